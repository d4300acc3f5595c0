"""Run a script of ``scripts/`` in this process, as ``python scripts/NAME.py ARGV`` would, and return its exit
status with what it printed (for tests of the scripts' messages and exit codes without a new interpreter)."""

import runpy
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def run_script_in_process(name: str, *argv: str, capsys=None) -> tuple[int, str, str]:
    """``(exit status, stdout, stderr)`` of ``scripts/NAME`` run with ``argv`` (output empty without ``capsys``)."""
    script = SCRIPTS / name
    old = sys.argv
    sys.argv = [str(script), *argv]
    try:
        runpy.run_path(str(script), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = old
    out, err = capsys.readouterr() if capsys else ("", "")
    return code, out, err
