"""Evaluation: validation loss / perplexity on token shards, and perplexity-based multiple choice.

Multiple choice follows OpenCompass's "-ppl" evaluations (the style of the seed's tables): each choice is
appended to the question, the model's mean negative log-likelihood of the choice tokens is its score,
and the lowest score is the prediction. Single-device, pure PyTorch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from aquila_ray.checkpoint import load_model
from aquila_ray.data.dataset import TokenDataset
from aquila_ray.data.shards import read_bytes
from aquila_ray.errors import DataError

SAMPLE_TASKS = Path(__file__).resolve().parent / "tasks" / "sample_cloze.jsonl"
"""The bundled multiple-choice sample (the default of ``jobs.evaluate`` and of the recipe's ``eval_tasks``)."""


@torch.no_grad()
def sequence_loss(model: torch.nn.Module, data: TokenDataset, indices: np.ndarray, batch_size: int
                  ) -> tuple[float, int]:
    """(sum of next-token losses, tokens) over the sequences ``indices`` of ``data``, ``batch_size`` at a
    time, reading only their record batches. The one validation-loss computation: ``evaluate_loss`` runs it
    over a split's first sequences, the trainer over each rank's share (then sums over ranks)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(indices), batch_size):
        batch = torch.from_numpy(data.get(indices[start:start + batch_size])).to(device)
        out = model(batch[:, :-1], labels=batch[:, 1:])
        n = batch[:, 1:].numel()
        total += float(out.loss) * n
        count += n
    model.train(was_training)
    return total, count


def evaluate_loss(model: torch.nn.Module, data_dir: str | Path, split: str = "validation", batch_size: int = 8,
                  max_sequences: int | None = None) -> dict[str, float]:
    """Mean next-token loss and perplexity over a split's first ``max_sequences`` sequences (all: None)."""
    data = TokenDataset(data_dir, split)
    n = len(data) if max_sequences is None else min(max_sequences, len(data))
    total, count = sequence_loss(model, data, np.arange(n, dtype=np.int64), batch_size)
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count, "sequences": n}


def read_tasks(path: str | Path) -> list[dict[str, Any]]:
    """A JSONL task file: one {"question": str, "choices": [str, ...], "answer": int} per line."""
    return parse_tasks(Path(path).read_text(encoding="utf-8"), path)


def tasks_location(tasks: str | None) -> str | None:
    """Where a config's ``eval_tasks`` lives: "sample" is the bundled cloze task, anything else a path or URI."""
    return str(SAMPLE_TASKS) if tasks == "sample" else tasks


def load_tasks(location: str) -> list[dict[str, Any]]:
    """The tasks of a JSONL task file on any filesystem (local path or URI); a clear error when it is missing."""
    raw = read_bytes(location)
    if raw is None:
        raise DataError(f"eval_tasks={location!r}: no such file")
    return parse_tasks(raw.decode("utf-8"), location)


def parse_tasks(text: str, path: str | Path) -> list[dict[str, Any]]:
    """The tasks of a JSONL task file's ``text`` (``path`` names it in errors)."""
    items = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: not valid JSON ({e})") from e
        ok = (isinstance(item, dict) and isinstance(item.get("question"), str)
              and isinstance(item.get("choices"), list) and len(item["choices"]) >= 2
              and all(isinstance(c, str) for c in item["choices"])
              and isinstance(item.get("answer"), int) and 0 <= item["answer"] < len(item["choices"]))
        if not ok:
            raise DataError(f"{path}:{i}: expected {{'question': str, 'choices': [>= 2 str], 'answer': index}}, "
                            f"got {line[:120]!r}")
        items.append(item)
    if not items:
        raise DataError(f"{path} holds no tasks")
    return items


@torch.no_grad()
def choice_scores(model: torch.nn.Module, prompt: list[int], choices: list[list[int]],
                  max_len: int) -> list[float]:
    """Mean NLL of each choice's tokens after the prompt (left-truncated to max_len tokens)."""
    device = next(model.parameters()).device
    rows, spans = [], []
    for c in choices:
        ids = (prompt + c)[-max_len:]
        n_choice = min(len(c), len(ids) - 1)
        rows.append(ids)
        spans.append(n_choice)
    width = max(len(r) for r in rows)
    batch = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        batch[i, : len(r)] = torch.tensor(r)
    logp = F.log_softmax(model(batch).logits.float(), dim=-1)
    scores = []
    for i, (r, n) in enumerate(zip(rows, spans, strict=True)):
        targets = torch.tensor(r[len(r) - n:], device=device)
        positions = torch.arange(len(r) - n - 1, len(r) - 1, device=device)
        scores.append(-float(logp[i, positions, targets].mean()) if n > 0 else float("inf"))
    return scores


def choice_counts(model: torch.nn.Module, tokenizer: Any, tasks: list[dict[str, Any]],
                  max_len: int | None = None) -> tuple[int, float]:
    """(items answered right, summed chance) of perplexity-based choice over ``tasks``, one forward per item;
    ``tokenizer`` is a ``tokenizers.Tokenizer``. The trainer's workers run it on their share of the items."""
    was_training = model.training
    model.eval()
    limit: int = max_len or int(model.config.max_seq_len)  # type: ignore[union-attr,arg-type]
    correct, chance = 0, 0.0
    for item in tasks:
        prompt = tokenizer.encode(item["question"]).ids
        choices = [tokenizer.encode(c).ids for c in item["choices"]]
        scores = choice_scores(model, prompt, choices, limit)
        correct += int(int(np.argmin(scores)) == item["answer"])
        chance += 1.0 / len(item["choices"])
    model.train(was_training)
    return correct, chance


def choice_summary(correct: int, chance: float, items: int) -> dict[str, Any]:
    return {"accuracy": correct / items, "correct": correct, "items": items, "chance": chance / items}


def multiple_choice(model: torch.nn.Module, tokenizer: Any, tasks: list[dict[str, Any]],
                    max_len: int | None = None) -> dict[str, Any]:
    """Accuracy of perplexity-based choice; ``tokenizer`` is a ``tokenizers.Tokenizer``."""
    return choice_summary(*choice_counts(model, tokenizer, tasks, max_len), len(tasks))


def evaluate_checkpoint(ckpt: str | Path, data_dir: str | Path | None = None, split: str = "validation",
                        tasks: str | Path | None = None, tokenizer: str | Path | None = None,
                        max_sequences: int | None = None, device: str = "cpu") -> dict[str, Any]:
    """Loss on ``data_dir``'s split and accuracy on a task file, for one checkpoint."""
    model = load_model(ckpt, device=device)
    results: dict[str, Any] = {"checkpoint": str(ckpt)}
    if data_dir is not None:
        results[split] = evaluate_loss(model, data_dir, split, max_sequences=max_sequences)
    if tasks is not None:
        tok_path = Path(tokenizer) if tokenizer else (Path(data_dir) / "tokenizer.json" if data_dir else None)
        if tok_path is None or not tok_path.is_file():
            raise DataError(f"multiple choice needs a tokenizer.json: pass --tokenizer or --data (got {tok_path})")
        results["multiple_choice"] = {"tasks": str(tasks),
                                      **multiple_choice(model, Tokenizer.from_file(str(tok_path)), read_tasks(tasks))}
    return results
