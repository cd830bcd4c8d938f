"""Evaluation: validation loss / perplexity on token shards, perplexity-based multiple choice
(``evaluate.py``), and the lm-evaluation-harness model (``harness.py``, the optional ``lm-eval`` extra,
imported only by ``jobs.lm_eval``)."""

from aquila_ray.eval.evaluate import (
    SAMPLE_TASKS,
    choice_counts,
    choice_scores,
    choice_summary,
    evaluate_checkpoint,
    evaluate_loss,
    load_tasks,
    multiple_choice,
    parse_tasks,
    read_tasks,
    sequence_loss,
    tasks_location,
)

__all__ = [
    "SAMPLE_TASKS",
    "choice_counts",
    "choice_scores",
    "choice_summary",
    "evaluate_checkpoint",
    "evaluate_loss",
    "load_tasks",
    "multiple_choice",
    "parse_tasks",
    "read_tasks",
    "sequence_loss",
    "tasks_location",
]
