"""Global heads: a linear or one-hidden-layer MLP head trained on the train split of any feature space.

A head is ``forward(x) = last(body(x))``: ``body`` is the identity (linear head) or ``Linear → ReLU`` (MLP
head), ``last`` an ``nn.Linear``. Local TTT only ever trains ``last``, on features ``body(x)`` (paper, Sec. 4).

The recipe defaults are the paper's for the CLIP linear head: Adam lr 1e-3, batch 250, 50 epochs, no weight
decay; ``patience`` switches to validation early stopping (best validation loss is restored).
Inputs may be dense arrays or ``SparseCodes``; sparse codes are densified one batch at a time, so a code-space
head never holds a dense ``(n, n_latents)`` copy of the data set.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from analysis.neighbours import SparseCodes
from artifacts import (
    SCHEMA_VERSION, ArtifactError, begin_dir, commit_dir, package_version, read_json, sha256_file, write_json,
)
from artifacts.weights import load_checked
from artifacts.typed import check_seed

KINDS = ("linear", "mlp")
TASKS = ("classification", "regression")
WEIGHTS_FILE = "head.safetensors"


@dataclass(frozen=True)
class HeadConfig:
    """How a global head is built and trained."""

    kind: str = "linear"
    """``linear`` or ``mlp`` (one hidden ReLU layer) (--head)."""
    hidden: int = 256
    """Hidden width of the MLP head (--hidden)."""
    task: str = "classification"
    """``classification`` (cross-entropy) or ``regression`` (mean squared error) (--task)."""
    lr: float = 1e-3
    """Adam learning rate; the paper's 1e-3 (--head-lr)."""
    batch_size: int = 250
    """Minibatch size; the paper's 250 (--head-batch-size)."""
    epochs: int = 50
    """Epochs (the maximum when early stopping); the paper's 50 (--head-epochs)."""
    weight_decay: float = 0.0
    """Adam weight decay; the paper uses none (--head-weight-decay)."""
    patience: int | None = None
    """Epochs without a better validation loss before stopping; ``None``: the fixed recipe (--patience)."""
    seed: int = 0
    """Seed of the initialisation and the batch order (--seed)."""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"--head must be one of {KINDS}, got {self.kind!r}")
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {TASKS}, got {self.task!r}")
        if self.hidden < 1:
            raise ValueError(f"--hidden must be >= 1, got {self.hidden}")
        if not self.lr > 0:
            raise ValueError(f"--head-lr must be > 0, got {self.lr}")
        if self.batch_size < 1 or self.epochs < 0:
            raise ValueError(f"--head-batch-size must be >= 1 and --head-epochs >= 0, got {self.batch_size}, {self.epochs}")
        if self.weight_decay < 0:
            raise ValueError(f"--head-weight-decay must be >= 0, got {self.weight_decay}")
        check_seed(self.seed)
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"--patience must be >= 1 or None, got {self.patience}")


class Head(nn.Module):
    """``forward(x) = last(body(x))``; ``x`` ``(n, n_inputs)`` → ``(n, n_outputs)`` logits or values."""

    def __init__(self, config: HeadConfig, n_inputs: int, n_outputs: int):
        super().__init__()
        self.config = config
        self.n_inputs = int(n_inputs)
        self.n_outputs = int(n_outputs)
        if config.kind == "linear":
            self.body = nn.Identity()
            width = n_inputs
        else:
            self.body = nn.Sequential(nn.Linear(n_inputs, config.hidden), nn.ReLU())
            width = config.hidden
        self.last = nn.Linear(width, n_outputs)

    @property
    def n_features(self) -> int:
        """Width of the last layer's input (``body``'s output)."""
        return self.last.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.body(x))


# -- inputs -----------------------------------------------------------------------------------------------
def n_rows(x) -> int:
    return x.n if isinstance(x, SparseCodes) else len(x)


def n_columns(x) -> int:
    return x.n_latents if isinstance(x, SparseCodes) else int(np.shape(x)[1])


def dense_rows(x, rows) -> np.ndarray:
    """Rows of a dense array or of ``SparseCodes`` as a dense float32 array ``(len(rows), d)``."""
    rows = np.asarray(rows)
    if isinstance(x, SparseCodes):
        return x.take(rows).dense()
    return np.asarray(x[rows], dtype=np.float32)


def iter_dense(x, batch_size: int):
    """``(start, dense batch)`` over all rows of ``x`` in order, one batch at a time."""
    n = n_rows(x)
    for start in range(0, n, batch_size):
        yield start, dense_rows(x, np.arange(start, min(start + batch_size, n)))


@torch.no_grad()
def head_outputs(head: Head, x, batch_size: int = 4096, features: bool = False) -> np.ndarray:
    """``head(x)`` (or ``head.body(x)`` when ``features``) as float32 ``(n, ·)``, batched."""
    device = next(head.parameters()).device
    width = head.n_features if features else head.n_outputs
    out = np.empty((n_rows(x), width), dtype=np.float32)
    was_training = head.training
    head.eval()
    for start, batch in iter_dense(x, batch_size):
        t = torch.from_numpy(batch).to(device)
        y = head.body(t) if features else head(t)
        out[start:start + len(batch)] = y.float().cpu().numpy()
    head.train(was_training)
    return out


def head_features(head: Head, x, batch_size: int = 4096):
    """The last layer's inputs ``body(x)``: ``x`` itself for a linear head (kept sparse if it is sparse)."""
    if head.config.kind == "linear":
        return x if isinstance(x, SparseCodes) else np.asarray(x, dtype=np.float32)
    return head_outputs(head, x, batch_size, features=True)


