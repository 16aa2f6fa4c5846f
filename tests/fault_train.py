"""pretrain/train.py with faults injected from the environment, for the reliability tests. The
training code is the real one; only the moments chosen below are intercepted.

    CVTKIT_KILL_AT_SAVE=STEP:RANK:NAME   SIGKILL this process (rank RANK) when the save of step STEP
                                         is about to write the file whose name contains NAME
                                         (e.g. `optim_states`, written by DeepSpeed, or `COMPLETE`)
    CVTKIT_KILL_AT_STEP=STEP             every rank SIGKILLs itself once the update of step STEP is
                                         done and agreed (before it is logged or saved)
    CVTKIT_KILL_RANK_AT_STEP=STEP:RANK   rank RANK alone SIGKILLs itself once its step STEP is done
    CVTKIT_SIGNAL_AT_STEP=STEP:RANK:SIG  rank RANK alone sends itself signal SIG (TERM, USR1, USR2)
                                         once the update of step STEP is done and agreed
    CVTKIT_SIGNAL_AT=STEP                each rank sends itself SIGUSR1 (Slurm's warning before the
                                         time limit) once its step STEP is done
    CVTKIT_NONFINITE_AT=STEPS            rank 0's loss is multiplied by NaN in the optimizer steps
                                         STEPS (comma-separated, the first step is 1): their
                                         gradients are not finite, on every rank once reduced
    CVTKIT_DUMP_LOADED=PATH              build the run as training would (resuming from the run
                                         folder), write the whole live model state (its dtypes)
                                         and every parameter's fp32 master (DeepSpeed's accessor)
                                         to PATH (rank 0, gathered under ZeRO-3), and each rank's
                                         next random draws (torch, numpy, python) to PATH.rankR,
                                         and exit
    CVTKIT_DUMP_OPTIMIZER=PATH           each rank writes `optimizer_view` to PATH.saved.STEP.rankR
                                         after every save, and to PATH.restored.STEP.rankR once a
                                         resumed run is set up (before its first step)
    CVTKIT_PLANT_NAN=STEP                make rank 0's first fp32 master element NaN just before
                                         the save of step STEP (as a diverging update would)
    CVTKIT_DUMP_BUFFERS=PATH             after training, each rank writes its module's buffers to
                                         PATH.rankR
    CVTKIT_DETERMINISTIC=1               deterministic algorithms (torch's, cuBLAS's workspace), no
                                         cuDNN autotuning: reruns give the same numbers
    CVTKIT_COUNT_HOST_READS=PATH         count the device reads (`aten._local_scalar_dense`: `.item()`,
                                         `float(t)`, `if t:`) between the end of one log step and
                                         the read of the ranks' agreement at the next, by whose code
                                         made them (cvtkit's own, DeepSpeed's, torch's DataLoader
                                         on its own CPU tensors, other); each rank
                                         writes its windows to PATH.rankR as JSON
    CVTKIT_SLOW_SAVE_AND_VAL=SECONDS     a slow disk and a slow validation set: each state file the
                                         checkpointer writes, and each validation batch, takes
                                         SECONDS longer (a planted fault, not a wait)
    CVTKIT_SPIKE_AT_STEP=STEP            the loss of optimizer step STEP, the first time the run
                                         takes it, scaled by 1e4 (its gradients too): a loss spike
    CVTKIT_SKIP_BATCHES=EPOCH:A:B        the loader skips batches [A, B) of epoch EPOCH (A > 0):
                                         a run told from the start to skip a spike's window

`FaultTrainJob` is submitit's job (cvtkit.train.submitit_job.TrainJob) with the same faults.
"""
import json
import os
import random
import signal
import sys
from pathlib import Path

import numpy as np
import torch

from cvtkit.checkpoint import tag_for
from cvtkit.train import checkpointer
from cvtkit.train.cli import pretrain_main
from cvtkit.train.submitit_job import TrainJob


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


