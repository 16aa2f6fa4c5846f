"""Saving and loading a run's checkpoints through DeepSpeed's own save/load (any ZeRO stage); the
folder layout is `cvtkit.checkpoint`'s.

DeepSpeed writes its own `latest` before its final barrier, so a kill at that moment would leave it
naming a partial checkpoint. Here DeepSpeed is told not to write it; rank 0 writes `COMPLETE` and
then replaces `latest` atomically only after every rank finished, and deletes old checkpoints only
once a newer one is complete. A checkpoint without `COMPLETE` never counts.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from cvtkit.atomic import write_text_atomic
from cvtkit.checkpoint import (COMPLETE, TAG_RE, ResumeError, complete_tags, latest_complete,
                               refuse_unsafe_pickles, saved_module_state, tag_for, torch_save_atomic)
from cvtkit.device import any_rank, barrier
from cvtkit.errors import CvtkitError

from .reshard import untie_step_counts

log = logging.getLogger(__name__)

# torch.save to a path reports a failed write (a full disk) as a RuntimeError with these words.
_WRITE_FAILURES = ("unexpected pos", "PytorchStreamWriter failed", "file write failed")


class SaveFailed(CvtkitError):
    """A checkpoint could not be written (a full disk, say); the previous one is intact."""
    exit_code = 1


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
        barrier()
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
        except RuntimeError as e:
            if not any(sign in str(e) for sign in _WRITE_FAILURES):
                raise
            free = shutil.disk_usage(self.ckpt_dir).free / 2**20
            failure = f"{str(e).splitlines()[0]} ({folder}; {free:.1f} MiB free there)"
        if any_rank(bool(failure)):
            if self.rank == 0:
                shutil.rmtree(folder, ignore_errors=True)
            previous = latest_complete(self.ckpt_dir)
            raise SaveFailed(f"saving checkpoint {folder} failed: {failure or 'on another rank'}; "
                             f"the previous checkpoint ({previous or 'none'}) is intact")
        if self.rank == 0:
            write_text_atomic(folder / COMPLETE, f"{step}\n")
            write_text_atomic(self.ckpt_dir / "latest", tag + "\n")
            self._prune(tag)
        barrier()
        return folder

    def _prune(self, newest: str) -> None:
        """Keep the newest `keep` complete checkpoints; drop partial ones older than `newest`."""
        keep = set(complete_tags(self.ckpt_dir)[-self.keep:]) | {newest}
        for path in self.ckpt_dir.iterdir():
            base = path.name.removesuffix(".partial").removesuffix("_universal")
            if TAG_RE.match(base) and base not in keep and base < newest:
                shutil.rmtree(path, ignore_errors=True)

    def load(self, engine, tag: str, universal: bool) -> tuple[dict | None, dict | None]:
        """Load `tag` into `engine` (model, optimizer, DeepSpeed state); returns this rank's trainer
        state (RNG, loader), None for a rank the checkpoint had no state for (more ranks than
        it was saved with), and the EMA state."""
        folder = self.ckpt_dir / tag
        refuse_unsafe_pickles(folder)
        load_tag = tag + "_universal" if universal else tag
        path, _ = engine.load_checkpoint(str(self.ckpt_dir), tag=load_tag, load_module_strict=True,
                                         load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise ResumeError(f"{self.ckpt_dir / load_tag}: DeepSpeed could not load this checkpoint")
        if universal:
            self._restore_buffers(engine.module, folder)
            untie_step_counts(engine.optimizer)
        own = folder / f"trainer_rank{self.rank:05d}.pt"
        rank_state = torch.load(own, map_location="cpu", weights_only=True) if own.is_file() else None
        ema_file = folder / "ema.pt"
        ema = torch.load(ema_file, map_location="cpu", weights_only=True) if ema_file.is_file() else None
        return rank_state, ema

    def rank_zero_state(self, tag: str) -> dict:
        return torch.load(self.ckpt_dir / tag / "trainer_rank00000.pt", map_location="cpu", weights_only=True)

    @staticmethod
    def _restore_buffers(module, folder: Path) -> None:
        """DeepSpeed's universal loading restores the parameters only (from `zero/`); without this
        the BatchNorm statistics would silently restart from their initial values. They come
        from the module state DeepSpeed saved with the original checkpoint."""
        states, saved = saved_module_state(folder)
        persistent = module.state_dict().keys()
        with torch.no_grad():
            for name, buffer in module.named_buffers():
                if name not in persistent:
                    continue
                if name not in saved:
                    raise ResumeError(f"{states}: has no {name}; cannot restore the model's buffers")
                buffer.copy_(saved[name])
