"""What the page shows, prepared from ``report.json``: table rows with words for headers and one number format
per kind of value, figures with captions, the width note, the gallery's statements and the provenance table.
``analysis.report.html`` renders it through the templates; nothing here writes HTML."""

from __future__ import annotations

from pathlib import Path

from analysis.figures import plain_text
from analysis.report.document import lookup
from analysis.report.embed import embed_png
from analysis.report.metrics import label
from analysis.report.paper import format_difference
from analysis.stats import format_measure

PLOT_CAPTIONS = {
    "report.sae_training": "The SAE's training: variance left unexplained on its training batches (the diamond: "
                           "held-out rows) and the share of latents counted dead, over the steps.",
    "report.latent_frequency": "How often each latent fires on held-out images; the grey bar counts those that "
                               "never fired.",
    "concepts.union_hist": "O2: distinct concepts used by each neighbourhood, one panel per way of choosing it. "
                           "Dotted: k (every neighbour shares its concepts) and the most a neighbourhood can reach.",
    "concepts.o1_cosines": "O1: for each way of choosing neighbours, the share of (test image, neighbour) pairs whose "
                           "SAE codes have at most a given cosine; curves on top of each other mean O1 holds.",
    "ttt.ttt_masks": "O2: concepts in each neighbourhood against those the learned mask keeps.",
    "concepts.umap_atoms": "UMAP of the SAE's decoder atoms (concepts), coloured by how often each fires.",
    "concepts.umap_embeddings": "UMAP of the embeddings, coloured by label.",
    "ttt.ttt_accuracy": "Left: accuracy of each method on the same test points (95% Wilson intervals). Right: the "
                        "paired differences the verdicts test (±1.96 SE).",
    "ttt.ttt_locality": "Locality: each TTT head on its own neighbourhood and on the whole test set, against the "
                        "global head on the same test rows.",
    "ttt.ttt_n_neighbours": "Neighbourhood-size sweep: accuracy and the paired TTT gain against the number of "
                            "neighbours.",
    "ttt.ttt_train_size": "Training-set-size sweep: each point retrains the global head on a share of the train split.",
    "report.width": "Backbone-width scaling: the paired TTT gain with its weighted trend over all widths, and the "
                    "test error of both heads. The paper: the gain shrinks as the model grows.",
}
"""One sentence under each known plot, in the order the page shows them; other plots show their name."""
SWEEP_HEADERS = {
    "width": "CNN width (channels)", "n_features": "penultimate features", "n_parameters": "parameters",
    "n_neighbours": "neighbours", "n_train": "training rows", "global_acc": "global head", "ttt_acc": "TTT",
    "majority_acc": "kNN majority vote", "gain": "TTT − global head (paired)",
}
SWEEP_TITLES = {"width": "Backbone width", "n_neighbours": "Neighbourhood size", "train_size": "Training-set size"}


def verdict_class(verdict: str) -> str:
    if verdict.startswith(("agrees", "supports")):
        return "ok"
    if verdict.startswith(("differs", "contradicts", "does not")):
        return "bad"
    if verdict.startswith(("not the paper", "the paper gives no")):
        return "na"
    return "meh"


def _n_note(measures: list[dict], what: str) -> str:
    ns = sorted({m.get("n") for m in measures if isinstance(m, dict) and m.get("n") is not None})
    if len(ns) == 1:
        return f"n = {ns[0]} {what} for every number"
    return f"n per row in the last column ({what})" if ns else ""


def summary_rows(report: dict) -> list[dict]:
    """The summary table: each headline number in words, ours, the paper's (where it ran on this data)."""
    rows = []
    for c in report.get("comparisons", []):
        paper = c.get("paper")
        rows.append({"label": c.get("label") or c["claim"], "metric": c["metric"], "claim": c["claim"],
                     "ours": format_measure(c["ours"], with_n=False), "n": f"{c['ours'].get('n')} {c.get('items', '')}",
                     "paper": format_measure({**paper, "n": None}, with_n=False) if paper else c.get("paper_text"),
                     "paper_where": (paper or {}).get("where"), "verdict": c["verdict"],
                     "css": verdict_class(c["verdict"])})
    return rows


