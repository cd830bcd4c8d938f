"""Bilingual (zh + en) pretraining data pipeline on Ray Data: clean documents, a BPE tokenizer, token shards.

Entry point: ``data_pipeline.run.prepare_data(config) -> Path`` (also ``python -m jobs.prepare_data``).
Steps live in ``data_pipeline.steps`` (registry ``STEPS``), dedup in ``data_pipeline.dedup``, config in
``data_pipeline.config``. See docs/data.md. Follows datatrove and NeMo Curator in structure.
"""

from __future__ import annotations

from typing import Any

from data_pipeline.config import DataConfig, load_data_config, sample_config

__all__ = ["DataConfig", "load_data_config", "prepare_data", "sample_config"]


def __getattr__(name: str) -> Any:
    if name == "prepare_data":
        from data_pipeline.run import prepare_data  # deferred: run imports Ray; importing the steps must not

        return prepare_data
    raise AttributeError(name)
