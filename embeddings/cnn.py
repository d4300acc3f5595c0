"""The digits CNN family: the default data's "foundation model", scalable in width.

LeNet-style, like the paper's MNIST model family (Section 4 of the paper: ``conv -> ReLU -> pool ->
conv -> ReLU -> pool -> linear``, penultimate widths from 25 to about 1,000)::

    x (b, 1, 32, 32)
      -> conv 5x5, width channels -> ReLU -> max-pool 2   (b, width, 14, 14)
      -> conv 5x5, width channels -> ReLU -> max-pool 2   (b, width, 5, 5)
      -> flatten                                         (b, n_features = 25 * width)   <- the embedding
      -> linear                                          (b, n_classes)

``width`` 1..40 gives penultimate widths 25..1000. It is trained once, globally, on the digits train split
(``train_cnn``), saved as safetensors with its config (``save_cnn``) and then used frozen through
``embeddings.backbone.load_backbone("digits-cnn", weights=CNN_DIR)``; its penultimate features are the
embeddings and its last linear layer is the head that test-time training adapts.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torchvision import transforms

from artifacts import (
    SCHEMA_VERSION,
    ArtifactError,
    building,
    package_version,
    read_json,
    sha256_file,
    write_json,
)
from artifacts.weights import load_checked

ARCHITECTURE = "digits-cnn"
"""The name under which ``load_backbone`` knows this family."""
WEIGHTS_FILE = "model.safetensors"
KERNEL_SIZE = 5
# Mean and standard deviation of the 32x32 digit pixels (scaled to 0..1) over the default train split;
# fixed constants so that the preprocessing does not depend on which split a model saw.
DIGITS_MEAN = 0.3059
DIGITS_STD = 0.3239


@dataclass(frozen=True)
class CNNConfig:
    """Architecture of one member of the digits CNN family."""

    width: int = 8
    """Channels of both convolutions; the penultimate (embedding) width is ``25 * width`` at 32x32 input."""
    n_classes: int = 10
    """Outputs of the linear head."""
    image_size: int = 32
    """Side length of the (greyscale, square) input image."""
    mean: float = DIGITS_MEAN
    """Input normalisation: pixel/255 minus this mean ..."""
    std: float = DIGITS_STD
    """... divided by this standard deviation."""

    def __post_init__(self):
        if not isinstance(self.width, int) or self.width < 1:
            raise ValueError(f"--width must be a positive integer, got {self.width!r}")
        if not isinstance(self.n_classes, int) or self.n_classes < 2:
            raise ValueError(f"n_classes must be an integer >= 2, got {self.n_classes!r}")
        if not isinstance(self.image_size, int) or _feature_side(self.image_size) < 1:
            raise ValueError(f"image_size must be an integer >= 16 for two 5x5 convolutions and pools, got {self.image_size!r}")
        if not self.std > 0:
            raise ValueError(f"std must be positive, got {self.std}")

    @property
    def feature_side(self) -> int:
        """Side of the last feature map (5 at 32x32 input)."""
        return _feature_side(self.image_size)

    @property
    def n_features(self) -> int:
        """Penultimate (embedding) width: ``width * feature_side**2``."""
        return self.width * self.feature_side**2

    @classmethod
    def for_n_features(cls, n_features: int, **kwargs) -> "CNNConfig":
        """The family member whose penultimate width is closest to ``n_features`` (at least one channel)."""
        side = _feature_side(kwargs.get("image_size", 32))
        return cls(width=max(1, int(round(n_features / side**2))), **kwargs)


def _feature_side(image_size: int) -> int:
    return ((image_size - KERNEL_SIZE + 1) // 2 - KERNEL_SIZE + 1) // 2


@dataclass(frozen=True)
class CNNTrainConfig:
    """How the digits CNN is trained globally on the train split."""

    epochs: int = 20
    """Passes over the train split."""
    batch_size: int = 64
    """Images per Adam step."""
    lr: float = 3e-3
    """Adam learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW); 0 is plain Adam, as the paper trains its heads."""

    def __post_init__(self):
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise ValueError(f"--epochs must be a non-negative integer, got {self.epochs!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"--batch-size must be a positive integer, got {self.batch_size!r}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ValueError(f"--weight-decay must be non-negative, got {self.weight_decay}")


class DigitsCNN(nn.Module):
    """``conv -> ReLU -> pool -> conv -> ReLU -> pool -> linear`` with timm's feature/head interface.

    ``forward_features``: ``(b, 1, s, s) -> (b, width, f, f)``; ``forward_head(x, pre_logits=True)``:
    the flattened ``(b, n_features)`` embedding; ``forward``: logits ``(b, n_classes)``.
    """

    def __init__(self, config: CNNConfig):
        super().__init__()
        self.config = config
        self.conv1 = nn.Conv2d(1, config.width, KERNEL_SIZE)
        self.conv2 = nn.Conv2d(config.width, config.width, KERNEL_SIZE)
        self.head = nn.Linear(config.n_features, config.n_classes)
        self.num_features = config.n_features
        self.num_classes = config.n_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        return F.max_pool2d(F.relu(self.conv2(x)), 2)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.flatten(1)
        return x if pre_logits else self.head(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(b, n_features)`` of images ``(b, 1, s, s)``."""
        return self.forward_head(self.forward_features(x), pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def cnn_transform(config: CNNConfig) -> transforms.Compose:
    """PIL RGB image -> ``(1, s, s)`` float tensor, normalised as the CNN was trained."""
    s = config.image_size
    return transforms.Compose(
        [
            transforms.Grayscale(num_output_channels=1),
            transforms.Resize((s, s), interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.ToTensor(),
            transforms.Normalize([config.mean], [config.std]),
        ]
    )


def cnn_preprocessing(config: CNNConfig) -> dict:
    """The preprocessing of ``cnn_transform`` in the shape of timm's resolved data config."""
    return {
        "input_size": [1, config.image_size, config.image_size],
        "interpolation": "bilinear",
        "mean": [config.mean],
        "std": [config.std],
        "crop_pct": 1.0,
        "crop_mode": "none",
        "grayscale": True,
    }


def images_to_tensor(images: np.ndarray, config: CNNConfig) -> torch.Tensor:
    """``(n, s, s)`` uint8 grey images -> ``(n, 1, s, s)`` float tensor, the same values as ``cnn_transform``."""
    images = np.asarray(images)
    if images.ndim != 3 or images.shape[1:] != (config.image_size, config.image_size) or images.dtype != np.uint8:
        raise ValueError(
            f"expected uint8 images of shape (n, {config.image_size}, {config.image_size}), got {images.dtype} {images.shape}"
        )
    x = torch.from_numpy(np.array(images, copy=True)).unsqueeze(1).float().div(255)
    mean = torch.tensor([config.mean], dtype=x.dtype).view(1, 1, 1)
    std = torch.tensor([config.std], dtype=x.dtype).view(1, 1, 1)
    return x.sub(mean).div(std)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Share of rows whose arg-max logit is the label (NaN for no rows)."""
    if len(y) == 0:
        return math.nan
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(y), batch_size):
        logits = model(x[start : start + batch_size])
        correct += int((logits.argmax(1) == y[start : start + batch_size]).sum())
    model.train(was_training)
    return correct / len(y)


def train_cnn(
    config: CNNConfig = CNNConfig(),
    train: CNNTrainConfig = CNNTrainConfig(),
    *,
    images: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    split: dict[str, np.ndarray] | None = None,
    seed: int = 0,
    device: str = "cpu",
    n_threads: int | None = 1,
) -> tuple[DigitsCNN, dict]:
    """Train a fresh ``DigitsCNN`` on ``split["train"]`` and report accuracies on every split.

    Defaults to the bundled digits and their seeded split (``digits_split(labels, seed)``). Initialisation
    and batch order depend only on ``seed``, so two runs on the same machine and device give the same
    weights; the global torch random state is left as it was. Returns the model (in eval mode, on
    ``device``) and a dict of metrics.

    ``n_threads`` sets torch's CPU threads during training (``None``: leave them). One is the default:
    these convolutions are too small to gain from intra-op threads, and on shared cores extra threads
    spin and made training more than ten times slower in our measurements.
    """
    previous_threads = torch.get_num_threads()
    if n_threads is not None:
        torch.set_num_threads(n_threads)
    try:
        return _train_cnn(config, train, images, labels, split, seed, device)
    finally:
        torch.set_num_threads(previous_threads)


def _train_cnn(config, train, images, labels, split, seed, device) -> tuple[DigitsCNN, dict]:
    if images is None or labels is None:
        from embeddings.digits import digits_split, load_digits_images

        images, labels = load_digits_images(config.image_size)
        if split is None:
            split = digits_split(labels, seed=seed)
    labels = np.array(labels, dtype=np.int64, copy=True)
    if split is None:
        split = {"train": np.arange(len(labels))}
    if "train" not in split or len(split["train"]) == 0:
        raise ValueError("train_cnn needs a non-empty 'train' split")
    bad = labels[split["train"]]
    if bad.min() < 0 or bad.max() >= config.n_classes:
        raise ValueError(f"train labels must lie in [0, {config.n_classes}), found {bad.min()}..{bad.max()}")
    x_all = images_to_tensor(images, config).to(device)
    y_all = torch.from_numpy(labels).to(device)
    rows = {name: torch.from_numpy(np.asarray(idx, dtype=np.int64)).to(device) for name, idx in split.items()}

    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsCNN(config).to(device)
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    x_train, y_train = x_all[rows["train"]], y_all[rows["train"]]
    n_train = len(y_train)
    model.train()
    last_loss = math.nan
    for _ in range(train.epochs):
        order = torch.randperm(n_train, generator=generator).to(device)
        total, count = 0.0, 0
        for start in range(0, n_train, train.batch_size):
            batch = order[start : start + train.batch_size]
            loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(batch)
            count += len(batch)
        last_loss = total / count
    model.eval()
    model.requires_grad_(False)
    metrics = {
        "final_train_loss": last_loss,
        "seconds": time.perf_counter() - t0,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "n_features": config.n_features,
    }
    for name, idx in rows.items():
        metrics[f"n_{name}"] = int(len(idx))
        metrics[f"{name}_accuracy"] = accuracy(model, x_all[idx], y_all[idx])
    return model, metrics


def save_cnn(
    model: DigitsCNN,
    out_dir: str | Path,
    *,
    train: CNNTrainConfig | None = None,
    seed: int | None = None,
    metrics: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model.safetensors``, ``config.json`` and ``meta.json`` to ``out_dir``, atomically."""
    with building(out_dir, overwrite) as work:  # committed at the end; deleted and unlocked on an error
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(work / WEIGHTS_FILE))
        config = {
            "architecture": ARCHITECTURE,
            "model": asdict(model.config),
            "train": None if train is None else asdict(train),
            "seed": seed,
            "data": "digits",
        }
        write_json(work / "config.json", config)
        write_json(
            work / "meta.json",
            {
                "schema_version": SCHEMA_VERSION,
                "package_version": package_version(),
                "weights_sha256": sha256_file(work / WEIGHTS_FILE),
                "n_features": model.config.n_features,
                "n_parameters": sum(p.numel() for p in model.parameters()),
                "metrics": _json_safe(metrics or {}),
            },
        )
    return Path(out_dir)


def _json_safe(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def cnn_weights_path(cnn_dir: str | Path) -> Path:
    """The weights file of a saved CNN directory (or the file itself when given)."""
    p = Path(cnn_dir)
    return p if p.is_file() else p / WEIGHTS_FILE


def load_cnn(cnn_dir: str | Path, device: str = "cpu") -> DigitsCNN:
    """Rebuild a saved CNN from its ``config.json`` and load its safetensors strictly; frozen, eval mode."""
    path = Path(cnn_dir)
    if path.is_file() and path.name != WEIGHTS_FILE:
        raise ArtifactError(
            f"{path} is a file, not a digits CNN: the digits CNN loads from the directory that "
            f"scripts/train_backbone.py writes (config.json and {WEIGHTS_FILE}); pass that directory, or train one "
            f"with `python scripts/train_backbone.py --out CNN_DIR`"
        )
    cnn_dir = path.parent if path.is_file() else path
    hint = f"train one with `python scripts/train_backbone.py --out {cnn_dir}`"
    if not (cnn_dir / "config.json").is_file() or not (cnn_dir / WEIGHTS_FILE).is_file():
        raise ArtifactError(f"no digits CNN at {path} (it needs config.json and {WEIGHTS_FILE}); {hint}")
    config = read_json(cnn_dir / "config.json", expect=dict, hint=hint)
    if config.get("architecture") != ARCHITECTURE:
        raise ArtifactError(f"{cnn_dir}/config.json describes {config.get('architecture')!r}, not {ARCHITECTURE!r}")
    model_config = config.get("model")
    if not isinstance(model_config, dict):
        raise ArtifactError(f"{cnn_dir / 'config.json'}: 'model' must be an object of CNNConfig fields; {hint}")
    model = load_checked(lambda: DigitsCNN(CNNConfig(**model_config)), cnn_dir / WEIGHTS_FILE,
                         cnn_dir / "config.json", hint)
    return model.to(device).eval().requires_grad_(False)
