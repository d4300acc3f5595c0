"""The backbone-width scaling sweep: does the TTT gain shrink as the model grows? (the paper, Section 4)

For each width of the digits CNN family: train the CNN globally on the train split, take its penultimate
features of every image, and run local TTT of its own last linear layer (the global head) on each test image's
nearest training neighbours in that feature space, against the global head and kNN majority vote. The paper's
MNIST study sees the TTT gain fall from about 0.8 to about 0.1 points of error from the smallest CNN to the
largest; the claim is that a larger model is less underparameterised, so it needs less specialisation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
import numpy as np
import torch

from analysis.progress import progress
from analysis.stats import accuracy, paired_difference


@dataclass(frozen=True)
class WidthSweepConfig:
    """The widths and the TTT recipe of the scaling sweep."""

    widths: tuple[int, ...] = (1, 2, 4, 8, 16)
    """CNN widths (channels); penultimate widths are 25 × these at 32×32 input (--widths)."""
    cnn_epochs: int = 20
    """Global training epochs of every CNN (--cnn-epochs)."""
    n_neighbours: int = 50
    """Training neighbours per test image (the paper uses 10…200 per width on MNIST)."""
    steps: int = 50
    """ERM full-batch Adam steps of TTT (the paper: 50…200 epochs on MNIST)."""
    lr: float = 1e-2
    """TTT Adam learning rate (the paper: 1e-3…5e-2 on MNIST)."""
    seed: int = 0
    """Seed of every CNN and of TTT."""

    def __post_init__(self):
        if not self.widths or any(int(w) < 1 for w in self.widths):
            raise ValueError(f"--widths must be positive integers, got {self.widths}")
        if self.n_neighbours < 1 or self.steps < 0 or not self.lr > 0 or self.cnn_epochs < 1:
            raise ValueError("the width sweep needs n_neighbours >= 1, steps >= 0, lr > 0 and --cnn-epochs >= 1")


@torch.no_grad()
def cnn_features(model, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Penultimate features ``(n, n_features)`` float32 of grey images ``(n, s, s)`` uint8."""
    from embeddings.cnn import images_to_tensor

    x = images_to_tensor(images, model.config)
    return torch.cat([model.features(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]).numpy()


def cnn_head(model):
    """The CNN's last linear layer as a linear ``analysis.heads.Head`` (a copy: the CNN is never changed)."""
    from analysis.heads import Head, HeadConfig

    head = Head(HeadConfig(kind="linear"), model.config.n_features, model.config.n_classes)
    head.last.load_state_dict(model.head.state_dict())
    return head.eval()


def width_point(width: int, images, labels, split, config: WidthSweepConfig, device: str = "cpu") -> dict:
    """One width: train the CNN, TTT its head on the test images; accuracies and the paired TTT gain."""
    from analysis.local_ttt import LocalTTT, TTTConfig
    from embeddings.cnn import CNNConfig, CNNTrainConfig, train_cnn

    cnn_config = CNNConfig(width=int(width), image_size=int(images.shape[1]), n_classes=int(labels.max()) + 1)
    model, metrics = train_cnn(cnn_config, CNNTrainConfig(epochs=config.cnn_epochs), images=images, labels=labels,
                               split=split, seed=config.seed, device=device)
    model = model.cpu()
    feats = cnn_features(model, images)
    train, test = np.asarray(split["train"]), np.asarray(split["test"])
    ttt = LocalTTT(cnn_head(model), TTTConfig(n_neighbours=config.n_neighbours, mode="erm", steps=config.steps,
                                             lr=config.lr, metric="l2", seed=config.seed))
    result = ttt.fit(feats[train], labels[train]).predict(feats[test])
    y = labels[test]
    ttt_ok, global_ok = result.predictions == y, result.global_predictions == y
    where = f"digits CNN width {width} ({cnn_config.n_features} features), {len(test)} test images"
    return {
        "width": int(width), "n_features": cnn_config.n_features, "n_parameters": int(metrics["n_parameters"]),
        "global_acc": accuracy(global_ok, where), "ttt_acc": accuracy(ttt_ok, where),
        "majority_acc": accuracy(result.majority == y, where),
        "gain": paired_difference(ttt_ok, global_ok, where + ", TTT minus global, paired"),
    }


def width_sweep(images, labels, split, config: WidthSweepConfig, device: str = "cpu", log=print) -> dict:
    """Every width of ``config``: the rows (the report draws them, ``analysis.report.plots.plot_width``)."""
    rows = []
    bar = progress("width", len(config.widths), "widths")
    for width in config.widths:
        bar.step(f"width {width}: CNN, store and TTT")
        row = width_point(width, images, labels, split, config, device)
        log(f"  width {width:>3} ({row['n_features']:>4} features): global {row['global_acc']['value']:.4f}, "
            f"TTT {row['ttt_acc']['value']:.4f}, gain {row['gain']['value']:+.4f} ± {row['gain']['se']:.4f}")
        rows.append(row)
    bar.close()
    return {"rows": rows, "config": asdict(config)}
