"""Artifacts you can trust: no data lost to --overwrite or to two runs at once, no silently wrong reuse or
hand-edited store, clear messages for damaged files, every input of a folder accounted for."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from artifacts import (
    ArtifactError,
    LockHeld,
    begin_dir,
    building,
    check_settings,
    commit_dir,
    dir_lock,
    lock_path,
    partial_dir,
    read_json,
    settings_differences,
    write_json,
)
from embeddings.store import EmbeddingStore, write_store
from script_runner import run_script_in_process

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SAE = str(ROOT / "scripts" / "train_sae.py")
EXTRACT = str(ROOT / "scripts" / "extract.py")
HOLDER = """
import sys
from artifacts import dir_lock
with dir_lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.readline()
"""


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    return env


def _run(*cmd, **kw):
    return subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=240,
                          **kw)


def _in_process(script, *argv, capsys):
    """Run a script's ``__main__`` here (no new interpreter to start), answered like ``_run``."""
    code, out, err = run_script_in_process(Path(script).name, *argv, capsys=capsys)
    return subprocess.CompletedProcess(argv, code, out, err)


def _assert_one_error_line(done):
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr
    return errors[0]


def _thesis(tmp_path) -> Path:
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "thesis.tex").write_text("\\chapter{Three years of work}")
    return folder


@pytest.fixture
def small_store(tmp_path):
    x = np.random.default_rng(0).normal(size=(120, 8)).astype(np.float32)
    return write_store(tmp_path / "store", x, split={"train": np.arange(100), "val": np.arange(100, 120)})


def _sae_args(store, out, steps=20):
    return [TRAIN_SAE, "--store", str(store.store_dir), "--out", str(out), "--steps", str(steps), "--batch-size", "20",
            "--n-latents", "16", "--k", "2", "--checkpoint-every", "5", "--no-progress", "--device", "cpu",
            "--threads", "1"]


# ------------------------------------------------------------------------------------------- --overwrite


def test_overwrite_never_deletes_a_folder_that_is_not_an_artifact(tmp_path):
    folder = _thesis(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(ArtifactError, match="not an artifact of this toolkit") as refused:
            begin_dir(folder, overwrite=overwrite)
        assert str(folder) in str(refused.value) and "choose another --out" in str(refused.value)
        assert "--overwrite" not in str(refused.value)
    work = partial_dir(tmp_path / "elsewhere")
    work.mkdir()
    with pytest.raises(ArtifactError, match="not an artifact"):
        commit_dir(work, folder, overwrite=True)
    assert (folder / "thesis.tex").read_text().startswith("\\chapter")
    (tmp_path / "a_file").write_text("mine")
    with pytest.raises(ArtifactError, match="is a file"):
        begin_dir(tmp_path / "a_file", overwrite=True)


def test_overwrite_replaces_an_artifact_and_refusal_suggests_it(tmp_path):
    out = tmp_path / "art"
    with building(out) as work:
        write_json(work / "meta.json", {"schema_version": 1, "package_version": "x", "v": 1})
    with pytest.raises(ArtifactError, match="already exists; pass --overwrite"):
        begin_dir(out)
    with building(out, overwrite=True) as work:
        write_json(work / "meta.json", {"schema_version": 1, "package_version": "x", "v": 2})
    assert read_json(out / "meta.json")["v"] == 2 and not partial_dir(out).exists()
    assert not lock_path(out).exists()  # committed: the lock went with it
    with pytest.raises(RuntimeError):
        with building(out, overwrite=True) as work:
            raise RuntimeError("failed half-way")
    assert read_json(out / "meta.json")["v"] == 2 and not partial_dir(out).exists() and not lock_path(out).exists()


def test_scripts_with_overwrite_leave_a_foreign_folder_alone(tmp_path, small_store, capsys, one_thread):
    folder = _thesis(tmp_path)
    done = _in_process(EXTRACT, "--source", "digits", "--weights", "random", "--device", "cpu", "--no-progress",
                       "--out", str(folder), "--overwrite", "--threads", "1", capsys=capsys)
    line = _assert_one_error_line(done)
    assert str(folder) in line and "choose another --out" in line and "--overwrite" not in line
    line = _assert_one_error_line(_in_process(*_sae_args(small_store, folder), "--overwrite", capsys=capsys))
    assert str(folder) in line and "--overwrite" not in line
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.tex"]


# ------------------------------------------------------------------------------------------- locks


def _hold_lock(final_dir):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(final_dir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def _release(holder):
    holder.stdin.close()
    assert holder.wait(timeout=60) == 0


def test_a_second_process_is_refused_while_the_first_holds_the_lock(tmp_path):
    out = tmp_path / "art"
    holder = _hold_lock(out)
    try:
        with pytest.raises(LockHeld, match=rf"pid {holder.pid} on host {socket.gethostname()}"):
            begin_dir(out)
        with pytest.raises(LockHeld):
            begin_dir(out, overwrite=True)
    finally:
        _release(holder)
    assert not lock_path(out).exists()  # released when the holder finished
    assert begin_dir(out).is_dir()
    commit_dir(partial_dir(out), out)


def test_a_dead_holders_lock_is_taken_over(tmp_path):
    out = tmp_path / "art"
    holder = _hold_lock(out)
    holder.kill()  # SIGKILL: no clean-up; the lock file stays, naming a dead pid
    holder.wait()
    assert lock_path(out).exists()
    work = begin_dir(out)
    assert read_json(lock_path(out))["pid"] == os.getpid()
    commit_dir(work, out)
    assert not lock_path(out).exists()


def test_a_lock_of_another_host_is_never_guessed_about(tmp_path):
    out = tmp_path / "art"
    lock_path(out).write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "since": "today"}))
    with pytest.raises(LockHeld, match=r"host elsewhere\.example.*delete .*\.art\.lock"):
        begin_dir(out)
    # an empty lock is one being written right now, unless it has stayed empty for long
    lock_path(out).write_text("")
    with pytest.raises(LockHeld, match="starting"):
        begin_dir(out)
    old = time.time() - 3600
    os.utime(lock_path(out), (old, old))
    commit_dir(begin_dir(out), out)


