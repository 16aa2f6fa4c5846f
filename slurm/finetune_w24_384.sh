#!/bin/bash
# CvT-W24 fine-tuning 22k -> 1k at 384 (configs/finetune/cvt_w24_384_ft1k.yaml). Submit from the
# checkout, naming the pretraining run (folder, checkpoint or export):
#
#   sbatch slurm/finetune_w24_384.sh --pretrained runs/cvt_w24_224_in22k
#   sbatch --nodes=4 slurm/finetune_w24_384.sh --pretrained runs/cvt_w24_224_in22k --set data.train=...
#
# Preemption and time-out behave as in slurm/pretrain_w24.sh: save, requeue, resume.
#SBATCH --job-name=cvt-w24-384-ft1k
#SBATCH --nodes=2
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
REPO=$REPO ENTRY=finetune/finetune.py CONFIG=configs/finetune/cvt_w24_384_ft1k.yaml exec bash "$REPO/slurm/train_job.sh" "$@"
