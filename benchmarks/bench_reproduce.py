"""The whole default digits run (``scripts/reproduce.py`` with no argument), stage by stage, against its baselines.

    python benchmarks/bench_reproduce.py [--quick] [--out DIR]

Prints, for a fresh run in a temporary directory (or --out): each stage's wall time and the process's CPU time,
the total against the target (5 minutes on 2 CPU cores), and two ratios measured in the same process:

- full run / chain: the whole study against the chain up to the codes (backbone → store → SAE → codes), which
  was all the main job did before the studies existed;
- cached rerun / full run: what a second invocation costs when every stage is reused (report rebuilt).

The machine's load average is printed too: on shared cores the wall time grows with the other processes' load,
while the CPU time does not.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

from analysis.run.presets import reproduce

TARGET_S = 300.0
CHAIN = ("backbone", "store", "sae", "codes")


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed_run(out: Path, quick: bool) -> tuple[dict, float, float]:
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    report = reproduce("digits", out, log=lambda line: print("   ", line, flush=True), quick=quick or None)
    return report, time.perf_counter() - t0, cpu_seconds() - cpu0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the --quick preset instead of the default")
    p.add_argument("--out", default=None, help="run directory (default: a fresh temporary one)")
    args = p.parse_args()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-reproduce-")) / "digits"
    print(f"digits preset{' --quick' if args.quick else ''} into {out}; torch threads: "
          f"{__import__('torch').get_num_threads()}, cpus: {os.cpu_count()}, load average before: {os.getloadavg()}")
    report, wall, cpu = timed_run(out, args.quick)
    stages = {k: v for k, v in report["timings"].items() if isinstance(v, dict)}
    print(f"{'stage':<10} {'wall s':>8} {'CPU s':>8}")
    for name, t in stages.items():
        cpu_s = t.get("cpu_seconds")
        print(f"{name:<10} {t['seconds']:>8.1f} {'-' if cpu_s is None else format(cpu_s, '8.1f'):>8}"
              f"{'  (reused)' if t['reused'] else ''}")
    chain = sum(stages[s]["seconds"] for s in CHAIN if s in stages)
    # The small presets run torch on one thread, so on idle cores the wall time is about the CPU time.
    print(f"full run: {wall:.1f} s wall, {cpu:.1f} s CPU; target {TARGET_S:.0f} s on 2 cores: "
          f"wall/target {wall / TARGET_S:.2f}, CPU/target {cpu / TARGET_S:.2f}")
    print(f"ratio full run / chain up to codes: {wall / chain:.2f} ({chain:.1f} s chain)")
    _, rerun, rerun_cpu = timed_run(out, args.quick)
    print(f"ratio cached rerun / full run: {rerun / wall:.3f} ({rerun:.1f} s wall, {rerun_cpu:.1f} s CPU)")
    sections = ", ".join(f"{name}: {s['status']}" for name, s in report["sections"].items())
    print(f"sections: {sections}; load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
