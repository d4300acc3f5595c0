"""``report.html``: one self-contained page for a run (no network, no server: images are embedded as data URIs).

The page is a jinja2 template (``templates/report.html.j2``) rendered with autoescape: every value from the run
(labels, ids, paths, concept names, settings, reasons) is escaped by default, and first made plain text
(``analysis.figures.plain_text``): bytes of a file name that were not UTF-8 show as ``\\xNN``, a direction
override shows as a visible mark instead of reversing the text. Nothing on the page is executable: no scripts, no
event handlers. Images come only from PNGs inside the run directory (``analysis.report.embed``).
"""

from __future__ import annotations

from pathlib import Path

import jinja2
from markupsafe import Markup

from analysis.figures import plain_text
from analysis.report import view
from analysis.report.embed import embed_png

TEMPLATES = Path(__file__).parent / "templates"
INTRO = (
    "The paper (Hübotter et al., arXiv 2509.24510) argues that foundation models are globally underparameterised: "
    "there are more concepts than feature dimensions, so a global head must compromise, while a head fine-tuned on "
    "a test point's nearest neighbours (test-time training, TTT) only has to fit the few concepts that neighbourhood "
    "uses. Below: what this run is made of, its numbers beside the paper's where it ran on the paper's data, and "
    "the paper's claims checked on it."
)
LABEL_CHARS = 48
"""Class names and ids longer than this are cut on the page (the full text is in the tooltip and the JSON)."""


def _finalize(value):
    """Every ``{{ value }}``: None as a dash, anything else as plain text (autoescape then escapes it)."""
    if value is None:
        return "—"
    if isinstance(value, jinja2.runtime.Undefined):
        return value
    return value if isinstance(value, Markup) else plain_text(value)


def environment() -> jinja2.Environment:
    """The page's template environment: autoescape on, undefined names are errors, plain text by default."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, finalize=_finalize,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True)
    env.filters["short"] = lambda value, n=LABEL_CHARS: plain_text(value, n)
    env.filters["pct"] = lambda value: "—" if value is None else f"{100 * value:.1f} %"
    env.filters["sim"] = lambda value: f"{value:.2f}"
    return env


def _asset(run_dir: Path | None):
    """Thumbnail path (relative to ``RUN_DIR/report``) -> embedded image dict."""
    return lambda rel: embed_png(run_dir, f"report/{rel}" if rel else None)


def render_html(report: dict, run_dir: Path) -> str:
    """The whole page as a string."""
    run_dir = Path(run_dir)
    compared = bool((report.get("data") or {}).get("paper_data")) and any(
        c.get("paper") or c.get("paper_text") for c in report.get("comparisons", []))
    page = {
        "preset": report.get("preset"), "created": report.get("created"), "intro": INTRO,
        "data": report.get("data") or {}, "setup": report.get("setup") or [],
        "summary": view.summary_rows(report), "compared": compared, "claims": view.claim_rows(report),
        "theory_only": not report.get("claims") and bool((report.get("theory") or {}).get("claims")),
        "sections": report.get("sections", {}), "figures": view.figures(report, run_dir),
        "sweeps": view.sweep_tables(report), "width_note": view.width_note(report),
        "gallery": view.gallery_view(report.get("gallery")), "cards": report.get("cards"),
        "provenance": view.provenance_view(report), "asset": _asset(run_dir),
        "verdict_class": view.verdict_class,
    }
    return environment().get_template("report.html.j2").render(**page)


def write_html(report: dict, run_dir: Path, path: Path) -> Path:
    """Write ``render_html`` to ``path`` (atomically, UTF-8)."""
    from artifacts import atomic_file

    data = render_html(report, run_dir).encode("utf-8")  # plain_text left no lone surrogate to refuse
    with atomic_file(path) as f:
        f.write(data)
    return path
