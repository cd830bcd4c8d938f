"""A minimal, resumable stage graph: stages run in order, each leaves a completion marker.

``DIR/stages/<name>/_DONE.json`` holds what the stage produced (its typed result, a dataclass, as JSON,
with the stage's kind and seconds); a rerun reads it back as the same dataclass and skips the stage
(datatrove's completion markers, STYLE.md rule 8). The marker is written atomically after the stage's
outputs, so a stage interrupted halfway runs again (and resumes from its own checkpoints).
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

from aquila_ray.config.base import from_dict, to_dict

log = logging.getLogger("aquila_ray.pipeline")

MARKER = "_DONE.json"
MARKER_EXTRAS = ("kind", "seconds")
"""What a marker holds beside the stage's result fields."""


@dataclass
class Stage:
    name: str
    kind: str
    """What the stage does (prepare_data, train, scale_up, scale_out, evaluate): shown in plans and reports."""
    run: Callable[[Path, dict[str, Any]], Any]
    """(stage_dir, results of the stages before, by name) -> this stage's result, a ``result`` instance."""
    result: type
    """The dataclass the stage returns (``aquila_ray.pipeline.results``)."""


def stage_dir(root: Path, name: str) -> Path:
    return root / "stages" / name


def completed(root: Path, name: str) -> dict[str, Any] | None:
    marker = stage_dir(root, name) / MARKER
    return json.loads(marker.read_text()) if marker.is_file() else None


def run_stages(root: str | Path, stages: list[Stage]) -> dict[str, Any]:
    """Run every stage not yet completed, in order; returns all stages' results (typed), by name."""
    root = Path(root)
    outputs: dict[str, Any] = {}
    for stage in stages:
        done = completed(root, stage.name)
        if done is not None:
            log.info("stage %s (%s): already done, skipping", stage.name, stage.kind)
            fields = {k: v for k, v in done.items() if k not in MARKER_EXTRAS}
            outputs[stage.name] = from_dict(stage.result, fields, prefix=f"{stage.name}/{MARKER}: ")
            continue
        d = stage_dir(root, stage.name)
        d.mkdir(parents=True, exist_ok=True)
        log.info("stage %s (%s): starting", stage.name, stage.kind)
        t0 = time.time()
        result = stage.run(d, outputs)
        if not isinstance(result, stage.result):
            raise TypeError(f"stage {stage.name} returned {type(result).__name__}, not {stage.result.__name__}")
        marker = {**to_dict(result), "kind": stage.kind, "seconds": round(time.time() - t0, 2)}
        tmp = d / f"{MARKER}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(marker, indent=2, default=str))
        os.replace(tmp, d / MARKER)
        log.info("stage %s (%s): done in %.1f s", stage.name, stage.kind, marker["seconds"])
        outputs[stage.name] = result
    return outputs
