"""Checkpoints of a run folder, written through DeepSpeed's own save/load (any ZeRO stage).

    <run>/checkpoints/latest                 the tag of the newest *complete* checkpoint
    <run>/checkpoints/step00001000/          DeepSpeed's files (model, optimizer shards, zero_to_fp32.py)
        meta.json                            what the run was: model, classes, global batch, world size
        trainer_rank00000.pt ...             per rank: RNG states and loader position
        ema.pt                               the EMA weights, when the run keeps one
        COMPLETE                             written last, once every rank has finished

DeepSpeed writes its own `latest` before its final barrier, so a kill at that moment leaves it
naming a partial checkpoint (shared/notes/ecosystem.md 3.2). Here DeepSpeed is told not to write it;
rank 0 writes `COMPLETE` and then replaces `latest` atomically only after a barrier, and deletes old
checkpoints only once a newer one is complete. A checkpoint without `COMPLETE` never counts.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

TAG_RE = re.compile(r"^step(\d{8})$")
COMPLETE = "COMPLETE"


class ResumeError(RuntimeError):
    """A resume that cannot be done as asked; the message is one line."""


# What DeepSpeed itself pickles into its checkpoint files besides tensors and plain containers
# (seen in ZeRO 0-3 with bf16, fp16 and fp32).
DEEPSPEED_GLOBALS = frozenset({
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
})


def refuse_unsafe_pickles(folder: Path) -> None:
    """DeepSpeed unpickles its checkpoint files with `weights_only=False`, which would run any code
    a planted file carries. Before anything loads them, every `.pt` file of `folder` is scanned
    (statically: nothing runs) and refused if it references any callable or class beyond tensors,
    plain containers and DeepSpeed's own few state classes."""
    for path in sorted(Path(folder).glob("*.pt")):
        try:
            found = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception as e:  # noqa: BLE001 - not a torch.save file at all
            raise ResumeError(f"{path}: refused: not a torch checkpoint file ({e})") from None
        unexpected = sorted(found - DEEPSPEED_GLOBALS)
        if unexpected:
            raise ResumeError(f"{path}: refused: it pickles {', '.join(unexpected)}, not among what DeepSpeed "
                              f"is known to save (cvtkit.train.checkpoint.DEEPSPEED_GLOBALS); nothing was "
                              f"loaded: if you wrote this file yourself with another DeepSpeed, add them there")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def torch_save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags of complete checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if TAG_RE.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(tags)


def latest_complete(ckpt_dir: Path) -> str | None:
    """The tag to resume from: `latest` when it names a complete checkpoint, else the newest
    complete one (a crash between `COMPLETE` and `latest` leaves the pointer one behind)."""
    tags = complete_tags(ckpt_dir)
    pointer = ckpt_dir / "latest"
    named = pointer.read_text().strip() if pointer.is_file() else None
    if named in tags and named == (tags[-1] if tags else None):
        return named
    if tags:
        if named is not None and named != tags[-1]:
            log.warning("%s names %s; resuming from the newest complete checkpoint %s",
                        pointer, named, tags[-1])
        return tags[-1]
    return None


def read_meta(ckpt_dir: Path, tag: str) -> dict:
    return json.loads((ckpt_dir / tag / "meta.json").read_text())