def test_locks_are_reentrant_in_a_process_and_released_at_exit(tmp_path):
    out = tmp_path / "art"
    with dir_lock(out):
        work = begin_dir(out)  # the same process may build what it holds
        commit_dir(work, out)
        assert lock_path(out).exists()  # still held by the outer block
    assert not lock_path(out).exists()
    leaves = "import sys\nfrom artifacts import begin_dir\nbegin_dir(sys.argv[1])\n"
    done = _run("-c", leaves, str(tmp_path / "other"))
    assert done.returncode == 0, done.stderr
    assert not lock_path(tmp_path / "other").exists()


@pytest.mark.slow
def test_two_extractions_into_one_out_never_crash(tmp_path):
    """The trial that crashed with FileNotFoundError / 'Directory not empty': two runs started together."""
    out = tmp_path / "store"
    args = [EXTRACT, "--source", "digits", "--weights", "random", "--batch-size", "64", "--chunk-size", "256",
            "--threads", "1", "--num-workers", "0", "--no-progress", "--device", "cpu", "--out", str(out)]
    procs = [subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(), cwd=ROOT) for _ in range(2)]
    results = [(p.wait(timeout=240), *p.communicate()) for p in procs]
    for code, _, err in results:
        assert "Traceback" not in err, err
        assert code == 0 or (code == 2 and "is being written by another run" in err), err
    assert any(code == 0 for code, _, _ in results)
    assert EmbeddingStore.open(out, verify=True).n == 1797
    assert not partial_dir(out).exists() and not lock_path(out).exists()


def test_extraction_is_refused_at_once_while_another_run_holds_out(tmp_path, capsys, one_thread):
    out = tmp_path / "store"
    holder = _hold_lock(out)
    try:
        done = _in_process(EXTRACT, "--source", "digits", "--weights", "random", "--no-progress", "--device", "cpu",
                           "--out", str(out), "--overwrite", "--threads", "1", capsys=capsys)
        line = _assert_one_error_line(done)
        assert f"pid {holder.pid}" in line and "another run" in line
    finally:
        _release(holder)
    assert not out.exists()


