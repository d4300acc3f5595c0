"""Train the digits CNN (the default data's backbone) on the digits train split and save it.

    python scripts/train_backbone.py --out runs/digits-cnn [--width 8] [--epochs 20] [--seed 0] [--device cpu]

Then extract its embeddings with ``--backbone digits-cnn --weights runs/digits-cnn``.
"""

from __future__ import annotations

import argparse

from artifacts import check_replaceable, dir_lock
from artifacts.cli import run_main
from artifacts.typed import check_seed
from artifacts.flags import SETTINGS_FILE, add_config_file_flag, add_config_flags, parse_args, write_settings
from embeddings.cnn import CNNConfig, CNNTrainConfig, save_cnn, train_cnn


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="directory to write (model.safetensors, config.json, meta.json)")
    add_config_flags(p, CNNConfig, exclude=("n_classes", "image_size", "mean", "std"))
    add_config_flags(p, CNNTrainConfig)
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the initialisation, the batch order and the digits split (default: 0)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads while training; 0: torch's default "
                                                            "(default: 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out artifact (default: off)")
    add_config_file_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse_args(parser(), argv)
    check_seed(args.seed)
    config = CNNConfig(width=args.width)
    train = CNNTrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay)
    # --out is locked and checked before training, so that a refusal comes at once, not after the epochs.
    with dir_lock(args.out):
        check_replaceable(args.out, args.overwrite)
        model, metrics = train_cnn(config, train, seed=args.seed, device=args.device, n_threads=args.threads or None)
        out = save_cnn(model, args.out, train=train, seed=args.seed, metrics=metrics, overwrite=args.overwrite)
        write_settings(out / SETTINGS_FILE, args)  # --config of it trains this CNN again
    print(
        f"digits CNN width {config.width} ({config.n_features} features, {metrics['n_parameters']} parameters): "
        f"train {metrics['train_accuracy']:.4f}, val {metrics['val_accuracy']:.4f}, "
        f"test {metrics['test_accuracy']:.4f} accuracy in {metrics['seconds']:.1f} s"
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_main(main)
