"""What the terminal shows at the end of a run: the setup in one line and each claim of the paper with its verdict
and the numbers behind it; the numbers set beside the paper's only when the run's data is the paper's."""

from __future__ import annotations

from analysis.report.document import is_measure, lookup
from analysis.stats import format_measure

SETUP_ROWS = (("Backbone", "backbone"), ("Backbone", "embedding width"), ("Data", "images"),
              ("Sparse autoencoder", "latents (concepts)"), ("Sparse autoencoder", "active per image, k"),
              ("Sparse autoencoder", "live / dead latents"), ("Neighbourhoods and TTT", "neighbourhood size"))


def setup_line(report: dict) -> str | None:
    """``backbone digits-cnn · embedding width 200 · images 1797 (train …) · latents 128 · …``."""
    cards = {card.get("title"): dict(card.get("rows") or []) for card in report.get("setup") or []}
    parts = [f"{label} {cards[title][label]}" for title, label in SETUP_ROWS
             if title in cards and cards[title].get(label)]
    return " · ".join(parts) or None


def _value(report: dict, claim: dict) -> str:
    measured = claim.get("measured")
    if is_measure(measured):
        return format_measure(measured)
    ours = lookup(report, claim.get("metric") or "")
    text = format_measure(ours) if is_measure(ours) else "—"
    against = claim.get("against")
    other = lookup(report, against) if isinstance(against, str) else None
    if is_measure(other):
        text += f" against {format_measure(other, with_n=False)} ({against.rsplit('.', 1)[-1].replace('_', ' ')})"
    return text


def summary_lines(report: dict, report_path: str) -> list[str]:
    """The closing lines of ``scripts/reproduce.py``."""
    lines = []
    setup = setup_line(report)
    if setup:
        lines.append(f"setup: {setup}")
    claims = report.get("claims") or []
    if claims:
        lines.append("the paper's claims, checked on this run:")
        for claim in claims:
            lines.append(f"  {claim.get('verdict', '?')}: {claim.get('claim')}: {_value(report, claim)}")
            if claim.get("paper"):
                lines.append(f"      the paper: {claim['paper']}")
    compared = [row for row in report.get("comparisons") or [] if row.get("paper")]
    if compared:
        lines.append("beside the paper's numbers:")
        for row in compared:
            paper = row["paper"]
            paper_text = format_measure(paper, with_n=False) if is_measure(paper) else str(paper.get("value"))
            lines.append(f"  {row.get('label') or row['metric']}: {format_measure(row['ours'])}, paper "
                         f"{paper_text}: {row['verdict']}")
    elif report.get("data"):
        data = report["data"]
        lines.append(f"not beside the paper's numbers: {data.get('evidence') or 'not the paper data'} "
                     f"({len(report.get('comparisons') or [])} numbers in the report)")
    for name, section in (report.get("sections") or {}).items():
        if section.get("status") != "ok":
            lines.append(f"section {name}: {section['status']}: {section.get('reason')}")
    lines.append(f"report: {report_path}")
    return lines
