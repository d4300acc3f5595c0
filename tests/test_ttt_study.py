"""The TTT study on a tiny planted store, SAE and codes: keys, Measure dicts, plots; resumable chunks."""

import json

import numpy as np
import pytest

from analysis.heads import HeadConfig, train_head
from analysis.stats import accuracy
from analysis.local_ttt import LocalTTT, TTTConfig
from analysis.ttt.chunks import evaluate
from analysis.ttt.data import SparseTopics, sparse_topics
from analysis.ttt.study import TTTStudyConfig, _rows, concept_analyses, ttt_study
from artifacts import ArtifactError
from embeddings.store import EmbeddingStore
from sae.checkpoint import load_sae
from sae.codes import CodeStore
from synthetic_concepts import planted_artifacts

SMALL = dict(n_neighbours=10, steps=20, head_epochs=20, head_lr=1e-2, sweep_neighbours=(5, 10),
             sweep_train_fractions=(0.5, 1.0), n_locality_queries=8, locality_rows=30, n_mask_queries=30)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    store_dir, sae_dir, codes_dir = planted_artifacts(tmp_path_factory.mktemp("planted"))
    return EmbeddingStore.open(store_dir), load_sae(sae_dir), CodeStore.open(codes_dir)


def _is_measure(d):
    return isinstance(d, dict) and {"value", "se", "n"} <= d.keys()


def test_study_returns_measures_and_plots(planted, tmp_path):
    store, sae, codes = planted
    out = ttt_study(store, sae, codes, TTTStudyConfig(**SMALL), tmp_path)
    t = out["ttt"]
    for key in ("global_acc", "ttt_acc", "majority_acc", "gain", "dense_sparse_agreement"):
        assert _is_measure(t[key]), key
    assert t["ttt_acc"]["n"] == store.split["test"].size
    assert _is_measure(t["locality"]["own_neighbourhood_acc"]) and _is_measure(t["locality"]["whole_test_acc"])
    assert t["locality"]["own_neighbourhood_acc"]["n"] == 8
    assert _is_measure(out["sharing"]["mask_concepts_mean"])
    assert out["sharing"]["mask_concepts_mean"]["value"] <= out["sharing"]["mask_union_mean"]["value"]
    assert [row["n_neighbours"] for row in out["sweeps"]["n_neighbours"]] == [5, 10]
    assert len(out["sweeps"]["train_size"]) == 2
    assert set(out["masks"]) == {"none", "query", "learned"}
    for path in out["plots"].values():
        assert (tmp_path / path).is_file() or __import__("pathlib").Path(path).is_file()
    json.dumps(out, allow_nan=False)  # JSON-ready


def test_study_without_sae_and_codes(planted, tmp_path):
    store, _, _ = planted
    out = ttt_study(store, None, None, TTTStudyConfig(**SMALL), tmp_path)
    assert "dense_sparse_agreement" not in out["ttt"] and "masks" not in out
    assert _is_measure(out["ttt"]["gain"])


def test_concept_analyses_use_linear_heads_under_an_mlp_study(planted):
    """The masks act on the codes the last layer reads and the update is projected on the decoder atoms: both
    need a linear head, also when the main study's head is an MLP (whose hidden width is not n_latents)."""
    store, sae, codes = planted
    config = TTTStudyConfig(**{**SMALL, "head": "mlp", "hidden": 8})
    out = concept_analyses(store, sae, codes, _rows(store, config), config)
    assert set(out["masks"]) == {"none", "query", "learned"}
    assert out["masks"]["none"]["acc"]["value"] > 0.5  # chance: 0.25
    assert (out["kept"] <= out["union"]).all()
    assert 0 <= out["update_concentration"]["active"]["value"] <= 1


def test_study_refuses_codes_of_another_store(planted, tmp_path):
    """Codes encoded from another store (same size) would silently pair this store's rows with other images'
    concepts: refused before any work, as the query tool refuses them."""
    store, sae, _ = planted
    _, _, other_codes = planted_artifacts(tmp_path / "other", seed=1)
    with pytest.raises(ArtifactError, match="encoded from another store"):
        ttt_study(store, sae, CodeStore.open(other_codes), TTTStudyConfig(**SMALL), tmp_path / "out")


