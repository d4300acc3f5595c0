"""The training data of ``train_sae``, whichever form it came in: an ``(n, d)`` array with chosen rows, or a
re-iterable source of batches; its seeded samples (bias init, held-out rows) and its NaN/Inf check."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from artifacts.ranks import Ranks
from sae.batches import BatchStream, IterableStream, check_rows_finite, first_rows
from sae.schedule import TrainConfig
from sae.train_state import rows_digest


def _read_sample(x: np.ndarray, rows: np.ndarray, max_rows: int, seed: int, salt: int, what: str) -> np.ndarray:
    """``x[rows]`` as float32, or a seeded sample of ``max_rows`` of them (read in ascending order); NaN or Inf
    is an error naming the rows. ``salt`` keeps the samples drawn for different purposes independent."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size > max_rows:
        rows = rows[np.sort(np.random.default_rng([seed, salt]).choice(rows.size, size=max_rows, replace=False))]
    out = np.asarray(x[rows], dtype=np.float32)
    check_rows_finite(out, rows, what)
    return out


_INIT_SALT, _HELDOUT_SALT = 0xB1A5, 0xE7A1


SMALL_DATA_ELEMENTS = 1 << 26
"""Training data up to this many values is checked for NaN/Inf before training; larger data batch by batch."""


def check_finite(x: np.ndarray, rows: np.ndarray, chunk_rows: int = 65536) -> None:
    """Raise ``ValueError`` naming the rows of ``x[rows]`` that hold NaN or Inf (read in chunks)."""
    bad: list[int] = []
    for start in range(0, rows.size, chunk_rows):
        part = np.sort(rows[start : start + chunk_rows])
        ok = np.isfinite(np.asarray(x[part], dtype=np.float32)).all(axis=1)
        bad.extend(part[~ok].tolist())
    if bad:
        raise ValueError(
            f"training data holds NaN or Inf in {len(bad)} rows: {sorted(bad)[:10]}"
            f"{' ...' if len(bad) > 10 else ''}; fix or re-extract the embeddings"
        )


@dataclass
class TrainData:
    """The training data, whichever form it came in: an ``(n, d)`` array or a re-iterable batch source."""

    x: Any
    rows: np.ndarray | None
    n_rows: int
    d: int
    heldout: Any
    heldout_rows: np.ndarray | None
    batch_size: int | None = None

    @property
    def is_array(self) -> bool:
        return self.rows is not None

    def digest(self) -> str:
        return rows_digest(self.rows, int(self.x.shape[0])) if self.is_array else "batch source"

    def stream(self, batch_size: int, seed: int, ctx: Ranks):
        if self.is_array:
            return BatchStream(self.x, batch_size, rows=self.rows, seed=seed, rank=ctx.rank, world_size=ctx.world_size)
        return IterableStream(self.x)

    def init_sample(self, n_samples: int, seed: int) -> np.ndarray:
        if self.is_array:
            return _read_sample(self.x, self.rows, n_samples, seed, _INIT_SALT, "training data")
        return first_rows(self.x, n_samples)

    def heldout_sample(self, max_rows: int, seed: int) -> np.ndarray | None:
        if self.heldout is not None:
            held = np.asarray(self.heldout, dtype=np.float32)
            if held.ndim != 2 or held.shape[1] != self.d:
                raise ValueError(f"held-out data must be (m, {self.d}), got shape {held.shape}")
            return _read_sample(held, np.arange(held.shape[0]), max_rows, seed, _HELDOUT_SALT, "held-out data")
        if self.heldout_rows is not None and len(self.heldout_rows) > 0 and self.is_array:
            return _read_sample(self.x, self.heldout_rows, max_rows, seed, _HELDOUT_SALT, "held-out data")
        return None


def as_data(x, train_rows, heldout_rows, heldout_x, config: TrainConfig) -> TrainData:
    """Wrap ``train_sae``'s data argument, refusing shapes and sources it cannot train on."""
    if getattr(x, "ndim", None) is not None:
        if x.ndim != 2:
            raise ValueError(f"training data must be a 2-d (n, d) array, got shape {x.shape}")
        n = int(x.shape[0])
        rows = np.arange(n, dtype=np.int64) if train_rows is None else np.asarray(train_rows, dtype=np.int64)
        if rows.size == 0:
            raise ValueError("no training rows: the selected split is empty")
        return TrainData(x, rows, int(rows.size), int(x.shape[1]), heldout_x, heldout_rows)
    if not hasattr(x, "__iter__"):
        raise ValueError(f"training data must be an (n, d) array or a re-iterable source of batches, got {type(x)}")
    if train_rows is not None or heldout_rows is not None:
        raise ValueError("train_rows / heldout_rows select rows of an array; with a batch source pass heldout_x")
    if iter(x) is x:
        # Resume and the initial data sample re-iterate the source, which a one-shot iterator cannot do.
        raise ValueError(
            "the batch source must be re-iterable (a list, a DataLoader, an object whose __iter__ starts over), "
            "not a one-shot iterator or generator"
        )
    n_batches = len(x) if hasattr(x, "__len__") else None
    if config.n_steps is None and n_batches is None:
        raise ValueError("a batch source without len() needs --steps (n_steps), not --epochs")
    first = next(iter(x), None)
    if first is None:
        raise ValueError("the batch source yielded no batches")
    if getattr(first, "ndim", None) != 2:
        raise ValueError(f"the batch source must yield 2-d (b, d) batches, got shape {getattr(first, 'shape', None)}")
    b, d = int(first.shape[0]), int(first.shape[1])
    # A batch source has no row count: one pass is estimated from the first batch (for the data-size defaults).
    n_rows = b * (n_batches if n_batches is not None else config.n_steps)
    return TrainData(x, None, n_rows, d, heldout_x, None, batch_size=b)


