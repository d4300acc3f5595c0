"""Local test-time training (TTT) of a head's last layer on each query's neighbourhood (paper, Sec. 4).

For every query: its ``n_neighbours`` nearest training points in the space the last layer reads (``head.body``:
the inputs themselves for a linear head, the hidden layer for an MLP head); a fresh copy of the global last
layer and a fresh Adam (no weight decay); cross-entropy (MSE for regression); *ERM*: ``steps`` full-batch
steps over the neighbours, or *sequential*: one step per neighbour, nearest first, one pass; predict the query;
discard the copy. Nothing leaks between queries and the global head is never changed.

Three implementations of the same protocol (``impl``): ``reference`` is the plain per-query loop (deep copy +
``torch.optim.Adam``), the twin every faster path is tested against; ``exact`` and ``fast`` are batched
(``analysis/batched_ttt.py``). Baselines: the global head, and the kNN vote in the same space (unweighted
majority; ties go to the class of the nearest tied neighbour) or, for regression, the neighbours' mean.

``precision="auto"`` runs the batched modes' matmuls in bf16 only where bf16 matmuls are native (a CPU with
``avx512_bf16`` or AMX, a CUDA device that supports them) *and* the mode measures faster with them at the
problem's shape, once per process (``choose_precision``); small problems stay float32 without a measurement.
"""

from __future__ import annotations

import copy
import functools
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from analysis.heads import Head, dense_rows, head_features, head_loss, head_outputs, n_rows
from analysis.neighbours import NeighbourIndex, SparseCodes
from analysis.batched_ttt import FAST_CHUNK, LocalOutputs, exact_block, queries_per_batch, ttt_exact, ttt_fast
from sae.precision import GAIN as BF16_GAIN, native_bf16  # the margin against timing noise, as the SAE's

MODES = ("erm", "sequential")
IMPLS = ("reference", "exact", "fast")
PRECISIONS = ("auto", "float32", "bfloat16")
TOP = 10
SMALL_MACS = 1 << 22
"""Below this many multiply-adds in one query's global outputs (``n_neighbours × n_features × n_outputs``) a
step's matmuls take microseconds and bf16 cannot pay for its casts: ``auto`` keeps float32 without measuring,
so that small problems never depend on a timing."""


