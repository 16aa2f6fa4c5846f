"""ImageNet-22k or -1k into webdataset shards (timm's layout), in parallel and restartable.

    python data_prep/make_shards.py --source /data/fall11_whole.tar --out /data/in22k-wds \
        --prefix imagenet22k --workers 32 --holdout 50
    python data_prep/make_shards.py --source /data/imagenet --out /data/in1k-wds --prefix imagenet1k

Run the same command again after a crash or a kill: finished shards are kept, the rest is written,
and the result is byte-identical to an uninterrupted run. `_info.json` appears last.
The source is listed once, into OUT/_index/ (reused by every restart). Under a Slurm array
(slurm/make_shards.sh) the tasks share that listing and each writes a disjoint slice of the shards.
"""
import sys

from cvtkit.prep.cli import make_shards_main

if __name__ == "__main__":
    sys.exit(make_shards_main())
