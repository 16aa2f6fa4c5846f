"""What the training entry points share: arguments, logging, one-line errors, exit codes."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

from cvtkit.config import ConfigError, add_config_args, load_config
from cvtkit.data.wds_loader import DamagedData

from .checkpoint import ResumeError
from .config import RunConfig
from .trainer import NonFiniteLoss, Trainer

EXIT_USAGE = 2


def quiet_libraries() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def run_training(argv: list[str] | None, description: str,
                 extra_args: Callable[[argparse.ArgumentParser], None] | None = None,
                 adjust: Callable[[RunConfig, argparse.Namespace], Callable | None] | None = None) -> int:
    """Parse `--config/--set` (plus `extra_args`), validate, train. Returns the exit code:
    0 done, 75 stopped by a signal after saving (requeue), 2 bad input, 1 training failed."""
    parser = argparse.ArgumentParser(description=description)
    add_config_args(parser)
    # The deepspeed launcher passes --local_rank; the rank comes from the environment (cvtkit.dist).
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    if extra_args is not None:
        extra_args(parser)
    args = parser.parse_args(argv)
    quiet_libraries()
    try:
        cfg = load_config(RunConfig, args.config, args.overrides)
        prepare = adjust(cfg, args) if adjust is not None else None
        return Trainer(cfg, prepare_model=prepare).fit()
    except (ConfigError, ResumeError, FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except (NonFiniteLoss, OSError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except DamagedData as e:
        # From a loader worker, DataLoader re-raises it with the worker's traceback in the message;
        # its last line is the original one.
        print(f"error: {str(e).strip().splitlines()[-1].split('DamagedData: ')[-1]}", file=sys.stderr, flush=True)
        return 1
