"""One way to declare a setting: a script's flags come from its stage's config dataclass, and a run's settings can
come from a file and are written back as one.

``add_config_flags(parser, Config)`` adds ``--field-name`` for every field of a frozen config dataclass: its type
from the annotation (``X | None`` takes an ``X``, ``tuple[X, ...]`` takes one or more, ``bool`` is
``--name/--no-name``), its default, and the one-line docstring under the field as its help, with the default
shown. ``parse_args(parser, argv)`` also reads ``--config FILE`` (TOML or JSON; the keys are the flags' names, with
``_`` or ``-``): the file's values become the defaults, and flags on the command line override them. ``settings``
gives the resolved values of a parsed run, which ``write_settings`` stores as JSON: ``--config`` of that file
repeats the run.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import os
import re
import textwrap
import tomllib
import types
import typing
from pathlib import Path

from artifacts.io import write_json
from artifacts.typed import field_types, typed_value

CONFIG_FLAG = "config"
SETTINGS_FILE = "settings.json"
"""Where a script writes its run's resolved settings, beside what it wrote."""
NOT_SETTINGS = {CONFIG_FLAG, "help"}


def field_docs(cls) -> dict[str, str]:
    """The one-line docstring under each field of a config dataclass, read from its source."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for field, doc in zip(body, body[1:]):
        if isinstance(field, ast.AnnAssign) and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant):
            docs[field.target.id] = " ".join(str(doc.value.value).split())
    return docs


def _help_text(doc: str) -> str:
    """A field's docstring as flag help: without reST quotes and without the ``(--flag)`` it names itself by."""
    text = re.sub(r"``([^`]*)``", r"\1", doc)
    text = re.sub(r"\s*\(--[a-z0-9-]+(?:/--[a-z0-9-]+)?\)", "", text)
    return text.rstrip(" .;") if text.endswith((".", ";")) else text


def _shown(value) -> str:
    if isinstance(value, tuple):
        return " ".join(str(v) for v in value) if value else "none"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _flag_kwargs(hint) -> dict:
    """argparse keywords for a field annotation."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) else hint
    if base is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(base) is tuple:
        return {"type": typing.get_args(base)[0], "nargs": "*"}
    return {"type": base}


def add_config_flags(parser: argparse.ArgumentParser, cls, *, exclude=(), defaults: dict | None = None,
                     default_text: dict | None = None, names: dict | None = None) -> list[str]:
    """Add a flag for every field of ``cls`` but ``exclude``; returns the fields added. ``defaults`` replaces a
    field's default (``None`` for "the preset decides"); ``default_text`` says in words what a default is;
    ``names`` gives a field the flag name every script uses for that idea (``out_dir`` is ``--out``)."""
    docs, types_ = field_docs(cls), field_types(cls)
    added = []
    for f in dataclasses.fields(cls):
        hint = types_[f.name]
        if f.name in exclude or hint is dict or typing.get_origin(hint) is dict:
            continue
        if defaults is not None and f.name in defaults:
            default = defaults[f.name]
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            raise ValueError(f"{cls.__name__}.{f.name} has no default: give one in defaults=")
        shown = (default_text or {}).get(f.name, _shown(default))
        text = _help_text(docs.get(f.name, "")).replace("%", "%%")
        flag = (names or {}).get(f.name, f.name)
        parser.add_argument("--" + flag.replace("_", "-"), dest=f.name, default=default,
                            help=f"{text} (default: {shown})", **_flag_kwargs(hint))
        added.append(f.name)
    return added


def add_config_file_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--" + CONFIG_FLAG, metavar="FILE", default=None,
                        help="read settings from a TOML or JSON file with the flags' names as keys (a run's own "
                             "settings.json repeats it); flags given on the command line override it (default: none)")


def read_config_file(path: str | os.PathLike) -> dict:
    """The settings in a TOML or JSON file (by its suffix; JSON otherwise)."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as e:
        raise ValueError(f"--config {path}: cannot read it ({e.strerror})") from None
    try:
        values = tomllib.loads(text.decode()) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--config {path} is not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {e}") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config {path} must hold a table of settings, not {type(values).__name__}")
    return values


def _file_value(action: argparse.Action, value, name: str):
    """A value from a settings file, checked as the flag would check its text."""
    if isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return typed_value(bool, value, name)
    if value is None:
        return None
    if action.nargs in ("*", "+") or isinstance(action, argparse._AppendAction):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list, got {value!r}")
        items = [typed_value(action.type or str, v, f"{name}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(action, argparse._AppendAction) else tuple(items)  # a flag appends to a list
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    return typed_value(action.type or str, value, name)


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args(argv)`` with ``--config FILE`` read first: its values become the defaults."""
    first, _ = parser.parse_known_args(argv)
    path = getattr(first, CONFIG_FLAG, None)
    if path is not None:
        actions = {a.dest: a for a in parser._actions if a.dest not in NOT_SETTINGS}
        aliases = {s.lstrip("-").replace("-", "_"): a.dest for a in actions.values() for s in a.option_strings
                   if s.startswith("--") and not s.startswith("--no-")}
        given = {}
        for key, value in read_config_file(path).items():
            name = str(key).replace("-", "_")
            given[aliases.get(name, name)] = value
        unknown = sorted(set(given) - set(actions))
        if unknown:
            raise ValueError(f"--config {path}: no such setting {', '.join(unknown)}; the settings are "
                             f"{', '.join(sorted(actions))}")
        parser.set_defaults(**{k: _file_value(actions[k], v, f"--config {path}: {k}") for k, v in given.items()})
        for dest in given:
            actions[dest].required = False  # the file gives it
    args = parser.parse_args(argv)
    for name, value in vars(args).items():  # nargs flags give lists; the configs hold tuples
        if isinstance(value, list):
            setattr(args, name, tuple(value))
    return args


def settings(args: argparse.Namespace) -> dict:
    """The resolved settings of a parsed run, JSON-able, without ``--config`` itself."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items() if k not in NOT_SETTINGS}


def write_settings(path: str | os.PathLike, args: argparse.Namespace, **resolved) -> Path:
    """Write the run's settings (``resolved`` replaces values the run decided, e.g. a preset's defaults) as JSON
    that ``--config`` reads back."""
    write_json(Path(path), {**settings(args), **resolved})
    return Path(path)
