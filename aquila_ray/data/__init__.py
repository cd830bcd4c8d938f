"""The token shard format shared by the data job (writer) and the trainer (reader): ``shards`` (format,
manifest, locations on any pyarrow filesystem), ``dataset`` (the trainer's bounded reader and sample order),
``synthetic`` (random shards for tests and benchmarks). Imports neither ``train`` nor ``data_pipeline``."""
