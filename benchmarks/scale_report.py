"""What the scale rehearsal (``bench_scale.py``) prints: the machine, the load, the stage table and the targets."""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import sys
from importlib import metadata
from pathlib import Path

from machine import cpu_model, load_average

GiB = 2**30
ENCODE_TARGET = 20_000
"""Rows per second the encoding must reach."""
TTT_TARGET_S = 20 * 60
"""Seconds for the fast TTT evaluation of the paper's 50,000 test queries."""
WHOLE_TARGET_S = 3600
"""Seconds for the whole rehearsal."""
N_LATENTS = 4096
STAGES = ("store", "sae", "codes", "concepts", "ttt", "ttt-exact", "query", "query-again")
"""The rehearsal's stages, in the order the imagenet-clip preset runs them (the query tool last)."""


def load_line() -> str:
    policy = os.environ.get("OMP_WAIT_POLICY")
    policy = policy if policy else "(unset: the toolkit sets PASSIVE when it loads)"
    return f"load average {load_average()}, OMP_WAIT_POLICY={policy}"


def machine_lines(work: Path) -> list[str]:
    with open("/proc/meminfo") as f:
        mem_kib = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    disk = shutil.disk_usage(work)
    versions = ", ".join(f"{name} {_version(name)}" for name in ("torch", "numpy", "faiss-cpu"))
    return [f"machine: {cpu_model()}, {os.cpu_count()} cpus, {mem_kib / 2**20:.1f} GiB memory, Python "
            f"{platform.python_version()}, {versions}",
            f"work directory {work}: {disk.free / GiB:.1f} GiB free of {disk.total / GiB:.1f} GiB",
            f"start: {load_line()}"]


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


def _size(n_bytes: float | None) -> str:
    if n_bytes is None:
        return "-"
    return f"{n_bytes / GiB:.2f} GiB" if n_bytes >= GiB / 4 else f"{n_bytes / 2**20:.1f} MiB"


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / GiB:.2f}"


def _pct(m: dict | None) -> str:
    if not m:
        return "-"
    return f"{100 * m['value']:.2f} ± {100 * (m.get('se') or 0):.2f} % (n={m.get('n')})"


def stage_table(records: dict) -> list[str]:
    lines = [f"{'stage':<12} {'wall s':>8} {'CPU s':>8} {'peak RSS':>10} {'anon/file':>17} {'on disk':>10}  "
             "largest allocation"]
    for stage, r in records.items():
        if r is None:
            lines.append(f"{stage:<12} {'(complete before this invocation; not measured)':>40}")
            continue
        tries = f" ({len(r['attempts'])} runs)" if len(r["attempts"]) > 1 else ""
        largest = r["child"].get("largest", QUERY_LARGEST.get(stage, ""))
        split = f"{_gib(max(a['peak_anon'] for a in r['attempts']))} / {_gib(max(a['peak_file'] for a in r['attempts']))}"
        lines.append(f"{stage:<12} {r['wall_s']:>8.1f} {r['cpu_s']:>8.1f} {_size(r['peak_rss']):>10} {split:>17} "
                     f"{_size(r['disk_bytes']):>10}  {largest}{tries}")
    return lines


QUERY_LARGEST = {
    "query": "the embeddings' IVF-Flat index of every row, (n, 512) float32, added 65,536 rows at a time: each "
             "list's vector grows by doubling and the freed buffers stay in the heap (analysis/dense_index.py); the "
             "store's memory map read whole; the recall scan in (500, 32768) blocks",
    "query-again": "the saved index and the store, memory-mapped: only the pages the probed lists touch",
}


