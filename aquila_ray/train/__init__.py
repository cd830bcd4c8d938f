"""Training on Ray Train + DeepSpeed: the worker loop, shard reader, schedules, checkpoints, metrics, W&B.

``run_training(cfg, storage_path, run_name) -> TrainResult`` is the library call behind
``python -m jobs.train``; the token shard format is ``aquila_ray.data``. Importing this package does
not import ray or deepspeed (they load when a run starts).
"""

from aquila_ray.train.trainer import TrainResult, plan, run_training, validate

__all__ = ["TrainResult", "plan", "run_training", "validate"]
