"""The checkpoint folders of a run, and reading them back: shared by the training engine (which
writes them, `cvtkit.train.checkpointer`) and the model zoo (which reads their weights). The one
module that spells the run folder's file names, and decides which state goes in which file.

    <run>/config.yaml                        the resolved run config
    <run>/checkpoints/latest                 the tag of the newest *complete* checkpoint
    <run>/checkpoints/step00001000/          DeepSpeed's files (model, optimizer shards, zero_to_fp32.py)
        meta.json                            what the run was: model, classes, global batch, world size
        trainer_rank00000.pt ...             per rank: its RANK_STATES (RNG, loader position, counters)
        ema.pt                               SHARED_STATES: the EMA weights, when the run keeps one
        COMPLETE                             written last, once every rank has finished
    <run>/checkpoints/step00001000_universal/  the same, converted for another number of ranks

A tag folder counts only once it holds `COMPLETE`; `latest` is a hint that is checked against that.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import pickle
import re
import zipfile
from pathlib import Path

import torch

from cvtkit.atomic import atomic_open
from cvtkit.errors import CvtkitError

log = logging.getLogger(__name__)

TAG_RE = re.compile(r"^step(\d{8})$")
COMPLETE = "COMPLETE"
LATEST = "latest"
META_FILE = "meta.json"
RUN_CONFIG_FILE = "config.yaml"
UNIVERSAL_SUFFIX = "_universal"
PARTIAL_SUFFIX = ".partial"

# What a checkpoint holds besides DeepSpeed's own files (the model and optimizer, state "model"):
# each rank's own states, in one file per rank; and states gathered whole and written by rank 0.
MODEL_STATE = "model"
RANK_STATES = ("rng", "loader", "trainer")
# States that are the same on every rank, so a rank the checkpoint had no file for (more ranks
# than it was saved with) takes rank 0's; anything else of such a rank starts afresh.
SAME_ON_EVERY_RANK = ("loader", "trainer")
SHARED_STATES = {"ema": "ema.pt"}
MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")

# What DeepSpeed itself pickles into its checkpoint files besides tensors and plain containers
# (seen in ZeRO 0-3 with bf16, fp16 and fp32).
DEEPSPEED_GLOBALS = frozenset({
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
})


class ResumeError(CvtkitError):
    """A checkpoint that cannot be resumed or read as asked; the message is one line."""


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def rank_state_file(tag_dir: Path, rank: int) -> Path:
    return Path(tag_dir) / f"trainer_rank{rank:05d}.pt"


def shared_state_file(tag_dir: Path, name: str) -> Path:
    return Path(tag_dir) / SHARED_STATES[name]


def universal_folder(ckpt_dir: Path, tag: str) -> Path:
    """Where `tag` converted for another number of ranks lives (`cvtkit.train.reshard`)."""
    return Path(ckpt_dir) / (tag + UNIVERSAL_SUFFIX)


def tag_of(folder_name: str) -> str:
    """The tag a checkpoint folder belongs to: its own, or the one it was converted from."""
    return folder_name.removesuffix(PARTIAL_SUFFIX).removesuffix(UNIVERSAL_SUFFIX)


def run_config_file(tag_dir: Path) -> Path:
    """The run's resolved config beside a tag folder (`<run>/checkpoints/<tag>`)."""
    return Path(tag_dir).parent.parent / RUN_CONFIG_FILE


def torch_save_atomic(obj, path: Path) -> None:
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags of complete checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if TAG_RE.match(p.name) and (p / COMPLETE).is_file())


def has_tag_folders(ckpt_dir: Path) -> bool:
    """Whether `ckpt_dir` holds any checkpoint folder, complete or partial."""
    return ckpt_dir.is_dir() and any(TAG_RE.match(p.name.removesuffix(UNIVERSAL_SUFFIX)) for p in ckpt_dir.iterdir())


def latest_complete(ckpt_dir: Path) -> str | None:
    """The tag to resume from: the newest complete checkpoint (a crash between `COMPLETE` and
    `latest` leaves the pointer one behind, and a stale pointer is only worth a warning)."""
    tags = complete_tags(ckpt_dir)
    if not tags:
        return None
    pointer = ckpt_dir / LATEST
    named = pointer.read_text().strip() if pointer.is_file() else None
    if named is not None and named != tags[-1]:
        log.warning("%s names %s; resuming from the newest complete checkpoint %s", pointer, named, tags[-1])
    return tags[-1]


def read_meta(tag_dir: Path) -> dict:
    """A tag folder's `meta.json`; {} for a folder of other code, which has none."""
    path = Path(tag_dir) / META_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def refuse_unsafe_pickles(folder: Path) -> None:
    """DeepSpeed unpickles its checkpoint files with `weights_only=False`, which would run any code
    a planted file carries. Before anything loads them, every `.pt` file of `folder` is scanned
    (statically: nothing runs) and refused if it references any callable or class beyond tensors,
    plain containers and DeepSpeed's own few state classes."""
    for path in sorted(Path(folder).glob("*.pt")):
        try:
            found = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except (ValueError, RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
            raise ResumeError(f"{path}: refused: not a torch checkpoint file ({e})") from None
        unexpected = sorted(found - DEEPSPEED_GLOBALS)
        if unexpected:
            raise ResumeError(f"{path}: refused: it pickles {', '.join(unexpected)}, not among what DeepSpeed "
                              f"is known to save (cvtkit.checkpoint.DEEPSPEED_GLOBALS); nothing was "
                              f"loaded: if you wrote this file yourself with another DeepSpeed, add them there")


def is_tag_folder(path: Path) -> bool:
    """A folder DeepSpeed's `save_checkpoint` wrote (ours or anyone's)."""
    return any((path / name).is_file() for name in MODEL_STATES)


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
    pointer = ckpt_dir / LATEST
    named = ckpt_dir / pointer.read_text().strip() if pointer.is_file() else None
    if named is not None and not TAG_RE.match(named.name) and is_tag_folder(named):
        return named
    if run_folder or has_tag_folders(ckpt_dir):
        raise ResumeError(f"{ckpt_dir}: no complete checkpoint (none has a {COMPLETE} marker)")
    return None


def saved_module_state(tag_dir: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """The module state DeepSpeed saved beside the optimizer shards (buffers included), and its file."""
    states = next(tag_dir / n for n in MODEL_STATES if (tag_dir / n).is_file())
    return states, torch.load(states, map_location="cpu", weights_only=True)["module"]


def consolidated_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The whole fp32 model state of a DeepSpeed checkpoint of any ZeRO stage, on CPU.

    ZeRO 1-3: DeepSpeed's own `zero_to_fp32` gathers the fp32 master weights from every rank's
    optimizer shard (and the buffers from the model states). ZeRO 0 has no shards: the module
    state is whole in `mp_rank_00_model_states.pt`. Both unpickle DeepSpeed's files with
    `weights_only=False`, after `refuse_unsafe_pickles` has scanned them."""
    tag_dir = Path(tag_dir)
    refuse_unsafe_pickles(tag_dir)
    if any(tag_dir.glob("*zero_pp_rank_*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    else:
        state = torch.load(tag_dir / MODEL_STATES[0], map_location="cpu", weights_only=False)["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
