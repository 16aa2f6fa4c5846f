"""Classifier surgery by synset: a 22k head becomes a 1k head
(docs/recipes.md#the-1k-head-from-the-22k-head).

    state, missing = map_head(state, src_synsets, dst_synsets, fresh=model.state_dict())

Row `i` of the new head is the pretrained row of `dst[i]`'s synset. A class with no pretrained
row (ImageNet-1k's teddy bear, n04399382, is not among fall11's 21,841) takes the row of
`fresh`, a newly initialised head, and is returned in `missing` for the caller to report. This
is the index map `_info.json` records as `synset_map_1k`, computed from the two class lists so
that any pair of label spaces works; Swin's hand-made map (teddy bear -> "chemise, slip") is not
used.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

HEAD_KEYS = ("head.weight", "head.bias")  # CvT and CeiT alike: `[num_classes, C]`, `[num_classes]`


def map_head(state: Mapping[str, torch.Tensor], src_classes: Sequence[str], dst_classes: Sequence[str],
             fresh: Mapping[str, torch.Tensor], head_keys: Sequence[str] = HEAD_KEYS
             ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Returns the state with each head tensor re-indexed from `src_classes` to `dst_classes`
    (rows of `fresh` where a synset has no pretrained row), and the synsets without one."""
    if len(set(dst_classes)) != len(dst_classes):
        raise ValueError("map_head: the target classes repeat a synset")
    src_index = {s: i for i, s in enumerate(src_classes)}
    rows = [src_index.get(s) for s in dst_classes]
    missing = [s for s, r in zip(dst_classes, rows) if r is None]
    out = dict(state)
    for key in head_keys:
        old, new = state[key], fresh[key]
        if old.shape[0] != len(src_classes):
            raise ValueError(f"map_head: {key} has {old.shape[0]} rows but {len(src_classes)} "
                             f"pretrained classes are listed")
        if new.shape[0] != len(dst_classes) or new.shape[1:] != old.shape[1:]:
            raise ValueError(f"map_head: {key} of the new head is {list(new.shape)}, expected "
                             f"[{len(dst_classes)}, *{list(old.shape[1:])}]")
        mapped = new.detach().clone().to(old.dtype)
        have = [(d, r) for d, r in enumerate(rows) if r is not None]
        if have:
            dst_rows, src_rows = zip(*have)
            mapped[list(dst_rows)] = old[list(src_rows)]
        out[key] = mapped
    return out, missing


def describe_missing(missing: Sequence[str], total: int, limit: int = 8) -> str:
    """`"2 of 1000 classes have no pretrained row and start fresh: n04399382, n09999999"`."""
    shown = ", ".join(missing[:limit]) + (f", ... ({len(missing) - limit} more)" if len(missing) > limit else "")
    return f"{len(missing)} of {total} classes have no pretrained row and start fresh: {shown}"
