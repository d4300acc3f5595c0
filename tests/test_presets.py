"""The presets end to end on tiny settings: the digits run and its report, reuse, a changed setting, the CLI,
the mnist preset on IDX files the test writes, and the imagenet-clip preset on a tiny folder (slow)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from analysis.run.presets import preset_config, reproduce
from embeddings.store import EmbeddingStore

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(cnn_width=1, cnn_epochs=1, sae_epochs=2.0, sae_n_latents=16, sae_k=2, n_neighbours=10, widths=(1, 2),
            study={"umap": False, "probe_epochs": 3, "n_queries": 30, "n_bootstrap": 5, "steps": 5, "head_epochs": 5,
                   "n_mask_queries": 20, "n_locality_queries": 10, "locality_rows": 100, "sweep_neighbours": (2, 5),
                   "sweep_train_fractions": (0.5, 1.0), "n_sweep_queries": 30})
SECTION_METRICS = {
    "concepts": ["downstream.acc_raw", "downstream.acc_recon", "downstream.acc_codes", "sharing.union_concepts_mean",
                 "sharing.union_concepts_random", "sharing.o1_distance"],
    "ttt": ["ttt.global_acc", "ttt.ttt_acc", "ttt.majority_acc"],
}


def _lookup(report, path):
    node = report
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    # A relative --out, as in the README's command: every recorded path must still hold from the run directory.
    root = tmp_path_factory.mktemp("runs")
    log, cwd = [], os.getcwd()
    os.chdir(root)
    try:
        report = reproduce("digits", Path("digits"), log=log.append, **TINY)
    finally:
        os.chdir(cwd)
    return root / "digits", report, log


def test_digits_report_files_and_schema(digits_run):
    out, report, _ = digits_run
    assert json.loads((out / "report.json").read_text()) == report
    assert (out / "report.html").stat().st_size > 1000
    assert report["schema"] == "ttt-concepts-report/2" and report["preset"] == "digits"
    for key in ("fvu", "dead_fraction"):
        m = report["sae"][key]
        assert m["n"] > 0 and m["se"] is not None and m["stage"] == "codes"
    assert set(report["timings"]) >= {"backbone", "store", "sae", "codes", "report", "total_s"}
    assert all(s["status"] in ("ok", "missing") for s in report["sections"].values()), report["sections"]
    assert {name.split(".")[0] for name in report["plots"]} >= {"concepts", "ttt"}
    for name, rel in report["plots"].items():
        assert open(out / rel, "rb").read(8) == b"\x89PNG\r\n\x1a\n", name


def test_every_section_reports_its_numbers_or_says_why_not(digits_run):
    out, report, _ = digits_run
    for section, metrics in SECTION_METRICS.items():
        status = report["sections"][section]
        for path in metrics:
            value = _lookup(report, path)
            if status["status"] == "ok":
                assert value is not None and "value" in value and "se" in value and "n" in value, path
            else:
                assert value is None and status["reason"], path
    if report["sections"]["width"]["status"] == "ok":
        rows = report["sweeps"]["width"]
        assert [r["width"] for r in rows] == [1, 2] and all("gain" in r for r in rows)
        assert report["plots"]["report.width"] == "report/width.png" and (out / "report" / "width.png").is_file()


def test_gallery_and_cards_come_from_the_codes(digits_run):
    out, report, _ = digits_run
    concepts = report["gallery"]["concepts"]
    assert concepts and all(c["description"] for c in concepts)
    assert all((out / "report" / p).is_file() for c in concepts for p in c["images"] if p)
    cards = report["cards"]["cards"]
    assert len(cards) == 6 and all(len(c["neighbours"]) == TINY["n_neighbours"] for c in cards)
    store = EmbeddingStore.open(out / "store")
    assert all(c["row"] in set(store.split["test"].tolist()) for c in cards)


def test_rerun_reuses_every_stage(digits_run):
    out, report, _ = digits_run
    log = []
    again = reproduce("digits", out, log=log.append, **TINY)
    ran = [r for r in again["timings"] if isinstance(again["timings"][r], dict) and r != "report"]
    assert ran and all(again["timings"][r]["reused"] for r in ran)
    assert sum("reusing" in line for line in log) == len(ran)
    assert again["sae"]["fvu"] == report["sae"]["fvu"]


def _cli(*argv):
    """Run scripts/reproduce.py in a fresh process: (exit code, stdout, stderr)."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "reproduce.py"), *argv], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)
    return done.returncode, done.stdout, done.stderr