@pytest.mark.slow
def test_a_live_training_run_is_neither_resumed_nor_overwritten_by_a_second(tmp_path, small_store):
    out = tmp_path / "sae"
    first = subprocess.Popen([sys.executable, *_sae_args(small_store, out, steps=10_000_000)], env=_env(), cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        ckpt = partial_dir(out) / "checkpoint.pt"
        deadline = time.time() + 120
        while not ckpt.exists():
            assert first.poll() is None and time.time() < deadline, first.stderr.read() if first.stderr else ""
            time.sleep(0.2)
        for flag in ("--resume", "--overwrite"):
            line = _assert_one_error_line(_run(*_sae_args(small_store, out), flag))
            assert f"pid {first.pid}" in line
        assert ckpt.exists() and first.poll() is None  # the first run's work is untouched and it runs on
    finally:
        first.kill()
        first.wait()
    # Killed: its lock is stale now, and a new run takes over.
    done = _run(*_sae_args(small_store, out), "--overwrite")
    assert done.returncode == 0, done.stderr
    assert (out / "sae.safetensors").is_file() and not lock_path(out).exists()


# ------------------------------------------------------------------------------------------- SAE leftovers


def test_resume_on_a_finished_sae_reports_it_complete_and_cleans_leftovers(tmp_path, small_store, capsys, one_thread):
    out = tmp_path / "sae"
    assert _in_process(*_sae_args(small_store, out), capsys=capsys).returncode == 0
    weights = (out / "sae.safetensors").read_bytes()
    # What a kill between the commit and the removal of the work folder leaves behind.
    partial_dir(out).mkdir()
    (partial_dir(out) / "checkpoint.pt").write_bytes(b"the last checkpoint")
    done = _in_process(*_sae_args(small_store, out), "--resume", capsys=capsys)
    assert done.returncode == 0, done.stderr
    assert "already complete" in done.stdout
    assert not partial_dir(out).exists() and (out / "sae.safetensors").read_bytes() == weights
    # the same --out asked for with other settings is refused, naming them
    args = _sae_args(small_store, out)
    args[args.index("--k") + 1] = "3"
    line = _assert_one_error_line(_in_process(*args, "--resume", capsys=capsys))
    assert "sae.k: recorded 2, requested 3" in line


# ------------------------------------------------------------------------------------------- reuse checks


def test_settings_differences_name_each_changed_setting(tmp_path):
    recorded = {"sae": {"k": 6, "n_latents": 128}, "train": {"lr": 0.001, "plan": {"n_steps": 9}}, "width": 8}
    assert settings_differences(recorded, {"sae": {"k": 6}, "train": {"lr": 1e-3}, "width": 8.0}) == []
    diffs = settings_differences(recorded, {"sae": {"k": 3, "n_latents": 64}, "width": 4, "seed": (1, 2)})
    assert diffs == ["sae.k: recorded 6, requested 3", "sae.n_latents: recorded 128, requested 64",
                     "seed: recorded <absent>, requested [1, 2]", "width: recorded 8, requested 4"]
    write_json(tmp_path / "config.json", recorded)
    check_settings(tmp_path, {"sae": {"k": 6}})
    with pytest.raises(ArtifactError, match=r"other settings than requested \(sae\.k: recorded 6, requested 3; "
                                            r"width: recorded 8, requested 4; recorded in .*config\.json\)"):
        check_settings(tmp_path, {"sae": {"k": 3}, "width": 4})


# ------------------------------------------------------------------------------------------- store checks


def _edit_meta(store, **changes):
    meta = read_json(store.store_dir / "meta.json")
    meta.update(changes)
    write_json(store.store_dir / "meta.json", meta)


def test_a_hand_edited_meta_is_refused_on_open(small_store):
    _edit_meta(small_store, n=5, d=7)
    with pytest.raises(ArtifactError, match=r"meta\.json says n=5, d=7 but .*/embeddings\.npy holds float32 \(120, 8"):
        EmbeddingStore.open(small_store.store_dir)


def test_a_zeroed_content_hash_is_refused_where_a_child_records_it(tmp_path, small_store):
    from analysis.run.store_stages import encode_store, train_sae_on_store
    from sae.checkpoint import save_sae
    from sae.config import SAEConfig
    from sae.model import TopKSAE
    from sae.train import RunConfig, TrainConfig

    _edit_meta(small_store, content_hash="0" * 64)
    store = EmbeddingStore.open(small_store.store_dir)  # the cheap checks pass: shapes are right
    with pytest.raises(ArtifactError, match=r"meta\.json records content_hash 0000.*rebuild the store"):
        store.verify()
    run = RunConfig(device="cpu", progress=False, checkpoint_every=0)
    with pytest.raises(ArtifactError, match="content_hash"):
        train_sae_on_store(store, tmp_path / "sae", SAEConfig(8, 16, 2), TrainConfig(n_steps=2), run)
    assert not (tmp_path / "sae").exists()
    save_sae(TopKSAE(SAEConfig(8, 16, 2)), tmp_path / "sae")
    with pytest.raises(ArtifactError, match="content_hash"):
        encode_store(store.store_dir, tmp_path / "sae", tmp_path / "codes")
    assert not (tmp_path / "codes").exists()
    # a huge store may skip the full read; the cheap checks still ran
    codes = encode_store(store.store_dir, tmp_path / "sae", tmp_path / "codes", verify_store=False)
    assert codes.n == 120


def test_a_changed_data_file_is_named(small_store):
    labels = np.load(small_store.store_dir / "labels.npy")
    np.save(small_store.store_dir / "labels.npy", labels.astype(np.int32))  # the same labels, other bytes
    with pytest.raises(ArtifactError, match=r"labels\.npy does not match the SHA-256 recorded"):
        EmbeddingStore.open(small_store.store_dir, verify=True)


@pytest.mark.parametrize("keep", [100, 40, 3])
def test_a_truncated_embeddings_file_is_named_with_the_fix(small_store, keep):
    path = small_store.store_dir / "embeddings.npy"
    data = path.read_bytes()
    path.write_bytes(data[:keep])  # 100: mid-data; 40: mid-header; 3: mid-magic
    with pytest.raises(ArtifactError, match=r"embeddings\.npy is truncated.*scripts/extract\.py.*--overwrite"):
        EmbeddingStore.open(small_store.store_dir)


def test_trailing_bytes_in_labels_are_refused(small_store):
    with open(small_store.store_dir / "labels.npy", "ab") as f:
        f.write(b"\0" * 8)
    with pytest.raises(ArtifactError, match=r"labels\.npy is corrupt"):
        EmbeddingStore.open(small_store.store_dir)


# ------------------------------------------------------------------------------------------- folder inputs


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 12), (value, value, value)).save(path, format="PNG")


