"""The per-image query tool: its JSON checked field by field against brute force, the same answer with codes
encoded on the fly, a new image through the store's own backbone, contact sheets, and one-line errors."""

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from analysis.concepts.naming import ConceptNamer
from analysis.neighbours import NeighbourIndex, SparseCodes
from analysis.concepts.query import QUERY_SCHEMA, QueryEngine
from embeddings.backbone import load_backbone
from embeddings.cnn import CNNConfig, DigitsCNN, save_cnn
from embeddings.digits import load_digits_images
from embeddings.store import EmbeddingStore, write_store
from sae.checkpoint import load_sae, save_sae
from sae.codes import CodeStore
from sae.config import SAEConfig
from sae.model import TopKSAE
from synthetic_concepts import planted_artifacts

SCRIPT = str(Path(__file__).resolve().parents[1] / "scripts" / "query.py")


def run(monkeypatch, capsys, *args):
    """``(exit code, stdout, stderr)`` of scripts/query.py run in this process."""
    monkeypatch.setattr(sys, "argv", ["query.py", *map(str, args)])
    try:
        runpy.run_path(SCRIPT, run_name="__main__")
        code = 0
    except SystemExit as done:
        code = done.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return planted_artifacts(tmp_path_factory.mktemp("query"), source={"kind": "digits", "size": 32})


def _brute_cosine(x, row):
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = xn @ xn[row]
    sims[row] = -np.inf
    return sims


def test_json_field_by_field(planted, monkeypatch, capsys):
    store_dir, sae_dir, codes_dir = planted
    code, out, err = run(monkeypatch, capsys, "--sae", sae_dir, "--store", store_dir, "--codes", codes_dir,
                         "--index", 17, "--n-neighbours", 6, "--json")
    assert code == 0 and err == ""
    a = json.loads(out)
    store, codes = EmbeddingStore.open(store_dir), CodeStore.open(codes_dir)
    assert a["schema"] == QUERY_SCHEMA and a["space"] == "embeddings" and a["metric"] == "cosine"
    split = "test" if 17 in store.split["test"] else "train"
    assert a["query"] == {"row": 17, "id": "17", "label": store.classes[store.labels[17]], "split": split,
                          "image_path": None}
    assert a["n_neighbours"] == 6 and a["sheet"] is None and a["notes"] == []
    assert a["store"] == {"dir": str(store_dir), "n": store.n, "d": store.d}
    assert a["sae"] == {"n_latents": codes.n_latents, "k": codes.k}
    # Neighbours: brute-force cosine over every other row, nearest first.
    sims = _brute_cosine(np.asarray(store.x, np.float64), 17)
    rows = [nb["row"] for nb in a["neighbours"]]
    assert [nb["rank"] for nb in a["neighbours"]] == list(range(1, 7)) and 17 not in rows
    np.testing.assert_allclose([nb["similarity"] for nb in a["neighbours"]], np.sort(sims)[::-1][:6], atol=1e-5)
    np.testing.assert_allclose([nb["similarity"] for nb in a["neighbours"]], sims[rows], atol=1e-5)
    assert [nb["id"] for nb in a["neighbours"]] == [store.ids[r] for r in rows]
    assert [nb["label"] for nb in a["neighbours"]] == [store.classes[store.labels[r]] for r in rows]
    # Concepts: the row's active codes, described as the namer describes them.
    values, indices = codes.codes([17])
    active = values[0] > 0
    assert [c["latent"] for c in a["concepts"]] == indices[0][active].tolist()
    np.testing.assert_allclose([c["activation"] for c in a["concepts"]], values[0][active], rtol=1e-6)
    namer = ConceptNamer(codes, store.labels, store.classes)
    for c in a["concepts"]:
        d = namer.describe(c["latent"], n_top=0)
        assert (c["description"], c["n_images"], c["frequency"]) == (d["description"], d["n_images"], d["frequency"])
        assert (c["top_label"], c["purity"]) == (d["all_labels"]["top_label"], d["all_labels"]["purity"])
    # Shared concepts: used by >= 2 neighbours, counted and summed by brute force, most used first.
    dense = codes.dense(rows)
    used = (dense > 0).sum(0)
    expected = {int(l): (int(used[l]), float(dense[:, l].sum())) for l in np.flatnonzero(used >= 2)}
    got = {c["latent"]: (c["n_neighbours_using"], c["summed_activation"]) for c in a["shared_concepts"]}
    assert got.keys() == expected.keys()
    for latent, (n_using, mass) in expected.items():
        assert got[latent][0] == n_using and got[latent][1] == pytest.approx(mass, rel=1e-5)
    counts = [c["n_neighbours_using"] for c in a["shared_concepts"]]
    assert counts == sorted(counts, reverse=True)
    assert all(c["in_query"] == (c["latent"] in indices[0][active]) for c in a["shared_concepts"])
    assert all(c["fraction"] == c["n_neighbours_using"] / 6 for c in a["shared_concepts"])
    u = a["union"]
    assert u["size"] == int((used > 0).sum()) and (u["min"], u["max"]) == (codes.k, 6 * codes.k)
    assert u["random_n"] == 200 and 0 <= u["percentile"] <= 100 and u["random_se"] > 0
    # Planted classes: a real neighbourhood shares more concepts than most random ones.
    assert u["size"] < u["random_mean"] and u["percentile"] > 90
    # The neighbourhood's labels, the index it was searched with, the nearest similarity against the store's own.
    labels = [nb["label"] for nb in a["neighbours"]]
    assert a["label_counts"] == sorted(({"label": label, "n": labels.count(label)} for label in dict.fromkeys(labels)),
                                       key=lambda c: -c["n"])
    assert a["index"]["exact"] and a["index"]["factory"] == "Flat" and a["index"]["recall"] == {"10": 1.0, "50": 1.0}
    near = a["nearest"]
    assert near["similarity"] == a["neighbours"][0]["similarity"] and near["store_sample"] == store.n
    assert near["far"] == (near["store_percentile"] <= 1.0) and bool(a["warnings"]) == near["far"]
    assert near["query_concepts_shared"] == sum(c["in_query"] for c in a["shared_concepts"])
    assert a["prediction"] is None


