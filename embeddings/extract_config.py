"""The settings of an extraction: what decides the content of the store, apart from where and how fast it runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from artifacts.typed import check_seed

DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class ExtractConfig:
    """Algorithm settings of an extraction: everything that decides the content of the store."""

    source: str
    """The images: ``digits``, an image folder (class sub-folders or flat) or a .txt/.csv file list (--source)."""
    kind: str = "auto"
    """How to read ``source``: ``auto`` guesses from it (--kind)."""
    backbone: str = "digits-cnn"
    """Backbone name: ``digits-cnn`` or any timm model name (--backbone)."""
    weights: str = "hub"
    """``hub``, ``random`` or a local weights file or directory (--weights)."""
    output: str = "auto"
    """``head``, ``pre_logits`` or ``auto`` (the head when it is an embedding projection) (--output)."""
    normalize: bool | None = None
    """L2-normalise embeddings; ``None`` uses the backbone's default (on for CLIP) (--normalize/--no-normalize)."""
    dtype: str = "float32"
    """Stored dtype of the embeddings: ``float32`` or ``float16`` (--dtype)."""
    batch_size: int = 64
    """Images per forward pass (--batch-size)."""
    seed: int = 0
    """Seed of the source's split, where the source makes one, and of random backbone weights (--seed)."""
    val_fraction: float | None = None
    """Share of each label held out as ``val``; ``None``: the source's default (digits 0.2, folders and lists
    no split) (--val-fraction)."""
    test_fraction: float | None = None
    """Share of each label held out as ``test``; ``None``: the source's default (--test-fraction)."""

    def __post_init__(self):
        if not self.source:
            raise ValueError("--source is required: digits, an image folder or a file list")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        check_seed(self.seed)
        if self.output not in ("auto", "head", "pre_logits"):
            raise ValueError(f"--output must be auto, head or pre_logits, got {self.output!r}")


@dataclass(frozen=True)
class ExtractRun:
    """Run settings of an extraction: where and how fast, not what."""

    out_dir: Path
    """The store directory to write (--out)."""
    device: str = "auto"
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when present) (--device)."""
    num_workers: int | None = None
    """DataLoader worker processes that decode and transform images (0: in this process, on threads); ``None``
    picks from the CPU count and the device (``default_num_workers``) (--num-workers)."""
    bf16: bool = False
    """Run the forward under bf16 autocast (changes the numbers, so resumes must match it) (--bf16)."""
    chunk_size: int = 1024
    """Input rows per resumable chunk; a multiple of the batch size (--chunk-size)."""
    overwrite: bool = False
    """Replace a different store at ``out_dir``, or a partial extraction made with other settings (--overwrite)."""
    n_threads: int | None = None
    """Torch threads of the forward pass; ``None`` keeps torch's default (--threads)."""
    progress: bool = True
    """Show a progress bar with images/s."""

    def __post_init__(self):
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        if self.chunk_size < 1:
            raise ValueError(f"--chunk-size must be >= 1, got {self.chunk_size}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"--num-workers must be >= 0, got {self.num_workers}")
        if self.n_threads is not None and self.n_threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.n_threads}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
