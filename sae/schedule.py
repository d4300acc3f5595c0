"""The settings and schedule of SAE training: the algorithm's settings (``TrainConfig``), their resolution for
one run (``TrainPlan``), the run's settings (``RunConfig``), the learning rate and k of every step, and the
default SAE shape for a data size."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from artifacts.typed import check_seed
from sae.config import SAEConfig

LR_DECAYS = ("linear", "cosine", "none")
BIAS_INITS = ("geometric_median", "mean")
PRECISION_CHOICES = ("auto", "fp32", "bf16")
DEFAULT_EPOCHS = 100.0

PAPER_RUN_SAMPLES = 100 * 1_231_167
"""Samples of the paper's run: 100 epochs over ImageNet's training set (~30k steps of 4096)."""
K_ANNEAL_FRACTION, K_ANNEAL_CAP_SAMPLES = 1 / 3, 10_000 * 4096
"""The paper anneals k over a third of its run, 10k steps of 4096 samples."""
WARMUP_FRACTION, WARMUP_CAP_SAMPLES = 1 / 6, 5000 * 4096
"""The paper warms the learning rate up over a sixth of its run, 5k steps of 4096 samples."""


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
    """Linear LR warm-up from 0; ``None``: resolved for the run's length in samples (``ramp_steps``): the paper's
    5k of ~30k steps at its length, ever shorter for shorter runs."""
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
    """Steps of k annealing; ``None``: resolved for the run's length in samples (``ramp_steps``): the paper's
    10k of ~30k steps at its length, none for short runs."""
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
    precision: str = "auto"
    """How the latents are chosen (``TopKSAE.precision``): ``fp32``; ``bf16`` (a bfloat16 matmul as a filter
    with exact float32 re-ranking: the same latents and values, auxiliary losses in bfloat16); ``auto``: bf16
    where it measures faster at the start of the run (``sae/precision.py``; recorded in the SAE's meta.json)."""

    def __post_init__(self) -> None:
        if self.n_steps is not None and self.n_epochs is not None:
            raise ValueError("pass --steps or --epochs, not both")
        check_seed(self.seed)
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
        if self.precision not in PRECISION_CHOICES:
            raise ValueError(f"--precision must be one of {PRECISION_CHOICES}, got {self.precision!r}")
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
        warmup = self.lr_warmup_steps
        if warmup is None:
            warmup = ramp_steps(WARMUP_FRACTION, WARMUP_CAP_SAMPLES, n_steps, batch_size)
        k = sae_config.k
        k_start = self.k_start if self.k_start is not None else min(8 * k, sae_config.n_latents)
        k_start = min(max(k_start, k), sae_config.n_latents)
        k_anneal = self.k_anneal_steps
        if k_anneal is None:
            k_anneal = ramp_steps(K_ANNEAL_FRACTION, K_ANNEAL_CAP_SAMPLES, n_steps, batch_size)
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
def ramp_steps(fraction: float, cap_samples: int, n_steps: int, batch_size: int) -> int:
    """Steps of a default warm-up or k annealing: the paper's fraction of the run, scaled down in proportion to
    how much shorter than the paper's run this one is (in samples), and capped at the paper's length in samples.

    Annealing k and warming up the learning rate help long runs (fewer latents that never win early; a gentle
    start for Adam) but cost short ones a large part of their budget at the wrong k or a low learning rate: on
    a planted dictionary with skewed atom usage, 1,500 steps of 512 recover far fewer atoms with a third of
    the run annealed than with none (benchmarks/bench_sae_quality.py). EleutherAI sparsify likewise fixes its
    warm-up in steps and does not anneal k by default. At the paper's length (and beyond) this gives its
    10k-step anneal and 5k-step warm-up; at a tenth of it, a tenth of those fractions; short runs get ~none.
    """
    total = n_steps * batch_size
    samples = min(float(cap_samples), fraction * total * min(1.0, total / PAPER_RUN_SAMPLES))
    return min(n_steps, int(round(samples / batch_size)))


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

