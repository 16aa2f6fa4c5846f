"""ImageNet-1k webdataset shards into ffcv `.beton` files for train and validation.

    python data_prep/make_ffcv.py --shards /data/in1k-wds --out /data/in1k-ffcv
writes /data/in1k-ffcv/train.beton and validation.beton (defaults suited to fine-tuning at 384).
Make the shards first with data_prep/make_shards.py (the same sources, same labels).
"""
import argparse
import sys
from pathlib import Path

from cvtkit.data.ffcv_files import write_beton
from cvtkit.errors import CvtkitError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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


if __name__ == "__main__":
    sys.exit(main())
