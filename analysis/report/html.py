"""``report.html``: one self-contained page for a run (no network, no server: images are embedded as data URIs).

Every string that comes from the run (labels, ids, paths, concept names, settings, reasons) passes through
``esc`` (``html.escape`` with quotes) before it reaches the page, so a class folder named like a tag or a script
shows as text and never runs. Nothing on the page is executable: no scripts, no event handlers.
"""

from __future__ import annotations

import json
from pathlib import Path

from analysis.report.gallery import esc, image_uri, render_cards, render_gallery

PERCENT_WORDS = ("acc", "gain", "fraction", "agreement")
SWEEP_COLUMNS = ("width", "n_neighbours", "n_train", "n_features", "n_parameters", "global_acc", "ttt_acc",
                 "majority_acc", "gain")
"""Columns shown first, in this order, in the sweep tables."""
PLOT_CAPTIONS = {
    "concepts.o1_cosines": "O1: concept-space cosine between a test point and its neighbours, with neighbours chosen "
                           "in the embeddings, reconstructions or codes, against random and same-label sets.",
    "concepts.union_hist": "O2: distinct concepts used by each neighbourhood, against random and same-label sets "
                           "of the same size (dotted: the bounds k and n_neighbours·k).",
    "concepts.umap_atoms": "UMAP of the SAE's decoder atoms (concepts), coloured by how often each fires.",
    "concepts.umap_embeddings": "UMAP of the embeddings, coloured by label.",
    "ttt.ttt_accuracy": "TTT against the global head and kNN majority vote on the test set (± 1 SE).",
    "ttt.ttt_locality": "Locality: each TTT head on its own neighbourhood and on the whole test set.",
    "ttt.ttt_n_neighbours": "Neighbourhood-size sweep.",
    "ttt.ttt_train_size": "Training-set-size sweep.",
    "ttt.ttt_masks": "O2: concepts in each neighbourhood and concepts kept by the learned mask.",
    "report.width": "Backbone-width scaling: the TTT gain (paired, TTT minus global) and the test error against the "
                   "CNN's penultimate width. The paper: the gain shrinks as the model grows.",
}
"""One sentence under each known plot; other plots show their name."""
INTRO = (
    "The paper (Hübotter et al., arXiv 2509.24510) argues that foundation models are globally underparameterised: "
    "there are more concepts than feature dimensions, so a global head must compromise, while a head fine-tuned on "
    "a test point's nearest neighbours (test-time training, TTT) only has to fit the few concepts that neighbourhood "
    "uses. The summary below sets this run's numbers beside the paper's and checks its claims."
)
CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
main{max-width:1180px;margin:0 auto;padding:20px 28px 60px}
h1{font-size:1.6rem;margin:.2em 0}
h2{font-size:1.25rem;margin-top:2em;border-bottom:2px solid #d6dbe3;padding-bottom:.2em}
p.lead{font-size:1.02rem;line-height:1.5;max-width:60em}
table{border-collapse:collapse;width:100%;background:#fff;font-size:.92rem;margin:.6em 0}
th,td{border:1px solid #d6dbe3;padding:6px 8px;text-align:left;vertical-align:top}
th{background:#eef1f5} td.num{font-variant-numeric:tabular-nums;white-space:nowrap}
.ok{color:#1f7a3a;font-weight:600} .bad{color:#b03a2e;font-weight:600} .meh{color:#8a6d00;font-weight:600}
.missing{background:#fff6e5} .na{color:#7a808c}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(460px,1fr));gap:16px}
figure{background:#fff;border:1px solid #d6dbe3;margin:0;padding:10px} figure img{width:100%;height:auto}
figcaption{font-size:.85rem;color:#4a5263;margin-top:4px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:14px}
.card{background:#fff;border:1px solid #d6dbe3;padding:10px;font-size:.88rem}
.thumbs img{width:42px;height:42px;image-rendering:pixelated;margin:1px;border:1px solid #ccd}
td.thumbs{min-width:400px} .cardhead{display:flex;gap:12px;align-items:flex-start}
img.query{width:96px;height:96px;image-rendering:pixelated;border:1px solid #ccd}
.card ul{padding-left:1.2em;margin:.5em 0} .note{background:#eef4fb;border-left:4px solid #2f6db5;padding:8px 12px}
.small{font-size:.82rem;color:#4a5263} code{font-size:.85em}
"""


def is_percent(metric: str, value: float) -> bool:
    return any(w in metric.rsplit(".", 1)[-1] for w in PERCENT_WORDS) and abs(value) <= 1.0


def fmt_measure(metric: str, m: dict | None) -> str:
    """``98.57 ± 0.12 %`` (n = 359) for fractions, else three significant digits."""
    if not m:
        return "—"
    if m.get("value") is None:  # a measurement that could not be made (e.g. too few points to fit a slope)
        return f"— ({m.get('provenance') or 'not measured'})"
    v, se = m["value"], m.get("se")
    if metric.rsplit(".", 1)[-1] == "gain" and abs(v) <= 1.0:
        text = f"{100 * v:+.2f}" + (f" ± {100 * se:.2f}" if se is not None else "") + " points"
    elif is_percent(metric, v):
        text = f"{100 * v:.2f}" + (f" ± {100 * se:.2f}" if se is not None else "") + " %"
    else:
        text = f"{v:.4g}" + (f" ± {se:.2g}" if se is not None else "")
    return text + (f" (n = {m['n']})" if m.get("n") is not None else "")


def _verdict_class(verdict: str) -> str:
    if verdict == "not compared":
        return "na"
    if verdict.startswith(("agrees", "supports")):
        return "ok"
    if verdict.startswith(("differs", "contradicts", "does not")):
        return "bad"
    return "meh"


def summary_table(report: dict) -> str:
    compared = any(c.get("paper") or c.get("paper_text") for c in report.get("comparisons", []))
    rows = []
    for c in report.get("comparisons", []):
        paper = c.get("paper")
        if not compared:
            rows.append(f"<tr><td>{esc(c['claim'])}</td><td><code>{esc(c['metric'])}</code></td>"
                        f"<td class=num>{esc(fmt_measure(c['metric'], c['ours']))}</td></tr>")
            continue
        paper_text = (f"{fmt_measure(c['metric'], {**paper, 'n': None})}<br>"
                      f"<span class=small>{esc(paper['where'])}</span>") if paper else esc(c.get("paper_text") or "—")
        rows.append(
            f"<tr><td>{esc(c['claim'])}</td><td><code>{esc(c['metric'])}</code></td>"
            f"<td class=num>{esc(fmt_measure(c['metric'], c['ours']))}</td><td class=num>{paper_text}</td>"
            f"<td class={_verdict_class(c['verdict'])}>{esc(c['verdict'])}</td></tr>")
    if not rows:
        return "<p class=missing>No headline number could be computed in this run (see the sections below).</p>"
    head = "<tr><th>What the claim means</th><th>Metric</th><th>This run</th>" + (
        "<th>Paper</th><th>Verdict</th></tr>" if compared else "</tr>")
    note = "" if compared else (
        "<p class=note>The paper has no run on this data, so its numbers are not compared here (the <code>mnist</code> "
        "and <code>imagenet-clip</code> presets compare them). The next table checks the paper's claims that do not "
        "depend on the data set.</p>")
    return f"{note}<table id=summary>{head}{''.join(rows)}</table>"


def claims_table(report: dict) -> str:
    rows = [f"<tr><td>{esc(c['claim'])}</td><td><code>{esc(c['metric'])}</code> vs {esc(c['against'])}</td>"
            f"<td class={_verdict_class(c['verdict'])}>{esc(c['verdict'])}</td></tr>" for c in report.get("claims", [])]
    if not rows and (report.get("theory") or {}).get("claims"):
        return "<p>The theory study checks the paper's Section 2 claims itself: see the summary table above.</p>"
    if not rows:
        return "<p>None of the paper's qualitative claims could be checked in this run.</p>"
    return f"<table id=claims><tr><th>Claim</th><th>Checked as</th><th>Verdict</th></tr>{''.join(rows)}</table>"


def sections_table(report: dict) -> str:
    rows = [f"<tr class={'' if s['status'] == 'ok' else 'missing'}><td>{esc(name)}</td><td>{esc(s['status'])}</td>"
            f"<td>{esc(s.get('reason', ''))}</td></tr>" for name, s in report.get("sections", {}).items()]
    return f"<table id=sections><tr><th>Section</th><th>Status</th><th>Note</th></tr>{''.join(rows)}</table>"


def plots_grid(report: dict, run_dir: Path) -> str:
    figures = []
    for name, rel in report.get("plots", {}).items():
        uri = image_uri(run_dir / rel)
        if uri is None:
            figures.append(f"<figure class=missing><figcaption>{esc(name)}: file {esc(rel)} is missing"
                           "</figcaption></figure>")
            continue
        caption = PLOT_CAPTIONS.get(name, "")
        figures.append(f"<figure><img src=\"{uri}\" alt=\"{esc(name)}\"><figcaption>{esc(caption)} "
                       f"<code>{esc(name)}</code></figcaption></figure>")
    return f"<div class=grid>{''.join(figures)}</div>" if figures else "<p>No plots in this run.</p>"


def sweep_table(name: str, rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = [k for k in SWEEP_COLUMNS if k in rows[0]] + [k for k in rows[0] if k not in SWEEP_COLUMNS]
    head = "".join(f"<th>{esc(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(
        f"<td class=num>{esc(fmt_measure(k, r[k]) if isinstance(r.get(k), dict) and 'value' in r[k] else r.get(k))}</td>"
        for k in keys) + "</tr>" for r in rows)
    return f"<h3>{esc(name)}</h3><table>{'<tr>' + head + '</tr>'}{body}</table>"


def provenance_block(report: dict) -> str:
    prov = report.get("provenance", {})
    versions = "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in prov.items() if k != "artifacts")
    arts = "".join(
        f"<tr><td>{esc(name)}</td><td><code>{esc(a['key'][:16])}</code></td><td class=small>{esc(a['dir'])}</td>"
        f"<td class=small>{esc(json.dumps(a.get('settings', {}), sort_keys=True))}</td>"
        f"<td class=small>{esc(json.dumps(a.get('hashes', {}), sort_keys=True))}</td></tr>"
        for name, a in prov.get("artifacts", {}).items())
    timings = report.get("timings", {})
    trows = "".join(f"<tr><td>{esc(k)}</td><td class=num>{v['seconds']:.1f} s</td><td class=num>"
                    f"{'—' if v.get('cpu_seconds') is None else format(v['cpu_seconds'], '.1f') + ' s'}</td>"
                    f"<td>{'reused' if v['reused'] else 'computed'}</td></tr>"
                    for k, v in timings.items() if isinstance(v, dict))
    settings = esc(json.dumps(report.get("settings", {}), indent=1, sort_keys=True))
    return (f"<h3>Versions</h3><table>{versions}</table><h3>Settings</h3><pre class=small>{settings}</pre>"
            f"<h3>Artifacts</h3><table><tr><th>Stage</th><th>Key</th><th>Directory</th><th>Settings</th>"
            f"<th>Hashes</th></tr>{arts}</table>"
            f"<h3>Stage timings</h3><table id=timings><tr><th>Stage</th><th>Wall time</th><th>CPU time</th>"
            f"<th>This run</th></tr>{trows}<tr><td>total (as computed)</td><td class=num>"
            f"{timings.get('total_s', 0.0):.1f} s</td><td></td><td></td></tr></table>")


def render_html(report: dict, run_dir: Path) -> str:
    """The whole page as a string."""
    sweeps = "".join(sweep_table(name, rows) for name, rows in report.get("sweeps", {}).items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>ttt-concepts report: {esc(report.get('preset'))}</title><style>{CSS}</style></head>
<body><main>
<h1>Specialization after generalization: {esc(report.get('preset'))} run</h1>
<p class=small>Created {esc(report.get('created'))}; every number is a mean ± one standard error over n items.</p>
<p class=lead>{esc(INTRO)}</p>
<h2>Summary: this run against the paper</h2>{summary_table(report)}
<h2>The paper's claims, checked</h2>{claims_table(report)}
<h2>Sections</h2>{sections_table(report)}
<h2>Plots</h2>{plots_grid(report, run_dir)}
<h2>Sweeps</h2>{sweeps or '<p>No sweep in this run.</p>'}
<h2>Concept gallery</h2>{render_gallery(report.get('gallery'), run_dir)}
<h2>Image cards</h2>{render_cards(report.get('cards'), run_dir)}
<h2>Provenance</h2>{provenance_block(report)}
</main></body></html>
"""


def write_html(report: dict, run_dir: Path, path: Path) -> Path:
    """Write ``render_html`` to ``path`` (atomically)."""
    from artifacts import atomic_file

    with atomic_file(path, "w") as f:
        f.write(render_html(report, run_dir))
    return path