def test_study_config_names_the_flags():
    with pytest.raises(ValueError, match="--impl"):
        TTTStudyConfig(impl="nope")
    with pytest.raises(ValueError, match="--sweep-train-fractions"):
        TTTStudyConfig(sweep_train_fractions=(0.0,))
    # Checked on creation, not after the main evaluation has run, and under their own flag names.
    with pytest.raises(ValueError, match="--sweep-neighbours"):
        TTTStudyConfig(sweep_neighbours=(0, 5))
    with pytest.raises(ValueError, match="--mask-lambda"):
        TTTStudyConfig(mask_lambda=-0.1)


def test_chunked_evaluation_resumes_and_equals_one_pass(tmp_path):
    x, y, _ = sparse_topics(SparseTopics(n=900))
    head = train_head(x[:700], y[:700], HeadConfig(epochs=10, batch_size=100))
    ttt = LocalTTT(head, TTTConfig(n_neighbours=15, steps=10)).fit(x[:700], y[:700])
    whole = ttt.predict(x[700:])
    first = evaluate(ttt, x[700:], chunk_dir=tmp_path / "c", chunk_size=64, fingerprint={"run": 1})
    (tmp_path / "c" / "chunk_000001.npz").unlink()          # as if killed before this chunk was written
    stamp = (tmp_path / "c" / "chunk_000002.npz").stat().st_mtime_ns
    again = evaluate(ttt, x[700:], chunk_dir=tmp_path / "c", chunk_size=64, fingerprint={"run": 1})
    assert (tmp_path / "c" / "chunk_000002.npz").stat().st_mtime_ns == stamp   # not recomputed
    for r in (first, again):
        assert np.array_equal(r.predictions, whole.predictions)
        assert np.array_equal(r.extras["top_classes"], whole.extras["top_classes"])
        assert accuracy(r.predictions == y[700:])["n"] == 200
    with pytest.raises(ArtifactError, match="other settings"):
        evaluate(ttt, x[700:], chunk_dir=tmp_path / "c", chunk_size=64, fingerprint={"run": 2})


SCRIPT_ARGS = ["--n-neighbours", "10", "--steps", "10", "--head-epochs", "5", "--sweep-neighbours", "5",
               "--sweep-train-fractions", "1.0", "--n-locality-queries", "4", "--locality-rows", "20",
               "--n-mask-queries", "10", "--n-sweep-queries", "10", "--chunk-size", "8", "--device", "cpu"]


def _run_script(prefix, planted_dirs, out):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    store, sae, codes = planted_dirs
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    cmd = [sys.executable, *prefix, str(root / "scripts" / "ttt.py"), "--store", str(store), "--sae", str(sae),
           "--codes", str(codes), "--out", str(out), *SCRIPT_ARGS]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dirs = planted_artifacts(tmp_path / "planted")
    one = _run_script([], dirs, tmp_path / "one")
    two = _run_script(["-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                       f"--master_port={port}"], dirs, tmp_path / "two")
    # rank 0 alone reports; it computed chunks 1, 3, 5 and rank 1 the others
    assert two.count("global head") == 1 and "chunk 3/5 done (rank 0)" in two and "chunk 2/5" not in two
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert a == b
    for chunk in sorted((tmp_path / "one" / "chunks").glob("*/main/chunk_*.npz")):
        with np.load(chunk) as x, np.load(tmp_path / "two" / "chunks" / chunk.parent.parent.name / "main" / chunk.name) as y:
            for key in x.files:
                assert np.array_equal(x[key], y[key]), key
    assert "chunk 5/5" in one


@pytest.mark.slow
def test_script_refuses_what_a_user_gets_wrong(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = str(Path(__file__).resolve().parents[1] / "scripts" / "ttt.py")
    done = subprocess.run([sys.executable, script, "--store", str(tmp_path / "none"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "Traceback" not in done.stderr
    done = subprocess.run([sys.executable, script, "--store", "s", "--sae", "x", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--codes" in done.stderr


def test_script_answers_an_unknown_device_with_one_line(tmp_path, monkeypatch, capsys):
    import runpy
    import sys
    from pathlib import Path

    script = str(Path(__file__).resolve().parents[1] / "scripts" / "ttt.py")
    monkeypatch.setattr(sys, "argv", ["ttt.py", "--store", str(tmp_path / "none"), "--out", str(tmp_path / "o"),
                                      "--device", "tpu"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(script, run_name="__main__")
    err = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and len(err) == 1 and err[0].startswith("error: --device 'tpu'"), err
