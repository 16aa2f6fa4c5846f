"""ImageNet-1k webdataset shards into ffcv `.beton` files for train and validation.

    python data_prep/make_ffcv.py --shards /data/in1k-wds --out /data/in1k-ffcv
writes /data/in1k-ffcv/train.beton and validation.beton (defaults suited to fine-tuning at 384).
Make the shards first with data_prep/make_shards.py (the same sources, same labels).
"""
import sys

from cvtkit.prep.cli import make_ffcv_main

if __name__ == "__main__":
    sys.exit(make_ffcv_main())
