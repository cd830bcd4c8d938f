"""Declarative key maps between our parameter names and a Hugging Face architecture's.

A map is written once, ours -> theirs, with ``{layer}`` and ``{expert}`` placeholders; the reverse is
derived by compiling the same templates into regular expressions (torchtitan's state_dict_adapter,
OLMo-core's StateMappingTemplate). Nothing is written twice.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from aquila_ray.errors import ConversionError

PLACEHOLDERS = ("layer", "expert")


def _compile(template: str) -> re.Pattern[str]:
    pattern = re.escape(template)
    for name in PLACEHOLDERS:
        pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>\\d+)")
    return re.compile(pattern + r"\Z")


class KeyMap:
    """Bidirectional renaming of tensor keys from one ours -> theirs template dict."""

    def __init__(self, ours_to_theirs: Mapping[str, str]) -> None:
        self.templates = dict(ours_to_theirs)
        if len(set(self.templates.values())) != len(self.templates):
            raise ValueError("key map is not one to one: two of our keys map to the same HF key")
        self._forward = [(_compile(o), t) for o, t in self.templates.items()]
        self._reverse = [(_compile(t), o) for o, t in self.templates.items()]

    @staticmethod
    def _rename(key: str, rules: list[tuple[re.Pattern[str], str]]) -> str | None:
        for pattern, target in rules:
            m = pattern.match(key)
            if m:
                return target.format(**m.groupdict())
        return None

    def to_hf(self, key: str) -> str:
        out = self._rename(key, self._forward)
        if out is None:
            raise ConversionError(f"no Hugging Face name for our tensor {key!r}")
        return out

    def from_hf(self, key: str) -> str | None:
        """Our name for an HF key, or None when the architecture has no such tensor in our model."""
        return self._rename(key, self._reverse)