@pytest.mark.slow  # a second process importing torch, and four stages rerun: ~15-25 s on 2 shared cores
def test_changed_setting_reruns_exactly_its_dependents_through_the_cli(digits_run, tmp_path):
    out, _, _ = digits_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    argv = ["--out", str(run), "--cnn-width", "1", "--cnn-epochs", "1", "--sae-n-latents", "16", "--sae-k", "2",
            "--sae-epochs", "3", "--seed", "0", "--n-neighbours", "10", "--widths", "1", "2"]
    argv += [f"--study-set={k}={json.dumps(v)}" for k, v in TINY["study"].items()]
    rc, text, err = _cli(*argv)
    assert rc == 0, err
    assert "sae: settings changed (epochs: recorded 2.0, requested 3.0); rerunning it" in text
    assert "codes: settings changed (input 'sae' changed); rerunning it" in text
    for kept in ("backbone", "store", "width"):
        assert f"{kept}: reusing" in text
    record = json.loads((run / "stages" / "sae.json").read_text())
    assert record["settings"]["epochs"] == 3.0
    if (run / "stages" / "concepts.json").is_file():
        assert "concepts: settings changed (input 'codes' changed" in text


def test_cli_errors_are_one_line_and_exit_2(tmp_path):
    rc, _, err = _cli("--out", str(tmp_path / "x"), "--sae-epochs", "0")
    assert rc == 2 and err.startswith("error: --sae-epochs must be a finite number > 0") and err.count("\n") == 1
    assert not (tmp_path / "x" / "backbone").exists()


def test_quick_keeps_explicit_settings():
    config = preset_config("digits", quick=True, cnn_epochs=3)
    assert config.quick and config.cnn_epochs == 3 and config.sae_epochs == 40.0
    with pytest.raises(ValueError, match="--preset"):
        preset_config("cifar")
    with pytest.raises(ValueError, match="--preset mnist needs --data DIR"):
        preset_config("mnist")


def test_mnist_preset_on_idx_files(tmp_path):
    from test_idx import make_idx_set

    make_idx_set(tmp_path / "data" / "MNIST" / "raw", n_train=120, n_test=30, gz=True)
    out = tmp_path / "run"
    report = reproduce("mnist", out, log=lambda _: None, data=str(tmp_path / "data"), **{**TINY, "widths": (1,)})
    store = EmbeddingStore.open(out / "store")
    assert store.n == 150 and store.d == 16  # 28x28 input: 4x4 feature maps of one channel
    np.testing.assert_array_equal(store.split["test"], np.arange(120, 150))
    assert len(store.split["val"]) == 20
    if report["sections"]["ttt"]["status"] == "ok":  # generated files are not MNIST's: never set beside the paper
        row = next(r for r in report["comparisons"] if r["metric"].endswith("ttt.global_acc"))
        assert row["paper"] is None and row["verdict"] == "not the paper's data: not compared"


HOSTILE_CLASS = "<img src=x onerror=alert(1)>"
"""A class folder named like an HTML tag (a folder name can't hold the '/' of a closing script tag)."""