def _extract_folder(root, out):
    from embeddings.extract import ExtractConfig, ExtractRun, extract

    config = ExtractConfig(source=str(root), backbone="digits-cnn", weights="random", batch_size=2)
    return extract(config, ExtractRun(out_dir=out, device="cpu", num_workers=0, n_threads=1, chunk_size=2,
                                      progress=False))


@pytest.mark.skipif(sys.platform != "linux", reason="needs a file system that takes any bytes as a name")
def test_a_name_that_is_not_utf8_gets_a_faithful_id(tmp_path):
    root = tmp_path / "images"
    _png(root / "plain.png", 10)
    odd = os.path.join(os.fsencode(root), b"caf\xe9.png")
    shutil.copyfile(root / "plain.png", odd)
    store = _extract_folder(root, tmp_path / "store")
    assert store.n == 2 and store.skipped == []
    odd_id = next(i for i in store.ids if i != "plain.png")
    assert os.fsencode(odd_id) == b"caf\xe9.png"  # reversible to the exact bytes of the name
    assert os.path.exists(os.path.join(os.fsencode(root), os.fsencode(odd_id)))
    assert read_json(store.store_dir / "ids.json") == store.ids
    # a file list naming it (in the list's own bytes) reads the same
    (tmp_path / "list.txt").write_bytes(b"images/caf\xe9.png 1\nimages/plain.png 0\n")
    from embeddings.sources import open_source

    assert os.fsencode(open_source(tmp_path / "list.txt").ids[0]) == b"images/caf\xe9.png"


def test_hidden_files_and_folders_are_recorded_as_skipped(tmp_path):
    root = tmp_path / "images"
    _png(root / "a.png", 10)
    _png(root / ".thumb.png", 20)
    _png(root / ".cache" / "b.png", 30)
    _png(root / "sub" / ".c.png", 40)
    store = _extract_folder(root, tmp_path / "store")
    assert store.ids == ["a.png"]
    skipped = read_json(store.store_dir / "skipped.json")
    assert {e["id"]: e["reason"].split(" (")[0] for e in skipped} == {
        ".cache/": "hidden folder", ".thumb.png": "hidden file", "sub/.c.png": "hidden file",
    }
    assert store.meta["n_skipped"] == 3


