"""BatchStream: seeded, resumable, shuffled batches gathered from an (optionally memory-mapped) ``(n, d)`` array.

Each epoch visits every selected row exactly once, in the order of a permutation drawn from
``numpy.random.default_rng([seed, epoch])``: the order of any epoch is a pure function of the seed and the
epoch number, so the whole state of the stream is ``(epoch, position)`` and a resumed stream continues
exactly where the interrupted one stopped. Only the permutation (8 bytes per row) and one batch are ever
in memory; the rows themselves stay in the memory map.

Data-parallel training splits every *global* batch into ``world_size`` contiguous parts; rank ``r`` reads
part ``r``. All ranks draw the same permutation, so together they read exactly the global batch a single
process would read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class Batch:
    """One rank's part of a global batch."""

    x: np.ndarray
    """This rank's rows ``(b_local, d)`` as float32, in the order of ``rows``."""
    rows: np.ndarray
    """Row indices of ``x`` in the source array, ascending ``(b_local,)`` int64."""
    n_global: int
    """Size of the global batch (all ranks together)."""
    epoch: int
    """Epoch the batch belongs to."""


def check_rows_finite(x: np.ndarray, rows: np.ndarray, what: str) -> None:
    """Raise ``ValueError`` naming the rows (at most ten) of ``x (m, d)``, known as ``rows (m,)``, that hold NaN
    or Inf; ``what`` names the data in the message."""
    ok = np.isfinite(x).all(axis=1)
    if not ok.all():
        bad = np.asarray(rows)[~ok]
        raise ValueError(
            f"{what} holds NaN or Inf in rows {bad[:10].tolist()}{' and more' if bad.size > 10 else ''}; "
            "fix or re-extract the embeddings"
        )


class BatchStream:
    """Shuffled batches of ``x[rows]``, ``batch_size`` rows per global batch; the last batch of an epoch
    holds the remainder, so every row is visited once per epoch."""

    def __init__(
        self,
        x: np.ndarray,
        batch_size: int,
        *,
        rows: np.ndarray | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if getattr(x, "ndim", None) != 2:
            raise ValueError(f"training data must be a 2-d (n, d) array, got shape {getattr(x, 'shape', None)}")
        if batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.x = x
        n = int(x.shape[0])
        if rows is None:
            self.rows = np.arange(n, dtype=np.int64)
        else:
            self.rows = np.asarray(rows, dtype=np.int64).reshape(-1)
            if self.rows.size and (self.rows.min() < 0 or self.rows.max() >= n):
                raise ValueError(f"training rows must lie in [0, {n}); got [{self.rows.min()}, {self.rows.max()}]")
        if self.rows.size == 0:
            raise ValueError("no training rows: the selected split is empty")
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.epoch = 0
        self.position = 0
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    @property
    def n_rows(self) -> int:
        return int(self.rows.size)

    @property
    def n_batches_per_epoch(self) -> int:
        return math.ceil(self.n_rows / self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """Row indices of ``epoch`` in visiting order (a seeded permutation of ``rows``)."""
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = self.rows[rng.permutation(self.n_rows)]
            self._perm_epoch = epoch
        return self._perm

    def next_rows(self) -> tuple[np.ndarray, int, int]:
        """Advance by one global batch; return this rank's rows (ascending), the global size and the epoch."""
        order = self.order(self.epoch)
        start = self.position * self.batch_size
        global_rows = order[start : start + self.batch_size]
        epoch = self.epoch
        self.position += 1
        if self.position >= self.n_batches_per_epoch:
            self.epoch += 1
            self.position = 0
        bounds = np.linspace(0, global_rows.size, self.world_size + 1).round().astype(np.int64)
        local = np.sort(global_rows[bounds[self.rank] : bounds[self.rank + 1]])
        return local, int(global_rows.size), epoch

    def next_batch(self) -> Batch:
        """Advance by one global batch and gather this rank's rows from the array.

        Rows are read in ascending order (locality in the memory map); the order *between* batches is the
        seeded permutation. A row holding NaN or Inf raises ``ValueError`` naming it.
        """
        rows, n_global, epoch = self.next_rows()
        x = np.asarray(self.x[rows], dtype=np.float32)
        check_rows_finite(x, rows, "training data")
        return Batch(x=x, rows=rows, n_global=n_global, epoch=epoch)

    def state_dict(self) -> dict:
        """The stream's position, plus what it must match on resume (plain ints)."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "n_rows": self.n_rows,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; the seed, batch size and row count must match."""
        for key in ("seed", "batch_size", "n_rows"):
            if int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"the saved batch stream has {key}={state[key]}, this one {getattr(self, key)}; "
                    "resume with the settings of the interrupted run"
                )
        if not 0 <= int(state["position"]) < self.n_batches_per_epoch:
            raise ValueError(f"saved stream position {state['position']} outside the epoch")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])


