"""Train a model (one EfficientScale stage) on Ray Train + DeepSpeed.

    python -m jobs.train --config train.yaml [--set steps=500 ...] --storage-path PATH --run-name NAME

Rerunning with the same ``--storage-path`` and ``--run-name`` resumes from the run's last registered
checkpoint (also at another worker count). ``--dry-run`` validates against the data and prints the plan.
"""

from __future__ import annotations

import json

from aquila_ray.config.base import resolve, to_dict
from aquila_ray.config.train import TrainConfig
from aquila_ray.train import plan, run_training, validate
from jobs.common import base_parser, print_plan, run_main


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--storage-path", required=True, help="where Ray Train keeps the run (local dir or URI)")
    parser.add_argument("--run-name", required=True, help="the run's name; rerun with the same name to resume")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local one)")
    args = parser.parse_args(argv)
    cfg = resolve(TrainConfig, None, args.config, args.overrides)
    if args.dry_run:
        manifest = validate(cfg)
        print_plan("train config", to_dict(cfg))
        print_plan("plan", plan(cfg, manifest))
        return
    result = run_training(cfg, args.storage_path, args.run_name, ray_address=args.address)
    print(json.dumps({"checkpoint": result.checkpoint_path, "metrics_path": result.metrics_path,
                      "run_dir": result.run_dir, "last_metrics": result.metrics}, indent=2, default=str))


if __name__ == "__main__":
    run_main(main)