def at_step(step: int, action) -> None:
    """Run `action(trainer)` on every rank once the update of `step` is done and agreed."""
    from cvtkit.train.trainer import Trainer
    real_step = Trainer._train_step

    def _train_step(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        if self.step == step:
            action(self)
        return result
    Trainer._train_step = _train_step


def kill_at_step(step: int) -> None:
    at_step(step, lambda trainer: os.kill(os.getpid(), signal.SIGKILL))


def signal_at_step(spec: str) -> None:
    step, rank, name = spec.split(":")
    sig = getattr(signal, f"SIG{name}")
    at_step(int(step), lambda trainer: os.kill(os.getpid(), sig) if trainer.rank == int(rank) else None)


def kill_rank_at_step(spec: str) -> None:
    step, rank = spec.split(":")
    at_step(int(step), lambda trainer: os.kill(os.getpid(), signal.SIGKILL) if trainer.rank == int(rank) else None)


def nonfinite_at(steps: set[int]) -> None:
    from cvtkit.train import trainer
    real_step, real_loss = trainer.Trainer._train_step, trainer.classification_loss

    def _train_step(self, *args, **kwargs):
        if self.step + 1 in steps and self.rank == 0:
            trainer.classification_loss = lambda *a: real_loss(*a) * float("nan")
        try:
            return real_step(self, *args, **kwargs)
        finally:
            trainer.classification_loss = real_loss
    trainer.Trainer._train_step = _train_step


def fp32_masters(engine) -> dict:
    """Every parameter's whole fp32 master, read through DeepSpeed's accessor (a collective); under
    ZeRO-0 (fp32) the parameter is its own master."""
    from deepspeed.utils import safe_get_full_fp32_param
    masters = {}
    for name, p in engine.module.named_parameters():
        master = safe_get_full_fp32_param(p)
        masters[name] = (p if master is None else master).detach().cpu().clone()
    return masters


def optimizer_view(engine) -> dict:
    """What the optimizer holds, read through DeepSpeed's own accessors (collectives: every rank
    calls it): every parameter's whole fp32 master and both Adam moments; and this rank's step
    counts (of the torch optimizer over its partition) and learning rates."""
    from deepspeed.utils import safe_get_full_optimizer_state
    optimizer = engine.optimizer
    if getattr(optimizer, "_hp_optimizer_states_linked", False):
        # DeepSpeed 0.19's ZeRO 1-2 link each parameter to its slice of the Adam state after the
        # first group's first update, when the other groups have no state yet, and never again:
        # safe_get_full_optimizer_state then fails ("exp_avg not found") for the second group
        # (biases, norms). The states themselves are whole; link them again to read them.
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()
    view = {"fp32": fp32_masters(engine)}
    for key in ("exp_avg", "exp_avg_sq"):
        view[key] = {name: safe_get_full_optimizer_state(p, key).detach().cpu().clone()
                     for name, p in engine.module.named_parameters()}
    view["steps"] = sorted({float(state["step"]) for state in optimizer.optimizer.state.values() if "step" in state})
    view["lr"] = [group["lr"] for group in optimizer.param_groups]
    return view


def dump_optimizer(out: str) -> None:
    from cvtkit.train.trainer import Trainer
    real_setup, real_save = Trainer.setup, Trainer._save

    def setup(self):
        real_setup(self)
        if self.step > 0:
            torch.save(optimizer_view(self.engine), f"{out}.restored.{self.step}.rank{self.rank}")

    def save(self):
        real_save(self)
        torch.save(optimizer_view(self.engine), f"{out}.saved.{self.step}.rank{self.rank}")
    Trainer.setup, Trainer._save = setup, save


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
    masters = fp32_masters(trainer.engine)
    if trainer.rank == 0:
        torch.save({"step": trainer.step, "state": state, "masters": masters}, out)
    draws = {"torch": torch.rand(16), "numpy": torch.from_numpy(np.random.rand(16)),
             "python": torch.tensor([random.random() for _ in range(16)])}
    torch.save(draws, f"{out}.rank{trainer.rank}")
    torch.distributed.barrier()
    return 0


def plant_nan(step: int) -> None:
    from cvtkit.train.state import master_fragments
    from cvtkit.train.trainer import Trainer
    real_save = Trainer._save

    def save(self):
        if self.step == step and self.rank == 0:
            fragment = next(f for f in master_fragments(self.engine.module).values() if f is not None)
            with torch.no_grad():
                fragment.values.view(-1)[0] = float("nan")
        return real_save(self)
    Trainer._save = save


def dump_buffers(out: str) -> None:
    from cvtkit.train.trainer import Trainer
    real_train = Trainer.train

    def train(self, signals):
        code = real_train(self, signals)
        torch.save({k: v.detach().clone() for k, v in self.engine.module.named_buffers()}, f"{out}.rank{self.rank}")
        return code
    Trainer.train = train


def slow_save_and_val(seconds: float) -> None:
    import time

    from cvtkit.data.config import RunData
    real_save, real_val_loader = checkpointer.torch_save_atomic, RunData.val_loader

    def torch_save_atomic(obj, path):
        time.sleep(seconds)
        return real_save(obj, path)

    def val_loader(self, *args, **kwargs):
        for batch in real_val_loader(self, *args, **kwargs):
            time.sleep(seconds)
            yield batch

    checkpointer.torch_save_atomic = torch_save_atomic
    RunData.val_loader = val_loader


def spike_at_step(step: int) -> None:
    from cvtkit.train import trainer as trainer_module
    real_step, real_loss = trainer_module.Trainer._train_step, trainer_module.classification_loss
    state = {"now": False, "done": False}

    def train_step(self, *args, **kwargs):
        state["now"] = self.step + 1 == step and not state["done"]
        try:
            return real_step(self, *args, **kwargs)
        finally:
            state["done"] = state["done"] or state["now"]
            state["now"] = False

    def loss(*args, **kwargs):
        value = real_loss(*args, **kwargs)
        return value * 1e4 if state["now"] else value

    trainer_module.Trainer._train_step, trainer_module.classification_loss = train_step, loss


def skip_batches(spec: str) -> None:
    from cvtkit.train.trainer import Trainer
    epoch, first, end = (int(v) for v in spec.split(":"))

    def batches(self):
        while True:
            for batch in self.loader:
                yield batch
                if (self.loader.epoch, self.loader.batches_done) == (epoch, first):
                    accum = getattr(self.loader, "accum", 1)  # the webdataset loader counts global steps
                    self.loader.load_state_dict({**self.loader.state_dict(), "batches_done": end,
                                                 "steps_done": end // accum, "partial_batches": end % accum})
                    break
    Trainer._batches = batches


def deterministic() -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def _reader(cvtkit_dir: str) -> tuple[str, str]:
    """Whose code asked for a read: the innermost frame in cvtkit or in DeepSpeed (frames of
    torch, timm and the like count for whoever called them), or "host data" inside torch's
    DataLoader, which reads only CPU tensors of its own (the seed it draws at each epoch's start)."""
    frame = sys._getframe(2)
    data_loader = f"{os.sep}torch{os.sep}utils{os.sep}data{os.sep}"
    while frame is not None:
        name = frame.f_code.co_filename
        if data_loader in name:
            return "host data", f"{Path(name).name}:{frame.f_lineno} ({frame.f_code.co_name})"
        if name.startswith(cvtkit_dir) or f"{os.sep}deepspeed{os.sep}" in name:
            who = "cvtkit" if name.startswith(cvtkit_dir) else "deepspeed"
            return who, f"{Path(name).name}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return "other", "?"


def count_host_reads(out: str) -> None:
    from torch.utils._python_dispatch import TorchDispatchMode

    import cvtkit
    from cvtkit.train.agreement import StepAgreement
    from cvtkit.train.trainer import Trainer
    cvtkit_dir = str(Path(cvtkit.__file__).resolve().parent)
    windows, state = [], {"window": None, "trainer": None}
    scalar = torch.ops.aten._local_scalar_dense.default

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            window = state["window"]
            if window is not None:
                window["ops"] += 1
                if func is scalar:
                    who, where = _reader(cvtkit_dir)
                    window[who] += 1
                    window["where"][where] = window["where"].get(where, 0) + 1
            return func(*args, **(kwargs or {}))

    real_log, real_read, real_train = Trainer._log_train, StepAgreement.read, Trainer.train

    def log_train(self, *args):
        real_log(self, *args)
        state["trainer"] = self
        state["window"] = {"after_step": self.step, "cvtkit": 0, "deepspeed": 0, "host data": 0, "other": 0,
                           "ops": 0, "where": {}}

    def read(self, new_window):
        if state["window"] is not None:
            windows.append({**state["window"], "read_at_step": state["trainer"].step})
            state["window"] = None
        return real_read(self, new_window)

    def train(self, signals):
        try:
            with Count():
                return real_train(self, signals)
        finally:
            Path(f"{out}.rank{self.rank}").write_text(json.dumps(windows, indent=1))

    Trainer._log_train, StepAgreement.read, Trainer.train = log_train, read, train


def install_faults() -> None:
    """The faults and dumps the environment asks for (the table above; CVTKIT_DUMP_LOADED is a
    run of its own)."""
    if os.environ.get("CVTKIT_DETERMINISTIC"):
        deterministic()
    if os.environ.get("CVTKIT_COUNT_HOST_READS"):
        count_host_reads(os.environ["CVTKIT_COUNT_HOST_READS"])
    if os.environ.get("CVTKIT_KILL_AT_SAVE"):
        kill_at_save(os.environ["CVTKIT_KILL_AT_SAVE"])
    if os.environ.get("CVTKIT_KILL_AT_STEP"):
        kill_at_step(int(os.environ["CVTKIT_KILL_AT_STEP"]))
    if os.environ.get("CVTKIT_KILL_RANK_AT_STEP"):
        kill_rank_at_step(os.environ["CVTKIT_KILL_RANK_AT_STEP"])
    if os.environ.get("CVTKIT_SIGNAL_AT_STEP"):
        signal_at_step(os.environ["CVTKIT_SIGNAL_AT_STEP"])
    if os.environ.get("CVTKIT_SIGNAL_AT"):
        at_step(int(os.environ["CVTKIT_SIGNAL_AT"]), lambda trainer: os.kill(os.getpid(), signal.SIGUSR1))
    if os.environ.get("CVTKIT_NONFINITE_AT"):
        nonfinite_at({int(s) for s in os.environ["CVTKIT_NONFINITE_AT"].split(",")})
    if os.environ.get("CVTKIT_DUMP_OPTIMIZER"):
        dump_optimizer(os.environ["CVTKIT_DUMP_OPTIMIZER"])
    if os.environ.get("CVTKIT_PLANT_NAN"):
        plant_nan(int(os.environ["CVTKIT_PLANT_NAN"]))
    if os.environ.get("CVTKIT_SLOW_SAVE_AND_VAL"):
        slow_save_and_val(float(os.environ["CVTKIT_SLOW_SAVE_AND_VAL"]))
    if os.environ.get("CVTKIT_SPIKE_AT_STEP"):
        spike_at_step(int(os.environ["CVTKIT_SPIKE_AT_STEP"]))
    if os.environ.get("CVTKIT_SKIP_BATCHES"):
        skip_batches(os.environ["CVTKIT_SKIP_BATCHES"])
    if os.environ.get("CVTKIT_DUMP_BUFFERS"):
        dump_buffers(os.environ["CVTKIT_DUMP_BUFFERS"])


class FaultTrainJob(TrainJob):
    """submitit's job with the faults of the environment in the run it was submitted for; its
    requeue (`TrainJob.checkpoint`) resubmits the plain TrainJob, which runs without them."""

    def __call__(self, entry: str, argv: list[str]) -> int:
        install_faults()
        return super().__call__(entry, argv)


if __name__ == "__main__":
    install_faults()
    if os.environ.get("CVTKIT_DUMP_LOADED"):
        sys.exit(dump_loaded(sys.argv[1:], os.environ["CVTKIT_DUMP_LOADED"]))
    sys.exit(pretrain_main())
