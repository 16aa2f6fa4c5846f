"""Data: preparing ImageNet into shards (`prep`), and loading them for training."""
