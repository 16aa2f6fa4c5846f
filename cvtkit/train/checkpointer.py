"""Saving and loading a run's checkpoints through DeepSpeed's own save/load (any ZeRO stage); the
folder layout, and which state goes in which file, are `cvtkit.checkpoint`'s.

Everything that survives a restart is handed over as `states={name: obj}`: the DeepSpeed engine
under `"model"`, and objects with `state_dict()` / `load_state_dict()` (the EMA, the loader, the
RNG, the trainer's counters). Adding a piece of state is one more entry, nothing else.

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
from typing import Callable

import torch

from cvtkit.atomic import write_text_atomic
from cvtkit.checkpoint import (COMPLETE, LATEST, META_FILE, MODEL_STATE, RANK_STATES, SAME_ON_EVERY_RANK,
                               SHARED_STATES, TAG_RE, ResumeError, complete_tags, latest_complete,
                               rank_state_file, refuse_unsafe_pickles, saved_module_state,
                               shared_state_file, tag_for, tag_of, torch_save_atomic, universal_folder)
from cvtkit.device import any_rank, barrier
from cvtkit.errors import CvtkitError

from .state import persistent_buffers
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
    # Called between the phases of a save (the trainer's stall watchdog): a save of many slow
    # files is progress, one that hangs in a phase is not.
    progress: Callable[[str], None] | None = None

    def _phase(self, what: str) -> None:
        if self.progress is not None:
            self.progress(what)

    def save(self, step: int, states: dict, meta: dict) -> Path:
        """A collective save of step `step`: `states` as the module docstring says, `meta` the
        JSON description of the run (`meta.json`); returns the folder once it is complete on
        every rank."""
        _check_names(states)
        # Gathered states are collectives: every rank takes part, rank 0 writes.
        shared = {name: states[name].state_dict() for name in SHARED_STATES if states.get(name) is not None}
        tag = tag_for(step)
        folder = self.ckpt_dir / tag
        self._phase(f"the start of the save of {tag}")
        if self.rank == 0:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            if folder.exists():  # a partial save of this very step from a killed run
                shutil.rmtree(folder)
        barrier()
        failure = ""
        try:
            # universal_checkpoint_info lets ds_to_universal convert it for another world size.
            states[MODEL_STATE].save_checkpoint(str(self.ckpt_dir), tag=tag, save_latest=False,
                                                client_state={"universal_checkpoint_info": {}, "step": step})
            self._phase(f"DeepSpeed's save of {tag}")
            own = {name: states[name].state_dict() for name in RANK_STATES if name in states}
            torch_save_atomic(own, rank_state_file(folder, self.rank))
            self._phase(f"this rank's states of {tag}")
            if self.rank == 0:
                for name, state in shared.items():
                    torch_save_atomic(state, shared_state_file(folder, name))
                    self._phase(f"the {name} state of {tag}")
                write_text_atomic(folder / META_FILE, json.dumps(meta, indent=1))
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
            write_text_atomic(self.ckpt_dir / LATEST, tag + "\n")
            self._prune(tag)
        barrier()
        self._phase(f"the save of {tag}")
        return folder

    def _prune(self, newest: str) -> None:
        """Keep the newest `keep` complete checkpoints; drop partial ones older than `newest`."""
        keep = set(complete_tags(self.ckpt_dir)[-self.keep:]) | {newest}
        for path in self.ckpt_dir.iterdir():
            base = tag_of(path.name)
            if TAG_RE.match(base) and base not in keep and base < newest:
                shutil.rmtree(path, ignore_errors=True)

    def load(self, tag: str, states: dict, universal: bool) -> set[str]:
        """Load `tag` into `states` (the engine's model, optimizer and DeepSpeed state included);
        returns the names of the states the checkpoint holds nothing for on this rank: a rank
        beyond those it was saved with (it takes rank 0's `SAME_ON_EVERY_RANK` states), or an
        EMA the run did not keep."""
        _check_names(states)
        folder = self.ckpt_dir / tag
        refuse_unsafe_pickles(folder)
        load_tag = universal_folder(self.ckpt_dir, tag).name if universal else tag
        engine = states[MODEL_STATE]
        path, _ = engine.load_checkpoint(str(self.ckpt_dir), tag=load_tag, load_module_strict=True,
                                         load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise ResumeError(f"{self.ckpt_dir / load_tag}: DeepSpeed could not load this checkpoint")
        if universal:
            self._restore_buffers(engine.module, folder)
            untie_step_counts(engine.optimizer)
        missing = set()
        own = rank_state_file(folder, self.rank)
        saved = _load(own) if own.is_file() else {}
        if not saved:
            first = _load(rank_state_file(folder, 0))
            saved = {name: first[name] for name in SAME_ON_EVERY_RANK if name in first}
        for name in RANK_STATES:
            if name not in states:
                continue
            if name in saved:
                states[name].load_state_dict(saved[name])
            else:
                missing.add(name)
        for name in SHARED_STATES:
            file = shared_state_file(folder, name)
            if states.get(name) is None:
                continue
            if file.is_file():
                states[name].load_state_dict(_load(file))
            else:
                missing.add(name)
        return missing

    @staticmethod
    def _restore_buffers(module, folder: Path) -> None:
        """DeepSpeed's universal loading restores the parameters only (from `zero/`); without this
        the BatchNorm statistics would silently restart from their initial values. They come
        from the module state DeepSpeed saved with the original checkpoint."""
        states, saved = saved_module_state(folder)
        with torch.no_grad():
            for name, buffer in persistent_buffers(module):
                if name not in saved:
                    raise ResumeError(f"{states}: has no {name}; cannot restore the model's buffers")
                buffer.copy_(saved[name])


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _check_names(states: dict) -> None:
    unknown = set(states) - {MODEL_STATE, *RANK_STATES, *SHARED_STATES}
    if unknown or MODEL_STATE not in states:  # a bug in the caller: cvtkit.checkpoint decides the names
        raise ValueError(f"checkpoint states: expected {MODEL_STATE!r} and any of "
                         f"{[*RANK_STATES, *SHARED_STATES]}, got {sorted(states)}")