def test_a_weights_file_for_the_digits_cnn_is_named_as_given(tmp_path):
    from embeddings.backbone import WeightsError, load_backbone

    weights = tmp_path / "file.pth"
    weights.write_bytes(b"not a directory")
    with pytest.raises(WeightsError) as refused:
        load_backbone("digits-cnn", weights=str(weights))
    assert str(weights) in str(refused.value) and "--out ." not in str(refused.value)
    with pytest.raises(WeightsError, match=f"no digits CNN at {tmp_path / 'missing'}"):
        load_backbone("digits-cnn", weights=str(tmp_path / "missing"))


# ------------------------------------------------------------------------------------------- weights and full disks


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_an_sae_with_nan_or_inf_weights_is_refused_on_load(tmp_path, bad):
    import torch
    from safetensors.torch import load_file, save_file

    from sae.checkpoint import load_sae, save_sae
    from sae.config import SAEConfig
    from sae.model import TopKSAE

    sae_dir = save_sae(TopKSAE(SAEConfig(4, 8, 2)), tmp_path / "sae")
    tensors = load_file(str(sae_dir / "sae.safetensors"))
    tensors["W_dec"][3, 1] = bad
    save_file(tensors, str(sae_dir / "sae.safetensors"))
    with pytest.raises(ArtifactError, match=r"sae\.safetensors: W_dec holds 1 NaN or Inf values.*train_sae\.py"):
        load_sae(sae_dir, verify_hash=False)
    assert torch.isfinite(tensors["W_enc"]).all()


def test_a_crafted_sae_config_allocates_nothing_beyond_its_file(tmp_path):
    from sae.checkpoint import load_sae, save_sae
    from sae.config import SAEConfig
    from sae.model import TopKSAE

    sae_dir = save_sae(TopKSAE(SAEConfig(4, 8, 2)), tmp_path / "sae")
    config = read_json(sae_dir / "config.json")
    config["sae"].update(d_in=10**6, n_latents=10**6)  # a model of 8 TB of weights
    write_json(sae_dir / "config.json", config)
    with pytest.raises(ArtifactError, match=r"W_enc has shape \(4, 8\) but config\.json implies \(1000000, 1000000\)"):
        load_sae(sae_dir)


class _Payload:
    """A class a torch file may hold as a pickled object; loading it would run its module's code."""


def test_pickled_checkpoints_are_refused_without_advice_to_unpickle(tmp_path):
    import torch

    from sae.checkpoint import import_paper_checkpoint

    path = tmp_path / "clip_sae_checkpoint.pt"
    torch.save({"config": {"k": 2}, "model_state_dict": {"W_enc": torch.zeros(2, 4)}, "extra": _Payload()}, path)
    with pytest.raises(ArtifactError) as info:
        import_paper_checkpoint(path, tmp_path / "sae")
    message = str(info.value)
    assert str(path) in message and "_Payload" in message
    for advice in ("weights_only=False", "weights_only` set to `False", "can still be loaded", "safe_globals"):
        assert advice not in message


def test_a_full_disk_names_the_file_being_written(tmp_path, monkeypatch):
    import errno

    from artifacts import DiskFullError
    from artifacts.cli import error_line, is_user_error

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    target = tmp_path / "run" / "meta.json"
    target.parent.mkdir()
    with pytest.raises(DiskFullError) as info:
        write_json(target, {"a": 1})
    assert info.value.errno == errno.ENOSPC and is_user_error(info.value)
    line = error_line(info.value)
    assert line.startswith(f"error: No space left on device while writing {target} ") and "[Errno 28]" not in line
    assert list(target.parent.iterdir()) == []  # neither the file nor its temporary


def test_an_atomic_write_removes_the_leftovers_of_killed_writes(tmp_path):
    import subprocess
    import sys

    from artifacts import atomic_file

    target = tmp_path / "plot [1].png"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f".{target.name}.tmp-{int(dead.stdout)}"  # a process that has ended
    leftover.write_bytes(b"half")
    alive = tmp_path / f".{target.name}.tmp-{os.getppid()}"  # one still running: maybe writing right now
    alive.write_bytes(b"busy")
    with atomic_file(target) as f:
        f.write(b"png")
    assert target.read_bytes() == b"png" and not leftover.exists() and alive.exists()
