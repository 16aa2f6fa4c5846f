"""Submit pretraining or fine-tuning through submitit (its checkpoint-and-requeue mechanism):

    python slurm/submit.py --config configs/pretrain/cvt_w24_224_in22k.yaml --nodes 4 --gpus-per-node 8
    python slurm/submit.py --entry finetune --config configs/finetune/cvt_w24_384_ft1k.yaml \
        --nodes 2 --gpus-per-node 8 --partition gpu -- --pretrained runs/cvt_w24_224_in22k
    python slurm/submit.py --cluster local --config configs/pretrain/tiny_cpu.yaml --tasks-per-node 2 --wait

Arguments after `--` go to the entry point unchanged. Logs and submitit's files go to --folder.
"""
import sys

from cvtkit.train.submitit_job import submit_main

if __name__ == "__main__":
    sys.exit(submit_main())
