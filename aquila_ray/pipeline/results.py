"""What each EfficientScale stage hands to the next: typed results, one dataclass per kind of stage.

A stage's result is written to its completion marker (``DIR/stages/<name>/_DONE.json``, ``to_dict`` plus
the stage's ``kind`` and ``seconds``) and read back as the same dataclass on a rerun (``from_dict``:
an unknown or mistyped field is an error, never a silent ``KeyError`` three stages later).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class DataResult:
    """The prepared token shards every training stage reads."""

    data_dir: str
    seq_len: int
    vocab_size: int
    sequences: dict[str, int]
    """Sequences per split."""


@dataclass
class Validation:
    """One validation pass, measured by a training stage's workers."""

    loss: float
    perplexity: float | None = None
    tokens: int | None = None
    sequences: int | None = None


@dataclass
class MultipleChoice:
    """Perplexity-based multiple choice, scored by a training stage's workers after its last step."""

    tasks: str | None
    accuracy: float
    correct: int
    items: int
    chance: float


@dataclass
class StageResult:
    """A training stage: its exported model and what its workers measured."""

    checkpoint: str
    """The stage's final model checkpoint (``aquila_ray.load_model`` opens it)."""
    model: str
    init: str
    init_from: str | None
    data_start: int
    """Where in the sample stream the stage started (the previous stage's ``data_position``)."""
    data_position: int
    train_run: str
    """The Ray Train run directory (local or remote)."""
    steps: int | None
    final_loss: float | None
    validation_loss: float | None
    validation: Validation | None = None
    """After the last step."""
    validation_start: Validation | None = None
    """Before the first update (a stage started from a checkpoint): a transition's loss just after."""
    multiple_choice: MultipleChoice | None = None


@dataclass
class TransitionResult:
    """Scale-Up or Scale-Out: the transformed checkpoint and the loss of the one it started from."""

    loss_before: float
    validation_before: Validation
    """The previous stage's final validation (its workers measured it)."""
    checkpoint: str | None = None
    """The transformed model; None for online upcycling (the MoE stage builds its experts itself)."""
    method: str | None = None
    mode: str | None = None
    """Scale-Out: offline | online."""
    dense_checkpoint: str | None = None
    """Online Scale-Out: the dense checkpoint the MoE stage upcycles."""
    parameters: Any = None
    probe: dict[str, Any] | None = None
    """The transform's own function-preservation probe (growth / upcycling report)."""
    depth_mode: str | None = None
    norm_mode: str | None = None


@dataclass
class EvaluationResult:
    """The three finals' evaluations, per training stage: checkpoint, validation, multiple choice."""

    results: dict[str, dict[str, Any]] = field(default_factory=dict)


def validation_from_rows(rows: list[dict[str, Any]]) -> tuple[Validation | None, Validation | None]:
    """(after the last step, before the first update) from a stage's metric rows (``val_*`` keys)."""
    last = rows[-1] if rows else {}
    final = None
    if "val_tokens" in last:
        final = Validation(loss=last["val_loss"], perplexity=math.exp(min(last["val_loss"], 50.0)),
                           tokens=last["val_tokens"], sequences=last["val_sequences"])
    start = Validation(loss=rows[0]["val_loss_start"]) if rows and "val_loss_start" in rows[0] else None
    return final, start


def choice_from_rows(rows: list[dict[str, Any]], tasks: str | None) -> MultipleChoice | None:
    """The multiple-choice counts of a stage's last metric row (``mc_*`` keys), if it has them."""
    last = rows[-1] if rows else {}
    if "mc_items" not in last:
        return None
    return MultipleChoice(tasks=tasks, accuracy=last["mc_accuracy"], correct=last["mc_correct"],
                          items=last["mc_items"], chance=last["mc_chance"])

