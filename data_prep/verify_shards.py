"""Check a shard folder against its `_info.json`: counts, sha256, labels, a decoded sample per shard.

    python data_prep/verify_shards.py /data/in22k-wds
Exits non-zero on any mismatch, listing each one.
"""
import argparse
import sys

from cvtkit.data.verify import verify


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder")
    p.add_argument("--decode", type=int, default=2, help="images decoded per shard")
    args = p.parse_args(argv)
    problems = verify(args.folder, args.decode)
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    if not problems:
        print(f"{args.folder}: all shards match _info.json")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