@dataclass(frozen=True)
class TTTConfig:
    """The local TTT protocol."""

    n_neighbours: int = 50
    """Neighbours each query trains on (--n-neighbours)."""
    mode: str = "erm"
    """``erm`` (``steps`` full-batch steps) or ``sequential`` (one step per neighbour, nearest first) (--mode)."""
    steps: int = 50
    """Full-batch Adam steps in ERM mode; the paper's 50 (--steps)."""
    lr: float = 1e-2
    """Adam learning rate; the paper's 1e-2 for ERM on CLIP (3e-3 sequential) (--lr)."""
    metric: str = "l2"
    """Neighbour metric: ``l2`` (the paper's exact L2 kNN) or ``cosine`` (--metric)."""
    impl: str = "exact"
    """``reference`` (per-query loop), ``exact`` (batched, same algorithm) or ``fast`` (--impl)."""
    precision: str = "auto"
    """Matmul precision of the batched modes: ``auto`` (bf16 where native and measured faster), ``float32`` or
    ``bfloat16`` (--precision)."""
    seed: int = 0
    """Seed of everything random in TTT and its analyses (--seed)."""

    def __post_init__(self):
        if self.n_neighbours < 1:
            raise ValueError(f"--n-neighbours must be >= 1, got {self.n_neighbours}")
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {MODES}, got {self.mode!r}")
        if self.steps < 0:
            raise ValueError(f"--steps must be >= 0, got {self.steps}")
        if not self.lr >= 0:
            raise ValueError(f"--lr must be >= 0, got {self.lr}")
        if self.metric not in ("l2", "cosine"):
            raise ValueError(f"--metric must be l2 or cosine, got {self.metric!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"--impl must be one of {IMPLS}, got {self.impl!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.precision == "bfloat16" and self.impl == "reference":
            raise ValueError("--precision bfloat16 needs --impl exact or fast; the reference loop is float32")


@dataclass
class TTTResult:
    """Per-query results of ``LocalTTT.predict`` (``m`` queries)."""

    predictions: np.ndarray
    """TTT predictions ``(m,)`` (class ids, or values for regression)."""
    global_predictions: np.ndarray
    """The global head's predictions ``(m,)``."""
    majority: np.ndarray
    """kNN baseline ``(m,)``: majority vote (ties → nearest), or the neighbours' mean for regression."""
    neighbours: np.ndarray
    """Training rows of each query's neighbourhood ``(m, n_neighbours)``, nearest first."""
    final_loss: np.ndarray
    """Loss of each TTT head on its own neighbourhood after training ``(m,)``."""
    update_norm: np.ndarray
    """Norm of each head's change from the global last layer ``(m,)``."""
    loss_curve: np.ndarray
    """Loss before each optimiser step ``(m, n_steps)``."""
    extras: dict = field(default_factory=dict)
    """``top_classes``/``top_probs`` ``(m, 10)``: the TTT head's top-10 predicted distribution (classification)."""


# -- baselines --------------------------------------------------------------------------------------------
def knn_majority(neighbour_labels: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """Unweighted majority label of each row ``(m, n)`` (nearest first); ties go to the nearest tied label."""
    y = np.asarray(neighbour_labels)
    out = np.empty(len(y), dtype=y.dtype)
    for start in range(0, len(y), chunk):
        block = y[start:start + chunk]
        counts = (block[:, :, None] == block[:, None, :]).sum(2)     # (b, n): votes for each position's label
        out[start:start + chunk] = block[np.arange(len(block)), counts.argmax(1)]  # first max = nearest
    return out


def knn_average(neighbour_targets: np.ndarray) -> np.ndarray:
    """Mean target of each neighbourhood ``(m, n[, k])`` → ``(m[, k])``."""
    return np.asarray(neighbour_targets, dtype=np.float32).mean(1)


# -- the reference loop -----------------------------------------------------------------------------------
def ttt_reference(last: nn.Linear, Z: torch.Tensor, y: torch.Tensor, q: torch.Tensor, *, mode: str, steps: int,
                  lr: float, task: str) -> LocalOutputs:
    """The paper's protocol as a plain loop: per query a deep copy of ``last`` and a new Adam."""
    outs, finals, norms, curves = [], [], [], []
    for i in range(Z.shape[0]):
        layer = copy.deepcopy(last).train()
        opt = torch.optim.Adam(layer.parameters(), lr=lr)
        batches = [(Z[i], y[i])] * steps if mode == "erm" else [(Z[i, j:j + 1], y[i, j:j + 1]) for j in range(Z.shape[1])]
        curve = []
        for z, target in batches:
            loss = head_loss(task, layer(z), target)
            curve.append(loss.item())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            outs.append(layer(q[i:i + 1])[0])
            finals.append(head_loss(task, layer(Z[i]), y[i]))
            norms.append(((layer.weight - last.weight).pow(2).sum() + (layer.bias - last.bias).pow(2).sum()).sqrt())
        curves.append(torch.tensor(curve, dtype=torch.float32))
    return LocalOutputs(torch.stack(outs), torch.stack(finals), torch.stack(norms),
                        torch.stack(curves) if curves else torch.empty(0, 0))


def run_local(last: nn.Linear, Z: torch.Tensor, y: torch.Tensor, q: torch.Tensor, config: TTTConfig,
              task: str, keep_weights: bool = False) -> LocalOutputs:
    """One batch of local problems with the implementation ``config.impl`` asks for."""
    kw = dict(mode=config.mode, steps=config.steps, lr=config.lr, task=task)
    if config.impl == "reference":
        return ttt_reference(last, Z, y, q, **kw)
    W0, b0 = last.weight.detach().float(), last.bias.detach().float()
    impl = "exact" if keep_weights else config.impl
    precision = choose_precision(config.precision, impl, Z.device.type, *Z.shape[1:], W0.shape[0])["precision"]
    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
    if impl == "exact":
        return ttt_exact(W0, b0, Z, y, q, dtype=dtype, keep_weights=keep_weights, **kw)
    return ttt_fast(W0, b0, Z, y, q, dtype=dtype, **kw)


# -- precision ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def choose_precision(requested: str, impl: str, device: str, n_neighbours: int, n_features: int,
                     n_outputs: int) -> dict:
    """The matmul precision of ``impl`` for problems of this shape: ``requested`` unless it is ``auto``; then
    bf16 where it is native and ``impl`` measures ``BF16_GAIN`` times faster with it. Decided once per process
    and shape. Returns ``{"precision", "requested", "reason"}`` plus, when measured, each way's milliseconds."""
    record = {"requested": requested}
    if requested != "auto":
        return {**record, "precision": requested, "reason": "requested"}
    if impl == "reference":
        return {**record, "precision": "float32", "reason": "the reference loop is float32"}
    macs = n_neighbours * n_features * n_outputs
    if not native_bf16(torch.device(device)):
        return {**record, "precision": "float32", "reason": f"no native bfloat16 matmul on {device}"}
    if macs < SMALL_MACS:
        return {**record, "precision": "float32",
                "reason": f"{macs} multiply-adds per query are too few to gain (threshold {SMALL_MACS})"}
    times = time_precisions(impl, device, n_neighbours, n_features, n_outputs)
    faster = times["bfloat16_ms"] * BF16_GAIN < times["float32_ms"]
    reason = (f"{impl} with bf16 matmuls {times['bfloat16_ms']:.1f} ms against float32 {times['float32_ms']:.1f} ms "
              f"on {times['queries']} queries of {times['steps']} steps (needs {BF16_GAIN}x)")
    return {**record, "precision": "bfloat16" if faster else "float32", "reason": reason, **times}


def time_precisions(impl: str, device: str, n: int, h: int, C: int, steps: int = 10, repeats: int = 5) -> dict:
    """Best-of-``repeats`` milliseconds of ``impl`` on random problems of this shape in each precision,
    interleaved: one exact block, or one fast chunk whose neighbourhoods hold a few classes each, per torch
    thread (the chunks run side by side, as in a real batch)."""
    gen = torch.Generator().manual_seed(0)
    B = (exact_block(C, h) if impl == "exact" else FAST_CHUNK) * max(1, torch.get_num_threads())
    Z = (torch.randn(B, n, h, generator=gen) / h ** 0.5).to(device)
    y = torch.randint(0, min(C, 6), (B, n), generator=gen).to(device)
    W0, b0 = (torch.randn(C, h, generator=gen) / h ** 0.5).to(device), torch.zeros(C, device=device)
    run = ttt_exact if impl == "exact" else ttt_fast
    best = {}
    for i in range(repeats + 1):
        for dtype in (torch.float32, torch.bfloat16):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            run(W0, b0, Z, y, Z[:, 0], mode="erm", steps=steps, lr=1e-2, task="classification", dtype=dtype)
            if device == "cuda":
                torch.cuda.synchronize()
            if i:  # the first round warms up
                key = f"{str(dtype).split('.')[-1]}_ms"
                best[key] = round(min(best.get(key, float("inf")), 1e3 * (time.perf_counter() - start)), 3)
    return {**best, "queries": B, "steps": steps}


# -- the estimator ----------------------------------------------------------------------------------------
class LocalTTT:
    """Local TTT around a trained global ``head``, in the scikit-learn habit.

    ``fit(x_train, y_train)`` indexes the training features ``head.body(x_train)`` and settles the matmul
    precision (``precision_``: the choice, why, and the timings it rests on); ``predict(x_query)`` returns a
    ``TTTResult``. ``memory_bytes`` bounds what one batch of queries holds (the batch adapts to it).
    """

    def __init__(self, head: Head, config: TTTConfig = TTTConfig(), *, device: str = "cpu",
                 memory_bytes: int = 1 << 30):
        self.head = head
        self.config = config
        self.device = torch.device(device)
        self.memory_bytes = int(memory_bytes)

    @property
    def task(self) -> str:
        return self.head.config.task

    def fit(self, x_train, y_train) -> "LocalTTT":
        if n_rows(x_train) != len(y_train):
            raise ValueError(f"x_train has {n_rows(x_train)} rows, y_train {len(y_train)}")
        if n_rows(x_train) < self.config.n_neighbours:
            raise ValueError(f"--n-neighbours {self.config.n_neighbours} exceeds the {n_rows(x_train)} training rows")
        self.features_ = head_features(self.head, x_train)
        if isinstance(self.features_, SparseCodes) and self.config.metric != "cosine":
            raise ValueError("neighbours in code space are searched by cosine: pass --metric cosine")
        self.labels_ = np.asarray(y_train)
        self.precision_ = dict(choose_precision(self.config.precision, self.config.impl, self.device.type,
                                                self.config.n_neighbours, self.head.n_features, self.head.n_outputs))
        self.index_ = NeighbourIndex(metric=self.config.metric).fit(self.features_)
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "index_"):
            raise RuntimeError("this LocalTTT is not fitted yet; call fit(x_train, y_train) first")

    def neighbours(self, x_query, exclude=None) -> np.ndarray:
        """Training rows ``(m, n_neighbours)`` nearest each query in the last layer's input space."""
        self._check_fitted()
        q = head_features(self.head, x_query)
        return self.index_.search(q, self.config.n_neighbours, exclude=exclude)[1]

    def batch_size(self, keep_weights: bool = False) -> int:
        """Queries per batch under ``memory_bytes`` (1 for the reference loop)."""
        if self.config.impl == "reference":
            return 1
        return queries_per_batch(self.config.impl, self.memory_bytes, self.config.n_neighbours,
                                 self.head.n_features, self.head.n_outputs, keep_weights)

    def local_problems(self, x_query, neighbours: np.ndarray, rows: np.ndarray):
        """``(Z, y, q)`` tensors of the queries ``rows``: neighbour features, their targets, query features."""
        nb = neighbours[rows]
        Z = dense_rows(self.features_, nb.ravel()).reshape(len(rows), nb.shape[1], -1)
        q = head_features(self.head, take_rows(x_query, rows))
        q = q.dense() if isinstance(q, SparseCodes) else q
        y = self.labels_[nb]
        y = torch.from_numpy(y.astype(np.int64) if self.task == "classification" else _as_2d(y, self.head.n_outputs))
        return (torch.from_numpy(np.ascontiguousarray(Z)).to(self.device), y.to(self.device),
                torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32)).to(self.device))

    def predict(self, x_query, exclude=None, neighbours: np.ndarray | None = None) -> TTTResult:
        """TTT predictions with baselines and per-query diagnostics; ``exclude`` ``(m,)``: a training row to
        leave out of each query's neighbourhood (the query itself), -1 for none; ``neighbours``: given rows."""
        self._check_fitted()
        if neighbours is None:
            neighbours = self.neighbours(x_query, exclude)
        neighbours = np.asarray(neighbours, dtype=np.int64)
        if neighbours.shape != (n_rows(x_query), self.config.n_neighbours):
            raise ValueError(f"neighbours must be (m, {self.config.n_neighbours}), got {neighbours.shape}")
        parts = [self._predict_rows(x_query, neighbours, np.arange(s, min(s + self.batch_size(), len(neighbours))))
                 for s in range(0, len(neighbours), self.batch_size())]
        out = torch.cat([p.outputs for p in parts]).cpu().numpy()
        result = TTTResult(
            predictions=_decide(out, self.task),
            global_predictions=_decide(head_outputs(self.head, x_query), self.task),
            majority=self.knn_baseline(neighbours),
            neighbours=neighbours,
            final_loss=torch.cat([p.final_loss for p in parts]).cpu().numpy(),
            update_norm=torch.cat([p.update_norm for p in parts]).cpu().numpy(),
            loss_curve=torch.cat([p.loss_curve for p in parts]).cpu().numpy(),
        )
        if self.task == "classification":
            result.extras.update(top_distribution(out))
        return result

    def _predict_rows(self, x_query, neighbours, rows) -> LocalOutputs:
        Z, y, q = self.local_problems(x_query, neighbours, rows)
        last = self.head.last
        with torch.no_grad() if self.config.impl != "reference" else torch.enable_grad():
            return run_local(last, Z, y, q, self.config, self.task)

    def knn_baseline(self, neighbours: np.ndarray) -> np.ndarray:
        """Majority vote (classification) or neighbour mean (regression) of the given neighbourhoods."""
        nb_y = self.labels_[neighbours]
        return knn_majority(nb_y) if self.task == "classification" else _squeeze(knn_average(nb_y))


def top_distribution(logits: np.ndarray, top: int = TOP) -> dict:
    """The ``top`` most probable classes and their softmax probabilities, ``(m, top)`` each."""
    t = torch.from_numpy(np.asarray(logits, dtype=np.float32))
    probs, classes = torch.softmax(t, 1).topk(min(top, t.shape[1]), dim=1)
    return {"top_classes": classes.numpy(), "top_probs": probs.numpy()}


def _decide(out: np.ndarray, task: str) -> np.ndarray:
    return out.argmax(1) if task == "classification" else _squeeze(out)


def _squeeze(a: np.ndarray) -> np.ndarray:
    return a[:, 0] if a.ndim == 2 and a.shape[1] == 1 else a


def _as_2d(y: np.ndarray, n_outputs: int) -> np.ndarray:
    y = np.asarray(y, dtype=np.float32)
    return y[..., None] if y.ndim == 2 else y


def take_rows(x, rows):
    """Rows of a dense array (as an array) or of ``SparseCodes`` (still sparse)."""
    return x.take(rows) if isinstance(x, SparseCodes) else np.asarray(x[rows])
