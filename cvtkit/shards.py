"""A shard folder's split metadata, read once: the splits and their shards, the class list.

Two layouts: cvtkit's own (`data_prep/make_shards.py`: `_info.json` with `num_classes` and the
class list) and timm's webdataset copies on the HF hub as they are (`_info.json` or `info.json`,
the class list from the dataset's name, `alt_label` splits: `cvtkit.hub_shards`).

    info = ShardInfo.read("/data/in22k-wds")      # a local folder or a URL prefix
    shards = info.split("train")                  # ShardSet: urls, lengths, classes, alt_label
    info.synsets                                  # class index -> synset, or None
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from cvtkit.errors import CvtkitError

from cvtkit.hub_shards import TIMM_INFO_FILE, alt_label_synsets, known, relabelled, timm_synsets

INFO_FILE = "_info.json"
# The image files a source folder (shard making) or an evaluation folder holds; PIL reads them all.
IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
INFO_FILES = (INFO_FILE, TIMM_INFO_FILE)  # read in this order, as timm reads them


class ShardFolderError(CvtkitError):
    """A shard folder that cannot be used: no `_info.json`, no such split, a listed shard absent."""


def class_list_sha256(synsets: list[str]) -> str:
    """The fingerprint of a class list (index order), in `_info.json` and in checkpoint metadata."""
    return hashlib.sha256("\n".join(synsets).encode()).hexdigest()


def class_names(synsets: list[str]) -> list[str]:
    """Human-readable names of synsets from timm's lists; a synset outside them keeps its id."""
    from timm.data import ImageNetInfo  # timm imports torch: kept out of prep's worker processes

    info = ImageNetInfo("imagenet-22k")
    names = []
    for s in synsets:
        try:
            names.append(info.label_name_to_description(s))
        except KeyError:
            names.append(s)
    return names


def class_records(synsets: list[str]) -> list[dict]:
    """The class list as `_info.json` and an export's metadata write it: index, synset, name."""
    return [{"index": i, "synset": s, "name": n} for i, (s, n) in enumerate(zip(synsets, class_names(synsets)))]


def has_info(folder: str | Path) -> bool:
    """Whether a local folder holds split metadata of either layout."""
    return any((Path(folder) / name).is_file() for name in INFO_FILES)


@dataclass(frozen=True)
class ShardSet:
    """The shards of one split as the metadata lists them (local paths or URLs), and its labels:
    `cls`, or with `alt_label` the `json` field of that name (timm's `train_12k`)."""
    urls: list[str]
    lengths: list[int]
    num_classes: int
    synsets: list[str] | None = None  # class index -> synset, where known
    alt_label: str | None = None
    split: str = ""

    @property
    def num_samples(self) -> int:
        return sum(self.lengths)

    @classmethod
    def from_info(cls, root: str, split: str) -> "ShardSet":
        return ShardInfo.read(root).split(split)

    def labelled(self, samples: Iterable[dict], on_damage: Callable[[str, BaseException], None]) -> Iterable[dict]:
        """The webdataset samples of this split with their label in `cls`: as they are, or, for an
        `alt_label` split, relabelled and filtered (`hub_shards.relabelled`)."""
        return samples if self.alt_label is None else relabelled(samples, self.alt_label, on_damage)