def test_code_space_and_codes_encoded_on_the_fly(planted, monkeypatch, capsys):
    store_dir, sae_dir, codes_dir = planted
    args = ("--sae", sae_dir, "--store", store_dir, "--id", "42", "--space", "codes", "--n-neighbours", 5, "--json")
    with_codes = json.loads(run(monkeypatch, capsys, *args, "--codes", codes_dir)[1])
    on_the_fly = json.loads(run(monkeypatch, capsys, *args)[1])
    assert on_the_fly["notes"] == ["codes encoded on the fly (no --codes given)"]
    assert with_codes["n_neighbours"] == 5
    for key in ("query", "concepts", "neighbours", "shared_concepts", "union"):
        assert on_the_fly[key] == with_codes[key], key
    codes = CodeStore.open(codes_dir)
    every = SparseCodes(codes.values, codes.indices, codes.n_latents)
    rows = NeighbourIndex().fit(every).search(every.take([42]), 5, exclude=np.array([42]))[1][0]
    assert [nb["row"] for nb in with_codes["neighbours"]] == rows.tolist()


def test_text_output_and_contact_sheet(planted, monkeypatch, capsys, tmp_path):
    store_dir, sae_dir, codes_dir = planted
    sheet = tmp_path / "sheet.png"
    code, out, _ = run(monkeypatch, capsys, "--sae", sae_dir, "--store", store_dir, "--codes", codes_dir,
                       "--index", 3, "--sheet", sheet)
    assert code == 0
    for part in ("query: row 3", "active concepts", "nearest 10 neighbours in embeddings", "distinct concepts",
                 "percentile", f"contact sheet: {sheet}"):
        assert part in out, part
    assert sheet.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sheet_says_when_images_are_not_available(tmp_path):
    store_dir, sae_dir, codes_dir = planted_artifacts(tmp_path, source={"kind": "image_folder",
                                                                        "root": str(tmp_path / "moved-away")})
    from analysis.concepts.sheet import contact_sheet

    store = EmbeddingStore.open(store_dir)
    engine = QueryEngine(store, load_sae(sae_dir), CodeStore.open(codes_dir))
    result = contact_sheet(engine.query(0, 4), store, engine.namer, tmp_path / "s.png")
    assert result["images_available"] is False and "are not at" in result["reason"]
    assert (tmp_path / "s.png").is_file()


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory):
    """A store of 60 digits embedded by a small random digits CNN saved to disk, as extraction records it."""
    tmp = tmp_path_factory.mktemp("digits")
    torch.manual_seed(0)
    save_cnn(DigitsCNN(CNNConfig(width=1)), tmp / "cnn")
    backbone = load_backbone("digits-cnn", str(tmp / "cnn"))
    images, labels = load_digits_images()
    with torch.no_grad():
        x = torch.cat([backbone.features(backbone.transform(Image.fromarray(images[i]).convert("RGB"))[None])
                       for i in range(60)]).numpy()
    info = backbone.info
    store = write_store(tmp / "store", x, labels=labels[:60], ids=[str(i) for i in range(60)],
                        classes=[str(i) for i in range(10)], config={"weights": str(tmp / "cnn")},
                        meta={"backbone": "digits-cnn", "output_kind": info["output_kind"],
                              "normalize": info["normalize"], "weights_sha256": info["weights_sha256"],
                              "source": {"kind": "digits", "size": 32}})
    save_sae(TopKSAE(SAEConfig(d_in=store.d, n_latents=16, k=2)), tmp / "sae", parent_store_hash=store.content_hash)
    Image.fromarray(images[7]).save(tmp / "digit7.png")
    return tmp


