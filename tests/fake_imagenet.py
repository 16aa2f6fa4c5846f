"""Small ImageNet-like sources on disk: real JPEGs of varied sizes plus every kind of bad file."""
import io
import random
import tarfile
from pathlib import Path

from PIL import Image

# tench and goldfish are 1k classes; n02084071 (dog) is 22k only; teddy bear (n04399382) is
# 1k but absent from fall11 22k.
SYNSETS = ["n01440764", "n01443537", "n02084071", "n04399382"]


def jpeg(rng: random.Random, mode="RGB", fmt="JPEG", size=None) -> bytes:
    w, h = size or (rng.randint(20, 90), rng.randint(20, 90))
    color = tuple(rng.randint(0, 255) for _ in range(len(mode) if mode != "P" else 1))
    img = Image.new(mode, (w, h), color if mode != "P" else color[0])
    for _ in range(6):  # some structure so JPEG has real content
        x, y = rng.randint(0, w - 1), rng.randint(0, h - 1)
        img.paste(Image.new(mode, (max(1, w // 4), max(1, h // 4)), tuple(rng.randint(0, 255) for _ in color)
                            if mode != "P" else rng.randint(0, 255)), (x, y))
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return buf.getvalue()


BAD_FILES = {  # file name suffix -> (bytes maker, expected outcome)
    "empty": (lambda rng: b"", "skip"),
    "text": (lambda rng: b"this is not an image at all", "skip"),
    "truncated": (lambda rng: jpeg(rng, size=(64, 64))[:300], "skip"),
    "png": (lambda rng: jpeg(rng, fmt="PNG"), "convert"),
    "gif": (lambda rng: jpeg(rng, mode="P", fmt="GIF"), "convert"),
    "cmyk": (lambda rng: jpeg(rng, mode="CMYK"), "convert"),
    "grey": (lambda rng: jpeg(rng, mode="L"), "convert"),
    "alpha": (lambda rng: jpeg(rng, mode="RGBA", fmt="PNG"), "convert"),
}


def synset_images(synset: str, count: int, rng: random.Random, bad: bool) -> dict[str, bytes]:
    files = {f"{synset}_{i}.JPEG": jpeg(rng) for i in range(count)}
    if bad:
        for kind, (make, _) in BAD_FILES.items():
            files[f"{synset}_{kind}.JPEG"] = make(rng)
    return files


def make_folder22k(root: Path, per_class=12, synsets=SYNSETS[:3], seed=0, bad_in=(0,)) -> Path:
    rng = random.Random(seed)
    for n, s in enumerate(synsets):
        (root / s).mkdir(parents=True)
        for name, data in synset_images(s, per_class, rng, n in bad_in).items():
            (root / s / name).write_bytes(data)
    return root


def _tar_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def make_tar22k(path: Path, per_class=12, synsets=SYNSETS[:3], seed=0, bad_in=(0,), evil=True) -> Path:
    """fall11_whole.tar: a tar of per-synset tars, with the same images as make_folder22k."""
    rng = random.Random(seed)
    outer = {}
    for n, s in enumerate(synsets):
        inner = synset_images(s, per_class, rng, n in bad_in)
        if evil and n == 0:
            inner["../escape.JPEG"] = jpeg(rng)
            inner["/abs/path.JPEG"] = jpeg(rng)
        outer[f"{s}.tar"] = _tar_bytes(inner)
    path.write_bytes(_tar_bytes(outer))
    return path


def make_imagenet1k(root: Path, per_class=10, val_per_class=3, synsets=SYNSETS, seed=1,
                    flat_val="csv") -> Path:
    """train/<synset>/ plus val/ either as synset folders (flat_val=None) or flat with labels."""
    rng = random.Random(seed)
    rows = []
    for s in synsets:
        (root / "train" / s).mkdir(parents=True)
        for name, data in synset_images(s, per_class, rng, bad=False).items():
            (root / "train" / s / name).write_bytes(data)
        for i in range(val_per_class):
            name = f"ILSVRC2012_val_{s[1:]}{i:03d}.JPEG"
            target = root / "val" / (s if flat_val is None else "")
            target.mkdir(parents=True, exist_ok=True)
            (target / name).write_bytes(jpeg(rng))
            rows.append((name, s))
    if flat_val == "csv":
        lines = ["ImageId,PredictionString"] + [f"{Path(n).stem},{s} 1 2 3 4" for n, s in rows]
        (root / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    elif flat_val == "list":
        (root / "val_labels.txt").write_text("".join(f"{n} {s}\n" for n, s in rows))
    return root


def make_colour_classes(root: Path, per_class=16, val_per_class=4, synsets=SYNSETS, size=40, seed=2) -> Path:
    """An ImageNet-1k layout whose classes a tiny model learns in a few steps: each class is a
    colour, with per-image noise and brightness jitter (val as synset folders)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    palette = [(220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 210, 40), (200, 60, 220), (40, 210, 210)]
    for split, count in (("train", per_class), ("val", val_per_class)):
        for c, s in enumerate(synsets):
            folder = root / split / s
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                base = np.array(palette[c % len(palette)], dtype=np.float32) * rng.uniform(0.7, 1.0)
                pixels = base + rng.normal(0, 25, (size, size, 3))
                image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
                image.save(folder / f"{s}_{split}_{i}.JPEG", quality=90)
    return root


def damage(shard: Path, how: str) -> None:
    """truncate: cut the tar in the middle of a member; corrupt_jpeg: garbage for one image."""
    if how == "truncate":
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) // 2 + 100])
        return
    members = []
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            members.append((m, tar.extractfile(m).read()))
    with tarfile.open(shard, "w") as tar:
        for i, (m, data) in enumerate(members):
            if m.name.endswith(".jpg") and i < 3:
                data = b"\xff\xd8 this is not a JPEG"
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))


def scan(root, val_labels=None):
    """Every image of the source at `root`, listed in memory (nothing stored), as `Source`; raises
    `SourceError` as `prep.run` would before any work starts. `prep.run` itself keeps the listing
    in a stored index (`cvtkit.prep.source_index`)."""
    from cvtkit.prep.plan import check_unique_keys
    from cvtkit.prep.source_index import list_source
    from cvtkit.prep.sources import Source

    index = list_source(Path(root), val_labels)
    for split in index.tables:
        check_unique_keys(index, split)
    splits = {split: index.items(split, range(len(table))) for split, table in index.tables.items()}
    return Source(index.layout, index.root, splits, index.rejected)
