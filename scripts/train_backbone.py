"""Train the digits CNN (the default data's backbone) on the digits train split and save it.

    python scripts/train_backbone.py --out runs/digits-cnn [--width 8] [--epochs 20] [--seed 0] [--device cpu]

Then extract its embeddings with ``--backbone digits-cnn --weights runs/digits-cnn``.
"""

from __future__ import annotations

import argparse

from artifacts import check_replaceable, dir_lock
from artifacts.cli import run_main
from embeddings.cnn import CNNConfig, CNNTrainConfig, save_cnn, train_cnn


def main(argv: list[str] | None = None) -> int:
    defaults_model, defaults_train = CNNConfig(), CNNTrainConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="directory to write (model.safetensors, config.json, meta.json)")
    p.add_argument("--width", type=int, default=defaults_model.width,
                   help=f"channels of both convolutions; embedding width is 25 * width (default {defaults_model.width})")
    p.add_argument("--epochs", type=int, default=defaults_train.epochs)
    p.add_argument("--batch-size", type=int, default=defaults_train.batch_size)
    p.add_argument("--lr", type=float, default=defaults_train.lr)
    p.add_argument("--weight-decay", type=float, default=defaults_train.weight_decay)
    p.add_argument("--seed", type=int, default=0, help="initialisation, batch order and the digits split")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads while training (0: torch's default)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    args = p.parse_args(argv)
    config = CNNConfig(width=args.width)
    train = CNNTrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay)
    # --out is locked and checked before training, so that a refusal comes at once, not after the epochs.
    with dir_lock(args.out):
        check_replaceable(args.out, args.overwrite)
        model, metrics = train_cnn(config, train, seed=args.seed, device=args.device, n_threads=args.threads or None)
        out = save_cnn(model, args.out, train=train, seed=args.seed, metrics=metrics, overwrite=args.overwrite)
    print(
        f"digits CNN width {config.width} ({config.n_features} features, {metrics['n_parameters']} parameters): "
        f"train {metrics['train_accuracy']:.4f}, val {metrics['val_accuracy']:.4f}, "
        f"test {metrics['test_accuracy']:.4f} accuracy in {metrics['seconds']:.1f} s"
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_main(main)
