"""One way to declare a setting: flags from config dataclasses, --config files, and every script's --help."""

import argparse
import json
import runpy
from dataclasses import dataclass
from pathlib import Path

import pytest

from artifacts.flags import add_config_file_flag, add_config_flags, parse_args, settings, write_settings

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@dataclass(frozen=True)
class Toy:
    """A config."""

    n_queries: int | None = None
    """Queries (``None``: all) (--n-queries)."""
    lr: float = 1e-2
    """Learning rate (--lr)."""
    sizes: tuple[int, ...] = (5, 10)
    """Neighbourhood sizes (--sizes)."""
    umap: bool = True
    """Draw the maps (--umap/--no-umap)."""
    mode: str = "erm"
    """erm or sequential (--mode)."""


def _parser():
    p = argparse.ArgumentParser()
    add_config_flags(p, Toy)
    add_config_file_flag(p)
    return p


def test_flags_come_from_the_fields_with_their_docstring_and_default():
    p = _parser()
    helps = {a.dest: a.help for a in p._actions}
    assert helps["lr"] == "Learning rate (default: 0.01)"
    assert helps["n_queries"] == "Queries (None: all) (default: none)"
    assert helps["sizes"] == "Neighbourhood sizes (default: 5 10)"
    args = parse_args(p, ["--n-queries", "7", "--sizes", "1", "2", "--no-umap"])
    assert (args.n_queries, args.sizes, args.umap, args.lr) == (7, (1, 2), False, 0.01)
    assert Toy(**settings(args) | {"sizes": args.sizes}) == Toy(n_queries=7, sizes=(1, 2), umap=False)


@pytest.mark.parametrize("suffix, text", [
    (".json", '{"n-queries": 7, "sizes": [3], "umap": false}'),
    (".toml", 'n_queries = 7\nsizes = [3]\numap = false\n'),
])
def test_a_config_file_sets_defaults_that_flags_override(tmp_path, suffix, text):
    path = tmp_path / f"run{suffix}"
    path.write_text(text)
    args = parse_args(_parser(), ["--config", str(path), "--lr", "0.5"])
    assert (args.n_queries, args.sizes, args.umap, args.lr) == (7, (3,), False, 0.5)
    args = parse_args(_parser(), ["--config", str(path), "--n-queries", "9"])
    assert args.n_queries == 9


@pytest.mark.parametrize("text, message", [
    ('{"n_querys": 7}', "no such setting n_querys"),
    ('{"n_queries": "abc"}', "n_queries must be an integer"),
    ('{"sizes": 3}', "sizes must be a list"),
    ('{"umap": "yes"}', "umap must be true or false"),
    ('[1, 2]', "must hold a table of settings"),
    ('{"lr": ', "is not valid JSON"),
])
def test_a_bad_config_file_is_refused_by_name(tmp_path, text, message):
    path = tmp_path / "run.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        parse_args(_parser(), ["--config", str(path)])


def test_written_settings_repeat_the_run(tmp_path):
    args = parse_args(_parser(), ["--n-queries", "7", "--sizes", "1", "2", "--no-umap"])
    path = write_settings(tmp_path / "settings.json", args)
    again = parse_args(_parser(), ["--config", str(path)])
    assert vars(again) | {"config": None} == vars(args)
    assert json.loads(path.read_text())["sizes"] == [1, 2]


def _script_parser(name: str) -> argparse.ArgumentParser:
    return runpy.run_path(str(SCRIPTS / name), run_name="toolkit_script")["parser"]()


@pytest.mark.parametrize("name", sorted(p.name for p in SCRIPTS.glob("*.py")))
def test_every_flag_of_every_script_says_what_it_does_and_its_default(name):
    undocumented = []
    for action in _script_parser(name)._actions:
        if action.dest == "help":
            continue
        text = action.help or ""
        if not text or ("default" not in text and not action.required):
            undocumented.append("/".join(action.option_strings))
    assert not undocumented, f"{name}: flags without help or default: {undocumented}"


def test_one_flag_name_for_the_neighbourhood_size_in_every_script():
    for name in sorted(p.name for p in SCRIPTS.glob("*.py")):
        flags = {s for a in _script_parser(name)._actions for s in a.option_strings}
        assert "--neighbours" not in flags, name


def test_a_repeatable_flag_adds_to_the_file_s_list(tmp_path):
    p = argparse.ArgumentParser()
    p.add_argument("--study-set", action="append", default=[], help="repeatable (default: none)")
    add_config_file_flag(p)
    path = tmp_path / "run.json"
    path.write_text('{"study_set": ["a=1"]}')
    assert parse_args(p, ["--config", str(path), "--study-set", "b=2"]).study_set == ("a=1", "b=2")


def test_a_file_key_may_be_the_flag_or_the_field_it_sets(tmp_path):
    p = argparse.ArgumentParser()
    p.add_argument("--out", dest="out_dir", required=True, help="where")
    add_config_file_flag(p)
    for key in ("out", "out_dir"):
        path = tmp_path / f"{key}.json"
        path.write_text(json.dumps({key: "runs/x"}))
        assert parse_args(p, ["--config", str(path), "--out", "runs/y"]).out_dir == "runs/y"
        assert parse_args(p, ["--config", str(path)]).out_dir == "runs/x"  # a required flag the file gives


@pytest.mark.parametrize("seed", [-1, 2**32, 2**40, True, 1.5])
def test_every_config_with_a_seed_refuses_one_numpy_cannot_take(seed):
    from analysis.concepts.sharing import ConceptConfig
    from analysis.heads import HeadConfig
    from analysis.ttt.study import TTTStudyConfig
    from embeddings.extract_config import ExtractConfig

    for build in (lambda: ConceptConfig(seed=seed), lambda: HeadConfig(seed=seed), lambda: TTTStudyConfig(seed=seed),
                  lambda: ExtractConfig(source="digits", seed=seed)):
        with pytest.raises(ValueError, match=r"--seed must be an integer in \[0, 2\*\*32 - 1\]"):
            build()
