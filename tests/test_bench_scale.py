"""The scale rehearsal benchmark: its flags, its generated store, and its smallest mode end to end."""

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_scale.py"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return sys.modules[name]


def test_flags_default_to_the_papers_size_and_refuse_bad_values(tmp_path):
    bench = _module("bench_scale")
    args = bench.parse([])
    assert args.rows == 1_281_167 and args.dtype == "float32" and args.sae_steps == 2000
    assert args.work == Path(tempfile.gettempdir()) / "ttt-concepts-scale-1281167" and args.kill_stages == []
    args = bench.parse(["--rows", "3000", "--dtype", "float16", "--work", str(tmp_path), "--kill-stage", "sae,ttt"])
    assert (args.rows, args.dtype, args.work, args.kill_stages) == (3000, "float16", tmp_path, ["sae", "ttt"])
    for bad in (["--rows", "0"], ["--dtype", "float64"], ["--kill-stage", "query-again"], ["--kill-after", "0"]):
        with pytest.raises(SystemExit):
            bench.parse(bad)


def test_the_generated_store_has_the_papers_split_unit_rows_and_is_seeded(tmp_path):
    data = _module("scale_data")
    from embeddings.store import EmbeddingStore

    spec = data.ScaleData(n=4000, n_classes=20, dtype="float16", seed=3)
    store = data.write_scale_store(tmp_path / "store", spec)
    assert isinstance(store, EmbeddingStore) and store.x.dtype == np.float16 and store.x.shape == (4000, 512)
    test, train = store.split["test"], store.split["train"]
    assert np.bincount(store.labels[test]).tolist() == [50] * 20  # 50 per class, as the paper holds out
    assert np.intersect1d(test, train).size == 0 and test.size + train.size == 4000
    np.testing.assert_allclose(np.linalg.norm(store.x[:500].astype(np.float32), axis=1), 1.0, atol=2e-3)
    again = data.Generator(spec).block(0)
    np.testing.assert_array_equal(again[:4000], np.asarray(store.x))
    assert not np.array_equal(data.Generator(data.ScaleData(n=4000, n_classes=20, seed=4)).block(0)[:10],
                              again[:10].astype(np.float32))


@pytest.mark.slow
def test_the_smallest_mode_runs_every_stage_and_a_rerun_skips_them(tmp_path):
    argv = [sys.executable, str(BENCH), "--rows", "3000", "--sae-steps", "20", "--work", str(tmp_path)]
    run = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for stage in ("store", "sae", "codes", "concepts", "ttt", "ttt-exact", "query", "query-again"):
        assert (tmp_path / "records" / f"{stage}.json").is_file(), stage
    assert "whole rehearsal" in run.stdout and "encoding" in run.stdout
    rerun = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert rerun.returncode == 0 and rerun.stdout.count("; skipped") == 8
    other = subprocess.run([*argv[:3], "4000", *argv[4:]], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert other.returncode != 0 and "--rows 3000 (asked 4000)" in other.stderr
