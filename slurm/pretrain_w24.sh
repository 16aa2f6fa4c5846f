#!/bin/bash
# CvT-W24 pretraining on ImageNet-22k (configs/pretrain/cvt_w24_224_in22k.yaml) across nodes with
# DeepSpeed ZeRO-2 and bf16. Submit from the checkout:
#
#   sbatch slurm/pretrain_w24.sh
#   sbatch --nodes=8 slurm/pretrain_w24.sh --set data.train=/data/in22k-wds data.val=/data/in22k-wds
#   sbatch slurm/pretrain_w24.sh --config configs/pretrain/cvt_13_224_in1k.yaml   # any recipe
#   CVTKIT_SET="optim.lr=1e-3" sbatch slurm/pretrain_w24.sh
#
# Every #SBATCH line can be overridden on the sbatch command line. USR1 arrives 300 s before the
# time limit (Slurm may send it up to 60 s early): every rank saves at the same step, the job
# requeues itself and resumes from the run folder; a preemption (SIGTERM) is handled the same way.
#SBATCH --job-name=cvt-w24-22k
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@300
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.log
# sbatch runs a copy of this script: the checkout is the submit directory (or CVTKIT_REPO).
REPO=${CVTKIT_REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}
REPO=$REPO ENTRY=pretrain/train.py CONFIG=configs/pretrain/cvt_w24_224_in22k.yaml exec bash "$REPO/slurm/train_job.sh" "$@"
