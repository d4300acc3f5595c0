"""The stage cache: reuse on a rerun, a changed setting reruns exactly its dependents and says why, resume."""

import json

import pytest

from analysis.run.cache import Stage, StageCache, stage_key
from artifacts import partial_dir


def _chain(calls: list, a: int = 1, b: int = 2, c: int = 3):
    """Three toy stages a → b → c (and d independent); each records its call and writes its settings."""

    def make(name):
        def run(out_dir, parents):
            calls.append(name)
            out_dir.mkdir()
            total = sum(p.result["total"] for p in parents.values())
            (out_dir / "value.json").write_text(json.dumps(total))
            return {"total": total + {"a": a, "b": b, "c": c, "d": 0}[name]}
        return run

    return [Stage("a", {"a": a}, make("a")), Stage("b", {"b": b}, make("b"), parents=("a",)),
            Stage("c", {"c": c}, make("c"), parents=("b",)), Stage("d", {}, make("d"))]


def _run(run_dir, calls, log, **settings):
    cache = StageCache(run_dir, log.append)
    for stage in _chain(calls, **settings):
        cache.run(stage)
    return cache


def test_rerun_reuses_every_stage(tmp_path):
    calls, log = [], []
    first = _run(tmp_path, calls, log)
    assert calls == ["a", "b", "c", "d"] and first.results["c"].result == {"total": 6}
    calls.clear()
    again = _run(tmp_path, calls, log)
    assert calls == []
    assert all(r.reused for r in again.results.values())
    assert again.results["c"].key == first.results["c"].key


def test_changed_setting_reruns_exactly_its_dependents_and_says_which(tmp_path):
    calls, log = [], []
    _run(tmp_path, calls, log)
    calls.clear(), log.clear()
    cache = _run(tmp_path, calls, log, b=5)
    assert calls == ["b", "c"]  # a and d do not depend on b
    assert cache.results["c"].result == {"total": 9}
    assert any(line.startswith("b: settings changed (b: recorded 2, requested 5)") for line in log)
    assert any(line.startswith("c: settings changed (input 'b' changed)") for line in log)
    assert cache.results["a"].reused and cache.results["d"].reused


def test_changed_root_setting_reruns_the_whole_chain(tmp_path):
    calls, log = [], []
    _run(tmp_path, calls, log)
    calls.clear()
    _run(tmp_path, calls, log, a=7)
    assert calls == ["a", "b", "c"]


def test_a_stage_directory_without_its_record_is_rebuilt(tmp_path):
    calls, log = [], []
    _run(tmp_path, calls, log)
    (tmp_path / "stages" / "b.json").unlink()  # as if killed between the directory and its record
    calls.clear(), log.clear()
    _run(tmp_path, calls, log)
    assert calls == ["b"]
    assert any("no completion record" in line for line in log)


def test_a_missing_directory_is_rebuilt(tmp_path):
    import shutil

    calls, log = [], []
    _run(tmp_path, calls, log)
    shutil.rmtree(tmp_path / "c")
    calls.clear()
    _run(tmp_path, calls, log)
    assert calls == ["c"]


def test_partial_directory_is_kept_for_the_same_key_and_cleared_for_another(tmp_path):
    seen = []

    def run(out_dir, parents):
        seen.append(partial_dir(out_dir).exists())
        partial_dir(out_dir).mkdir(exist_ok=True)  # a resumable stage's checkpoint
        raise KeyboardInterrupt  # killed mid-way

    cache = StageCache(tmp_path, lambda _: None)
    for _ in range(2):
        with pytest.raises(KeyboardInterrupt):
            cache.run(Stage("s", {"x": 1}, run))
    assert seen == [False, True]  # the second attempt finds its own partial directory
    with pytest.raises(KeyboardInterrupt):
        cache.run(Stage("s", {"x": 2}, run))
    assert seen[-1] is False  # another setting: the old partial work is cleared


def test_key_depends_on_settings_parents_and_version():
    base = stage_key("s", 1, {"x": 1}, {"p": "k"})
    assert base == stage_key("s", 1, {"x": 1}, {"p": "k"})
    assert len({base, stage_key("s", 2, {"x": 1}, {"p": "k"}), stage_key("s", 1, {"x": 2}, {"p": "k"}),
                stage_key("s", 1, {"x": 1}, {"p": "j"})}) == 4


