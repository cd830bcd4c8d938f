"""A minimal, resumable stage graph: stages run in order, each leaves a completion marker.

``DIR/stages/<name>/_DONE.json`` holds what the stage produced (paths, metrics); a rerun reads it and
skips the stage (datatrove's completion markers, STYLE.md rule 8). The marker is written atomically after
the stage's outputs, so a stage interrupted halfway runs again (and resumes from its own checkpoints).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("aquila_ray.pipeline")

MARKER = "_DONE.json"


@dataclass
class Stage:
    name: str
    kind: str
    """What the stage does (prepare_data, train, scale_up, scale_out, evaluate): shown in plans and reports."""
    run: Callable[[Path, dict[str, dict[str, Any]]], dict[str, Any]]
    """(stage_dir, outputs of the stages before) -> this stage's outputs (JSON-serializable)."""


def stage_dir(root: Path, name: str) -> Path:
    return root / "stages" / name


def completed(root: Path, name: str) -> dict[str, Any] | None:
    marker = stage_dir(root, name) / MARKER
    return json.loads(marker.read_text()) if marker.is_file() else None


def run_stages(root: str | Path, stages: list[Stage]) -> dict[str, dict[str, Any]]:
    """Run every stage not yet completed, in order; returns all stages' outputs."""
    root = Path(root)
    outputs: dict[str, dict[str, Any]] = {}
    for stage in stages:
        done = completed(root, stage.name)
        if done is not None:
            log.info("stage %s (%s): already done, skipping", stage.name, stage.kind)
            outputs[stage.name] = done
            continue
        d = stage_dir(root, stage.name)
        d.mkdir(parents=True, exist_ok=True)
        log.info("stage %s (%s): starting", stage.name, stage.kind)
        t0 = time.time()
        result = dict(stage.run(d, outputs))
        result.setdefault("kind", stage.kind)
        result["seconds"] = round(time.time() - t0, 2)
        tmp = d / f"{MARKER}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(result, indent=2, default=str))
        os.replace(tmp, d / MARKER)
        log.info("stage %s (%s): done in %.1f s", stage.name, stage.kind, result["seconds"])
        outputs[stage.name] = result
    return outputs
