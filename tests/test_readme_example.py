"""The README's Python path (store → SAE → codes → query → TTT) runs as written."""

import os
import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_notebook_example_runs(tmp_path, one_thread, capsys):
    text = README.read_text()
    code = re.search(r"<!-- notebook example -->\n```python\n(.*?)```", text, re.S).group(1)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16))
    labels = np.repeat(np.arange(4), 60)
    x = (centres[labels] + 0.5 * rng.normal(size=(240, 16))).astype(np.float32)
    test = np.arange(0, 240, 4)
    split = {"train": np.setdiff1d(np.arange(240), test), "test": test}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(code, str(README), "exec"), {"x": x, "labels": labels, "split": split})
    finally:
        os.chdir(cwd)
    printed = capsys.readouterr().out.split()
    assert float(printed[-1]) > 0.8  # the TTT accuracy on well-separated classes
    assert (tmp_path / "runs" / "mine" / "codes" / "meta.json").is_file()