def heldout_split(n_rows: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of ``range(n_rows)`` into (train, held-out) row indices, both ascending.

    For data without a validation split: ``fraction`` of the rows (at least one, and at least one left
    for training) are held out for the final metrics.
    """
    if n_rows < 2:
        raise ValueError(f"need at least 2 rows to hold some out, got {n_rows}")
    n_out = min(max(1, int(round(fraction * n_rows))), n_rows - 1)
    perm = np.random.default_rng([seed, 0x5EED]).permutation(n_rows)
    return np.sort(perm[n_out:]).astype(np.int64), np.sort(perm[:n_out]).astype(np.int64)


def choose_rows(
    n_rows: int,
    split: dict[str, np.ndarray],
    train_split: str | None = None,
    heldout_fraction: float = 0.05,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Training and held-out rows of a data set with named splits (e.g. a store's ``train``/``val``/``test``).

    Training rows: the split named ``train_split``, else ``"train"`` when present, else all rows. Held-out
    rows: ``"val"`` when present and not the training split, else ``"test"``, else a seeded
    ``heldout_fraction`` of the training rows (removed from training). Returns
    ``(train_rows, heldout_rows, heldout_name)``, where the name says which it was.
    """
    split = {name: np.asarray(r, dtype=np.int64) for name, r in split.items() if len(r) > 0}
    if train_split is not None:
        if train_split not in split:
            raise ValueError(f"--split {train_split!r} is not a non-empty split of the data (it has {sorted(split)})")
        train = split[train_split]
    elif "train" in split:
        train_split, train = "train", split["train"]
    else:
        train_split, train = None, np.arange(n_rows, dtype=np.int64)
    for name in ("val", "test"):
        if name in split and name != train_split:
            return np.sort(train), np.sort(split[name]), name
    keep, held = heldout_split(train.size, heldout_fraction, seed)
    return np.sort(train[keep]), np.sort(train[held]), f"held-out {heldout_fraction:.0%} of the training rows"


class IterableStream:
    """Batches from a re-iterable source: every ``iter(source)`` yields the same sequence of ``(b, d)``
    arrays or tensors (a list, a seeded DataLoader, a generator function wrapped in a class, ...).

    One pass over the source is an epoch; the state is ``(epoch, position)`` and a resumed stream re-iterates
    the source and skips the batches already consumed. Under data parallelism each process passes its own
    source (its shard); the trainer sums the batch sizes across processes.
    """

    def __init__(self, source):
        self.source = source
        self.epoch = 0
        self.position = 0
        self._it = None

    def _restart(self) -> None:
        self._it = iter(self.source)
        for _ in range(self.position):
            next(self._it)

    def next_batch(self) -> Batch:
        """The next batch as float32 numpy; ``rows`` are positions within the batch, ``n_global`` its size."""
        if self._it is None:
            self._restart()
        try:
            item = next(self._it)
        except StopIteration:
            if self.position == 0:
                raise ValueError("the batch source yielded no batches") from None
            self.epoch, self.position = self.epoch + 1, 0
            self._restart()
            item = next(self._it)
        if hasattr(item, "detach"):
            item = item.detach().cpu().numpy()
        x = np.asarray(item, dtype=np.float32)
        if x.ndim != 2:
            raise ValueError(f"the batch source must yield 2-d (b, d) batches, got shape {x.shape}")
        check_rows_finite(x, np.arange(x.shape[0]), f"batch {self.position} of epoch {self.epoch}")
        epoch = self.epoch
        self.position += 1
        return Batch(x=x, rows=np.arange(x.shape[0], dtype=np.int64), n_global=x.shape[0], epoch=epoch)

    def state_dict(self) -> dict:
        return {"kind": "iterable", "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "iterable":
            raise ValueError("the saved stream was not a batch source; resume with the data of the interrupted run")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._it = None


def first_rows(source, n_rows: int) -> np.ndarray:
    """Up to ``n_rows`` rows from the start of a re-iterable batch source, float32 ``(m, d)``."""
    parts, total = [], 0
    for item in source:
        if hasattr(item, "detach"):
            item = item.detach().cpu().numpy()
        part = np.asarray(item, dtype=np.float32)
        if part.ndim != 2:
            raise ValueError(f"the batch source must yield 2-d (b, d) batches, got shape {part.shape}")
        parts.append(part[: n_rows - total])
        total += parts[-1].shape[0]
        if total >= n_rows:
            break
    if not parts:
        raise ValueError("the batch source yielded no batches")
    return np.concatenate(parts)
