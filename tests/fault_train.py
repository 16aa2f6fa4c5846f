"""pretrain/train.py with faults injected from the environment, for the reliability tests. The
training code is the real one; only the moments chosen below are intercepted.

    CVTKIT_KILL_AT_SAVE=STEP:RANK:NAME   SIGKILL this process (rank RANK) when the save of step STEP
                                         is about to write the file whose name contains NAME
                                         (e.g. `optim_states`, written by DeepSpeed, or `COMPLETE`)
    CVTKIT_DUMP_LOADED=PATH              build the run as training would (resuming from the run
                                         folder), write the whole live model state (its dtypes)
                                         to PATH (rank 0, gathered under ZeRO-3) and exit
"""
import os
import signal
import sys
from pathlib import Path

import torch

from cvtkit.checkpoint import tag_for
from cvtkit.train import checkpointer
from cvtkit.train.cli import pretrain_main


def kill_at_save(spec: str) -> None:
    step, rank, name = spec.split(":")
    if os.environ.get("RANK", "0") != rank:
        return
    tag = tag_for(int(step))

    def check(target) -> None:
        path = str(target if isinstance(target, (str, os.PathLike)) else target.name)  # a path or a file
        if tag in path and name in Path(path).name:
            os.kill(os.getpid(), signal.SIGKILL)

    real_save, real_write = torch.save, checkpointer.write_text_atomic

    def save(obj, f, *args, **kwargs):
        check(f)
        return real_save(obj, f, *args, **kwargs)

    def write_text_atomic(path, text):
        check(path)
        return real_write(path, text)

    torch.save = save
    checkpointer.write_text_atomic = write_text_atomic


def dump_loaded(argv: list[str], out: str) -> int:
    import argparse

    import deepspeed

    from cvtkit.config_loader import add_config_args, load_config
    from cvtkit.train.run_config import RunConfig
    from cvtkit.train.trainer import Trainer

    parser = argparse.ArgumentParser()
    add_config_args(parser)
    args = parser.parse_args(argv)
    trainer = Trainer(load_config(RunConfig, args.config, args.overrides))
    trainer.setup()
    module = trainer.engine.module
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    if trainer.rank == 0:
        torch.save({"step": trainer.step, "state": state}, out)
    torch.distributed.barrier()
    return 0


if __name__ == "__main__":
    if os.environ.get("CVTKIT_KILL_AT_SAVE"):
        kill_at_save(os.environ["CVTKIT_KILL_AT_SAVE"])
    if os.environ.get("CVTKIT_DUMP_LOADED"):
        sys.exit(dump_loaded(sys.argv[1:], os.environ["CVTKIT_DUMP_LOADED"]))
    sys.exit(pretrain_main())
