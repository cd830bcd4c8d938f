"""The exception hierarchy: every error a user can cause derives from AquilaError.

Messages say what failed, the values involved, what would be valid, and where useful the command to run
next (STYLE.md, rule 11). Tests lock the wording with ``pytest.raises(match=...)``.
"""

from __future__ import annotations


class AquilaError(Exception):
    """Base class of every error aquila-ray raises on bad input or state."""


class ConfigError(AquilaError, ValueError):
    """A configuration field has an invalid value, or fields contradict each other."""


class CheckpointError(AquilaError):
    """A checkpoint directory is missing, incomplete, corrupted, or does not match its config."""


class DataError(AquilaError):
    """Input data or token shards are missing or malformed."""


class ConversionError(AquilaError):
    """A Hugging Face model cannot be converted to or from our format."""
