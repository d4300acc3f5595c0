"""Training of a top-k SAE on an ``(n, d)`` array or a batch source: schedules, dead latents, checkpoints
and resume, data parallel.

``train_sae`` streams shuffled batches from the array (a memory map is never loaded whole; a re-iterable
source of batches also works), optimises
``FVU + AuxK`` (or the authors' ``MSE + ghost`` for the ``paper`` variant) with Adam, LR warm-up and decay,
gradient clipping and k annealing, and writes a complete SAE directory atomically:

    OUT_DIR/  sae.safetensors, config.json (with this TrainConfig, the parent store hash, final metrics),
              metrics.json (held-out metrics, the resolved schedule and the per-log-step history)

While it runs, checkpoints go to ``artifacts.partial_dir(OUT_DIR)/checkpoint.pt`` every
``RunConfig.checkpoint_every`` steps (model, optimizer, RNG states, stream position, dead-latent state,
history). Killed at any moment, the same call with ``resume=True`` continues from the last checkpoint and
ends with weights bitwise equal to an uninterrupted run (CPU, same seed, same thread count): the stream
order, the schedules and every random draw are functions of the seed and the step, and all state that is
not is in the checkpoint.

Under ``torchrun`` (``WORLD_SIZE > 1``) each rank reads its part of every global batch, gradients are
summed across ranks with one all-reduce per step (weighted so that the result is the gradient of the
global-batch mean), and firing counts are all-reduced so that the dead-latent rule sees the global batch.
Only rank 0 writes. The model equals a one-process run with the same global batch up to float rounding.
The stream state is global, so a run may resume with another number of processes (then not bitwise).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from artifacts import ArtifactError, atomic_file, commit_dir, partial_dir
from artifacts.ranks import Ranks, resolve_device
from sae.batches import BatchStream, IterableStream, check_rows_finite, first_rows
from sae.config import SAEConfig
from sae.dead import CumulativeDeadTracker, WindowDeadTracker, firing_counts
from sae.model import TopKSAE

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
KILL_ENV = "SAE_TRAIN_KILL_AFTER_STEP"
"""Test-only: when set to ``j``, the process SIGKILLs itself right after step ``j`` (and its checkpoint,
if one is due at ``j``), so that tests can interrupt a run at a known point."""

LR_DECAYS = ("linear", "cosine", "none")
BIAS_INITS = ("geometric_median", "mean")
DEFAULT_EPOCHS = 100.0


@dataclass(frozen=True)
class TrainConfig:
    """Algorithm settings of SAE training; ``None`` fields are resolved from the data size (``plan``)."""

    batch_size: int | None = None
    """Global batch size; ``None``: 4096 (the paper's), or a power of two near n/4 for small data (>= 32)."""
    lr: float = 1e-3
    """Peak Adam learning rate (the paper's 1e-3)."""
    n_steps: int | None = None
    """Number of optimizer steps; give this or ``n_epochs``, not both (neither: 100 epochs, the paper's)."""
    n_epochs: float | None = None
    """Number of passes over the training rows (fractional allowed); give this or ``n_steps``."""
    lr_warmup_steps: int | None = None
    """Linear LR warm-up from 0; ``None``: min(5000, a sixth of the steps) (the paper: 5k of ~30k steps)."""
    lr_decay: str = "linear"
    """``linear``: to 0 over the last ``lr_decay_fraction`` of the steps (Conerly et al., Anthropic circuits
    update, April 2024); ``cosine``: cosine to 0 after warm-up; ``none``: constant (the paper's)."""
    lr_decay_fraction: float = 0.2
    """Fraction of the steps over which ``linear`` decay runs."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_eps: float = 6.25e-10
    """Adam epsilon: 6.25e-10 as in Gao et al. 2024's released training code (github.com/openai/
    sparse_autoencoder); torch's 1e-8 is large next to the tiny second moments of rarely firing latents."""
    grad_clip: float = 1.0
    """Maximum global gradient norm (the paper's 1; 0 disables clipping)."""
    k_start: int | None = None
    """k at step 0, annealed linearly to the model's k; ``None``: min(8k, n_latents) (the paper: 128 -> 16)."""
    k_anneal_steps: int | None = None
    """Steps of k annealing; ``None``: min(10000, a third of the steps) (the paper: 10k of ~30k steps)."""
    dead_window_samples: int | None = None
    """``topk`` variant: a latent that fired on none of the last this-many training samples is dead and
    feeds AuxK; ``None``: min(10M, the number of training rows) (Gao et al. 2024 use 10M tokens)."""
    dead_threshold: float = 1e-4
    """``paper`` variant: dead while the cumulative firing frequency is below this (the authors' 1e-4)."""
    bias_init: str = "geometric_median"
    """Decoder bias from a data sample: ``geometric_median`` (Gao et al. 2024) or ``mean``."""
    n_init_samples: int = 16384
    """Rows of the seeded sample used for the bias init and the fixed FVU normaliser (the data variance)."""
    seed: int = 0
    """Seed of the initialisation, the data order and dropout."""
    bf16: bool = False
    """Run forward and backward under bfloat16 autocast (CPU or CUDA); parameters stay float32."""

    def __post_init__(self) -> None:
        if self.n_steps is not None and self.n_epochs is not None:
            raise ValueError("pass --steps or --epochs, not both")
        if self.n_steps is not None and self.n_steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.n_steps}")
        if self.n_epochs is not None and not self.n_epochs > 0:
            raise ValueError(f"--epochs must be > 0, got {self.n_epochs}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be a positive number, got {self.lr}")
        if self.lr_warmup_steps is not None and self.lr_warmup_steps < 0:
            raise ValueError(f"--lr-warmup-steps must be >= 0, got {self.lr_warmup_steps}")
        if self.lr_decay not in LR_DECAYS:
            raise ValueError(f"--lr-decay must be one of {LR_DECAYS}, got {self.lr_decay!r}")
        if not 0.0 <= self.lr_decay_fraction <= 1.0:
            raise ValueError(f"--lr-decay-fraction must be in [0, 1], got {self.lr_decay_fraction}")
        if not (0.0 <= self.adam_beta1 < 1.0 and 0.0 <= self.adam_beta2 < 1.0 and self.adam_eps > 0):
            raise ValueError("Adam needs 0 <= beta1, beta2 < 1 and eps > 0")
        if self.grad_clip < 0:
            raise ValueError(f"--grad-clip must be >= 0, got {self.grad_clip}")
        if self.k_start is not None and self.k_start < 1:
            raise ValueError(f"--k-start must be >= 1, got {self.k_start}")
        if self.k_anneal_steps is not None and self.k_anneal_steps < 0:
            raise ValueError(f"--k-anneal-steps must be >= 0, got {self.k_anneal_steps}")
        if self.dead_window_samples is not None and self.dead_window_samples < 1:
            raise ValueError(f"--dead-window must be >= 1, got {self.dead_window_samples}")
        if not 0.0 < self.dead_threshold < 1.0:
            raise ValueError(f"--dead-threshold must be in (0, 1), got {self.dead_threshold}")
        if self.bias_init not in BIAS_INITS:
            raise ValueError(f"--bias-init must be one of {BIAS_INITS}, got {self.bias_init!r}")
        if self.n_init_samples < 1:
            raise ValueError(f"--n-init-samples must be >= 1, got {self.n_init_samples}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return cls(**d)

    def plan(self, n_rows: int, sae_config: SAEConfig) -> "TrainPlan":
        """Resolve every ``None`` default for ``n_rows`` training rows and the given SAE."""
        if self.batch_size is not None:
            batch_size = self.batch_size
        else:
            batch_size = min(4096, max(32, 2 ** int(math.floor(math.log2(max(n_rows / 4, 1))))))
        batch_size = min(batch_size, n_rows)
        batches_per_epoch = math.ceil(n_rows / batch_size)
        if self.n_steps is not None:
            n_steps = self.n_steps
        else:
            n_epochs = self.n_epochs if self.n_epochs is not None else DEFAULT_EPOCHS
            n_steps = max(1, math.ceil(n_epochs * batches_per_epoch))
        warmup = self.lr_warmup_steps if self.lr_warmup_steps is not None else min(5000, n_steps // 6)
        k = sae_config.k
        k_start = self.k_start if self.k_start is not None else min(8 * k, sae_config.n_latents)
        k_start = min(max(k_start, k), sae_config.n_latents)
        k_anneal = self.k_anneal_steps if self.k_anneal_steps is not None else min(10_000, n_steps // 3)
        window = self.dead_window_samples if self.dead_window_samples is not None else min(10_000_000, n_rows)
        return TrainPlan(
            batch_size=batch_size,
            n_steps=n_steps,
            lr_warmup_steps=min(warmup, n_steps),
            k_start=k_start,
            k_anneal_steps=k_anneal,
            dead_window_samples=window,
        )


@dataclass(frozen=True)
class TrainPlan:
    """The resolved schedule of one run (``TrainConfig.plan``)."""

    batch_size: int
    """Global batch size."""
    n_steps: int
    """Optimizer steps."""
    lr_warmup_steps: int
    """Steps of linear LR warm-up."""
    k_start: int
    """k at step 0."""
    k_anneal_steps: int
    """Steps over which k falls linearly from ``k_start`` to the model's k."""
    dead_window_samples: int
    """Window of the ``topk`` dead-latent rule, in samples."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RunConfig:
    """Run settings of SAE training (where and how it runs, not what it computes)."""

    device: str = "cpu"
    """Torch device; under torchrun, ``cuda`` means ``cuda:LOCAL_RANK``."""
    checkpoint_every: int = 1000
    """Write a checkpoint every this many steps (0: never; the run then cannot resume)."""
    log_every: int = 50
    """Record metrics into the history (and the progress bar) every this many steps."""
    progress: bool = True
    """Show a tqdm progress bar (rank 0 only)."""
    n_threads: int | None = None
    """CPU threads for torch (``None``: torch's default); one thread is often faster for small SAEs."""
    val_every: int = 0
    """Evaluate on (at most ``max_val_rows`` of) the held-out rows every this many steps (0: never). For the
    ``paper`` variant these evaluations also feed its cumulative dead-latent counts, as the authors' do."""
    max_val_rows: int = 8192
    """At most this many held-out rows (a seeded subsample) in the periodic validation."""
    eval_batch_size: int = 4096
    """Batch size of the held-out evaluation."""
    max_eval_rows: int = 100_000
    """At most this many held-out rows (a seeded subsample) are evaluated at the end."""

    def __post_init__(self) -> None:
        if self.checkpoint_every < 0:
            raise ValueError(f"--checkpoint-every must be >= 0, got {self.checkpoint_every}")
        if self.log_every < 1:
            raise ValueError(f"--log-every must be >= 1, got {self.log_every}")
        if self.n_threads is not None and self.n_threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.n_threads}")
        if self.val_every < 0:
            raise ValueError(f"--val-every must be >= 0, got {self.val_every}")
        if self.eval_batch_size < 1 or self.max_eval_rows < 1 or self.max_val_rows < 1:
            raise ValueError("eval batch size and max eval rows must be >= 1")


def default_shape(d: int, n_rows: int | None = None) -> tuple[int, int]:
    """Default ``(n_latents, k)`` for ``n_rows`` training embeddings of width ``d``.

    Width: 8x expansion (the paper's 4096 for 512-d CLIP), but at most the largest power of two below
    ``n_rows / 8`` (at least 64): on small data a wide dictionary has latents that see too few samples to
    be learnt and mostly die (on the digits store, 1600 latents for 1079 rows end ~90% dead, 128 ~25%).
    k: the paper's k/d = 16/512, at least 4 and at most a quarter of the width.
    """
    n_latents = 8 * d
    if n_rows is not None:
        n_latents = min(n_latents, max(64, 2 ** int(math.floor(math.log2(max(n_rows / 8, 1))))))
    k = max(4, int(round(d / 32)))
    return n_latents, max(1, min(k, n_latents // 4))


# --------------------------------------------------------------------------------------------- schedules
def lr_at(step: int, lr: float, plan: TrainPlan, config: TrainConfig) -> float:
    """Learning rate of ``step`` (0-based): linear warm-up, then constant, linear or cosine decay to 0."""
    factor = 1.0
    if plan.lr_warmup_steps > 0 and step < plan.lr_warmup_steps:
        factor = (step + 1) / plan.lr_warmup_steps
    if config.lr_decay == "linear":
        n_decay = int(round(config.lr_decay_fraction * plan.n_steps))
        start = plan.n_steps - n_decay
        if n_decay > 0 and step >= start:
            factor = min(factor, (plan.n_steps - step) / n_decay)
    elif config.lr_decay == "cosine":
        span = plan.n_steps - plan.lr_warmup_steps
        if span > 0 and step >= plan.lr_warmup_steps:
            t = (step - plan.lr_warmup_steps) / span
            factor = 0.5 * (1.0 + math.cos(math.pi * t))
    return lr * factor


def k_at(step: int, k: int, plan: TrainPlan) -> int:
    """k of ``step``: linear from ``plan.k_start`` down to ``k`` over ``plan.k_anneal_steps`` (the paper's
    warm-up from 128 to 16 over 10k steps; annealing avoids latents that never win early on)."""
    if plan.k_anneal_steps <= 0 or step >= plan.k_anneal_steps:
        return k
    t = step / plan.k_anneal_steps
    return int(round(plan.k_start + (k - plan.k_start) * t))


# --------------------------------------------------------------------------------------------- RNG state
def _rng_state(device: torch.device) -> dict:
    """Torch, numpy and Python RNG states, as tensors and plain values (loadable with weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64), "gauss_next": gauss_next},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state(
        (npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["cached_gaussian"])
    )
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


# --------------------------------------------------------------------------------------------- checkpoints
def _save_checkpoint(path: Path, state: dict) -> None:
    """``torch.save`` to a temporary sibling, fsync, rename: a crash leaves the previous checkpoint intact."""
    with atomic_file(path) as f:
        torch.save(state, f)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a training checkpoint (tensors and plain values only: ``weights_only=True``)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _rows_digest(rows: np.ndarray | None, n: int) -> str:
    if rows is None:
        return f"all:{n}"
    return hashlib.sha256(np.ascontiguousarray(rows, dtype=np.int64).tobytes()).hexdigest()


def hash_ints(*values: int) -> int:
    """A 63-bit seed derived from integers (stable across processes and Python versions)."""
    digest = hashlib.sha256(",".join(str(int(v)) for v in values).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def _check_fingerprint(saved: dict, current: dict, ckpt_path: Path) -> None:
    """Refuse a checkpoint made for other data or other settings, naming what differs."""
    if saved.get("d") != current["d"]:
        raise ArtifactError(
            f"checkpoint {ckpt_path} was trained on d={saved.get('d')} embeddings but the data has "
            f"d={current['d']}; resume with the store it was made from, or pass --overwrite to start over"
        )
    if saved.get("parent_store_hash") != current["parent_store_hash"]:
        raise ArtifactError(
            f"checkpoint {ckpt_path} was made from store {saved.get('parent_store_hash')}, not from this store "
            f"({current['parent_store_hash']}); resume with the original --store, or pass --overwrite to start over"
        )
    diffs = []
    for section in ("sae_config", "train_config"):
        a, b = saved.get(section, {}), current[section]
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                diffs.append(f"{key}: checkpoint {a.get(key)!r}, now {b.get(key)!r}")
    for key in ("n_rows", "rows"):
        if saved.get(key) != current[key]:
            diffs.append(f"training rows ({key}): checkpoint {saved.get(key)}, now {current[key]}")
    if diffs:
        raise ArtifactError(
            f"checkpoint {ckpt_path} was made with other settings:\n  "
            + "\n  ".join(diffs)
            + "\nrerun with the flags of the interrupted run, or pass --overwrite to start over"
        )


# --------------------------------------------------------------------------------------------- training
@dataclass
class TrainResult:
    """What ``train_sae`` returns (on every rank; only rank 0 wrote ``out_dir``)."""

    out_dir: Path
    """The complete SAE directory."""
    metrics: dict
    """Final held-out metrics plus training summary (rank 0; empty on other ranks)."""
    history: list[dict]
    """Per-log-step training metrics."""
    val_history: list[dict]
    """Periodic held-out metrics (``RunConfig.val_every``)."""
    resumed_from_step: int
    """Step the run continued from (0 for a fresh run)."""


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


def _make_tracker(sae_config: SAEConfig, config: TrainConfig, plan: TrainPlan):
    if sae_config.variant == "paper":
        return CumulativeDeadTracker(sae_config.n_latents, config.dead_threshold)
    return WindowDeadTracker(sae_config.n_latents, plan.dead_window_samples)


def _allreduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum gradients over ranks with a single flat all-reduce (each rank already weighted its share)."""
    for p in params:
        if p.grad is None:  # a rank with no rows in this batch has not built its gradients yet
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


def _check_paths(out_dir: Path, work_dir: Path, resume: bool, overwrite: bool) -> bool:
    """Decide whether to resume; refuse to clobber silently. Returns True when a checkpoint will be loaded."""
    ckpt = work_dir / CHECKPOINT_NAME
    if out_dir.exists() and not overwrite:
        raise ArtifactError(f"{out_dir} already exists; pass --overwrite to replace it, or choose another --out")
    if ckpt.exists():
        if resume:
            return True
        if not overwrite:
            raise ArtifactError(
                f"an interrupted run left a checkpoint in {work_dir}; pass --resume to continue it, "
                "or --overwrite to discard it and start over"
            )
    elif work_dir.exists() and not overwrite and not resume:
        raise ArtifactError(
            f"{work_dir} exists (an interrupted run's work directory); pass --resume or --overwrite"
        )
    return False


@dataclass
class _Data:
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
        return _rows_digest(self.rows, int(self.x.shape[0])) if self.is_array else "batch source"

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


def _as_data(x, train_rows, heldout_rows, heldout_x, config: TrainConfig) -> _Data:
    if getattr(x, "ndim", None) is not None:
        if x.ndim != 2:
            raise ValueError(f"training data must be a 2-d (n, d) array, got shape {x.shape}")
        n = int(x.shape[0])
        rows = np.arange(n, dtype=np.int64) if train_rows is None else np.asarray(train_rows, dtype=np.int64)
        if rows.size == 0:
            raise ValueError("no training rows: the selected split is empty")
        return _Data(x, rows, int(rows.size), int(x.shape[1]), heldout_x, heldout_rows)
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
    return _Data(x, None, n_rows, d, heldout_x, None, batch_size=b)


def train_sae(
    x: Any,
    out_dir: str | os.PathLike,
    sae_config: SAEConfig,
    config: TrainConfig = TrainConfig(),
    run: RunConfig = RunConfig(),
    *,
    train_rows: np.ndarray | None = None,
    heldout_rows: np.ndarray | None = None,
    heldout_x: np.ndarray | None = None,
    parent_store_hash: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> TrainResult:
    """Train an SAE and write ``out_dir``.

    ``x`` is an ``(n, d)`` float array (e.g. a store's memory map; trained on ``x[train_rows]``, held-out
    metrics on ``x[heldout_rows]``), or a re-iterable source of ``(b, d)`` batches (every ``iter(x)``
    yields the same sequence; give ``n_steps``, or ``n_epochs`` when it has ``len``; under torchrun each
    process passes its own shard). ``heldout_x``: held-out rows as an array, instead of ``heldout_rows``.

    ``resume=True`` continues from the checkpoint of an interrupted run with the same settings (or starts
    fresh when there is none); ``overwrite=True`` discards an old checkpoint and replaces ``out_dir``.
    """
    data = _as_data(x, train_rows, heldout_rows, heldout_x, config)
    if data.d != sae_config.d_in:
        raise ValueError(f"the data has d={data.d} but the SAE config has d_in={sae_config.d_in}")
    # A batch source brings its own batch size.
    plan_config = config if data.is_array else dataclasses.replace(config, batch_size=data.batch_size)
    plan = plan_config.plan(data.n_rows, sae_config)

    out_dir = Path(out_dir)
    work_dir = partial_dir(out_dir)
    ckpt_path = work_dir / CHECKPOINT_NAME
    if run.n_threads is not None:
        torch.set_num_threads(run.n_threads)
    ctx = Ranks.from_env(run.device)
    try:
        device = resolve_device(run.device, ctx)
        will_resume = _check_paths(out_dir, work_dir, resume, overwrite)
        ctx.barrier()  # every rank has looked before rank 0 changes anything
        if ctx.is_main:
            if overwrite and not will_resume and work_dir.exists():
                shutil.rmtree(work_dir)
            work_dir.mkdir(parents=True, exist_ok=True)
        ctx.barrier()
        return _train(
            data, out_dir, work_dir, ckpt_path, sae_config, config, plan, run,
            parent_store_hash, will_resume, overwrite, ctx, device,
        )
    finally:
        ctx.close()


def _train(
    data: _Data, out_dir, work_dir, ckpt_path, sae_config, config, plan, run,
    parent_store_hash, will_resume, overwrite, ctx: Ranks, device: torch.device,
) -> TrainResult:
    d = data.d
    fingerprint = _jsonable(
        {
            "d": d,
            "n_rows": data.n_rows,
            "rows": data.digest(),
            "parent_store_hash": parent_store_hash,
            "sae_config": sae_config.to_dict(),
            "train_config": config.to_dict(),
        }
    )

    if data.is_array and data.n_rows * d <= SMALL_DATA_ELEMENTS:
        check_finite(data.x, data.rows)
    _seed_everything(config.seed)
    model = TopKSAE(sae_config).to(device)
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps)
    stream = data.stream(plan.batch_size, config.seed, ctx)
    tracker = _make_tracker(sae_config, config, plan)
    history: list[dict] = []
    val_history: list[dict] = []
    step = 0
    elapsed_before = 0.0

    if will_resume:
        state = load_checkpoint(ckpt_path)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ArtifactError(f"checkpoint {ckpt_path} has format {state.get('format')}; pass --overwrite to start over")
        _check_fingerprint(state["fingerprint"], fingerprint, ckpt_path)
        model.load_state_dict(state["model"], strict=True)
        opt.load_state_dict(state["optimizer"])
        stream.load_state_dict(state["stream"])
        tracker.load_state_dict(state["dead"])
        history = list(state["history"])
        val_history = list(state["val_history"])
        step = int(state["step"])
        x_var = float(state["x_var"])
        elapsed_before = float(state["elapsed_s"])
        _set_rng_state(state["rng"], device)
    else:
        sample = data.init_sample(config.n_init_samples, config.seed)
        model.init_from_data_(torch.from_numpy(sample), method=config.bias_init)
        # A fixed FVU normaliser (the data's total variance) makes the loss a mean of per-sample terms,
        # so that data-parallel shards sum to the one-process gradient.
        x_var = float(np.var(sample.astype(np.float64), axis=0).sum())
        if not x_var > 0:
            raise ValueError("the training rows have zero variance (all identical); an SAE cannot be trained on them")
    if ctx.rank > 0:
        # Every rank built the same initial model from the same seed; from here on each draws its own
        # dropout masks (paper variant), else all ranks would apply identical masks to different rows.
        # Only rank 0's RNG state is checkpointed, so the other ranks reseed from (seed, rank, step).
        torch.manual_seed(hash_ints(config.seed, ctx.rank, step))
    resumed_from = step
    x_val = None
    if run.val_every:
        from sae.metrics import evaluate

        x_val = data.heldout_sample(run.max_val_rows, config.seed)

    amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=config.bf16)
    kill_after = int(os.environ[KILL_ENV]) if os.environ.get(KILL_ENV) else None
    bar = None
    if ctx.is_main and run.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=plan.n_steps, initial=step, desc="train SAE", unit="step", dynamic_ncols=True)

    t_start = time.perf_counter()
    t_log, samples_log = t_start, 0
    window = torch.zeros(4, dtype=torch.float64)  # sums since the last log: loss, fvu, aux, active values
    window_samples = 0
    n_latents = sae_config.n_latents
    model.train()
    while step < plan.n_steps:
        k_now = k_at(step, sae_config.k, plan)
        lr_now = lr_at(step, config.lr, plan, config)
        for group in opt.param_groups:
            group["lr"] = lr_now
        batch = stream.next_batch()
        b_local, n_global = batch.x.shape[0], batch.n_global
        if not data.is_array and ctx.world_size > 1:
            # Each process iterates its own shard: the global batch is the sum of the local ones.
            sizes = torch.tensor([b_local], dtype=torch.int64, device=device)
            dist.all_reduce(sizes)
            n_global = int(sizes)
        dead = tracker.dead_mask().to(device)
        opt.zero_grad(set_to_none=False)
        # Firing counts and loss sums of this rank's share, reduced in one call (on the device: NCCL needs it).
        local = torch.zeros(n_latents + 4, dtype=torch.float64, device=device)
        if b_local > 0:
            xb = torch.from_numpy(batch.x).to(device)
            with amp:
                out = model(xb, k=k_now, dead_mask=dead, x_var=x_var)
            # Weight this rank's mean by its share of the global batch; summed over ranks this is the
            # global-batch mean (one process: weight 1).
            (out.loss * (b_local / n_global)).backward()
            with torch.no_grad():
                active = out.active
                local[:n_latents] = firing_counts(out.indices, active, n_latents).double()
                local[n_latents:] = torch.stack(
                    [out.loss.detach().double() * b_local, out.fvu.detach().double() * b_local,
                     out.aux.detach().double() * b_local, active.sum().double()]
                )
        if ctx.world_size > 1:
            _allreduce_grads(params)
            dist.all_reduce(local)
        local = local.cpu()
        if sae_config.variant != "paper":
            # Gao et al. 2024 (appendix): drop the gradient component parallel to each unit decoder row.
            model.remove_parallel_grad_()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        opt.step()
        if sae_config.variant != "paper":
            model.normalize_decoder_()
        tracker.update(local[:n_latents].round().to(torch.int64), n_global)
        window += local[n_latents:]
        window_samples += n_global
        samples_log += n_global
        step += 1

        if step % run.log_every == 0 or step == plan.n_steps:
            now = time.perf_counter()
            rec = {
                "step": step,
                "lr": lr_now,
                "k": k_now,
                "loss": float(window[0] / window_samples),
                "fvu": float(window[1] / window_samples),
                "aux": float(window[2] / window_samples),
                "l0": float(window[3] / window_samples),
                "dead_fraction": float(tracker.dead_mask().double().mean()),
                "samples_per_s": samples_log / max(now - t_log, 1e-9),
            }
            history.append(rec)
            window.zero_()
            window_samples = 0
            t_log, samples_log = now, 0
            if bar is not None:
                bar.set_postfix(
                    fvu=f"{rec['fvu']:.4f}", l0=f"{rec['l0']:.1f}", dead=f"{rec['dead_fraction']:.3f}",
                    sps=f"{rec['samples_per_s']:.0f}",
                )
        if x_val is not None and step % run.val_every == 0:
            val, freq = evaluate(model, x_val, run.eval_batch_size, return_frequencies=True)
            model.train()
            if sae_config.variant == "paper":
                # The authors' quirk: evaluation batches also count towards the cumulative firing frequency.
                tracker.update(torch.from_numpy(np.rint(freq * val["n"]).astype(np.int64)), val["n"])
            val_history.append({"step": step, **{k: v for k, v in val.items() if not isinstance(v, dict)}})
        if bar is not None:
            bar.update(1)
        if run.checkpoint_every and step % run.checkpoint_every == 0 and step < plan.n_steps:
            if ctx.is_main:
                _save_checkpoint(
                    ckpt_path,
                    {
                        "format": CHECKPOINT_FORMAT,
                        "step": step,
                        "fingerprint": fingerprint,
                        "plan": plan.to_dict(),
                        "model": model.state_dict(),
                        "optimizer": opt.state_dict(),
                        "stream": stream.state_dict(),
                        "dead": tracker.state_dict(),
                        "history": history,
                        "val_history": val_history,
                        "x_var": x_var,
                        "elapsed_s": elapsed_before + time.perf_counter() - t_start,
                        "rng": _rng_state(device),
                    },
                )
            ctx.barrier()
        if kill_after is not None and step == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    if bar is not None:
        bar.close()
    train_s = elapsed_before + time.perf_counter() - t_start

    metrics: dict = {}
    if ctx.is_main:
        metrics = _finish(
            model, data, out_dir, work_dir, config, plan, run,
            parent_store_hash, overwrite, history, val_history, tracker, step, train_s,
        )
    ctx.barrier()
    return TrainResult(
        out_dir=out_dir, metrics=metrics, history=history, val_history=val_history, resumed_from_step=resumed_from
    )


def _finish(
    model, data: _Data, out_dir, work_dir, config, plan, run,
    parent_store_hash, overwrite, history, val_history, tracker, step, train_s,
) -> dict:
    """Evaluate on held-out rows, write the SAE into the work directory, and commit it as ``out_dir``."""
    from sae.checkpoint import save_sae

    model.eval()
    metrics: dict = {}
    x_held = data.heldout_sample(run.max_eval_rows, config.seed)
    if x_held is not None:
        from sae.metrics import evaluate

        metrics.update(evaluate(model, x_held, run.eval_batch_size))
    summary = {
        "n_steps": step,
        "train_seconds": train_s,
        "train_dead_fraction": float(tracker.dead_mask().double().mean()),
        "train_fvu_last": history[-1]["fvu"] if history else None,
    }
    final = {"heldout": _jsonable(metrics), "train": summary}
    train_record = {**config.to_dict(), "plan": plan.to_dict()}
    # Build the final directory inside the work directory, so that the checkpoint survives until the
    # complete SAE has its final name.
    staged = work_dir / "sae"
    if staged.exists():
        shutil.rmtree(staged)
    save_sae(
        model, staged, train_config=train_record, parent_store_hash=parent_store_hash, metrics=final,
        extra_json={
            "metrics.json": {"final": final, "plan": plan.to_dict(), "history": history, "val_history": val_history}
        },
    )
    commit_dir(staged, out_dir, overwrite=overwrite)
    shutil.rmtree(work_dir, ignore_errors=True)
    return final