@dataclass(frozen=True)
class ShardInfo:
    root: str  # a local folder, or a URL prefix webdataset opens (`https://host/in22k`)
    info: dict
    file: str = INFO_FILE  # the one of INFO_FILES it was read from

    @property
    def where(self) -> str:
        return f"{self.root}/{self.file}"

    @property
    def is_local(self) -> bool:
        return "://" not in self.root

    @classmethod
    def read(cls, root: str) -> "ShardInfo":
        """Either layout; anything else is one line naming the folder and what is missing."""
        root = str(root).removeprefix("file://").rstrip("/")
        if "://" in root:
            name, text = _read_url(root)
        else:
            if not Path(root).is_dir():
                raise ShardFolderError(f"{root}: no such shard folder")
            name = next((n for n in INFO_FILES if (Path(root) / n).is_file()), None)
            if name is None:
                raise ShardFolderError(f"{root}: no {' or '.join(INFO_FILES)} "
                                       f"(make shards with data_prep/make_shards.py)")
            text = (Path(root) / name).read_bytes()
        try:
            info = json.loads(text)
        except ValueError as e:
            raise ShardFolderError(f"{root}/{name}: not JSON ({e})") from None
        if not isinstance(info, dict) or not isinstance(info.get("splits"), dict):
            raise ShardFolderError(f"{root}/{name}: no 'splits' (neither cvtkit's nor timm's shard layout)")
        found = cls(root, info, name)
        found.check_classes()
        return found

    def check_classes(self) -> None:
        """A layout whose class count is not known (neither listed nor following from the name)
        is one line, when the folder is read."""
        if "num_classes" not in self.info and self.synsets is None:
            raise ShardFolderError(f"{self.where}: no 'num_classes' or class list, and its name "
                                   f"{self.info.get('name')!r} is none of timm's ({known()})")

    @property
    def num_classes(self) -> int:
        return self.info["num_classes"] if "num_classes" in self.info else len(self.synsets)

    @property
    def synsets(self) -> list[str] | None:
        """The synsets of the class indices: the listed classes (cvtkit's layout), timm's list of
        the dataset's name (the hub's, which list none), or None."""
        classes = self.info.get("classes")
        if classes:
            return [c["synset"] if isinstance(c, dict) else c for c in classes]
        if "num_classes" in self.info:
            return None
        found = timm_synsets(self.info.get("name"))
        return None if found is None else list(found)

    def split(self, name: str) -> ShardSet:
        splits = self.info["splits"]
        if name not in splits:
            raise ShardFolderError(f"{self.where}: no split {name!r} (have: {', '.join(splits) or 'none'})")
        s = splits[name] if isinstance(splits[name], dict) else {}
        files, lengths = s.get("filenames"), s.get("shard_lengths")
        if not isinstance(files, list) or not isinstance(lengths, list) or len(files) != len(lengths):
            raise ShardFolderError(f"{self.where}: split {name!r} needs 'filenames' and 'shard_lengths' "
                                   f"lists of the same length")
        alt = s.get("alt_label") or None
        synsets, num_classes = self.synsets, self.num_classes
        if alt is not None:
            found = alt_label_synsets(alt)
            if found is None:
                raise ShardFolderError(f"{self.where}: split {name!r} takes its labels from {alt!r}, "
                                       f"whose class list is unknown (known: {known(alt_label=True)})")
            synsets, num_classes = list(found), len(found)
            # its shard lengths count the samples the alt label keeps: a shard with none is not read
            files, lengths = [f for f, n in zip(files, lengths) if n > 0], [n for n in lengths if n > 0]
        if not files:
            raise ShardFolderError(f"{self.where}: split {name!r} lists no shards")
        urls = [f"{self.root}/{f}" for f in files]
        if self.is_local:
            missing = [u for u in urls if not Path(u).is_file()]
            if missing:
                raise ShardFolderError(f"{missing[0]}: listed in {self.where} but absent"
                                       + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        return ShardSet(urls, list(lengths), num_classes, synsets, alt, name)


def _read_url(root: str) -> tuple[str, bytes]:
    """The first of INFO_FILES under a URL prefix that can be read: (its name, its bytes)."""
    import webdataset as wds
    errors = []
    for name in INFO_FILES:
        try:
            with wds.gopen(f"{root}/{name}") as f:
                return name, f.read()
        except (OSError, ValueError) as e:  # any transport error, named with the URL
            errors.append(f"{root}/{name}: cannot be read ({e})")
    raise ShardFolderError("; ".join(errors))


def folder_synsets(path: str) -> list[str] | None:
    """The synsets of the split metadata in `path`, or None where there is none (a `.beton`'s folder)."""
    try:
        return ShardInfo.read(path).synsets
    except ShardFolderError:
        return None
