"""Checking a shard folder against its `_info.json` (`data_prep/verify_shards.py`)."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

from PIL import Image

from cvtkit.shards import INFO_FILE

from .tar_writer import file_sha256


def verify(out: str | Path, decode_per_shard: int = 2) -> list[str]:
    """Recount every shard of `out/_info.json`, check sha256 and lengths, decode a few images.

    Returns the problems found (empty: all good)."""
    out = Path(out)
    info_path = out / INFO_FILE
    if not info_path.is_file():
        return [f"{info_path}: missing (the job has not finished)"]
    info = json.loads(info_path.read_text())
    if any("shard_sha256" not in s for s in info.get("splits", {}).values()) or "num_classes" not in info:
        return [f"{info_path}: no shard_sha256 or num_classes: not made by make_shards.py "
                f"(timm's copies on the HF hub are read as they are, not verified)"]
    problems = []
    for split, s in info["splits"].items():
        if sum(s["shard_lengths"]) != s["num_samples"]:
            problems.append(f"{split}: shard_lengths add up to {sum(s['shard_lengths'])}, "
                            f"num_samples says {s['num_samples']}")
        for name, length, digest in zip(s["filenames"], s["shard_lengths"], s["shard_sha256"]):
            path = out / name
            if not path.is_file():
                problems.append(f"{path}: missing")
                continue
            if file_sha256(path) != digest:
                problems.append(f"{path}: sha256 differs from {INFO_FILE}")
            try:
                with tarfile.open(path) as tar:
                    members = tar.getmembers()
                    keys = {m.name.split(".", 1)[0] for m in members}
                    if len(keys) != length or len(members) != 3 * length:
                        problems.append(f"{path}: {len(keys)} samples, {INFO_FILE} says {length}")
                    for m in [m for m in members if m.name.endswith(".jpg")][:decode_per_shard]:
                        with Image.open(tar.extractfile(m)) as img:
                            img.convert("RGB").load()
                    for m in [m for m in members if m.name.endswith(".cls")]:
                        label = int(tar.extractfile(m).read())
                        if not 0 <= label < info["num_classes"]:
                            problems.append(f"{path}: {m.name} has label {label} outside 0..{info['num_classes'] - 1}")
                            break
            except (tarfile.TarError, OSError, ValueError) as e:
                problems.append(f"{path}: unreadable ({e})")
    return problems
