"""Helpers shared by every config dataclass: dict round trips, YAML overlays, ``a.b=c`` overrides, and
``resolve``, the one way every job builds its config.

Configs are plain dataclasses (STYLE.md rule 3); YAML is only a thin overlay on a preset and the saved
record of a run. Unknown fields are errors, never silently dropped. A field declared with
``preset_field(get_preset, ...)`` (a model shape) also takes a preset name, or ``{preset: NAME, field: value}``.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from aquila_ray.errors import ConfigError

T = TypeVar("T")
R = TypeVar("R")

PRESET_KEY = "preset"


def from_registry(registry: Mapping[str, Callable[[], R]], name: str, kind: str) -> R:
    """A fresh instance of preset ``name`` from a registry of factories (model shapes, MoE settings, recipes);
    an unknown name is an error that lists the valid ones."""
    if name not in registry:
        raise ConfigError(f"unknown {kind} preset {name!r}; valid presets: {sorted(registry)}")
    return registry[name]()


def preset_field(get: Callable[[str], Any], default: str) -> Any:
    """A dataclass field whose value may be given as a preset name (``get(name)``), as ``{preset: NAME,
    field: value...}`` (the preset with those fields changed), or in full; its default is ``get(default)``."""
    return dataclasses.field(default_factory=lambda: get(default), metadata={PRESET_KEY: get})


def _named(value: Any, get: Callable[[str], Any]) -> Any:
    """A preset-field value given by name (or ``{preset: NAME, ...}``) as the full mapping of its fields."""
    if isinstance(value, str):
        return to_dict(get(value))
    rest = {k: v for k, v in value.items() if k != PRESET_KEY}
    return merge_overlay(to_dict(get(value[PRESET_KEY])), rest)


def _by_name(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, dict) and PRESET_KEY in value)


def to_dict(cfg: Any) -> dict[str, Any]:
    """All fields, nested dataclasses as dicts (JSON-ready)."""
    return dataclasses.asdict(cfg)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if origin is Union or origin is types.UnionType:
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where) if len(args) == 1 else value
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return from_dict(tp, value, prefix=where + ".")  # type: ignore[arg-type]
    if origin is typing.Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}={value!r} is not valid; choose one of {list(get_args(tp))}")
        return value
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        (inner, *_) = get_args(tp) or (Any,)
        out = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict and isinstance(value, dict):
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        if tp is int and isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}={value!r} has type {type(value).__name__}; expected {tp.__name__}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build ``cls`` from a (possibly nested) dict; unknown keys raise a ConfigError naming them."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown field(s) {[prefix + u for u in unknown]} for {cls.__name__}; "
            f"valid fields: {sorted(fields)}"
        )
    hints = get_type_hints(cls)
    named = {k: _named(v, fields[k].metadata[PRESET_KEY]) for k, v in data.items()
             if PRESET_KEY in fields[k].metadata and _by_name(v)}
    kwargs = {k: _coerce(named.get(k, v), hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    for number in (int, float):  # YAML 1.1 reads "5e5" as a string
        try:
            return number(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(cfg: T, overrides: list[str] | dict[str, Any]) -> T:
    """Return a copy of ``cfg`` with ``a.b=value`` overrides applied (values parsed as YAML scalars)."""
    data = to_dict(cfg)
    items = overrides.items() if isinstance(overrides, dict) else [_split(o) for o in overrides]
    for key, value in items:
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            if isinstance(node.get(p), str):  # a section given by preset name: --set model=x --set model.y=1
                node[p] = {PRESET_KEY: node[p]}
            if not isinstance(node.get(p), dict):
                node[p] = {} if node.get(p) is None else node[p]
                if not isinstance(node[p], dict):
                    raise ConfigError(f"override {key!r}: {p!r} is not a section")
            node = node[p]
        node[parts[-1]] = value
    return from_dict(type(cfg), data)


def _split(override: str) -> tuple[str, Any]:
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like field.path=value (e.g. model.hidden_size=128)")
    key, text = override.split("=", 1)
    return key.strip(), _parse_scalar(text)


def merge_overlay(base: dict[str, Any], overlay: dict[str, Any], whole: frozenset[str] = frozenset()
                  ) -> dict[str, Any]:
    """``overlay`` on top of ``base`` (both ``to_dict`` forms): nested mappings merge key by key, except the
    fields named in ``whole`` (mapping-valued fields an overlay replaces as a whole) and a section given by
    preset (``{preset: NAME, ...}`` starts again from that preset); anything else replaces."""
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in whole \
                and PRESET_KEY not in value:
            out[key] = merge_overlay(out[key], value, whole)
        else:
            out[key] = value
    return out


def resolve(cls: type[T], base: T | None = None, overlay: dict[str, Any] | str | Path | None = None,
            overrides: list[str] | None = None, flags: dict[str, Any] | None = None,
            whole: frozenset[str] = frozenset()) -> T:
    """Every job's config, one way: ``base`` (a preset's instance; default ``cls()``) <- ``overlay`` (the
    ``--config`` YAML/JSON file, or a mapping) <- ``flags`` (the job's own options, as a mapping of the fields
    they set) <- ``overrides`` (``--set a.b=value``). Nested mappings merge (``merge_overlay``; ``whole`` names
    fields an overlay replaces as a whole); unknown fields and invalid values raise a ConfigError before any
    work."""
    data = to_dict(base if base is not None else cls())
    for layer in (overlay, flags):
        if layer:
            data = merge_overlay(data, load_overlay(layer) if isinstance(layer, (str, Path)) else dict(layer), whole)
    cfg = from_dict(cls, data)
    return apply_overrides(cfg, overrides) if overrides else cfg


def load_overlay(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON file into a dict (the overlay applied on top of a preset)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    text = p.read_text()
    data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
    return data
