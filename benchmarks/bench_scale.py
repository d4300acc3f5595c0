"""One rehearsal at the paper's size: every stage on an ImageNet-shaped store, each in its own process, measured.

Generates an ImageNet-shaped store (``scale_data.py``: 1,281,167 unit rows of width 512 in 1,000 classes, 50 per
class held out as test, seeded, streamed through the store's own writer), then runs the real stages in the order
the imagenet-clip preset runs them (``scale_stages.py``): SAE training (4,096 latents, k = 16) for ``--sae-steps``
steps (the paper's 100 epochs extrapolated from the measured steps/s, not run), encoding every row to a
CodeStore, the concept study on ``--concept-queries`` queries in all three spaces, local TTT in fast mode on every
test query and in exact mode on a sample (agreement and both accuracies), and ``scripts/query.py --json`` twice
(the first process builds and saves the index, the second reuses it).

Each stage runs in a process of its own, so its peak RSS is its own (``os.wait4``): per stage the wall time, CPU
time, peak RSS, bytes on disk of what it wrote and the largest single allocation it makes (stated from the code).
The load average and ``OMP_WAIT_POLICY`` are printed as each stage starts and ends. Targets: every stage's peak RSS
at most 2 × (store + codes) on disk; no ``(n, n)`` or dense ``(n, n_latents)`` array (a peak RSS below the dense
codes' size shows none was made); encoding at least 20,000 rows/s; the fast TTT evaluation of the test queries
under 20 minutes; the whole rehearsal under an hour.

``--work DIR`` keeps everything; a rerun skips the stages whose outputs are complete. ``--kill-stage STAGE[,STAGE]
--kill-after S`` SIGKILLs each named stage's process after S seconds, runs it again (SAE training continues from
its checkpoint, the TTT evaluation from its finished chunks) and checks the result against an uninterrupted run:
the SAE trained again uninterrupted (weights byte for byte), or the TTT chunks around the kill recomputed in a
fresh process (every array equal). Each run records a digest of the toolkit's source, so a comparison across runs
of different code is named as such.

    python benchmarks/bench_scale.py [--rows 1281167] [--dtype float32] [--sae-steps 2000] [--work DIR]
        [--device cuda] [--kill-stage sae,ttt --kill-after 300]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

from scale_process import spawn  # noqa: E402
from scale_report import STAGES, GiB, load_line, machine_lines, report  # noqa: E402
from scale_stages import paths  # noqa: E402

DONE_FILE = {"store": "store/meta.json", "sae": "sae/meta.json", "codes": "codes/meta.json",
             "concepts": "concepts/result.json", "ttt": "ttt/result.json", "ttt-exact": "ttt-exact/result.json",
             "query": "query/answer-1.json", "query-again": "query/answer-2.json"}
OUTPUTS = {"store": ["store"], "sae": ["sae"], "codes": ["codes"], "concepts": ["concepts"],
           "ttt": ["ttt", "ttt-head", "ttt-chunks"], "ttt-exact": ["ttt-exact"],
           "query": ["codes-index", "query/answer-1.json"], "query-again": ["query/answer-2.json"]}
RESUMABLE = {"sae": "continues from its last checkpoint", "ttt": "continues from its finished chunks"}
DATA_SETTINGS = ("rows", "dtype", "classes", "seed")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_281_167, help="rows of the store (default: ImageNet's 1,281,167)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16"), help="stored dtype")
    p.add_argument("--classes", type=int, default=None, help="classes (default: 1000, fewer below 100,000 rows)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and of every stage")
    p.add_argument("--device", default="cpu",
                   help="torch device of SAE training, encoding, the probes and TTT (default cpu; e.g. cuda)")
    p.add_argument("--sae-steps", type=int, default=2000, help="SAE training steps of 4096 rows (default 2000)")
    p.add_argument("--checkpoint-every", type=int, default=250, help="SAE checkpoint interval in steps")
    p.add_argument("--concept-queries", type=int, default=10_000, help="queries of the concept study")
    p.add_argument("--probe-epochs", type=int, default=0,
                   help="epochs of the concept study's linear probes (the paper's 50; default 0: no probes, an "
                        "epoch of the three probes over 1.23M rows takes about a quarter of an hour on 2 cores)")
    p.add_argument("--umap", action=argparse.BooleanOptionalAction, default=False,
                   help="draw the concept study's UMAP maps (default: off)")
    p.add_argument("--head-epochs", type=int, default=2, help="epochs of the global head for TTT (paper: 50)")
    p.add_argument("--exact-queries", type=int, default=1000, help="test queries of the exact TTT mode")
    p.add_argument("--ttt-precision", default="float32", choices=("auto", "float32", "bfloat16"),
                   help="matmul precision of the batched TTT (default float32: the same in every process)")
    p.add_argument("--chunk-size", type=int, default=1024, help="queries per saved TTT chunk")
    p.add_argument("--work", default=None,
                   help="work directory (default: ttt-concepts-scale-ROWS in the system's temporary directory)")
    p.add_argument("--kill-stage", default="",
                   help="SIGKILL these stages' processes once each (comma-separated, e.g. sae,ttt), then rerun them")
    p.add_argument("--kill-after", type=float, default=120.0, help="seconds before the kill (default 120)")
    p.add_argument("--only", default=",".join(STAGES),
                   help="run only these stages (comma-separated; each needs the outputs of the stages before it)")
    p.add_argument("--verify-chunks", type=int, default=2,
                   help="TTT chunks recomputed after a kill (those around it; 0: every chunk)")
    p.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage in this process
    p.add_argument("--verify-list", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for flag in ("rows", "sae_steps", "checkpoint_every", "concept_queries", "exact_queries", "chunk_size"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.head_epochs < 1 or args.probe_epochs < 0 or args.kill_after <= 0 or args.verify_chunks < 0:
        p.error("--head-epochs must be >= 1, --probe-epochs >= 0, --kill-after > 0, --verify-chunks >= 0")
    args.kill_stages = [k for k in args.kill_stage.split(",") if k]
    args.stages = [k for k in args.only.split(",") if k]
    for flag, names, allowed in (("--kill-stage", args.kill_stages, STAGES[:-2]), ("--only", args.stages, STAGES)):
        unknown = sorted(set(names) - set(allowed))
        if unknown:
            p.error(f"{flag} {','.join(unknown)}: choose among {', '.join(allowed)}")
    args.work = Path(args.work or Path(tempfile.gettempdir()) / f"ttt-concepts-scale-{args.rows}")
    return args


# -- one stage in this process ----------------------------------------------------------------------------
def run_child(args: argparse.Namespace) -> int:
    import analysis  # noqa: F401  (the toolkit's OpenMP wait policy, before torch loads)
    import scale_stages as st
    from artifacts import write_json

    print(f"[{args.stage}] start: {load_line()}", flush=True)
    if args.stage == "verify-ttt":
        record = st.stage_verify_ttt(args, args.work, [int(c) for c in args.verify_list.split(",") if c])
    elif args.stage == "verify-sae":
        record = st.stage_verify_sae(args, args.work)
    else:
        record = getattr(st, "stage_" + args.stage.replace("-", "_"))(args, args.work)
    print(f"[{args.stage}] end: {load_line()}", flush=True)
    paths(args.work)["records"].mkdir(parents=True, exist_ok=True)
    write_json(paths(args.work)["records"] / f"{args.stage}.child.json", _plain(record))
    return 0


def _plain(obj):
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


# -- the driver ---------------------------------------------------------------------------------------------
def child_argv(args: argparse.Namespace, stage: str, extra: list[str] = ()) -> list[str]:
    if stage.startswith("query"):
        p = paths(args.work)
        from scale_stages import spec_of
        from scale_data import test_rows

        row = int(test_rows(spec_of(args))[0])
        return [sys.executable, str(ROOT / "scripts" / "query.py"), "--sae", str(p["sae"]), "--store",
                str(p["store"]), "--codes", str(p["codes"]), "--index", str(row), "--json"]
    return [sys.executable, str(Path(__file__).resolve()), *_argv_of(args), "--work", str(args.work),
            "--stage", stage, *extra]


def _argv_of(args: argparse.Namespace) -> list[str]:
    """The settings of ``args`` as flags, for the stage processes."""
    out = []
    for key in ("rows", "dtype", "classes", "seed", "sae_steps", "checkpoint_every", "concept_queries",
                "probe_epochs", "head_epochs", "exact_queries", "ttt_precision", "chunk_size", "device"):
        value = getattr(args, key)
        if value is not None:
            out += [f"--{key.replace('_', '-')}", str(value)]
    return out + ["--umap" if args.umap else "--no-umap"]


def disk_bytes(work: Path, names: list[str]) -> int:
    total = 0
    for name in names:
        path = work / name
        files = [path] if path.is_file() else (p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
        total += sum(f.stat().st_size for f in files)
    return total


def run_stage(args: argparse.Namespace, stage: str) -> dict:
    """Run one stage (killing it once when asked), record its measurements, return the record."""
    from artifacts import read_json, write_json

    p = paths(args.work)
    print(f"== {stage}: start; {load_line()}", flush=True)
    stdout = None
    if stage.startswith("query"):
        p["query"].mkdir(exist_ok=True)
        stdout = p["query"] / f".{Path(DONE_FILE[stage]).name}.tmp"
    attempts = []
    kill = args.kill_after if stage in args.kill_stages else None
    while True:
        attempt = spawn(child_argv(args, stage), ROOT, stdout, kill)
        attempts.append(attempt)
        if attempt["killed"]:
            chunks = sorted(int(f.stem.split("_")[1]) for f in p["ttt-chunks"].glob("chunk_*.npz")) \
                if stage == "ttt" and p["ttt-chunks"].is_dir() else []
            attempt["chunks_done_at_kill"] = chunks
            started = p["records"] / "ttt.eval_started"
            if stage == "ttt" and started.is_file():
                attempt["eval_s_before_kill"] = attempt["killed_at"] - float(started.read_text())
            how = RESUMABLE.get(stage, "starts again from scratch")
            print(f"== {stage}: killed (SIGKILL) after {attempt['wall_s']:.0f} s; rerunning it: it {how}", flush=True)
            kill = None
            continue
        if attempt["rc"] != 0:
            raise SystemExit(f"stage {stage} failed (exit status {attempt['rc']}); see its output above")
        break
    if stdout is not None:
        json.loads(stdout.read_text())  # a complete answer, or the stage failed
        stdout.rename(args.work / DONE_FILE[stage])
    if stage.startswith("query"):
        answer = read_json(args.work / DONE_FILE[stage])
        child = {"index": answer["index"], "n_neighbours": len(answer["neighbours"]), "row": answer["query"]["row"]}
    else:
        child = read_json(p["records"] / f"{stage}.child.json")
    record = {"stage": stage, "attempts": attempts, "child": child, "disk_bytes": disk_bytes(args.work, OUTPUTS[stage]),
              "wall_s": sum(a["wall_s"] for a in attempts), "cpu_s": sum(a["cpu_s"] for a in attempts),
              "peak_rss": max(a["peak_rss"] for a in attempts)}
    write_json(p["records"] / f"{stage}.json", record)
    print(f"== {stage}: done in {record['wall_s']:.1f} s wall, {record['cpu_s']:.1f} s CPU, peak RSS "
          f"{record['peak_rss'] / GiB:.2f} GiB (sampled: anonymous {attempt['peak_anon'] / GiB:.2f}, file-backed "
          f"{attempt['peak_file'] / GiB:.2f}); {load_line()}", flush=True)
    return record


def verify_resume(args: argparse.Namespace, records: dict, stage: str) -> dict | None:
    """After a kill of a resumable stage: the resumed result against an uninterrupted computation."""
    from artifacts import read_json

    if stage not in RESUMABLE or not records.get(stage) or len(records[stage]["attempts"]) < 2:
        return None
    p = paths(args.work)
    extra = []
    if stage == "ttt":
        before = records[stage]["attempts"][0].get("chunks_done_at_kill", [])
        n_chunks = len(list(p["ttt-chunks"].glob("chunk_*.npz")))
        after = [c for c in range(n_chunks) if c not in before]
        half = max(1, args.verify_chunks // 2)
        chosen = list(range(n_chunks)) if args.verify_chunks == 0 else sorted(set(before[-half:] + after[:half]))
        extra = ["--verify-list", ",".join(map(str, chosen))]
    name = f"verify-{stage}"
    print(f"== {name}: start; {load_line()}", flush=True)
    attempt = spawn(child_argv(args, name, extra), ROOT)
    if attempt["rc"] != 0:
        raise SystemExit(f"{name} failed (exit status {attempt['rc']})")
    result = {**read_json(p["records"] / f"{name}.child.json"), **attempt, "stage": stage,
              "sources": [a["source"] for a in records[stage]["attempts"]] + [attempt["source"]]}
    print(f"== {name}: done in {attempt['wall_s']:.1f} s; equal to an uninterrupted run: {result['all_equal']}; "
          f"{load_line()}", flush=True)
    return result


def check_work(args: argparse.Namespace) -> None:
    """A work directory holds one data set: other data settings are refused by name."""
    from artifacts import read_json, write_json

    from scale_stages import spec_of

    args.work.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in DATA_SETTINGS} | {"data": spec_of(args).to_dict()}
    path = args.work / "settings.json"
    if path.is_file():
        old = read_json(path)
        diffs = [f"--{k} {old.get(k)} (asked {settings[k]})" for k in DATA_SETTINGS if old.get(k) != settings[k]]
        if not diffs and old.get("data") != settings["data"]:
            diffs = [f"the generator's law (scale_data.ScaleData) {old.get('data')} (now {settings['data']})"]
        if diffs:
            raise SystemExit(f"{args.work} holds a rehearsal of other data ({', '.join(diffs)}); choose another --work")
    write_json(path, settings)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.stage:
        return run_child(args)
    check_work(args)
    for line in machine_lines(args.work):
        print(line, flush=True)
    records = {}
    t = time.perf_counter()
    for stage in [s for s in STAGES if s in args.stages]:
        record_path = paths(args.work)["records"] / f"{stage}.json"
        if (args.work / DONE_FILE[stage]).is_file():
            from artifacts import read_json

            records[stage] = {**read_json(record_path), "reused": True} if record_path.is_file() else None
            print(f"== {stage}: complete in {args.work}; skipped", flush=True)
            continue
        records[stage] = run_stage(args, stage)
    resumes = [r for r in (verify_resume(args, records, stage) for stage in args.kill_stages) if r is not None]
    print(f"rehearsal driver: {time.perf_counter() - t:.0f} s in this invocation", flush=True)
    report(args, records, resumes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
