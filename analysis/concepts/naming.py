"""Concept descriptions from what the user's data holds: firing frequency, top-activating images, labels.

A concept (SAE latent) is described by how often it fires (value > 0), the rows where it fires most strongly,
and, when the store is labelled, the label distribution of those top rows and of every row that uses it, e.g.
``mostly '3' (83% of 120 images)``, with the purity (share of the most common label) as a number. A concept
that never fires is reported as dead. Everything reads the CodeStore's inverted lists: no dense codes.
"""

from __future__ import annotations

import numpy as np

from sae.codes import CodeStore

BATCH_ROWS = 1 << 16
"""Code rows read at a time when counting over the whole CodeStore."""


def firing_counts(codes: CodeStore) -> np.ndarray:
    """How many rows use each latent with a positive value, ``(n_latents,)`` int64."""
    counts = np.zeros(codes.n_latents, dtype=np.int64)
    for start in range(0, codes.n, BATCH_ROWS):
        values, indices = codes.codes(np.arange(start, min(start + BATCH_ROWS, codes.n)))
        counts += np.bincount(indices[values > 0].astype(np.int64), minlength=codes.n_latents)
    return counts


def label_counts(codes: CodeStore, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """``(n_latents, n_classes)`` how many rows of each label use each latent (unlabelled rows not counted)."""
    labels = np.asarray(labels, dtype=np.int64)
    out = np.zeros(codes.n_latents * n_classes, dtype=np.int64)
    for start in range(0, codes.n, BATCH_ROWS):
        rows = np.arange(start, min(start + BATCH_ROWS, codes.n))
        values, indices = codes.codes(rows)
        row_labels = np.broadcast_to(labels[rows, None], indices.shape)
        use = (values > 0) & (row_labels >= 0)
        out += np.bincount(indices[use].astype(np.int64) * n_classes + row_labels[use], minlength=out.size)
    return out.reshape(codes.n_latents, n_classes)


def top_rows(codes: CodeStore, latent: int, n_top: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, values)`` of the ``n_top`` rows where ``latent`` is most active (value > 0), strongest first;
    ties go to the lower row."""
    rows = codes.rows_of(int(latent))
    values, indices = codes.codes(rows)
    value = np.where(indices == latent, values, 0.0).sum(1)
    keep = value > 0
    rows, value = rows[keep], value[keep]
    order = np.lexsort((rows, -value))[:n_top]
    return rows[order], value[order].astype(np.float32)


def rows_with_latents(codes: CodeStore, latents) -> np.ndarray:
    """Rows (ascending) whose codes select every one of ``latents``: the intersection of their inverted lists."""
    latents = [int(latent) for latent in np.atleast_1d(latents)]
    if not latents:
        raise ValueError("rows_with_latents needs at least one latent")
    lists = sorted((codes.rows_of(latent) for latent in latents), key=len)
    out = lists[0]
    for other in lists[1:]:
        out = np.intersect1d(out, other, assume_unique=True)
    return out


def _distribution(counts: np.ndarray, classes: list[str]) -> dict:
    total = int(counts.sum())
    if total == 0:
        return {"n": 0, "top_label": None, "purity": None, "labels": {}}
    order = np.argsort(-counts, kind="stable")
    shown = [int(c) for c in order[:5] if counts[c] > 0]
    return {
        "n": total,
        "top_label": classes[order[0]] if order[0] < len(classes) else str(order[0]),
        "purity": float(counts[order[0]] / total),
        "labels": {(classes[c] if c < len(classes) else str(c)): int(counts[c]) for c in shown},
    }


class ConceptNamer:
    """Descriptions of any latents of one CodeStore; the whole-store counts are computed once, on creation."""

    def __init__(self, codes: CodeStore, labels: np.ndarray | None = None, classes: list[str] | None = None):
        self.codes = codes
        self.counts = firing_counts(codes)
        self.labels = None if labels is None else np.asarray(labels)
        self.classes = list(classes or [])
        self.labelled = bool(self.labels is not None and self.classes and (self.labels >= 0).any())
        # Labels past the class names (a store may name fewer classes than it uses) keep bins of their own.
        n_classes = max(len(self.classes), int(self.labels.max()) + 1) if self.labelled else 0
        self.per_label = label_counts(codes, self.labels, n_classes) if self.labelled else None

    def describe(self, latent: int, n_top: int = 20) -> dict:
        """A dict: ``latent``, ``n_images`` (rows that use it), ``frequency`` (their share), ``dead``,
        ``top_rows``/``top_values``, ``top_labels`` and ``all_labels`` (label distributions with ``purity``;
        ``None`` when the store is unlabelled) and a one-line ``description``."""
        latent = int(latent)
        if not 0 <= latent < self.codes.n_latents:
            raise ValueError(f"latent {latent} out of range [0, {self.codes.n_latents})")
        # n_top=0 skips reading the latent's rows: a quick description from the whole-store counts.
        rows, values = top_rows(self.codes, latent, n_top) if n_top > 0 else (np.zeros(0, np.int64), [])
        entry = {
            "latent": latent,
            "n_images": int(self.counts[latent]),
            "frequency": float(self.counts[latent] / max(self.codes.n, 1)),
            "dead": bool(self.counts[latent] == 0),
            "top_rows": rows.tolist(),
            "top_values": [float(v) for v in values],
            "top_labels": None,
            "all_labels": None,
        }
        if self.labelled:
            top = self.labels[rows]
            entry["top_labels"] = _distribution(np.bincount(top[top >= 0], minlength=len(self.classes)), self.classes)
            entry["all_labels"] = _distribution(self.per_label[latent], self.classes)
        entry["description"] = _sentence(entry, self.codes.n, self.labelled)
        return entry


def describe_concepts(codes: CodeStore, labels: np.ndarray | None = None, classes: list[str] | None = None,
                      latents=None, n_top: int = 20) -> list[dict]:
    """``ConceptNamer.describe`` of each of ``latents`` (all latents when ``None``)."""
    namer = ConceptNamer(codes, labels, classes)
    latents = range(codes.n_latents) if latents is None else np.atleast_1d(latents)
    return [namer.describe(int(latent), n_top) for latent in latents]


def _sentence(entry: dict, n_rows: int, labelled: bool) -> str:
    if entry["dead"]:
        return f"dead: never fires on the {n_rows} images"
    freq = f"fires on {entry['frequency']:.1%} of images ({entry['n_images']})"
    if not labelled:
        return f"{freq}; unlabelled store: described by frequency and top images only"
    every, top = entry["all_labels"], entry["top_labels"]
    if every["n"] == 0:
        return f"{freq}; none of its images is labelled"
    lead = "mostly" if every["purity"] > 0.5 else "mixed, most often"
    text = f"{lead} '{every['top_label']}' ({every['purity']:.0%} of {every['n']} images)"
    if top["n"]:
        text += f"; top {top['n']}: {top['purity']:.0%} '{top['top_label']}'"
    return f"{text}; {freq}"