def make_imagenet(root, n_train=53, n_val=2, classes=("n01", "n02", HOSTILE_CLASS)):
    rng = np.random.default_rng(0)
    for part, n in (("train", n_train), ("val", n_val)):
        for c in classes:
            folder = root / part / c
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, size=(36 + i % 5, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


@pytest.mark.slow
def test_imagenet_clip_preset_end_to_end_with_a_stand_in_model(tmp_path):
    make_imagenet(tmp_path / "imagenet")
    out = tmp_path / "run"
    report = reproduce("imagenet-clip", out, log=lambda _: None, data=str(tmp_path / "imagenet"),
                       backbone="paper-clip-vit-b16=vit_tiny_patch16_224", weights="random", sae_n_latents=32, sae_k=4,
                       sae_epochs=2.0, n_neighbours=5, study=TINY["study"])
    store = EmbeddingStore.open(out / "store")
    recipe = store.meta["backbone_info"]["recipe"]
    assert recipe["name"] == "paper-clip-vit-b16" and recipe["model_used"] == "vit_tiny_patch16_224"
    assert recipe["model"] == "vit_base_patch16_clip_quickgelu_224.openai" and recipe["stand_in"]
    preprocessing = store.meta["preprocessing"]
    assert preprocessing["resize_short_side"] == 256 and preprocessing["input_size"] == [3, 224, 224]
    assert store.meta["normalize"] is True
    np.testing.assert_allclose(np.linalg.norm(store.x, axis=1), 1.0, rtol=1e-5)
    assert len(store.split["test"]) == 150 and len(store.split["train"]) == 9 and len(store.split["val"]) == 6
    assert np.bincount(store.labels[store.split["test"]]).tolist() == [50, 50, 50]
    assert HOSTILE_CLASS in store.classes
    page = (out / "report.html").read_text()
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert report["sae"]["fvu"]["n"] == 150


def test_clip_sae_made_otherwise_warns_naming_both(tmp_path):
    from analysis.run.cache import StageCache, StageResult
    from analysis.run.presets import check_clip_sae
    from artifacts import write_json

    for name, body in (("store", {"backbone": "vit_base_patch16_clip_224.openai", "backbone_info": {}}),
                       ("sae", {"provenance": {"preprocessing": {"recipe": "paper-clip-vit-b16"}}})):
        (tmp_path / name).mkdir()
        write_json(tmp_path / name / ("meta.json" if name == "store" else "config.json"), body)
    cache = StageCache(tmp_path, log=lambda _: None)
    cache.results = {n: StageResult(n, "k" * 64, tmp_path / n, {}, 0.0, False) for n in ("store", "sae")}
    with pytest.warns(UserWarning, match=r"'paper-clip-vit-b16'.*'vit_base_patch16_clip_224.openai'"):
        assert check_clip_sae(cache)
    recipe = {"recipe": {"name": "paper-clip-vit-b16"}}
    write_json(tmp_path / "store" / "meta.json", {"backbone": "x", "backbone_info": recipe})
    assert check_clip_sae(cache) == []


def test_paper_clip_recipe_is_quickgelu_with_resize_256_and_crop_224():
    import torch
    from torchvision.transforms import functional as TF

    from embeddings.backbone import load_backbone
    from embeddings.recipes import CLIP_MEAN, CLIP_STD, PAPER_CLIP, RECIPES, parse_recipe

    recipe = RECIPES[PAPER_CLIP]
    assert recipe.model == "vit_base_patch16_clip_quickgelu_224.openai" and (recipe.resize, recipe.crop) == (256, 224)
    assert parse_recipe("vit_base_patch16_clip_224.openai") is None
    backbone = load_backbone(f"{PAPER_CLIP}=vit_tiny_patch16_224", weights="random")
    info = backbone.info
    assert info["recipe"]["name"] == PAPER_CLIP and info["recipe"]["stand_in"]
    assert info["preprocessing"]["resize_short_side"] == 256 and info["preprocessing"]["crop_pct"] == 224 / 256
    assert info["output_kind"] == "head" and info["normalize"] is True
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    x = backbone.transform(image)
    expected = TF.normalize(TF.to_tensor(TF.center_crop(TF.resize(image, 256, TF.InterpolationMode.BICUBIC), 224)),
                            CLIP_MEAN, CLIP_STD)
    torch.testing.assert_close(x, expected)
    batch = backbone.normalize_batch(backbone.image_transform(image).unsqueeze(0))
    torch.testing.assert_close(batch[0], x, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_a_run_killed_during_sae_training_resumes_to_the_same_weights(tmp_path):
    import os

    from sae.trainer import KILL_ENV

    args = ["--cnn-width", "1", "--cnn-epochs", "1", "--sae-n-latents", "16", "--sae-k", "2", "--sae-epochs", "60",
            "--widths"] + [f"--study-set={k}={json.dumps(v)}" for k, v in TINY["study"].items()]
    killed = subprocess.run([sys.executable, str(ROOT / "scripts" / "reproduce.py"), "--out", str(tmp_path / "a"),
                             *args], capture_output=True, text=True, cwd=ROOT, env={**os.environ, KILL_ENV: "201"})
    assert killed.returncode != 0
    # A stage is built beside the run (RUN_DIR/.next) and moved in only when it has succeeded.
    assert (tmp_path / "a" / ".next" / ".sae.partial" / "checkpoint.pt").is_file()
    assert not (tmp_path / "a" / "sae").exists()
    rc, text, err = _cli("--out", str(tmp_path / "a"), *args)
    assert rc == 0, err
    assert "backbone: reusing" in text and "store: reusing" in text
    rc, _, err = _cli("--out", str(tmp_path / "b"), *args)
    assert rc == 0, err
    same = [(tmp_path / d / "sae" / "sae.safetensors").read_bytes() for d in ("a", "b")]
    assert same[0] == same[1]


def test_a_failing_study_is_a_failed_section_with_its_traceback(tmp_path):
    from analysis.run.cache import Stage, StageCache
    from analysis.run.presets import run_section

    def boom(out_dir, parents):
        raise ValueError("the study broke")

    cache = StageCache(tmp_path, log=lambda _: None)
    status = run_section(cache, "concepts", Stage("concepts", {}, boom))
    assert status["status"] == "failed" and "the study broke" in status["reason"]
    assert "Traceback" in (tmp_path / "stages" / "concepts.error.txt").read_text()
    assert run_section(cache, "ttt", "analysis/ttt/study.py is not in this tree") == {
        "status": "missing", "reason": "analysis/ttt/study.py is not in this tree"}


def test_the_summary_lines_survive_a_claim_that_could_not_be_measured(capsys):
    import runpy

    main = runpy.run_path(str(ROOT / "scripts" / "reproduce.py"))["main"]
    missing = {"value": None, "se": None, "n": 0, "provenance": "too few points to fit"}
    report = {"sections": {"theory": {"status": "ok", "reason": ""}}, "comparisons": [],
              "claims": [{"metric": "theory.claims", "claim": "falls as 1/n_neighbours", "measured": missing,
                          "verdict": "inconclusive (not measured: too few points to fit)"}]}
    main.__globals__["reproduce"] = lambda *a, **k: report
    assert main(["--preset", "theory", "--out", "unused"]) == 0
    lines = capsys.readouterr().out.splitlines()
    claim = next(line for line in lines if "falls as 1/n_neighbours" in line)
    assert "inconclusive" in claim and "too few points to fit" in claim
    assert sum(line.startswith("report: ") for line in lines) == 1  # the report path once


def test_new_contents_in_the_same_idx_folder_change_the_backbone_key(tmp_path):
    # Swapping MNIST for Fashion-MNIST in the same --data folder must not reuse the old CNN, store and studies.
    from test_idx import make_idx_set

    from analysis.run.cache import stage_key
    from analysis.run.presets import _chain, _cnn_data

    def backbone_key():
        config = preset_config("mnist", data=str(tmp_path / "data"), **{**TINY, "widths": (1,)})
        stage = _chain("mnist", config, _cnn_data("mnist", config), "cpu")[0]
        return stage_key(stage.name, stage.version, stage.settings, {})

    make_idx_set(tmp_path / "data", n_train=60, n_test=12, seed=0)
    before = backbone_key()
    assert backbone_key() == before
    make_idx_set(tmp_path / "data", n_train=60, n_test=12, seed=1)
    assert backbone_key() != before


def test_a_second_run_into_the_same_out_is_refused_while_the_first_runs(tmp_path):
    # Two runs into one --out would delete each other's stage directories (a changed key clears them) and fail
    # each other's sections; the second is refused at once, naming the first.
    import os
    import socket

    from analysis.run.rundir import LOCK_NAME, open_run_dir, close_run_dir
    from artifacts.lock import LockHeld

    out = tmp_path / "run"
    open_run_dir(out, "digits")
    close_run_dir(out)
    holder = {"pid": os.getppid(), "host": socket.gethostname(), "start_ticks": None, "since": "now"}
    (out / LOCK_NAME).write_text(json.dumps(holder))
    with pytest.raises(LockHeld, match=f"pid {os.getppid()}"):
        reproduce("digits", out, log=lambda _: None, **TINY)
    assert not (out / "backbone").exists()


def test_a_folder_that_is_not_a_run_directory_is_refused_and_left_untouched(tmp_path):
    # Pointed at a project checkout, an earlier version deleted its sae/ folder (named like a stage).
    from artifacts import ArtifactError

    out = tmp_path / "checkout"
    for name in ("sae", "store", "report/assets"):
        (out / name).mkdir(parents=True)
        (out / name / "keep.py").write_text("precious")
    (out / "report.html").write_text("mine")
    with pytest.raises(ArtifactError, match=r"\(report, report.html, sae, store\) but not a run directory"):
        reproduce("digits", out, log=lambda _: None, **TINY)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "report", "report.html", "report/assets", "report/assets/keep.py", "sae", "sae/keep.py", "store",
        "store/keep.py"]


def test_a_run_directory_of_an_earlier_version_is_recognised(tmp_path):
    from artifacts import ArtifactError
    from analysis.run.rundir import close_run_dir, is_run_dir, open_run_dir

    out = tmp_path / "old"
    for name in ("stages", "sae", "report"):
        (out / name).mkdir(parents=True)
    (out / "stages" / "sae.json").write_text(json.dumps({"stage": "sae", "key": "k" * 64}))
    (out / "report.json").write_text("{}")
    close_run_dir(open_run_dir(out, "digits"))
    assert is_run_dir(out)
    (tmp_path / "mine" / "stages").mkdir(parents=True)
    (tmp_path / "mine" / "notes.txt").write_text("a user's folder that happens to have stages/")
    with pytest.raises(ArtifactError, match="not a run directory"):
        open_run_dir(tmp_path / "mine", "digits")


def test_the_run_directory_lock_lives_inside_it(tmp_path):
    from analysis.run.rundir import LOCK_NAME, close_run_dir, is_run_dir, open_run_dir

    parent = tmp_path / "readonly"
    out = open_run_dir(parent / "run", "digits")
    assert (out / LOCK_NAME).is_file() and is_run_dir(out)
    close_run_dir(out)
    parent.chmod(0o555)  # a run directory the user may write in a parent they may not
    try:
        out = open_run_dir(parent / "run", "digits")
        close_run_dir(out)
    finally:
        parent.chmod(0o755)
    assert [p.name for p in parent.iterdir()] == ["run"]


def test_a_wrong_setting_fails_before_any_finished_study_is_touched(tmp_path):
    import torch

    out = tmp_path / "run"
    tiny = {**TINY, "widths": ()}
    reproduce("digits", out, log=lambda _: None, **tiny)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".run.lock"}
    wrong = [({"n_neighbours": 100000}, "--n-neighbours 100000 must be below"),
             ({"study": {"seed": None}}, "--study-set seed must be an integer, got None"),
             ({"study": {"n_querys": 7}}, "--study-set n_querys: no study of this run has such a setting"),
             ({"study": {"n_queries": "abc"}}, "--study-set n_queries must be an integer"),
             ({"study": {"spaces": "codes"}}, "--study-set spaces must be a list")]
    if not torch.cuda.is_available():
        wrong.append(({"device": "cuda"}, "CUDA is not available"))
    for settings, message in wrong:
        given = {**tiny, **settings, "study": {**TINY["study"], **settings.get("study", {})}}
        with pytest.raises(ValueError, match=message):
            reproduce("digits", out, log=lambda _: None, **given)
        after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".run.lock"}
        assert after.keys() == before.keys() and all(after[p] == before[p] for p in before), settings


