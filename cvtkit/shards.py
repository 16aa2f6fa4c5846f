"""A shard folder's `_info.json`, read once: the splits and their shards, the class list.

    info = ShardInfo.read("/data/in22k-wds")      # a local folder or a URL prefix
    shards = info.split("train")                  # ShardSet: urls, lengths, num_classes
    info.synsets                                  # class index -> synset, or None
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from cvtkit.errors import CvtkitError

INFO_FILE = "_info.json"
# The image files a source folder (shard making) or an evaluation folder holds; PIL reads them all.
IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})


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


@dataclass(frozen=True)
class ShardSet:
    """The shards of one split as `_info.json` lists them (local paths or URLs)."""
    urls: list[str]
    lengths: list[int]
    num_classes: int

    @property
    def num_samples(self) -> int:
        return sum(self.lengths)

    @classmethod
    def from_info(cls, root: str, split: str) -> "ShardSet":
        return ShardInfo.read(root).split(split)


@dataclass(frozen=True)
class ShardInfo:
    root: str  # a local folder, or a URL prefix webdataset opens (`https://host/in22k`)
    info: dict

    @property
    def where(self) -> str:
        return f"{self.root}/{INFO_FILE}"

    @property
    def is_local(self) -> bool:
        return "://" not in self.root

    @classmethod
    def read(cls, root: str) -> "ShardInfo":
        root = str(root).removeprefix("file://").rstrip("/")
        if "://" in root:
            import webdataset as wds
            try:
                with wds.gopen(f"{root}/{INFO_FILE}") as f:
                    return cls(root, json.loads(f.read()))
            except (OSError, ValueError) as e:  # any transport error, named with the URL
                raise ShardFolderError(f"{root}/{INFO_FILE}: cannot be read ({e})") from None
        path = Path(root) / INFO_FILE
        if not Path(root).is_dir():
            raise ShardFolderError(f"{root}: no such shard folder")
        if not path.is_file():
            raise ShardFolderError(f"{root}: no {INFO_FILE} (make shards with data_prep/make_shards.py)")
        return cls(root, json.loads(path.read_text()))

    @property
    def num_classes(self) -> int:
        return self.info["num_classes"]

    @property
    def synsets(self) -> list[str] | None:
        """The synsets of the class indices, or None where `_info.json` lists no classes."""
        classes = self.info.get("classes")
        if not classes:
            return None
        return [c["synset"] if isinstance(c, dict) else c for c in classes]

    def split(self, name: str) -> ShardSet:
        splits = self.info.get("splits", {})
        if name not in splits:
            raise ShardFolderError(f"{self.where}: no split {name!r} (have: {', '.join(splits) or 'none'})")
        s = splits[name]
        if not s["filenames"]:
            raise ShardFolderError(f"{self.where}: split {name!r} lists no shards")
        urls = [f"{self.root}/{f}" for f in s["filenames"]]
        if self.is_local:
            missing = [u for u in urls if not Path(u).is_file()]
            if missing:
                raise ShardFolderError(f"{missing[0]}: listed in {self.where} but absent"
                                       + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        return ShardSet(urls, list(s["shard_lengths"]), self.num_classes)


def folder_synsets(path: str) -> list[str] | None:
    """The synsets of the `_info.json` in `path`, or None where there is none (a `.beton`'s folder)."""
    try:
        return ShardInfo.read(path).synsets
    except ShardFolderError:
        return None
