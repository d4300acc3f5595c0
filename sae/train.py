"""Training of a top-k SAE on an ``(n, d)`` array or a batch source: schedules, dead latents, checkpoints
and resume, data parallel.

``train_sae`` streams shuffled batches from the array (a memory map is never loaded whole; a re-iterable
source of batches also works), optimises
``FVU + AuxK`` (or the authors' ``MSE + ghost`` for the ``paper`` variant) with Adam, LR warm-up and decay,
gradient clipping and k annealing, and writes a complete SAE directory atomically:

    OUT_DIR/  sae.safetensors, config.json (with this TrainConfig, the parent store hash and provenance,
              final metrics), latent_frequency.npy (per-latent firing frequency),
              metrics.json (held-out metrics, the resolved schedule and the per-log-step history)

The parts: ``sae/schedule.py`` (TrainConfig, its resolution into a TrainPlan, LR and k per step),
``sae/train_data.py`` (the data in either form), ``sae/train_state.py`` (checkpoint file, RNG states,
fingerprint), ``sae/trainer.py`` (the run as named steps: prepare, step, log, validate, checkpoint, finish).

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
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from artifacts import check_settings, is_artifact_dir, lock, partial_dir, read_json
from artifacts.ranks import Ranks, resolve_device
from sae.config import SAEConfig
from sae.schedule import RunConfig, TrainConfig, default_shape
from sae.train_data import as_data
from sae.train_state import check_paths
from sae.trainer import Trainer, TrainResult

__all__ = ["RunConfig", "TrainConfig", "TrainResult", "default_shape", "train_sae"]


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
    provenance: dict | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> TrainResult:
    """Train an SAE and write ``out_dir``.

    ``x`` is an ``(n, d)`` float array (e.g. a store's memory map; trained on ``x[train_rows]``, held-out
    metrics on ``x[heldout_rows]``), or a re-iterable source of ``(b, d)`` batches (every ``iter(x)``
    yields the same sequence; give ``n_steps``, or ``n_epochs`` when it has ``len``; under torchrun each
    process passes its own shard). ``heldout_x``: held-out rows as an array, instead of ``heldout_rows``.
    ``provenance``: what the data is (the parent store's backbone, output kind, normalisation,
    preprocessing; ``sae.provenance``), recorded in the SAE's config.

    ``resume=True`` continues from the checkpoint of an interrupted run with the same settings (or starts
    fresh when there is none); ``overwrite=True`` discards an old checkpoint and replaces ``out_dir``.
    """
    data = as_data(x, train_rows, heldout_rows, heldout_x, config)
    if data.d != sae_config.d_in:
        raise ValueError(f"the data has d={data.d} but the SAE config has d_in={sae_config.d_in}")
    # A batch source brings its own batch size.
    plan_config = config if data.is_array else dataclasses.replace(config, batch_size=data.batch_size)
    plan = plan_config.plan(data.n_rows, sae_config)

    out_dir = Path(out_dir)
    work_dir = partial_dir(out_dir)
    if run.n_threads is not None:
        torch.set_num_threads(run.n_threads)
    ctx = Ranks.from_env(run.device)
    try:
        device = resolve_device(run.device, ctx)
        if ctx.is_main:
            lock.acquire(out_dir)  # held until the SAE is committed: a second run is refused at once
        if resume and not overwrite and is_artifact_dir(out_dir):
            return _completed(out_dir, work_dir, sae_config, config, parent_store_hash, provenance, ctx)
        will_resume = check_paths(out_dir, work_dir, resume, overwrite)
        ctx.barrier()  # every rank has looked before rank 0 changes anything
        if ctx.is_main:
            if overwrite and not will_resume and work_dir.exists():
                shutil.rmtree(work_dir)
            work_dir.mkdir(parents=True, exist_ok=True)
        ctx.barrier()
        trainer = Trainer(
            data, out_dir, work_dir, sae_config, config, plan, run, ctx, device, parent_store_hash, provenance
        )
        return trainer.run(will_resume, overwrite)
    finally:
        if ctx.is_main:
            lock.release(out_dir)
        ctx.close()


def _completed(out_dir: Path, work_dir: Path, sae_config, config, parent_store_hash, provenance, ctx) -> TrainResult:
    """``resume=True`` on a finished SAE (e.g. killed after the commit, before its work directory was removed):
    refuse it when it was trained with other settings, else remove the leftovers and return its record."""
    requested = {"sae": sae_config.to_dict(), "train": config.to_dict(), "parent_store_hash": parent_store_hash}
    if provenance is not None:
        requested["provenance"] = provenance
    check_settings(out_dir, requested, fix="choose another --out, or pass --overwrite to train it again")
    if ctx.is_main:
        shutil.rmtree(work_dir, ignore_errors=True)
    record = read_json(out_dir / "config.json")
    log = read_json(out_dir / "metrics.json") if (out_dir / "metrics.json").is_file() else {}
    metrics = record.get("metrics") or {}
    return TrainResult(
        out_dir=out_dir, metrics=metrics, history=log.get("history", []), val_history=log.get("val_history", []),
        resumed_from_step=int(metrics.get("train", {}).get("n_steps", 0)), already_complete=True,
    )