def stage_results(records: dict) -> list[str]:
    """One line of results per stage that has them."""
    out = []
    sae, codes = (records.get("sae") or {}).get("child", {}), (records.get("codes") or {}).get("child", {})
    if sae:
        held = sae.get("heldout", {})
        out.append(f"sae: {sae['steps']} steps in {sae['train_seconds']:.0f} s = {sae['steps_per_s']:.2f} steps/s "
                   f"(precision {sae['precision']}); held-out FVU {held.get('fvu', float('nan')):.4f}, dead "
                   f"{held.get('dead_fraction', float('nan')):.3f}; the paper's 100 epochs ({sae['paper_steps']:,} "
                   f"steps of 4096) would take {sae['paper_hours']:.1f} h at this rate (extrapolated, not run)")
    if codes:
        out.append(f"codes: {codes['n']:,} rows encoded in {codes['encode_seconds']:.1f} s = {codes['rows_per_s']:,.0f}"
                   f" rows/s (store verified first in {codes['verify_seconds']:.1f} s); FVU on the test split "
                   f"{codes['fvu']['value']:.4f}, dead latents {codes['dead_fraction']['value']:.3f}")
    con = (records.get("concepts") or {}).get("child", {})
    if con:
        m = con["metrics"]
        unions = ", ".join(f"{k.split('_')[-1] if k != 'union_concepts_mean' else 'neighbours'} "
                           f"{m[k]['value']:.1f}" for k in m if k.startswith("union") and m[k])
        probes = ", ".join(f"{k} {_pct(m[k])}" for k in ("acc_raw", "acc_recon", "acc_codes") if k in m) or "off"
        out.append(f"concepts: {con['n_queries']:,} queries; distinct concepts per 50-neighbourhood: {unions}; "
                   f"O1 distance {m['o1_distance']['value']:.4f}; probes ({con['probe_epochs']} epochs): {probes}")
    ttt, ex = (records.get("ttt") or {}).get("child", {}), (records.get("ttt-exact") or {}).get("child", {})
    if ttt:
        out.append(f"ttt (fast, {ttt['precision']}): {ttt['n_queries']:,} queries; global {_pct(ttt['global_acc'])}, "
                   f"TTT {_pct(ttt['ttt_acc'])}, kNN majority {_pct(ttt['majority_acc'])}; the exact neighbour "
                   f"search is {100 * ttt['search_share']:.0f}% of the evaluation (one chunk timed apart); global head "
                   f"{'trained' if ttt['head_seconds'] > 1 else 'loaded'} in {ttt['head_seconds']:.0f} s")
    if ex:
        out.append(f"ttt exact on {ex['n_queries']:,} of them ({ex['queries_per_s']:.1f} queries/s): agreement with "
                   f"fast {_pct(ex['agreement'])}; exact {_pct(ex['exact_acc'])}, fast {_pct(ex['fast_acc'])}")
    for stage in ("query", "query-again"):
        r = records.get(stage)
        if r:
            i = r["child"]["index"]
            recall = ", ".join(f"@{k} {v:.3f}" for k, v in (i.get("recall") or {}).items())
            out.append(f"{stage}: scripts/query.py --json, row {r['child']['row']}, {r['wall_s']:.1f} s; index "
                       f"{i['factory']} (nprobe {i['nprobe']}, recall {recall}), "
                       f"{'reused' if i['reused'] else 'built and saved'}")
    return out


def ttt_eval_seconds(record: dict | None) -> float | None:
    """The fast evaluation's time over every run of the stage (a killed run's evaluation up to the kill)."""
    if not record:
        return None
    before = sum(a.get("eval_s_before_kill", 0.0) for a in record["attempts"] if a["killed"])
    return before + record["child"]["eval_seconds"]