@dataclass
class Checkpointer:
    """Saves and finds the checkpoints of one run folder; every method is called on every rank."""
    ckpt_dir: Path
    rank: int
    world_size: int
    keep: int = 3

    def save(self, engine, step: int, meta: dict, rank_state: dict, ema_state: dict | None) -> Path:
        """A collective save of step `step`; returns its folder once it is complete on every rank."""
        tag = tag_for(step)
        folder = self.ckpt_dir / tag
        if self.rank == 0:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            if folder.exists():  # a partial save of this very step from a killed run
                shutil.rmtree(folder)
        _barrier()
        failure = ""
        try:
            # universal_checkpoint_info lets ds_to_universal convert it for another world size.
            engine.save_checkpoint(str(self.ckpt_dir), tag=tag, save_latest=False,
                                   client_state={"universal_checkpoint_info": {}, "step": step})
            torch_save_atomic(rank_state, folder / f"trainer_rank{self.rank:05d}.pt")
            if self.rank == 0:
                if ema_state is not None:
                    torch_save_atomic(ema_state, folder / "ema.pt")
                write_text_atomic(folder / "meta.json", json.dumps(meta, indent=1))
        except OSError as e:
            failure = f"{e.strerror or e} ({getattr(e, 'filename', None) or folder})"
        except RuntimeError as e:  # torch.save to a path reports a full disk as a RuntimeError
            free = shutil.disk_usage(self.ckpt_dir).free / 2**20
            failure = f"{str(e).splitlines()[0]} ({folder}; {free:.1f} MiB free there)"
        if any_rank(bool(failure)):
            if self.rank == 0:
                shutil.rmtree(folder, ignore_errors=True)
            previous = latest_complete(self.ckpt_dir)
            raise OSError(f"saving checkpoint {folder} failed: {failure or 'on another rank'}; "
                          f"the previous checkpoint ({previous or 'none'}) is intact")
        if self.rank == 0:
            write_text_atomic(folder / COMPLETE, f"{step}\n")
            write_text_atomic(self.ckpt_dir / "latest", tag + "\n")
            self._prune(tag)
        _barrier()
        return folder

    def _prune(self, newest: str) -> None:
        """Keep the newest `keep` complete checkpoints; drop partial ones older than `newest`."""
        keep = set(complete_tags(self.ckpt_dir)[-self.keep:]) | {newest}
        for path in self.ckpt_dir.iterdir():
            base = path.name.removesuffix("_universal")
            if TAG_RE.match(base) and base not in keep and base < newest:
                shutil.rmtree(path, ignore_errors=True)

    def load(self, engine, tag: str, universal: bool) -> tuple[dict, dict | None]:
        """Load `tag` into `engine` (model, optimizer, DeepSpeed state); returns this rank's trainer
        state (RNG, loader) and the EMA state. After a world-size change, rank r < old world reads
        its own trainer state, the others rank 0's (their RNG and loader position then differ
        from an uninterrupted run; the loader logs that its position is approximate)."""
        folder = self.ckpt_dir / tag
        refuse_unsafe_pickles(folder)
        load_tag = tag + "_universal" if universal else tag
        path, client = engine.load_checkpoint(str(self.ckpt_dir), tag=load_tag, load_module_strict=True,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise ResumeError(f"{self.ckpt_dir / load_tag}: DeepSpeed could not load this checkpoint")
        if universal:
            self._restore_buffers(engine.module, folder)
        own = folder / f"trainer_rank{self.rank:05d}.pt"
        state_file = own if own.is_file() else folder / "trainer_rank00000.pt"
        rank_state = torch.load(state_file, map_location="cpu", weights_only=True)
        ema_file = folder / "ema.pt"
        ema = torch.load(ema_file, map_location="cpu", weights_only=True) if ema_file.is_file() else None
        return rank_state, ema

    @staticmethod
    def _restore_buffers(module, folder: Path) -> None:
        """DeepSpeed's universal loading restores the parameters only (from `zero/`); without this
        the BatchNorm statistics would silently restart from their initial values. They come
        from the module state DeepSpeed saved with the original checkpoint."""
        states = next(folder / n for n in _MODEL_STATES if (folder / n).is_file())
        saved = torch.load(states, map_location="cpu", weights_only=True)["module"]
        persistent = module.state_dict().keys()
        with torch.no_grad():
            for name, buffer in module.named_buffers():
                if name not in persistent:
                    continue
                if name not in saved:
                    raise ResumeError(f"{states}: has no {name}; cannot restore the model's buffers")
                buffer.copy_(saved[name])

    def make_universal(self, tag: str) -> None:
        """Convert `tag` with DeepSpeed's own ds_to_universal (rank 0), for a new world size."""
        target = self.ckpt_dir / f"{tag}_universal"
        refuse_unsafe_pickles(self.ckpt_dir / tag)
        if self.rank == 0 and not (target / COMPLETE).is_file():
            shutil.rmtree(target, ignore_errors=True)
            log.warning("checkpoint %s was written by another number of ranks: converting it with "
                        "deepspeed.checkpoint.ds_to_universal", tag)
            proc = subprocess.run(
                [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                 str(self.ckpt_dir / tag), "--output_folder", str(target), "--num_extract_workers", "1",
                 "--num_merge_workers", "1"], capture_output=True, text=True)
            if proc.returncode != 0:
                tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                raise ResumeError(f"{self.ckpt_dir / tag}: conversion to a universal checkpoint failed: {tail}")
            write_text_atomic(target / COMPLETE, "universal\n")
        _barrier()


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool) -> bool:
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    dist.all_reduce(t)
    return bool(t.item() > 0)


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------- reading weights back

_MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def is_tag_folder(path: Path) -> bool:
    """A folder DeepSpeed's `save_checkpoint` wrote (ours or anyone's)."""
    return any((path / name).is_file() for name in _MODEL_STATES)


def find_tag_folder(path: str | Path) -> Path | None:
    """A run folder, its `checkpoints/` folder or a tag folder -> the tag folder to read: the
    newest complete one (`latest_complete`), or what DeepSpeed's own `latest` names in a folder
    written by other code. None when `path` is none of these; `ResumeError` when it is a run
    folder without a complete checkpoint."""
    path = Path(path)
    if not path.is_dir():
        return None
    if is_tag_folder(path):
        return path
    run_folder = (path / "checkpoints").is_dir()
    ckpt_dir = path / "checkpoints" if run_folder else path
    tag = latest_complete(ckpt_dir)
    if tag is not None:
        return ckpt_dir / tag
    pointer = ckpt_dir / "latest"
    named = ckpt_dir / pointer.read_text().strip() if pointer.is_file() else None
    if named is not None and not TAG_RE.match(named.name) and is_tag_folder(named):
        return named
    if run_folder or any(TAG_RE.match(p.name) for p in ckpt_dir.iterdir()):
        raise ResumeError(f"{ckpt_dir}: no complete checkpoint (none has a {COMPLETE} marker)")
    return None


def consolidated_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The whole fp32 model state of a DeepSpeed checkpoint of any ZeRO stage, on CPU.

    ZeRO 1-3: DeepSpeed's own `zero_to_fp32` gathers the fp32 master weights from every rank's
    optimizer shard (and the buffers from the model states). ZeRO 0 has no shards: the module
    state is whole in `mp_rank_00_model_states.pt`. Both unpickle DeepSpeed's files with
    `weights_only=False`, after `refuse_unsafe_pickles` has scanned them."""
    import contextlib
    import io

    tag_dir = Path(tag_dir)
    refuse_unsafe_pickles(tag_dir)
    if any(tag_dir.glob("*zero_pp_rank_*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    else:
        state = torch.load(tag_dir / _MODEL_STATES[0], map_location="cpu", weights_only=False)["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
