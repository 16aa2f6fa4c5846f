"""The data-preparation commands (`data_prep/*.py`, also the console scripts `cvtkit-make-shards`,
`cvtkit-verify-shards` and `cvtkit-make-ffcv`): argument parsing and one-line errors; the work is in
`prep`, `verify` and `ffcv_files`."""
import argparse
import os
import sys
from pathlib import Path

from cvtkit.errors import CvtkitError

from .beton import write_beton
from .pipeline import PrepOptions, run
from .verify import verify


def make_shards_main(argv: list[str] | None = None) -> int:
    """ImageNet-22k or -1k into webdataset shards (timm's layout), in parallel and restartable."""
    p = argparse.ArgumentParser(description=make_shards_main.__doc__)
    p.add_argument("--source", required=True, help="synset folders, a tar of synset tars, or train/ + val/")
    p.add_argument("--out", required=True, help="output folder for the shards and _info.json")
    p.add_argument("--prefix", default="imagenet", help="shard names: PREFIX-SPLIT-000000.tar")
    p.add_argument("--workers", type=int, default=4, help="parallel processes")
    p.add_argument("--shard-samples", type=int, default=1000, help="samples per shard")
    p.add_argument("--shard-bytes", type=int, default=0, help="cut shards by source bytes instead")
    p.add_argument("--resize", default=None, metavar="shorter:N|longer:N",
                   help="shrink large images (default: copy JPEGs untouched)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images")
    p.add_argument("--decode-check", action="store_true",
                   help="also decode copied JPEGs to catch corrupt data (slower)")
    p.add_argument("--seed", type=int, default=0, help="shuffle and held-out selection seed")
    p.add_argument("--holdout", type=int, default=50, help="validation images per class (22k)")
    p.add_argument("--classes", default="", help="comma-separated synsets or a file of synsets")
    p.add_argument("--val-labels", default=None, help="labels for a flat 1k val/ folder")
    p.add_argument("--task-index", type=int, default=int(os.environ.get("SLURM_ARRAY_TASK_ID", 0)),
                   help="this task's slice of the shards (default: $SLURM_ARRAY_TASK_ID or 0)")
    p.add_argument("--num-tasks", type=int, default=int(os.environ.get("SLURM_ARRAY_TASK_COUNT", 1)),
                   help="number of slices (default: $SLURM_ARRAY_TASK_COUNT or 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    classes = args.classes
    if classes and os.path.isfile(classes):
        with open(classes) as f:
            classes = ",".join(line.split()[0] for line in f if line.strip())
    try:
        opts = PrepOptions(source=args.source, out=args.out, prefix=args.prefix,
                           shard_samples=args.shard_samples, shard_bytes=args.shard_bytes,
                           workers=args.workers, resize=args.resize, quality=args.quality,
                           decode_check=args.decode_check,
                           seed=args.seed, holdout=args.holdout,
                           classes=tuple(c for c in classes.split(",") if c), val_labels=args.val_labels)
        run(opts, progress=not args.quiet, task_index=args.task_index, num_tasks=args.num_tasks)
    except CvtkitError as e:  # bad input; anything else is a bug and keeps its traceback
        print(f"error: {e.one_line()}", file=sys.stderr)
        return e.exit_code
    return 0


def verify_shards_main(argv: list[str] | None = None) -> int:
    """Check a shard folder against its `_info.json`: counts, sha256, labels, a decoded sample per shard."""
    p = argparse.ArgumentParser(description=verify_shards_main.__doc__)
    p.add_argument("folder")
    p.add_argument("--decode", type=int, default=2, help="images decoded per shard")
    args = p.parse_args(argv)
    problems = verify(args.folder, args.decode)
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    if not problems:
        print(f"{args.folder}: all shards match _info.json")
    return 1 if problems else 0


def make_ffcv_main(argv: list[str] | None = None) -> int:
    """ImageNet-1k webdataset shards into ffcv `.beton` files for train and validation."""
    p = argparse.ArgumentParser(description=make_ffcv_main.__doc__)
    p.add_argument("--shards", required=True, help="folder with _info.json and the shards")
    p.add_argument("--out", required=True, help="output folder for SPLIT.beton")
    p.add_argument("--splits", nargs="+", default=["train", "validation"])
    p.add_argument("--max-resolution", type=int, default=512, help="cap on the longer side")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--workers", type=int, default=4)
    args = p.parse_args(argv)
    for split in args.splits:
        out = Path(args.out) / f"{split}.beton"
        try:
            n = write_beton(args.shards, split, out, args.max_resolution, args.jpeg_quality, args.workers)
        except CvtkitError as e:
            print(f"error: {e.one_line()}", file=sys.stderr)
            return e.exit_code
        print(f"{out}: {n} samples")
    return 0