def test_a_new_image_goes_through_the_store_backbone(digits_store, monkeypatch, capsys, tmp_path):
    sheet = tmp_path / "new.png"
    code, out, err = run(monkeypatch, capsys, "--sae", digits_store / "sae", "--store", digits_store / "store",
                         "--image", digits_store / "digit7.png", "--n-neighbours", 3, "--json", "--sheet", sheet)
    assert code == 0, err
    a = json.loads(out)
    assert a["query"] == {"row": None, "id": None, "label": None, "split": None,
                          "image_path": str(digits_store / "digit7.png")}
    # The same picture as row 7: re-embedded, it finds row 7 itself at cosine 1.
    assert a["neighbours"][0]["row"] == 7 and a["neighbours"][0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert a["sheet"]["images_available"] is True and sheet.is_file()


def _other_store(tmp, d):
    return write_store(tmp / f"other{d}", np.random.default_rng(0).normal(size=(30, d)).astype(np.float32))


@pytest.mark.parametrize("case", ["unknown id", "index out of range", "negative index", "sae width",
                                  "codes of another store", "undecodable image", "bad neighbours", "sheet not png",
                                  "sheet folder missing", "sheet not writable", "missing store", "unknown device",
                                  "not a head"])
def test_errors_are_one_line_and_exit_2(planted, digits_store, tmp_path, monkeypatch, capsys, case):
    store_dir, sae_dir, codes_dir = planted
    base = ["--sae", sae_dir, "--store", store_dir]
    bad_image = tmp_path / "broken.png"
    bad_image.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    sheet_dir = tmp_path / "taken.png"  # a folder where the sheet would go: writing it must fail cleanly
    sheet_dir.mkdir()
    args, expected = {
        "unknown id": (base + ["--id", "no-such-image"], "--id 'no-such-image' is not an image"),
        "index out of range": (base + ["--index", 10_000], "--index 10000 is out of range"),
        "negative index": (base + ["--index", -1], "--index -1 is out of range for store"),
        "sae width": (["--sae", digits_store / "sae", "--store", store_dir, "--index", 0], "d_in="),
        "codes of another store": (["--sae", digits_store / "sae", "--store", digits_store / "store",
                                    "--codes", codes_dir, "--index", 0], "encoded from another store"),
        "undecodable image": (["--sae", digits_store / "sae", "--store", digits_store / "store",
                               "--image", bad_image], "cannot be decoded"),
        "bad neighbours": (base + ["--index", 0, "--n-neighbours", 0], "--n-neighbours must be >= 1"),
        "sheet not png": (base + ["--index", 0, "--sheet", tmp_path / "x.jpg"], "--sheet must name a .png"),
        "sheet folder missing": (base + ["--index", 0, "--sheet", tmp_path / "nowhere" / "x.png"], "its folder"),
        "sheet not writable": (base + ["--index", 0, "--sheet", sheet_dir],
                               f"cannot write the contact sheet {sheet_dir}"),
        "not a head": (base + ["--index", 0, "--head", tmp_path], "is not a saved head"),
        "missing store": (["--sae", sae_dir, "--store", tmp_path / "nowhere", "--index", 0], "no embedding store"),
        "unknown device": (["--sae", digits_store / "sae", "--store", digits_store / "store",
                            "--image", digits_store / "digit7.png", "--device", "tpu"], "--device 'tpu'"),
    }[case]
    code, out, err = run(monkeypatch, capsys, *args)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert ".tmp-" not in err  # never the name of a temporary file


def test_engine_refuses_codes_of_another_sae(planted, digits_store, tmp_path):
    store_dir, _, codes_dir = planted
    store = EmbeddingStore.open(store_dir)
    other = TopKSAE(SAEConfig(d_in=store.d, n_latents=24, k=3))
    save_sae(other, tmp_path / "other-sae")
    with pytest.raises(Exception, match="encoded with another SAE"):
        QueryEngine(store, load_sae(tmp_path / "other-sae"), CodeStore.open(codes_dir))


def test_sae_of_another_backbone_is_refused_and_another_store_of_the_same_is_noted(digits_store, tmp_path,
                                                                                    monkeypatch, capsys):
    store = EmbeddingStore.open(digits_store / "store")
    sae = TopKSAE(SAEConfig(d_in=store.d, n_latents=16, k=2))
    save_sae(sae, tmp_path / "resnet-sae", parent_store_hash="f" * 64, provenance={"backbone": "resnet50"})
    code, _, err = run(monkeypatch, capsys, "--sae", tmp_path / "resnet-sae", "--store", digits_store / "store",
                       "--index", 0)
    assert code == 2 and "trained on 'resnet50' embeddings" in err and "'digits-cnn'" in err
    save_sae(sae, tmp_path / "sibling-sae", parent_store_hash="f" * 64, provenance={"backbone": "digits-cnn"})
    code, out, _ = run(monkeypatch, capsys, "--sae", tmp_path / "sibling-sae", "--store", digits_store / "store",
                       "--index", 0, "--json")
    assert code == 0 and json.loads(out)["notes"][0].startswith("the SAE was trained on another store (ffffffffffff")


# -- the saved index, far queries, predictions ----------------------------------------------------------------
def test_the_saved_index_is_reused_by_the_next_process(planted, monkeypatch, capsys, tmp_path):
    store_dir, sae_dir, codes_dir = planted
    args = ["--sae", sae_dir, "--store", store_dir, "--codes", codes_dir, "--index", 5, "--json",
            "--index-dir", tmp_path / "indexes"]
    first = json.loads(run(monkeypatch, capsys, *args)[1])
    second = json.loads(run(monkeypatch, capsys, *args)[1])
    assert not first["index"]["reused"] and second["index"]["reused"]
    assert first["index"]["path"] == second["index"]["path"]
    assert Path(first["index"]["path"]).parent == tmp_path / "indexes"
    assert first["neighbours"] == second["neighbours"]
    exact = json.loads(run(monkeypatch, capsys, *args, "--exact")[1])
    assert exact["index"]["exact"] and exact["index"]["path"] != first["index"]["path"]
    none = json.loads(run(monkeypatch, capsys, *args[:-2], "--no-index-cache")[1])
    assert none["index"]["path"] is None and "in memory" in none["index"]["note"]
    # By default the index lives beside the codes.
    default = json.loads(run(monkeypatch, capsys, *args[:-2])[1])
    assert Path(default["index"]["path"]).parent == Path(f"{codes_dir}-index")


def test_a_json_answer_from_saved_codes_and_index_imports_no_torch(planted, tmp_path):
    import subprocess

    store_dir, sae_dir, codes_dir = planted
    argv = [SCRIPT, "--sae", str(sae_dir), "--store", str(store_dir), "--codes", str(codes_dir), "--index", "3",
            "--json", "--index-dir", str(tmp_path)]
    probe = ("import runpy, sys; sys.argv = %r; runpy.run_path(%r, run_name='__main__'); "
             "print(sorted(m for m in ('torch', 'matplotlib', 'sklearn', 'umap', 'selenium') if m in sys.modules))")
    for space in ("embeddings", "codes", "reconstructions"):  # the first run of a space builds its index
        for _ in range(2):
            done = subprocess.run([sys.executable, "-c", probe % (argv + ["--space", space], SCRIPT)],
                                  capture_output=True, text=True, cwd=Path(SCRIPT).parents[1])
            assert done.returncode == 0, done.stderr
        assert done.stdout.strip().splitlines()[-1] == "[]", (space, done.stdout[-200:])


def test_reconstructions_space_equals_brute_force(planted):
    store_dir, sae_dir, codes_dir = planted
    store, sae = EmbeddingStore.open(store_dir), load_sae(sae_dir)
    engine = QueryEngine(store, sae, CodeStore.open(codes_dir), index_dir=None)
    a = engine.query(9, 5, "reconstructions")
    with torch.no_grad():
        recon = sae.decode(*sae.encode(torch.from_numpy(np.array(store.x)))).double().numpy()
    sims = _brute_cosine(recon, 9)
    np.testing.assert_allclose([nb["similarity"] for nb in a["neighbours"]], np.sort(sims)[::-1][:5], atol=1e-5)
    rows = [nb["row"] for nb in a["neighbours"]]
    np.testing.assert_allclose([nb["similarity"] for nb in a["neighbours"]], sims[rows], atol=1e-5)


def test_an_image_far_from_the_store_is_warned_with_the_evidence(planted):
    store_dir, sae_dir, codes_dir = planted
    store = EmbeddingStore.open(store_dir)
    engine = QueryEngine(store, load_sae(sae_dir), CodeStore.open(codes_dir), index_dir=None)
    typical = engine.query(17, 10)
    far = engine.query_vector(-np.asarray(store.x[17]), 10)  # pointing away from every row of the store
    assert not typical["nearest"]["far"] and typical["warnings"] == []
    near = far["nearest"]
    assert near["far"] and near["store_percentile"] == 0.0 and near["similarity"] < near["store_p1"]
    assert len(far["warnings"]) == 1
    warning = far["warnings"][0]
    assert "far from everything in the store" in warning and f"{near['similarity']:.3f}" in warning
    assert f"shares {near['query_concepts_shared']} of its {near['query_concepts']} concepts" in warning
    from analysis.concepts.query_text import format_text

    assert format_text(far).splitlines()[1].startswith("WARNING: this image is far")


def test_predictions_of_the_global_head_local_ttt_and_knn(planted, monkeypatch, capsys, tmp_path):
    store_dir, sae_dir, codes_dir = planted
    args = ["--sae", sae_dir, "--store", store_dir, "--codes", codes_dir, "--index", 17, "--json",
            "--index-dir", tmp_path]
    first = json.loads(run(monkeypatch, capsys, *args, "--predict")[1])
    p = first["prediction"]
    store = EmbeddingStore.open(store_dir)
    truth = store.classes[store.labels[17]]
    assert p["head"]["trained"] and not p["head"]["reused"] and Path(p["head"]["path"]).parent == tmp_path
    assert p["n_labelled_neighbours"] == 10 and p["ttt"]["steps"] == 50 and p["ttt"]["lr"] == 1e-2
    counts = {c["label"]: c["n"] for c in first["label_counts"]}
    assert p["knn"]["label"] == max(counts, key=counts.get)
    # Planted classes are linearly separable: the head, TTT and the vote all find the query's class.
    assert p["global"]["label"] == p["ttt"]["label"] == p["knn"]["label"] == truth
    assert 0 < p["global"]["probability"] <= 1 and 0 < p["ttt"]["probability"] <= 1
    second = json.loads(run(monkeypatch, capsys, *args, "--predict")[1])["prediction"]
    assert second["head"]["reused"] and second["global"] == p["global"] and second["ttt"] == p["ttt"]
    saved = json.loads(run(monkeypatch, capsys, *args, "--head", p["head"]["path"])[1])["prediction"]
    assert not saved["head"]["trained"] and saved["global"] == p["global"]
    code, out, _ = run(monkeypatch, capsys, *[a for a in args if a != "--json"], "--predict")
    assert code == 0 and "local TTT" in out and "global head" in out


def test_a_label_past_the_class_names_is_refused_before_any_count(planted):
    import dataclasses

    from artifacts import ArtifactError

    store_dir, sae_dir, codes_dir = planted
    store = EmbeddingStore.open(store_dir)
    labels = store.labels.copy()
    labels[3] = 10**9
    with pytest.raises(ArtifactError, match="holds labels -?\\d+...1000000000 but names 4 classes"):
        QueryEngine(dataclasses.replace(store, labels=labels), load_sae(sae_dir), CodeStore.open(codes_dir))


def test_a_black_on_white_digit_against_a_white_on_black_store_is_warned(digits_store, monkeypatch, capsys):
    images, _ = load_digits_images()
    Image.fromarray(255 - images[7]).save(digits_store / "inverted7.png")
    base = ["--sae", digits_store / "sae", "--store", digits_store / "store", "--json", "--no-index-cache"]
    same = json.loads(run(monkeypatch, capsys, *base, "--image", digits_store / "digit7.png")[1])
    inverted = json.loads(run(monkeypatch, capsys, *base, "--image", digits_store / "inverted7.png")[1])
    assert same["warnings"] == [] and same["nearest"]["store_percentile"] == 100.0
    assert inverted["nearest"]["far"] and "far from everything in the store" in inverted["warnings"][0]
