"""The whole EfficientScale recipe (AquilaMoE, arXiv 2408.06567) as one resumable job.

    python -m jobs.efficientscale --preset tiny --output runs/quickstart          # CPU, bundled sample corpus
    python -m jobs.efficientscale --preset aquila3-efficientscale --output X --dry-run \
        --set data_dir=/mnt/shared/data --cluster cluster.yaml                   # plan the seed's run on a cluster
    python -m jobs.efficientscale --config recipe.yaml --output /mnt/shared/es1 --storage-path s3://B/runs

Stages: data -> train_small -> scale_up -> train_large -> scale_out -> train_moe -> evaluate. Rerunning the
same command resumes at the first unfinished stage (and a training stage from its last checkpoint).
``--set`` overrides any RecipeConfig field (``stage_small.steps=300``, ``stage_moe.optimizer.lr=1e-4``,
``train.scaling.num_workers=4``, ``growth.method=aki-pro``, ``scale_out.mode=online``, ``large=demo-large``,
``data_dir=PREPARED_DIR``). Writes DIR/report.json and
DIR/loss_vs_flops.png.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml

from aquila_ray.config.base import resolve, to_dict
from aquila_ray.config.recipe import RECIPES, RecipeConfig, get_recipe
from aquila_ray.errors import ConfigError
from aquila_ray.pipeline.plan import plan_recipe
from aquila_ray.pipeline.tasks import use_transform_env
from jobs.common import base_parser, print_plan, run_main


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--preset", default="tiny", choices=sorted(RECIPES), help="recipe preset")
    parser.add_argument("--output", required=True, help="run directory (stages/, report.json, data/)")
    parser.add_argument("--storage-path", default=None, help="where Ray Train keeps stage runs (default OUTPUT/runs)")
    parser.add_argument("--run-name", default=None, help="names the stage runs and the W&B group (default: "
                        "OUTPUT's name)")
    parser.add_argument("--until", default=None, help="stop after this stage (data, train_small, scale_up, "
                        "train_large, scale_out, train_moe, evaluate)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local one)")
    parser.add_argument("--local-tasks", action="store_true", help="run growth/upcycling/eval in this process")
    parser.add_argument("--cluster", default=None, help="with --dry-run: a Ray cluster launcher YAML to check "
                        "each stage against (GPUs, GPU memory, host memory per node)")
    args = parser.parse_args(argv)
    if args.local_tasks:
        use_transform_env()  # before any tensor exists: growth and upcycling run in this process
    cfg = resolve(RecipeConfig, get_recipe(args.preset), args.config, args.overrides)
    log = logging.getLogger("aquila_ray.pipeline")  # "stage X: starting / done / already done, skipping"
    log.setLevel(logging.INFO)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[aquila-ray] %(message)s"))
    log.addHandler(handler)
    if args.dry_run:
        cluster = None
        if args.cluster:
            path = Path(args.cluster)
            cluster = yaml.safe_load(path.read_text()) if path.is_file() else None
            if not isinstance(cluster, dict) or "available_node_types" not in cluster:
                raise ConfigError(f"--cluster {args.cluster!r} is not a Ray cluster launcher file (a YAML mapping "
                                  f"with available_node_types, like cluster.yaml)")
        print_plan("recipe", to_dict(cfg))
        print_plan("plan", plan_recipe(cfg, cluster=cluster))
        return
    # deferred: Ray Train, DeepSpeed and the data pipeline's Ray Data, not needed by --dry-run
    from aquila_ray.pipeline.efficientscale import run_efficientscale

    report = run_efficientscale(cfg, args.output, storage_path=args.storage_path, run_name=args.run_name,
                                until=args.until, ray_address=args.address, local_tasks=args.local_tasks)
    summary = {"output": args.output,
               "stages": [{k: s[k] for k in ("name", "steps", "start_loss", "end_loss", "validation_loss")}
                          for s in report["stages"]],
               "transitions": [{k: t[k] for k in ("name", "method", "loss_before", "loss_after", "relative_change",
                                                  "steps_to_recover")} for t in report["transitions"]]}
    if "evaluation" in report:
        summary["multiple_choice_accuracy"] = {k: v.get("multiple_choice", {}).get("accuracy")
                                               for k, v in report["evaluation"].items()}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    run_main(main)
