"""Jobs that build datasets for rtrain.

- ``python -m data_prep.imagenet``: ImageNet-style folders -> verified WebDataset shards, on Ray.
- ``python -m data_prep.index``: an rtrain manifest for existing WebDataset shards (local, http(s), s3://).
- ``python -m data_prep.verify``: re-check every shard of an output against its manifest.
- ``python -m data_prep.samples``: small real (digits) and synthetic ImageNet-like folders.
"""