def checks(records: dict) -> list[str]:
    """Each target, met or missed, and by how much."""
    measured = {k: r for k, r in records.items() if r is not None}
    store, codes = records.get("store"), records.get("codes")
    if not store or not codes:
        return ["targets: the store and codes stages were not measured in this invocation"]
    limit = 2 * (store["disk_bytes"] + codes["disk_bytes"])
    n = store["child"]["n"]
    dense = n * N_LATENTS * 4
    out = [f"limit 2 x (store {_size(store['disk_bytes'])} + codes {_size(codes['disk_bytes'])}) = {_size(limit)}"
           + (" (below the interpreter's own footprint with torch loaded, ~0.4 GiB: meaningful at full size only)"
              if limit < GiB else "")]
    for stage, r in measured.items():
        verdict = "met" if r["peak_rss"] <= limit else f"MISSED by {_size(r['peak_rss'] - limit)}"
        out.append(f"  peak RSS {stage:<12} {_size(r['peak_rss']):>10} = {r['peak_rss'] / limit:.2f} x limit: {verdict}")
    top = max(r["peak_rss"] for r in measured.values())
    out.append(f"no dense (n, n_latents) array: largest peak RSS {_size(top)} against the dense codes' "
               f"{_size(dense)}: " + ("met (none could have been made)" if top < dense else
                                       "not decidable from RSS at this size (see the stated allocations)"))
    rate = codes["child"]["rows_per_s"]
    out.append(f"encoding {rate:,.0f} rows/s, target >= {ENCODE_TARGET:,}: " +
               ("met" if rate >= ENCODE_TARGET else f"MISSED ({rate / ENCODE_TARGET:.2f} of it)"))
    seconds = ttt_eval_seconds(records.get("ttt"))
    if seconds is not None:
        m = records["ttt"]["child"]["n_queries"]
        verdict = "met" if seconds < TTT_TARGET_S else f"MISSED by {(seconds - TTT_TARGET_S) / 60:.1f} min"
        if m != 50_000:
            verdict += f" (on {m:,} queries, not the paper's 50,000)"
        search = records["ttt"]["child"]["search_share"] * seconds
        out.append(f"fast TTT evaluation of {m:,} queries: {seconds / 60:.1f} min = {m / seconds:.1f} queries/s (the "
                   f"exact neighbour search about {search / 60:.1f} min of it), target < 20 min: {verdict}")
    if set(measured) == set(STAGES):
        whole = sum(r["wall_s"] for r in records.values())
        lost = sum(a["wall_s"] for r in records.values() for a in r["attempts"] if a["killed"])
        verdict = "met" if whole < WHOLE_TARGET_S else f"MISSED by {(whole - WHOLE_TARGET_S) / 60:.1f} min"
        out.append(f"whole rehearsal {whole / 60:.1f} min wall ({lost / 60:.1f} min of it in killed runs), "
                   f"target < 60 min: {verdict}")
    return out


def resume_lines(resumes: list[dict]) -> list[str]:
    out = []
    for r in resumes:
        if r["stage"] == "ttt":
            what = (f"TTT chunks {r['chunks']} recomputed in a fresh process against the killed-and-resumed run's "
                    f"files: bitwise equal {r['equal']}; predictions, neighbours and votes equal "
                    f"{r['integer_outputs_equal']}; largest difference of a float output {r['max_float_difference']:.3g}")
        else:
            what = (f"SAE trained again uninterrupted: weights sha256 {r['weights_sha256_uninterrupted'][:16]}... "
                    f"against the resumed run's {r['weights_sha256_resumed'][:16]}...")
        same = len(set(r["sources"])) == 1
        out.append(f"resume of {r['stage']}: {what}; all equal: {r['all_equal']} ({r['wall_s']:.0f} s, peak RSS "
                   f"{_size(r['peak_rss'])}); the toolkit's source "
                   + ("was the same in every run" if same else f"CHANGED between the runs ({', '.join(r['sources'])})"))
    return out


def report(args, records: dict, resumes: list[dict]) -> None:
    print(f"\ncommand: {shlex.join(['python', 'benchmarks/bench_scale.py', *sys.argv[1:]])}")
    for line in [*stage_table(records), "", *stage_results(records), "", *checks(records), *resume_lines(resumes),
                 f"end: {load_line()}"]:
        print(line)
