"""Check a shard folder against its `_info.json`: counts, sha256, labels, a decoded sample per shard.

    python data_prep/verify_shards.py /data/in22k-wds
Exits non-zero on any mismatch, listing each one.
"""
import sys

from cvtkit.prep.cli import verify_shards_main

if __name__ == "__main__":
    sys.exit(verify_shards_main())
