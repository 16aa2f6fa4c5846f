"""Offline shard making: ImageNet sources into webdataset shards and ffcv `.beton` files, in
parallel and restartably (`data_prep/make_shards.py`), and their verification. Imports
`cvtkit.shards` (the format both sides agree on), never `cvtkit.data`."""