def claim_rows(report: dict) -> list[dict]:
    """The qualitative claims: what was tested, how, the result, the paper's finding, the verdict."""
    rows = []
    for c in report.get("claims", []):
        measured = c.get("measured")
        if c.get("metric") == "sweeps.width":
            shown = c["against"]
        elif measured:  # the test column states its n
            shown = f"{label(c['metric'])}: {format_measure(measured, with_n=False)}"
        else:
            a, b = (lookup(report, m) for m in (c["metric"], c["against"]))
            shown = (f"{label(c['metric'])}: {format_measure(a, with_n=False)}; {label(c['against'])}: "
                     f"{format_measure(b, with_n=False)}")
        rows.append({"claim": c["claim"], "measured": shown, "test": c.get("test", ""), "paper": c.get("paper"),
                     "verdict": c["verdict"], "css": verdict_class(c["verdict"])})
    return rows


def figures(report: dict, run_dir: Path) -> list[dict]:
    """Every plot, known ones first in the page's order, with its caption and embedded PNG (or why not)."""
    plots = report.get("plots", {})
    names = [n for n in PLOT_CAPTIONS if n in plots] + [n for n in plots if n not in PLOT_CAPTIONS]
    out = []
    for name in names:
        found = embed_png(run_dir, plots[name])
        out.append({"name": name, "caption": PLOT_CAPTIONS.get(name, ""), **found})
    for name, why in (report.get("plots_refused") or {}).items():
        out.append({"name": name, "caption": "", "uri": None, "reason": why})
    return out


def sweep_tables(report: dict) -> list[dict]:
    """One table per sweep: headers in words, n stated once, one format per kind of value."""
    tables = []
    for name, rows in (report.get("sweeps") or {}).items():
        if not rows:
            continue
        keys = [k for k in SWEEP_HEADERS if k in rows[0]] + [k for k in rows[0] if k not in SWEEP_HEADERS]
        measures = [r[k] for r in rows for k in keys if isinstance(r.get(k), dict) and "value" in r[k]]
        body = [[format_measure(r[k], with_n=False) if isinstance(r.get(k), dict) and "value" in r[k]
                 else ("—" if r.get(k) is None else str(r.get(k))) for k in keys] for r in rows]
        tables.append({"title": SWEEP_TITLES.get(name, name), "headers": [SWEEP_HEADERS.get(k, k) for k in keys],
                       "rows": body, "n_note": _n_note(measures, "test points")})
    return tables


def width_note(report: dict) -> str | None:
    """Why the width sweep's row at the main run's width differs from the main run's TTT study, when it does."""
    rows, main = (report.get("sweeps") or {}).get("width") or [], report.get("ttt") or {}
    width = (report.get("settings") or {}).get("cnn_width")
    row = next((r for r in rows if r.get("width") == width), None)
    if row is None or not all(k in main for k in ("global_acc", "ttt_acc", "gain")):
        return None
    parts = {k: (row[k]["value"], main[k]["value"]) for k in ("global_acc", "ttt_acc", "gain")}
    same = all(abs(a - b) < 1e-12 for a, b in parts.values())
    text = (f"At the main run's width ({width} channels, {row['n_features']} features) the sweep reads global "
            f"{100 * parts['global_acc'][0]:.2f} %, TTT {100 * parts['ttt_acc'][0]:.2f} %, gain "
            f"{format_difference(parts['gain'][0], 'points')}; the main run's TTT study reads "
            f"{100 * parts['global_acc'][1]:.2f} %, {100 * parts['ttt_acc'][1]:.2f} %, "
            f"{format_difference(parts['gain'][1], 'points')}.")
    if same:
        return text + " They agree."
    text += (" Both train the CNN with the same recipe (width, epochs, seed) and use the same TTT recipe, but not "
             "the same global head: the sweep's global head is the CNN's own last layer, and TTT starts from it; "
             "the TTT study trains a new linear head on the stored embeddings (the reference probe) and TTT starts "
             "from that. Different starting heads give different global accuracies and gains.")
    n_row, n_main = row["gain"].get("n"), main["gain"].get("n")
    if n_row != n_main:
        text += f" They also count different test points: the sweep {n_row}, the TTT study a sample of {n_main}."
    return text


