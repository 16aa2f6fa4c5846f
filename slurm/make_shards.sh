#!/bin/bash
# ImageNet into webdataset shards as a Slurm array: each task writes a disjoint slice of the
# shards (every Nth), and the last task to finish writes _info.json. The tasks share one listing
# of the source in OUT/_index/: each lists a disjoint part of it (the others wait for, or take
# over, the parts of a task that is late or dead), so the source's headers are read once per job.
#
#   sbatch slurm/make_shards.sh --source /data/fall11_whole.tar --out /data/in22k-wds \
#       --prefix imagenet22k --holdout 50
#   sbatch --array=0-63 --cpus-per-task=32 slurm/make_shards.sh --source ... --out ...
#
# A task that dies (preempted, node lost) leaves its finished shards and index parts in place:
# resubmit the same command, or run `python data_prep/make_shards.py` with the same options, to
# finish the rest. Memory: the listing costs about 60 bytes per image at its peak (under 1 GiB for
# fall11's 14.2M images, see BENCHMARKS.md), plus what --cpus-per-task workers hold.
#SBATCH --job-name=make-shards
#SBATCH --array=0-15
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --mem=32G
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=make_shards-%A_%a.log
set -euo pipefail
# sbatch runs a copy of this script: find the checkout from the submit directory.
REPO=${CVTKIT_REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}
[ -f "$REPO/data_prep/make_shards.py" ] || {
    echo "make_shards.sh: $REPO is not a cvtkit checkout: submit from the checkout or set CVTKIT_REPO" >&2
    exit 2
}
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
: "${SLURM_ARRAY_TASK_ID:?run this through sbatch (it needs a Slurm array)}"
exec "$PYTHON" "$REPO/data_prep/make_shards.py" \
    --workers "${SLURM_CPUS_PER_TASK:-4}" \
    --task-index "$((SLURM_ARRAY_TASK_ID - ${SLURM_ARRAY_TASK_MIN:-0}))" \
    --num-tasks "${SLURM_ARRAY_TASK_COUNT:-1}" \
    --quiet "$@"