@pytest.mark.parametrize("preset, settings, flag", [
    ("digits", {"sae": "x"}, "--sae"), ("digits", {"backbone": "x"}, "--backbone"),
    ("digits", {"weights": "random"}, "--weights"), ("mnist", {"data": "d", "weights": "x"}, "--weights"),
    ("imagenet-clip", {"data": "d", "cnn_width": 2}, "--cnn-width"),
])
def test_a_flag_the_preset_ignores_is_refused(preset, settings, flag):
    with pytest.raises(ValueError, match=f"does not use {flag}"):
        preset_config(preset, **settings)


@pytest.mark.parametrize("argv, message", [
    (["--threads", "-1"], "--threads must be >= 1"),
    (["--sae-epochs", "inf"], "--sae-epochs must be a finite number"),
    (["--seed", "-1"], "--seed must be an integer in"),
    (["--seed", str(2**40)], "--seed must be an integer in"),
    (["--study-set", "n_queries=abc"], "--study-set n_queries must be an integer"),
    (["--study-set", "n_queries=[1,2]"], "--study-set n_queries must be an integer"),
])
def test_bad_flags_are_one_line_errors_before_the_run_directory_is_made(tmp_path, argv, message):
    rc, _, err = _cli("--out", str(tmp_path / "x"), *argv)
    assert rc == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()