def predict_head(head: Head, x, batch_size: int = 4096) -> np.ndarray:
    """Class ids ``(n,)`` (classification) or values ``(n,)``/``(n, n_outputs)`` (regression)."""
    out = head_outputs(head, x, batch_size)
    if head.config.task == "classification":
        return out.argmax(1)
    return out[:, 0] if out.shape[1] == 1 else out


# -- training ---------------------------------------------------------------------------------------------
def _targets(y, config: HeadConfig, n_outputs: int | None) -> tuple[torch.Tensor, int]:
    y = np.asarray(y)
    if config.task == "classification":
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"classification labels must be a 1-d integer array, got {y.dtype} {y.shape}")
        if y.size and y.min() < 0:
            raise ValueError("classification labels must be >= 0 (unlabelled rows have -1: drop them first)")
        n_out = int(y.max()) + 1 if n_outputs is None else int(n_outputs)
        if y.size and y.max() >= n_out:
            raise ValueError(f"label {int(y.max())} does not fit n_outputs={n_out}")
        return torch.from_numpy(y.astype(np.int64)), n_out
    y = y.astype(np.float32)
    y2 = y[:, None] if y.ndim == 1 else y
    return torch.from_numpy(y2), y2.shape[1] if n_outputs is None else int(n_outputs)


def head_loss(task: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (classification) or mean squared error (regression)."""
    if task == "classification":
        return nn.functional.cross_entropy(out, y)
    return nn.functional.mse_loss(out, y)


@torch.no_grad()
def _eval_loss(head: Head, x, y: torch.Tensor, batch_size: int) -> float:
    device = next(head.parameters()).device
    total = 0.0
    for start, batch in iter_dense(x, batch_size):
        out = head(torch.from_numpy(batch).to(device))
        target = y[start:start + len(batch)].to(device)
        total += float(head_loss(head.config.task, out, target)) * len(batch)
    return total / max(n_rows(x), 1)


def _epoch(head: Head, opt, x, y: torch.Tensor, gen: torch.Generator, batch_size: int) -> None:
    device = next(head.parameters()).device
    order = torch.randperm(n_rows(x), generator=gen).numpy()
    for start in range(0, len(order), batch_size):
        rows = np.sort(order[start:start + batch_size])
        out = head(torch.from_numpy(dense_rows(x, rows)).to(device))
        loss = head_loss(head.config.task, out, y[rows].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def train_head(x_train, y_train, config: HeadConfig = HeadConfig(), *, x_val=None, y_val=None,
               n_outputs: int | None = None, device: str = "cpu") -> Head:
    """Train a global head on ``x_train`` (dense array or ``SparseCodes``) and ``y_train``.

    With ``config.patience`` the head stops once the validation loss has not improved for that many epochs and
    the best epoch's weights are returned; otherwise it runs the fixed recipe of ``config.epochs`` epochs.
    """
    if n_rows(x_train) != len(y_train):
        raise ValueError(f"x_train has {n_rows(x_train)} rows, y_train {len(y_train)}")
    if config.patience is not None and (x_val is None or y_val is None):
        raise ValueError("--patience needs validation data (x_val, y_val)")
    y, n_out = _targets(y_train, config, n_outputs)
    torch.manual_seed(config.seed)
    head = Head(config, n_columns(x_train), n_out).to(device)
    opt = torch.optim.Adam(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    yv = _targets(y_val, config, n_out)[0] if config.patience is not None else None
    best, best_state, waited = float("inf"), None, 0
    for _ in range(config.epochs):
        head.train()
        _epoch(head, opt, x_train, y, gen, config.batch_size)
        if yv is None:
            continue
        val = _eval_loss(head, x_val, yv, 4096)
        if val < best:
            best, best_state, waited = val, copy.deepcopy(head.state_dict()), 0
        else:
            waited += 1
            if waited >= config.patience:
                break
    if best_state is not None:
        head.load_state_dict(best_state)
    return head.eval()


# -- artifacts --------------------------------------------------------------------------------------------
def save_head(head: Head, out_dir: str | os.PathLike, parents: dict | None = None, overwrite: bool = False,
              metrics: dict | None = None) -> Path:
    """Write ``head.safetensors``, ``config.json`` (the HeadConfig and shapes) and ``meta.json`` (schema,
    version, weights hash, ``parents``: e.g. ``{"store": hash, "sae": hash}``) atomically."""
    work = begin_dir(out_dir, overwrite)
    tensors = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    save_file(tensors, str(work / WEIGHTS_FILE), metadata={"format": "pt"})
    write_json(work / "config.json", {"head": asdict(head.config), "n_inputs": head.n_inputs,
                                      "n_outputs": head.n_outputs})
    write_json(work / "meta.json", {
        "kind": "head", "schema_version": SCHEMA_VERSION, "package_version": package_version(),
        "weights_sha256": sha256_file(work / WEIGHTS_FILE), "parents": parents or {}, "metrics": metrics,
    })
    return commit_dir(work, out_dir, overwrite=overwrite)


def load_head(head_dir: str | os.PathLike, device: str = "cpu") -> Head:
    """Build the head from ``config.json`` and load its safetensors strictly."""
    head_dir = Path(head_dir)
    if not (head_dir / WEIGHTS_FILE).is_file():
        raise ArtifactError(f"no head at {head_dir} ({WEIGHTS_FILE} missing); train one with scripts/ttt.py")
    hint = f"delete {head_dir} and run again: the head is retrained"
    cfg = read_json(head_dir / "config.json", expect=dict, hint=hint)

    def build() -> Head:
        if not isinstance(cfg.get("head"), dict):
            raise TypeError("'head' must be an object of HeadConfig fields")
        return Head(HeadConfig(**cfg["head"]), int(cfg["n_inputs"]), int(cfg["n_outputs"]))

    head = load_checked(build, head_dir / WEIGHTS_FILE, head_dir / "config.json", hint)
    return head.to(device).eval()