def test_a_stage_must_run_after_its_parents(tmp_path):
    with pytest.raises(ValueError, match="needs"):
        StageCache(tmp_path).run(Stage("b", {}, lambda o, p: {}, parents=("a",)))


def test_a_failing_rebuild_keeps_the_old_result_and_its_record(tmp_path):
    calls, log = [], []
    _run(tmp_path, calls, log)
    record = (tmp_path / "stages" / "c.json").read_text()

    def boom(out_dir, parents):
        out_dir.mkdir()
        (out_dir / "half.json").write_text("{}")
        raise ValueError("a wrong flag")

    cache = StageCache(tmp_path, log.append)
    for stage in _chain(calls)[:2]:
        cache.run(stage)
    with pytest.raises(ValueError, match="a wrong flag"):
        cache.run(Stage("c", {"c": 99}, boom, parents=("b",)))
    assert (tmp_path / "stages" / "c.json").read_text() == record
    assert json.loads((tmp_path / "c" / "value.json").read_text()) == 3
    assert not (tmp_path / "c" / "half.json").exists()
    calls.clear()
    again = _run(tmp_path, calls, log)
    assert calls == [] and again.results["c"].reused  # the old settings still find their finished result


def test_an_edited_record_or_result_file_is_rebuilt_not_trusted(tmp_path):
    calls, log = [], []
    _run(tmp_path, calls, log)
    record_path = tmp_path / "stages" / "c.json"
    record = json.loads(record_path.read_text())
    record["result"]["total"] = 1000  # a hand-edited number
    record_path.write_text(json.dumps(record))
    (tmp_path / "b" / "value.json").write_text("42")
    calls.clear(), log.clear()
    cache = _run(tmp_path, calls, log)
    assert calls == ["b", "c"]
    assert cache.results["c"].result == {"total": 6}
    assert any("b: " in line and "value.json changed" in line for line in log)
    assert any("c: " in line and "was edited" in line for line in log)


def test_a_stage_folder_that_is_a_link_is_refused_and_its_target_kept(tmp_path):
    from artifacts import ArtifactError

    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "a").symlink_to(target)
    with pytest.raises(ArtifactError, match="symbolic link"):
        _run(run_dir, [], [])
    assert (target / "precious.txt").read_text() == "keep me"


def test_a_replacement_killed_half_way_is_finished_forward(tmp_path):
    calls, log = [], []
    _run(tmp_path, calls, log)
    cache = StageCache(tmp_path, log.append)
    stages = _chain(calls, c=10)
    for stage in stages[:2]:
        cache.run(stage)
    original = cache._install
    cache._install = lambda name: None  # killed after the build and its record, before the renames
    cache.run(stages[2])
    assert (tmp_path / ".next" / "c").is_dir() and (tmp_path / "stages" / "c.next.json").is_file()
    cache._install = original
    calls.clear()
    again = _run(tmp_path, calls, log, c=10)
    assert calls == [] and again.results["c"].result == {"total": 13}
    assert not (tmp_path / ".next" / "c").exists()


def test_temporary_leftovers_in_the_records_are_cleaned(tmp_path):
    _run(tmp_path, [], [])
    leftover = tmp_path / "stages" / ".c.json.tmp-12345"
    leftover.write_text("{")
    _run(tmp_path, [], [])
    assert not leftover.exists()


RECORD_DAMAGES = [None, True, 7, -1.5, "text", [], [1, "a"], {}, {"a": None}]


@pytest.mark.parametrize("key", ["stage", "key", "settings", "parents", "result", "files", "seconds", "digest"])
@pytest.mark.parametrize("value", RECORD_DAMAGES)
def test_a_damaged_record_is_rebuilt_never_a_crash(tmp_path, key, value):
    calls, log = [], []
    _run(tmp_path, calls, log)
    path = tmp_path / "stages" / "b.json"
    record = json.loads(path.read_text())
    record[key] = value
    path.write_text(json.dumps(record))
    calls.clear()
    cache = _run(tmp_path, calls, log)
    assert calls == ["b"] and cache.results["c"].result == {"total": 6}  # b's key is the same: c stands


@pytest.mark.parametrize("text", ["", "{", "[1, 2]", "null", "\xff\xfe"])
def test_an_unreadable_record_is_rebuilt(tmp_path, text):
    calls, log = [], []
    _run(tmp_path, calls, log)
    (tmp_path / "stages" / "b.json").write_bytes(text.encode("latin-1"))
    calls.clear()
    _run(tmp_path, calls, log)
    assert calls == ["b"]
