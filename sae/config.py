"""SAEConfig: the architecture of a top-k sparse autoencoder (training settings live elsewhere)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

VARIANTS = ("topk", "paper")


@dataclass(frozen=True)
class SAEConfig:
    """Architecture of a top-k SAE; ``variant`` selects the corrected model or the authors' one."""

    d_in: int
    """Width of the input embeddings (``d``)."""
    n_latents: int
    """Number of latents (the SAE width)."""
    k: int
    """Active latents per input after training (top-k)."""
    variant: str = "topk"
    """``"topk"``: Gao et al. 2024 (ReLU, unit-norm decoder, AuxK loss); ``"paper"``: the authors' model."""
    subtract_decoder_bias: bool = True
    """Encode ``x - b_dec`` rather than ``x`` (Gao et al. 2024, Sec. 2.1); the authors' model does not."""
    dropout: float = 0.0
    """Dropout probability on the pre-activations before top-k, in training only (the authors use 0.5)."""
    auxk_k: int | None = None
    """Dead latents used by the AuxK loss; ``None`` means ``d_in // 2`` as in EleutherAI sparsify."""
    auxk_coef: float = 1.0 / 32.0
    """Weight of the AuxK loss (alpha = 1/32 in Gao et al. 2024, Sec. A.2)."""
    ghost_coef: float = 1e6
    """Weight of the ghost-gradient loss of the ``paper`` variant (1e6 in the authors' config.json)."""

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"--variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.d_in < 1:
            raise ValueError(f"the input width d_in must be >= 1, got {self.d_in}")
        if self.n_latents < 1:
            raise ValueError(f"--n-latents must be >= 1, got {self.n_latents}")
        if not 1 <= self.k <= self.n_latents:
            raise ValueError(f"--k must be in [1, --n-latents={self.n_latents}], got {self.k}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.auxk_k is not None and not 1 <= self.auxk_k <= self.n_latents:
            raise ValueError(f"--auxk-k must be in [1, --n-latents={self.n_latents}], got {self.auxk_k}")
        if self.auxk_coef < 0:
            raise ValueError(f"--auxk-coef must be >= 0, got {self.auxk_coef}")
        if self.ghost_coef < 0:
            raise ValueError(f"--ghost-coef must be >= 0, got {self.ghost_coef}")

    @property
    def auxk_k_effective(self) -> int:
        """The AuxK width actually used: ``auxk_k`` or ``d_in // 2`` (at least 1, at most n_latents)."""
        k_aux = self.auxk_k if self.auxk_k is not None else max(self.d_in // 2, 1)
        return min(k_aux, self.n_latents)

    @classmethod
    def paper(cls, d_in: int = 512, n_latents: int = 4096, k: int = 16, **overrides: Any) -> "SAEConfig":
        """The authors' model (github.com/patrikwolf/ttt_theory, sae/sae_topk.py and sae/config.json)."""
        settings = dict(variant="paper", subtract_decoder_bias=False, dropout=0.5, ghost_coef=1e6)
        settings.update(overrides)
        return cls(d_in=d_in, n_latents=n_latents, k=k, **settings)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SAEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown SAE config keys {sorted(unknown)}; the checkpoint was written by a newer version")
        return cls(**d)
