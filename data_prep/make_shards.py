"""ImageNet-22k or -1k into webdataset shards (timm's layout), in parallel and restartable.

    python data_prep/make_shards.py --source /data/fall11_whole.tar --out /data/in22k-wds \
        --prefix imagenet22k --workers 32 --holdout 50
    python data_prep/make_shards.py --source /data/imagenet --out /data/in1k-wds --prefix imagenet1k

Run the same command again after a crash or a kill: finished shards are kept, the rest is written,
and the result is byte-identical to an uninterrupted run. `_info.json` appears last.
Under a Slurm array (slurm/make_shards.sh) each task writes a disjoint slice of the shards.
"""
import argparse
import os
import sys

from cvtkit.data.prep import PrepOptions, run
from cvtkit.data.sources import SourceError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    except (SourceError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. an output folder that cannot be written
        print(f"error: {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
