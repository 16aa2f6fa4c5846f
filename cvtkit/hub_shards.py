"""timm's webdataset copies of ImageNet on the HF hub (timm/imagenet-22k-wds, -12k-wds, -1k-wds),
read as they are: what `cvtkit.shards` needs to know of that layout beyond its own.

They are written by `wds/build_wds.py` of rwightman/imagenet-12k: shards
`imagenet22k-train-0000.tar` ..., each sample a `jpg`, a `cls` (the class index in the sorted
synsets of the dataset) and a `json` (`label`, `class_name`, `width`, `height`, and for 22k
`label_12k`); the split metadata is `info.json` (the hub's copies name it `_info.json`):
`{name, splits: {split: {name, filenames, shard_lengths, num_samples, alt_label}}}`, with no
class count and no class list. The class list follows from the dataset's `name`: timm ships the
sorted synset lists. A split with an `alt_label` (22k's `train_12k` and `validation_12k`:
`label_12k`) takes each sample's label from that field of its `json` and leaves out the samples
where it is -1 (not in the 12k subset); its `shard_lengths` and `num_samples` count the samples
kept.
"""
from __future__ import annotations

import functools
import json
import re
from typing import Callable, Iterable, Iterator

TIMM_INFO_FILE = "info.json"  # build_wds.py's name for the split metadata

# A dataset's `name` -> timm's ImageNetInfo subset: the sorted synsets its `cls` indexes. By name,
# not by class count: timm's "imagenet-21k" is Google's list of 21,843 synsets, while the hub's
# 22k copy (from fall11) indexes the 21,841 synsets timm calls "imagenet-22k".
TIMM_SUBSETS = {"imagenet22k": "imagenet-22k", "imagenet12k": "imagenet-12k", "imagenet1k": "imagenet-1k"}
# An `alt_label` field -> the dataset whose sorted synsets it indexes (build_wds.py: `label_12k`).
ALT_LABEL_DATASETS = {"label_12k": "imagenet12k"}


def timm_synsets(name: object) -> tuple[str, ...] | None:
    """The sorted synsets of a hub dataset by its name (`imagenet22k`: 21,841; `imagenet12k`:
    11,821; `imagenet1k`: 1,000), spelt as timm allows (`ImageNet-22k`, `imagenet_22k`), from
    timm's lists; None for a name timm has no list for."""
    key = re.sub(r"[-_\s]", "", name.lower()) if isinstance(name, str) else ""
    return _subset_synsets(TIMM_SUBSETS[key]) if key in TIMM_SUBSETS else None


def alt_label_synsets(alt_label: object) -> tuple[str, ...] | None:
    """The sorted synsets an `alt_label` field indexes (`label_12k`: 12k's), or None."""
    return timm_synsets(ALT_LABEL_DATASETS.get(alt_label)) if isinstance(alt_label, str) else None


def known(alt_label: bool = False) -> str:
    """The dataset names (or alt labels) whose class lists are known, for messages."""
    return ", ".join(ALT_LABEL_DATASETS if alt_label else TIMM_SUBSETS)


@functools.cache
def _subset_synsets(subset: str) -> tuple[str, ...]:
    from timm.data import ImageNetInfo  # timm imports torch: only where a hub folder is read
    return tuple(ImageNetInfo(subset).label_names())


def relabelled(samples: Iterable[dict], alt_label: str, on_damage: Callable[[str, BaseException], None]
               ) -> Iterator[dict]:
    """The webdataset samples of an `alt_label` split: `cls` replaced by the `json` field
    `alt_label`, samples where it is negative left out. A sample whose `json` cannot give the
    label (none, not JSON, no such field) is reported to `on_damage(what, error)` and skipped."""
    for sample in samples:
        try:
            label = int(json.loads(sample["json"])[alt_label])
        except (KeyError, TypeError, ValueError) as e:  # no json or field; not JSON, a dict, a number
            on_damage(f"sample {sample.get('__key__')} of {sample.get('__url__')}", e)
            continue
        if label >= 0:
            yield {**sample, "cls": b"%d" % label}
