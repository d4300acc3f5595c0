"""Settings given as text or JSON (``--study-set KEY=VALUE``, a ``--config`` file) checked against the type of the
config dataclass field they set, so that a typo or a wrong type is refused by name before any work starts.

``typed_value(hint, value, name)`` accepts exactly what the field's annotation says: ``int`` (not a bool),
``float`` (finite; an int is widened), ``bool``, ``str``, ``X | None``, ``tuple[X, ...]`` (from a list), ``dict``
and a nested config dataclass (from a dict, field by field). ``config_from_dict`` builds a dataclass from such
values and refuses keys it does not have.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing


def _describe(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def typed_value(hint, value, name: str):
    """``value`` as the type ``hint`` (a field annotation); ``ValueError`` naming ``name`` when it is not one."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return typed_value(arg, value, name)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if len(errors) == 1 else f"{name} must be {_describe(hint)}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list of {_describe(args[0])}, got {value!r}")
        return tuple(typed_value(args[0], v, f"{name}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be an object with the fields of {hint.__name__}, got {value!r}")
        return config_from_dict(hint, value, name + ".")
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{name} must be text, got {value!r}")
        return value
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be an object, got {value!r}")
        return value
    raise ValueError(f"{name} has the type {_describe(hint)}, which cannot be set from text")


def field_types(cls) -> dict:
    """``{field name: resolved annotation}`` of a config dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def config_from_dict(cls, values: dict, prefix: str = ""):
    """``cls(**values)`` with every value checked against its field's type; unknown keys are refused by name."""
    types_ = field_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise ValueError(f"{', '.join(prefix + k for k in unknown)}: no such setting of {cls.__name__}; "
                         f"its settings are {', '.join(sorted(types_))}")
    return cls(**{k: typed_value(types_[k], v, prefix + k) for k, v in values.items()})


SEED_MAX = 2**32 - 1
"""The largest seed numpy's generators take; torch takes more, but one seed seeds both."""


def check_seed(seed, flag: str = "--seed") -> None:
    """Refuse a seed that is not an integer in ``[0, 2**32 - 1]``, naming the flag."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise ValueError(f"{flag} must be an integer in [0, 2**32 - 1] (numpy's seed range), got {seed!r}")