def test_the_theory_preset_refuses_settings_it_would_ignore():
    # The theory stage reads only --quick and --study-set: a --seed would be recorded in the report's settings
    # while the numbers came from the default seeds.
    with pytest.raises(ValueError, match="--seed"):
        preset_config("theory", seed=3)
    with pytest.raises(ValueError, match="--cnn-width"):
        preset_config("theory", cnn_width=4, quick=True)
    assert preset_config("theory", quick=True, study={"seeds": [3]}, seed=None) == {"quick": True,
                                                                                   "study": {"seeds": [3]}}


def test_a_run_repeats_from_its_own_settings_file(digits_run):
    # settings.json holds every setting resolved, in the flags' names: --config of it asks for the very same run.
    import runpy

    from analysis.run.presets import run_settings
    from artifacts.flags import parse_args

    out, _, _ = digits_run
    recorded = json.loads((out / "settings.json").read_text())
    script = runpy.run_path(str(ROOT / "scripts" / "reproduce.py"), run_name="toolkit_script")
    args = parse_args(script["parser"](), ["--config", str(out / "settings.json")])
    given = {k: getattr(args, k) for k in ("data", "quick", "seed", "cnn_width", "cnn_epochs", "sae_n_latents",
                                           "sae_k", "sae_epochs", "n_neighbours", "widths", "backbone", "weights",
                                           "sae")}
    config = preset_config(args.preset, **given, study=script["study_settings"](args.study_set))
    assert run_settings(args.preset, config, args.device, args.threads) == recorded
    assert recorded["sae_epochs"] == TINY["sae_epochs"] and recorded["widths"] == list(TINY["widths"])


def test_new_images_in_the_same_imagenet_folder_change_the_store_key(tmp_path):
    from analysis.run.cache import stage_key
    from analysis.run.presets import _chain

    def store_key():
        config = preset_config("imagenet-clip", data=str(tmp_path / "imagenet"))
        stage = _chain("imagenet-clip", config, None, "cpu")[0]
        return stage_key(stage.name, stage.version, stage.settings, {})

    make_imagenet(tmp_path / "imagenet", n_train=4, n_val=1)
    before = store_key()
    assert store_key() == before
    image = next((tmp_path / "imagenet" / "train" / "n01").iterdir())
    Image.new("RGB", (32, 32), (1, 2, 3)).save(image.with_name("added.png"))
    assert store_key() != before
