#!/bin/bash
# The body shared by slurm/pretrain_w24.sh and slurm/finetune_w24_384.sh (not an sbatch script):
# one task per GPU through srun, master address from the node list, and the requeue after a
# checkpoint on preemption or time-out.
#
# In: REPO, ENTRY (pretrain/train.py or finetune/finetune.py), CONFIG (default recipe), and the
# job script's arguments (`--config FILE`, `--set key=value ...`, `--pretrained PATH`), added
# after CVTKIT_CONFIG / CVTKIT_SET from the environment.
set -uo pipefail
[ -f "$REPO/$ENTRY" ] || {
    echo "slurm: $REPO is not a cvtkit checkout (no $ENTRY): submit from the checkout or set CVTKIT_REPO" >&2
    exit 2
}
: "${SLURM_JOB_ID:?run this through sbatch}"
source "$REPO/slurm/env.sh"
PYTHON=${PYTHON:-$REPO/.venv/bin/python}

hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
MASTER_ADDR=${hosts%%$'\n'*}
export MASTER_ADDR MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
args=()
case " $* " in *" --config "*) ;; *) args+=(--config "${CVTKIT_CONFIG:-$CONFIG}") ;; esac
# shellcheck disable=SC2206 # CVTKIT_SET is a space-separated list of key=value
[ -n "${CVTKIT_SET:-}" ] && args+=(--set ${CVTKIT_SET})
args+=("$@")

echo "[$(date -Is)] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST:" \
     "$SLURM_NTASKS tasks, master $MASTER_ADDR:$MASTER_PORT, $ENTRY ${args[*]}"
# Every task gets the --signal of sbatch; each saves at the same step boundary and exits 75.
# No --kill-on-bad-exit: the first rank to exit 75 must not cut the others short. A crashed rank
# ends the others through their collective timeout (engine.dist_timeout_s) instead. --wait: once
# a task has ended, the others get CVTKIT_SRUN_WAIT_S (120 s; ranks that end together do so within
# seconds, a save included); a frozen rank, whose healthy peers exited 76 (the stall watchdog), is
# killed then instead of holding the job forever.
srun --export=ALL --wait="${CVTKIT_SRUN_WAIT_S:-120}" "$PYTHON" -u "$REPO/$ENTRY" "${args[@]}"
rc=$?
# Requeue or not (cvtkit/train/requeue.py): 75 (saved after a signal) always; 2 (bad input) and 0
# never; any other failure (a crash, 76 from the stall watchdog) when the run saved a newer
# checkpoint since the last end, else at most CVTKIT_RESTARTS_WITHOUT_PROGRESS (2) times in a row.
# Each decision is a line of the run folder's requeues.jsonl; the next start's line of
# starts.jsonl gives its reason.
if [ "$rc" -ne 0 ] && PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m cvtkit.train.requeue "$rc" "${args[@]}"; then
    echo "[$(date -Is)] exit $rc: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    echo "scontrol requeue failed; resubmit the same command to resume" >&2
fi
echo "[$(date -Is)] job $SLURM_JOB_ID ended with $rc"
exit "$rc"
