"""What an SAE directory says about itself, read without its weights and without torch.

Enough to check that an SAE belongs to a store and its codes (``analysis.parents``) and to key what is derived
from it (its weights' SHA-256, recorded in ``meta.json``); ``load`` builds the model when a computation needs it
(encoding, decoding). A loaded ``TopKSAE`` gives the same record (``as_record``), so every check runs one way.
Reading a query's answer from saved codes and a saved index therefore never imports torch (seconds of start-up).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from artifacts import ArtifactError, read_json
from sae.config import SAEConfig

if TYPE_CHECKING:
    from sae.model import TopKSAE


@dataclass(frozen=True)
class SAERecord:
    """An SAE's architecture and identity."""

    config: SAEConfig
    """The architecture (``d_in``, ``n_latents``, ``k``, variant)."""
    source_dir: Path | None
    """Its checkpoint directory (``None`` for a model built in memory)."""

    @classmethod
    def read(cls, sae_dir) -> "SAERecord":
        """The record of a checkpoint directory (``config.json``), refusing a missing or invalid one."""
        sae_dir = Path(sae_dir)
        if not sae_dir.is_dir():
            raise ArtifactError(f"SAE directory {sae_dir} does not exist; train one with scripts/train_sae.py")
        config = read_json(sae_dir / "config.json", expect=dict)
        try:
            return cls(SAEConfig.from_dict(config["sae"]), sae_dir)
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{sae_dir / 'config.json'} does not hold a valid SAE config ({e})") from e

    def weights_hash(self) -> str:
        """The SHA-256 of the weights recorded in the checkpoint's ``meta.json``."""
        if self.source_dir is None:
            raise ValueError("an SAE built in memory has no checkpoint directory and no recorded weights hash")
        meta = read_json(self.source_dir / "meta.json", expect=dict)
        if "weights_sha256" not in meta:
            raise ArtifactError(f"{self.source_dir / 'meta.json'} has no weights_sha256; re-save the SAE")
        return meta["weights_sha256"]

    def check_width(self, d: int, what: str) -> None:
        """Refuse an SAE whose ``d_in`` differs from the width ``d`` of the data described by ``what``."""
        if self.config.d_in == d:
            return
        name = f"SAE {self.source_dir}" if self.source_dir is not None else "the SAE"
        raise ArtifactError(
            f"{name} takes inputs of width d_in={self.config.d_in}, but {what} has d={d}. Train an SAE on that "
            f"data (scripts/train_sae.py --store STORE_DIR --out SAE_DIR) or use the store the SAE was trained on."
        )

    def load(self, device: str = "cpu") -> "TopKSAE":
        """The model itself, from its checkpoint (imports torch)."""
        if self.source_dir is None:
            raise ValueError("an SAE built in memory has no checkpoint to load")
        from sae.checkpoint import load_sae

        return load_sae(self.source_dir, device)


def as_record(sae) -> SAERecord:
    """The record of a loaded ``TopKSAE`` (its config and ``source_dir``) or of an ``SAERecord`` itself."""
    if isinstance(sae, SAERecord):
        return sae
    return SAERecord(sae.config, getattr(sae, "source_dir", None))
