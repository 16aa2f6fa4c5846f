"""What a training run reads: the shard, `.beton` and DALI loaders, JPEG decoding, transforms,
evaluation sets, the on-device half of a batch, and the loaders of a run's `data:` config.
Imports `cvtkit.shards`, never `cvtkit.prep`."""