def _statement(counts: dict | None, total: int | None, what: str) -> str:
    if not counts or not total:
        return f"{what}: no labels"
    top = list(counts.items())[:3]
    shown = ", ".join(f"{100 * c / total:.0f} % '{plain_text(k, 24)}'" for k, c in top)
    return f"{what}: {shown}" + (" …" if len(counts) > 3 else "")


def gallery_view(gallery: dict | None) -> dict | None:
    """The gallery with a statement per population: every image that uses a concept, and the shown images."""
    if not gallery or not gallery.get("concepts"):
        return None
    concepts = []
    for c in gallery["concepts"]:
        n_all = sum((c.get("all_labels") or {}).values()) or c.get("n_rows")
        shown = c.get("shown") or []
        concepts.append({**c, "all_statement": _statement(c.get("all_labels"), n_all,
                                                          f"all {c['n_rows']} images that use it"),
                         "shown_statement": _statement(c.get("shown_labels"), len(shown),
                                                       f"the {len(shown)} shown (strongest)")})
    return {**gallery, "concepts": concepts}


def provenance_view(report: dict) -> dict:
    """Versions, settings and artifacts as rows of words; hashes shortened (full in a tooltip)."""
    prov = report.get("provenance", {})
    versions = [[k, str(v)] for k, v in prov.items() if k != "artifacts"]
    artifacts = []
    for name, a in (prov.get("artifacts") or {}).items():
        settings = [[k, _setting(v)] for k, v in sorted((a.get("settings") or {}).items())]
        hashes = [[k, str(v)[:12] + "…", str(v)] for k, v in (a.get("hashes") or {}).items()]
        hashes += [[f"file {k}", _fingerprint(str(v)), str(v)] for k, v in (a.get("files") or {}).items()]
        if a.get("digest"):
            hashes.append(["record digest", str(a["digest"])[:12] + "…", str(a["digest"])])
        artifacts.append({"stage": name, "key": a.get("key", "")[:12], "key_full": a.get("key", ""),
                          "dir": a.get("dir", ""), "settings": settings, "hashes": hashes})
    timings = [{"stage": k, "seconds": f"{v['seconds']:.1f} s",
                "cpu": "—" if v.get("cpu_seconds") is None else f"{v['cpu_seconds']:.1f} s",
                "reused": "reused" if v.get("reused") else "computed"}
               for k, v in (report.get("timings") or {}).items() if isinstance(v, dict)]
    return {"versions": versions, "artifacts": artifacts, "timings": timings,
            "total": f"{(report.get('timings') or {}).get('total_s', 0.0):.1f} s",
            "settings": [[k, _setting(v)] for k, v in sorted((report.get("settings") or {}).items())]}


def _fingerprint(value: str) -> str:
    """A file fingerprint of a stage record, short: the SHA-256's first 12 digits, or the size of a large file."""
    if value.startswith("sha256:"):
        return value[7:19] + "…"
    return value.replace("size:", "size ").split(":mtime")[0] + " bytes"


def _setting(value) -> str:
    if isinstance(value, dict):
        return "; ".join(f"{k} = {_setting(v)}" for k, v in sorted(value.items())) or "none"
    if isinstance(value, (list, tuple)):
        return ", ".join(_setting(v) for v in value) or "none"
    return "default" if value is None else str(value)
