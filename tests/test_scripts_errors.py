"""Every script answers a user's mistake with one ``error:`` line and exit status 2, never a traceback."""

from __future__ import annotations

import ast
import errno
import os
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from artifacts import ArtifactError
from artifacts.cli import TRACEBACK_ENV, error_line, run_main
from script_runner import run_script_in_process

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", TRACEBACK_ENV)}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


def _one_error_line(code: int, err: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if re.match(r"([\w.]+: )?error: ", line)]
    assert len(errors) == 1, err
    return errors[0]


# ------------------------------------------------------------------------------------------- run_main


def _exit_of(main, capsys):
    with pytest.raises(SystemExit) as done:
        run_main(main, [])
    return done.value.code, capsys.readouterr().err


def test_run_main_turns_user_errors_into_one_line(capsys, monkeypatch):
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)

    def refuses(argv):
        raise ArtifactError("checkpoint was made with other settings:\n  lr: 1 -> 2\nrerun with the same flags")

    code, err = _exit_of(refuses, capsys)
    assert code == 2
    assert err == "error: checkpoint was made with other settings: lr: 1 -> 2; rerun with the same flags\n"

    def disk_full(argv):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/store")

    code, err = _exit_of(disk_full, capsys)
    assert code == 2 and "No space left on device" in err and "/data/store" in err

    def interrupted(argv):
        raise KeyboardInterrupt

    assert _exit_of(interrupted, capsys) == (130, "error: interrupted\n")
    assert run_main(lambda argv: 0, []) is None  # success returns; the script ends normally
    with pytest.raises(SystemExit) as done:
        run_main(lambda argv: 3, [])
    assert done.value.code == 3


def test_run_main_keeps_the_traceback_of_a_defect(monkeypatch):
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)

    def defect(argv):
        return [][1]

    with pytest.raises(IndexError):
        run_main(defect, [])

    def io_failure(argv):
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(OSError):
        run_main(io_failure, [])
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    with pytest.raises(ValueError):
        run_main(lambda argv: int("x"), [])


def test_error_line_names_the_file_of_an_os_error():
    assert error_line(FileNotFoundError(errno.ENOENT, "No such file or directory", "a.npy")) == (
        "error: [Errno 2] No such file or directory: 'a.npy'"
    )


def test_every_script_ends_through_run_main():
    """So that every stage, present and future, answers user errors the same way."""
    missing = []
    for path in sorted(SCRIPTS.glob("*.py")):
        tree = ast.parse(path.read_text())
        calls = {
            node.func.id
            for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        }
        if "run_main" not in calls:
            missing.append(path.name)
    assert missing == [], f"scripts that do not end with artifacts.cli.run_main(main): {missing}"


# ------------------------------------------------------------------------------------------- each script


def _subprocess_cases(tmp_path):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "thesis.tex").write_text("mine")
    missing = str(tmp_path / "missing")
    return {
        "extract.py": (["--source", missing, "--backbone", "resnet18", "--out", str(tmp_path / "s")], "does not exist"),
        "train_sae.py": (["--store", missing, "--out", str(tmp_path / "sae")], "no embedding store"),
        "encode.py": (["--store", missing, "--sae", missing, "--out", str(tmp_path / "c")], "no embedding store"),
        "import_paper_sae.py": (["--checkpoint", missing, "--out", str(tmp_path / "p")], "missing"),
        "train_backbone.py": (["--out", str(folder), "--epochs", "1"], "not an artifact"),
        "reproduce.py": (["--out", str(tmp_path / "r"), "--cnn-width", "0"], "--cnn-width"),
    }


@pytest.mark.parametrize("script", ["extract.py", "train_sae.py", "encode.py", "import_paper_sae.py",
                                    "train_backbone.py", "reproduce.py"])
def test_each_script_answers_a_mistake_with_one_line(tmp_path, script):
    args, expected = _subprocess_cases(tmp_path)[script]
    done = subprocess.run([sys.executable, str(SCRIPTS / script), *args], capture_output=True, text=True,
                          env=_env(), cwd=ROOT, timeout=240)
    line = _one_error_line(done.returncode, done.stderr)
    assert expected in line, line


# ------------------------------------------------------------------------------------------- extract.py


def _extract(capsys, *argv):
    code, _, err = run_script_in_process(
        "extract.py", "--no-progress", "--device", "cpu", "--threads", "1", "--num-workers", "0", *argv, capsys=capsys
    )
    return code, err


class Payload:
    """Something a weights file must never unpickle."""


def test_every_refusal_of_extract_is_one_line(tmp_path, capsys, one_thread, monkeypatch):
    from embeddings.cnn import CNNConfig, DigitsCNN, save_cnn
    from embeddings.store import write_store

    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    other = write_store(tmp_path / "other", np.ones((3, 2), dtype=np.float32)).store_dir
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file at all")
    pickled = tmp_path / "pickled.pth"
    torch.save({"weight": torch.zeros(2), "extra": Payload(), "ratio": Fraction(1, 2)}, pickled)
    nan_cnn = DigitsCNN(CNNConfig(width=1))
    with torch.no_grad():
        for p in nan_cnn.parameters():
            p.fill_(float("nan"))
    save_cnn(nan_cnn, tmp_path / "nan_cnn")
    digits = ["--source", "digits", "--batch-size", "64", "--chunk-size", "256"]
    cases = [
        (digits + ["--weights", "random", "--out", str(other)], "already holds a different store"),
        (["--source", str(tmp_path / "nowhere"), "--backbone", "resnet18", "--out", str(tmp_path / "a")],
         "does not exist"),
        (["--source", str(tmp_path), "--out", str(tmp_path / "b")], "--backbone is required"),
        (digits + ["--out", str(tmp_path / "c")], "train_backbone.py"),
        (digits + ["--weights", str(tmp_path / "no_cnn"), "--out", str(tmp_path / "d")],
         f"no digits CNN at {tmp_path / 'no_cnn'}"),
        (digits + ["--weights", str(garbage), "--out", str(tmp_path / "e")], f"{garbage} is a file, not a digits CNN"),
        (digits + ["--backbone", "resnet18", "--weights", str(garbage), "--out", str(tmp_path / "f")],
         f"cannot read weights file {garbage}"),
        (digits + ["--backbone", "resnet18", "--weights", str(pickled), "--out", str(tmp_path / "g")],
         f"cannot read weights file {pickled}"),
        (digits + ["--backbone", "no_such_model_xyz", "--weights", "random", "--out", str(tmp_path / "h")],
         "timm has no model 'no_such_model_xyz'"),
        (digits + ["--weights", str(tmp_path / "nan_cnn"), "--out", str(tmp_path / "i")],
         "nan_cnn/model.safetensors holds NaN or Inf"),
    ]
    for argv, expected in cases:
        code, err = _extract(capsys, *argv)
        line = _one_error_line(code, err)
        assert expected in line, (argv, line)
    assert not any((tmp_path / name).exists() for name in "abcdefghi")
