"""Deterministic mixing by source proportions and the validation split, both decided per document.

Every decision is a function of (seed, document order) through a hash, so it does not depend on how
Ray Data cut the data into blocks or how many workers ran. The validation split is held out by document
(fraction ``validation_fraction``), before mixing, and is never repeated. For the train split, source s
with natural size c_s (characters) and weight w_s gets the rate ``r_s = w_s * C / (sum_w * c_s)`` with
C = sum_s c_s: the total stays the same, small sources are repeated (each document floor(r) times, plus
one more with probability frac(r)), big ones are subsampled (dropped documents get ``mix.downsampled``).
The same rule as the Pile's / Dolma's epochs-per-source mixing, made per-document deterministic.
"""

from __future__ import annotations

import math

import xxhash


def unit_hash(seed: int, order: int, salt: str) -> float:
    """A uniform number in [0, 1) from (seed, order, salt)."""
    return xxhash.xxh64_intdigest(f"{salt}:{seed}:{order}".encode()) / float(1 << 64)


def assign_split(order: int, seed: int, validation_fraction: float) -> str:
    return "validation" if unit_hash(seed, order, "split") < validation_fraction else "train"


def mixing_rates(chars: dict[str, int], weights: dict[str, float | None]) -> dict[str, float]:
    """Per-key (source or domain) repetition rate. Keys without a weight (None or not listed) keep their
    natural size (rate 1.0); the weighted keys share the characters they have together in proportion to
    their weights. All weights None gives 1.0 everywhere; all weighted is the rule in the module docstring."""
    weighted = {k: float(w) for k, w in weights.items() if w is not None and k in chars}
    total = sum(chars[k] for k in weighted)
    wsum = sum(w for k, w in weighted.items() if chars[k] > 0)
    rates = {}
    for k, c in chars.items():
        if k not in weighted:
            rates[k] = 1.0
        else:
            rates[k] = weighted[k] * total / (wsum * c) if c > 0 and wsum > 0 else 0.0
    return rates


def copies_for(order: int, seed: int, rate: float) -> int:
    """How many times a train document appears: floor(rate) plus one with probability frac(rate)."""
    whole = math.floor(rate)
    return whole + (1 if unit_hash(seed, order, "mix") < rate - whole else 0)
