"""The training entry points: arguments, logging, one-line errors, exit codes.

    cvtkit-pretrain --config configs/pretrain/<recipe>.yaml [--set key=value ...]
    cvtkit-finetune --config configs/finetune/<recipe>.yaml --pretrained PATH [--set ...]

(`python pretrain/train.py` and `python finetune/finetune.py` are the same.) Exit codes: 0 done,
75 stopped by a signal after saving (the launcher requeues), 76 the stall watchdog ended a rank
that made no progress for guard.stall_timeout_s (requeued too; `watchdog.py`), 2 bad input, 1 the
run failed on its data or numbers. A user's mistake (`CvtkitError`) is one line; anything else is a bug and keeps
its traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from cvtkit.config_loader import add_config_args, load_config
from cvtkit.errors import CvtkitError

from .engine import close_distributed
from .run_config import RunConfig
from .trainer import Trainer


def quiet_libraries() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def run_training(argv: list[str] | None, description: str, finetune: bool = False) -> int:
    """Parse `--config/--set` (and fine-tuning's `--pretrained PATH`, which sets `init.pretrained`),
    validate, train; returns the exit code."""
    parser = argparse.ArgumentParser(description=description)
    add_config_args(parser)
    # The deepspeed launcher passes --local_rank; the rank comes from the environment (cvtkit.dist).
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    if finetune:
        parser.add_argument("--pretrained", metavar="PATH",
                            help="weights to start from (init.pretrained): a pretraining run folder or "
                                 "checkpoint (any ZeRO stage), an export, an official CvT/CeiT or "
                                 "HuggingFace checkpoint")
    args = parser.parse_args(argv)
    quiet_libraries()
    try:
        cfg = load_config(RunConfig, args.config, args.overrides)
        if getattr(args, "pretrained", None):
            cfg.init.pretrained = args.pretrained
        exit_code = Trainer(cfg, require_pretrained=finetune).fit()
        close_distributed()
        return exit_code
    except CvtkitError as e:
        print(f"error: {e.one_line()}", file=sys.stderr, flush=True)
        return e.exit_code


def pretrain_main(argv: list[str] | None = None) -> int:
    """Pretrain a model from shards; resumes from the run folder's latest checkpoint."""
    return run_training(argv, description=pretrain_main.__doc__)


def finetune_main(argv: list[str] | None = None) -> int:
    """Fine-tune pretrained weights (`--pretrained`); the 22k head becomes the data's by synset."""
    return run_training(argv, description=finetune_main.__doc__, finetune=True)
