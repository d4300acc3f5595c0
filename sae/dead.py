"""Dead-latent trackers: which latents the auxiliary loss should revive.

Two rules, chosen by the SAE variant:

- ``WindowDeadTracker`` (``topk``, Gao et al. 2024, AuxK): a latent is dead when it has not fired on
  any of the last ``window_samples`` training samples. The count is over a sliding window, not since the
  start, so a latent that stops firing becomes dead once the window has passed, and a dead latent that
  fires again is alive at once.
- ``CumulativeDeadTracker`` (``paper``, the authors' code): a latent is dead while its firing frequency
  since the start of training is below ``threshold`` (1e-4). The counts are cumulative, and the authors
  also update them from evaluation batches; the trainer reproduces that quirk for this variant.

"Fired" means the latent was among the top-k of a sample with a positive value. Both trackers take the
per-latent firing counts of a whole global batch (already summed over data-parallel ranks), so every
rank holds the same state.
"""

from __future__ import annotations

import torch
from torch import Tensor


class WindowDeadTracker:
    """Samples since each latent last fired; dead when that reaches ``window_samples``."""

    kind = "window"

    def __init__(self, n_latents: int, window_samples: int):
        if window_samples < 1:
            raise ValueError(f"--dead-window must be >= 1 sample, got {window_samples}")
        self.window_samples = int(window_samples)
        self.since_fired = torch.zeros(n_latents, dtype=torch.int64)

    def update(self, fired_counts: Tensor, n_samples: int) -> None:
        """Record one batch of ``n_samples`` in which latent ``j`` fired ``fired_counts[j]`` times."""
        self.since_fired += int(n_samples)
        self.since_fired[fired_counts.to("cpu") > 0] = 0

    def dead_mask(self) -> Tensor:
        """``(n_latents,)`` bool: latents that fired on none of the last ``window_samples`` samples."""
        return self.since_fired >= self.window_samples

    def state_dict(self) -> dict:
        return {"kind": self.kind, "window_samples": self.window_samples, "since_fired": self.since_fired.clone()}

    def load_state_dict(self, state: dict) -> None:
        if state["kind"] != self.kind or int(state["window_samples"]) != self.window_samples:
            raise ValueError(f"saved dead-latent state {state['kind']}/{state.get('window_samples')} does not match")
        self.since_fired = state["since_fired"].clone().to(torch.int64)


class CumulativeDeadTracker:
    """Firing counts since the start; dead while ``count / n_seen < threshold`` (the authors' rule)."""

    kind = "cumulative"

    def __init__(self, n_latents: int, threshold: float):
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"--dead-threshold must be in (0, 1), got {threshold}")
        self.threshold = float(threshold)
        self.fired = torch.zeros(n_latents, dtype=torch.int64)
        self.n_seen = 0

    def update(self, fired_counts: Tensor, n_samples: int) -> None:
        self.fired += fired_counts.to("cpu", torch.int64)
        self.n_seen += int(n_samples)

    def dead_mask(self) -> Tensor:
        """``(n_latents,)`` bool; nothing is dead before the first sample."""
        if self.n_seen == 0:
            return torch.zeros_like(self.fired, dtype=torch.bool)
        return self.fired.double() / self.n_seen < self.threshold

    def state_dict(self) -> dict:
        return {"kind": self.kind, "threshold": self.threshold, "fired": self.fired.clone(), "n_seen": self.n_seen}

    def load_state_dict(self, state: dict) -> None:
        if state["kind"] != self.kind or float(state["threshold"]) != self.threshold:
            raise ValueError(f"saved dead-latent state {state['kind']}/{state.get('threshold')} does not match")
        self.fired = state["fired"].clone().to(torch.int64)
        self.n_seen = int(state["n_seen"])


def firing_counts(indices: Tensor, active: Tensor, n_latents: int) -> Tensor:
    """Per-latent number of samples in which it fired: ``(n_latents,)`` int64 from codes ``(b, k)``."""
    return torch.bincount(indices[active].reshape(-1), minlength=n_latents).to(torch.int64)
