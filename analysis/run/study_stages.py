"""The study stages of a run: concepts, TTT, the width sweep, the theory simulation, as cache entries.

Each stage calls its study (``analysis.concepts.sharing.concept_study``, ``analysis.ttt.study.ttt_study``,
``analysis.ttt.scaling.width_sweep``, ``analysis.theory.study.theory_study``) into a fresh directory, writes the returned
numbers to ``result.json`` beside the study's plots, and keeps them in the stage record as ``metrics``. When a
study is not in the tree, ``missing_reason`` says so, and the preset reports the section as missing: never a
number in its place.
"""

from __future__ import annotations

import importlib
import inspect
import shutil
import typing
from dataclasses import asdict, is_dataclass
from pathlib import Path

from analysis.run.chain import data_images, open_chain
from analysis.run.cache import Stage, resume_dir
from artifacts import building, write_json
from artifacts.typed import config_from_dict, field_types

STUDIES = {
    "concepts": ("analysis.concepts.sharing", "concept_study"),
    "ttt": ("analysis.ttt.study", "ttt_study"),
    "theory": ("analysis.theory.study", "theory_study"),
}
"""Stage name -> (module, function) of the studies written beside this one."""


def study_function(name: str):
    """The study function of stage ``name``, or a string saying why it is not available."""
    module_name, func_name = STUDIES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        return f"{module_name.replace('.', '/')}.py is not in this tree ({e})"
    func = getattr(module, func_name, None)
    if func is None:
        return f"{module_name.replace('.', '/')}.py has no {func_name}() yet"
    return func


def config_class(func):
    """The config dataclass a study's ``config`` parameter is annotated with, or ``None``."""
    try:
        hint = typing.get_type_hints(func).get("config")
    except Exception:  # an annotation that does not resolve: the study takes a plain dict
        return None
    for cls in (hint, *typing.get_args(hint)):
        if isinstance(cls, type) and is_dataclass(cls):
            return cls
    return None


def study_config(func, overrides: dict):
    """The study's own config with ``overrides`` for the fields it has, each checked against its field's type (a
    wrong type is refused by name); a plain dict when the study takes none."""
    cls = config_class(func)
    if cls is None:
        return dict(overrides)
    known = field_types(cls)
    return config_from_dict(cls, {k: v for k, v in overrides.items() if k in known}, prefix="--study-set ")


def check_study_settings(names: tuple[str, ...], overrides: dict, run_settings: dict | None = None) -> None:
    """Before any stage runs: refuse ``--study-set`` keys that none of the studies ``names`` has, and build each
    study's config once so that a wrong type or value is refused now, not after the stages before it."""
    funcs = [f for f in (study_function(n) for n in names) if not isinstance(f, str)]
    classes = [c for c in (config_class(f) for f in funcs) if c is not None]
    known = set().union(*(field_types(c) for c in classes)) if classes else set()
    unknown = sorted(set(overrides) - known)
    if unknown and classes:
        raise ValueError(f"--study-set {', '.join(unknown)}: no study of this run has such a setting; the studies' "
                         f"settings are {', '.join(sorted(known))}")
    for func in funcs:
        study_config(func, {**overrides, **(run_settings or {})})


def _jsonable_config(config) -> dict:
    return asdict(config) if is_dataclass(config) else dict(config)


def _relative_plots(result: dict, work: Path) -> dict:
    """The study's plot paths relative to its work directory, so that they still hold once the directory is renamed
    into place; a study may give them relative to the current directory (a relative ``--out``) or absolute."""
    plots = {}
    for key, path in (result.get("plots") or {}).items():
        p = Path(path).resolve()
        try:
            plots[key] = p.relative_to(work.resolve()).as_posix()
        except ValueError:
            plots[key] = str(p)
    return plots


def _finish(result: dict, work: Path) -> dict:
    plots = _relative_plots(result, work)
    metrics = {k: v for k, v in result.items() if k != "plots"}
    write_json(work / "result.json", {"metrics": metrics, "plots": plots})
    return {"metrics": metrics, "plots": plots}


def chain_study_stage(name: str, overrides: dict, device: str):
    """A study over the store, SAE and codes (``concepts`` or ``ttt``), or the reason it is missing."""
    func = study_function(name)
    if isinstance(func, str):
        return func
    config = study_config(func, {**overrides, "device": device})

    resumable = "cache_dir" in inspect.signature(func).parameters

    def run(out_dir: Path, done: dict) -> dict:
        store, sae, codes = open_chain(done, device)
        # A study that checkpoints (the TTT evaluation) keeps its chunks beside the stage's partial directory, so
        # a killed run resumes them; the cache clears them when the stage's key changes.
        extra = {"cache_dir": resume_dir(out_dir)} if resumable else {}
        with building(out_dir) as work:
            result = func(store, sae, codes, config, work, **extra)
            finished = _finish(result, work)
        if extra:
            shutil.rmtree(extra["cache_dir"], ignore_errors=True)
        return finished

    return Stage(name, _jsonable_config(config), run, parents=("store", "sae", "codes"), version=2)


def theory_stage(overrides: dict):
    """The theory simulation, or the reason it is missing."""
    func = study_function("theory")
    if isinstance(func, str):
        return func
    config = study_config(func, overrides)

    def run(out_dir: Path, done: dict) -> dict:
        with building(out_dir) as work:
            return _finish(func(config, work), work)

    return Stage("theory", _jsonable_config(config), run, version=2)


def width_stage(data: dict, config, device: str, log=print):
    """The backbone-width sweep over the CNN family, or the reason it can't run (it needs ``analysis.local_ttt``)."""
    try:
        importlib.import_module("analysis.local_ttt").LocalTTT  # noqa: B018
    except (ImportError, AttributeError) as e:
        return f"the width sweep needs analysis/local_ttt.py LocalTTT, which is not in this tree ({e})"
    from analysis.ttt.scaling import width_sweep

    def run(out_dir: Path, done: dict) -> dict:
        images, labels, split = data_images(data)
        with building(out_dir) as work:
            result = width_sweep(images, labels, split, config, device=device, log=log)
            write_json(work / "result.json", result)
        return {"metrics": {"sweeps": {"width": result["rows"]}}}

    return Stage("width", {"data": data, **asdict(config)}, run, version=3)
