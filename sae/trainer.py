"""Trainer: one SAE training run as named steps (prepare, step, log, validate, checkpoint, finish). ``sae.train.train_sae`` is the entry point that sets up the directories
and the ranks and calls ``Trainer.run``."""

from __future__ import annotations

import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from artifacts import ArtifactError, commit_dir
from artifacts.ranks import Ranks
from sae.config import SAEConfig
from sae.dead import CumulativeDeadTracker, WindowDeadTracker, firing_counts
from sae.model import TopKSAE
from sae.precision import choose_precision
from sae.selection import PRECISIONS
from sae.schedule import RunConfig, TrainConfig, TrainPlan, k_at, lr_at
from sae.train_data import SMALL_DATA_ELEMENTS, TrainData, check_finite
from sae.train_state import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    check_fingerprint,
    hash_ints,
    jsonable,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)

KILL_ENV = "SAE_TRAIN_KILL_AFTER_STEP"
"""Test-only: when set to ``j``, the process SIGKILLs itself right after step ``j`` (and its checkpoint,
if one is due at ``j``), so that tests can interrupt a run at a known point."""


@dataclass
class TrainResult:
    """What ``train_sae`` returns (on every rank; only rank 0 wrote ``out_dir``)."""

    out_dir: Path
    """The complete SAE directory."""
    metrics: dict
    """Final held-out metrics plus training summary (rank 0; empty on other ranks)."""
    history: list[dict]
    """Per-log-step training metrics."""
    val_history: list[dict]
    """Periodic held-out metrics (``RunConfig.val_every``)."""
    resumed_from_step: int
    """Step the run continued from (0 for a fresh run)."""
    already_complete: bool = False
    """The SAE was complete before this call (``resume=True`` on a finished run): nothing was trained."""


def make_tracker(sae_config: SAEConfig, config: TrainConfig, plan: TrainPlan):
    if sae_config.variant == "paper":
        return CumulativeDeadTracker(sae_config.n_latents, config.dead_threshold)
    return WindowDeadTracker(sae_config.n_latents, plan.dead_window_samples)


def allreduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum gradients over ranks with a single flat all-reduce (each rank already weighted its share)."""
    for p in params:
        if p.grad is None:  # a rank with no rows in this batch has not built its gradients yet
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


class Trainer:
    """One training run as named steps: ``prepare`` (fresh or from a checkpoint), ``step``, ``log``,
    ``validate``, ``checkpoint`` and ``finish``; ``run`` is the driver that calls them in order."""

    def __init__(self, data: TrainData, out_dir: Path, work_dir: Path, sae_config: SAEConfig,
                 config: TrainConfig, plan: TrainPlan, run: RunConfig, ctx: Ranks, device: torch.device,
                 parent_store_hash: str | None = None, provenance: dict | None = None):
        self.data, self.out_dir, self.work_dir = data, out_dir, work_dir
        self.ckpt_path = work_dir / CHECKPOINT_NAME
        self.sae_config, self.config, self.plan, self.run_config = sae_config, config, plan, run
        self.ctx, self.device = ctx, device
        self.parent = {"parent_store_hash": parent_store_hash, "provenance": provenance}
        self.history: list[dict] = []
        self.val_history: list[dict] = []
        self.step_ = 0
        self.elapsed_before = 0.0
        self.x_var = 0.0
        self.x_val = None
        # Sums since the last log (loss, fvu, aux, active values), and samples in them.
        self.window = torch.zeros(4, dtype=torch.float64)
        self.window_samples = 0

    def run(self, will_resume: bool, overwrite: bool) -> TrainResult:
        """The driver: prepare, then step / log / validate / checkpoint until done, then finish."""
        self.prepare(will_resume)
        resumed_from = self.step_
        kill_after = int(os.environ[KILL_ENV]) if os.environ.get(KILL_ENV) else None
        bar = self._progress_bar()
        self.t_start = time.perf_counter()
        self.t_log, self.samples_log = self.t_start, 0
        self.model.train()
        while self.step_ < self.plan.n_steps:
            self.step()
            self.log(bar)
            self.validate()
            if bar is not None:
                bar.update(1)
            self.checkpoint()
            if kill_after is not None and self.step_ == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
        if bar is not None:
            bar.close()
        train_s = self.elapsed_before + time.perf_counter() - self.t_start
        metrics: dict = {}
        if self.ctx.is_main:
            metrics = self.finish(train_s, overwrite)
        self.ctx.barrier()
        return TrainResult(
            out_dir=self.out_dir, metrics=metrics, history=self.history, val_history=self.val_history,
            resumed_from_step=resumed_from,
        )

    # ------------------------------------------------------------------------------------------ prepare
    def fingerprint(self) -> dict:
        """What a checkpoint must match to be resumed: the data, its parent store and every setting."""
        return jsonable(
            {
                "d": self.data.d,
                "n_rows": self.data.n_rows,
                "rows": self.data.digest(),
                "parent_store_hash": self.parent["parent_store_hash"],
                "sae_config": self.sae_config.to_dict(),
                "train_config": self.config.to_dict(),
            }
        )

    def prepare(self, will_resume: bool) -> None:
        """Build the model, optimizer, data stream and dead-latent tracker; initialise or load a checkpoint."""
        data, config = self.data, self.config
        if data.is_array and data.n_rows * data.d <= SMALL_DATA_ELEMENTS:
            check_finite(data.x, data.rows)
        seed_everything(config.seed)
        self.model = TopKSAE(self.sae_config).to(self.device)
        self.params = list(self.model.parameters())
        self.opt = torch.optim.Adam(
            self.params, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps
        )
        self.stream = data.stream(self.plan.batch_size, config.seed, self.ctx)
        self.tracker = make_tracker(self.sae_config, config, self.plan)
        if will_resume:
            self._load_checkpoint()
        else:
            self._init_from_data()
            self.precision = self._choose_precision()
        self.model.precision = self.precision["precision"]
        if self.ctx.rank > 0:
            # Every rank built the same initial model from the same seed; from here on each draws its own
            # dropout masks (paper variant), else all ranks would apply identical masks to different rows.
            # Only rank 0's RNG state is checkpointed, so the other ranks reseed from (seed, rank, step).
            torch.manual_seed(hash_ints(config.seed, self.ctx.rank, self.step_))
        if self.run_config.val_every:
            self.x_val = data.heldout_sample(self.run_config.max_val_rows, config.seed)

    def _init_from_data(self) -> None:
        sample = self.data.init_sample(self.config.n_init_samples, self.config.seed)
        self.model.init_from_data_(torch.from_numpy(sample), method=self.config.bias_init)
        # A fixed FVU normaliser (the data's total variance) makes the loss a mean of per-sample terms,
        # so that data-parallel shards sum to the one-process gradient.
        self.x_var = float(np.var(sample.astype(np.float64), axis=0).sum())
        if not self.x_var > 0:
            raise ValueError("the training rows have zero variance (all identical); an SAE cannot be trained on them")

    def _choose_precision(self) -> dict:
        """Rank 0 decides how the latents are chosen (``sae/precision.py``); every rank takes its decision."""
        record: dict = {}
        if self.ctx.is_main:
            sample = torch.from_numpy(self.data.init_sample(self.config.n_init_samples, self.config.seed))
            rows = -(-self.plan.batch_size // self.ctx.world_size)
            record = choose_precision(self.config.precision, self.model, sample, rows, self.plan.k_start)
        chosen = self.ctx.broadcast_int(PRECISIONS.index(record.get("precision", "fp32")), self.device)
        return record if self.ctx.is_main else {"precision": PRECISIONS[chosen]}

    def _load_checkpoint(self) -> None:
        state = load_checkpoint(self.ckpt_path)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ArtifactError(
                f"checkpoint {self.ckpt_path} has format {state.get('format')}; pass --overwrite to start over"
            )
        check_fingerprint(state["fingerprint"], self.fingerprint(), self.ckpt_path)
        self.model.load_state_dict(state["model"], strict=True)
        self.opt.load_state_dict(state["optimizer"])
        self.stream.load_state_dict(state["stream"])
        self.tracker.load_state_dict(state["dead"])
        self.history = list(state["history"])
        self.val_history = list(state["val_history"])
        self.step_ = int(state["step"])
        self.x_var = float(state["x_var"])
        self.elapsed_before = float(state["elapsed_s"])
        self.precision = dict(state["precision"])  # the same way as before the interruption, not measured again
        set_rng_state(state["rng"], self.device)

    def _progress_bar(self):
        if not (self.ctx.is_main and self.run_config.progress):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.plan.n_steps, initial=self.step_, desc="train SAE", unit="step", dynamic_ncols=True)

    # ------------------------------------------------------------------------------------------ step
    def step(self) -> None:
        """One optimizer step on the next global batch (gradients and firing counts reduced over ranks)."""
        model, ctx, n_latents = self.model, self.ctx, self.sae_config.n_latents
        self.k_now = k_at(self.step_, self.sae_config.k, self.plan)
        self.lr_now = lr_at(self.step_, self.config.lr, self.plan, self.config)
        for group in self.opt.param_groups:
            group["lr"] = self.lr_now
        batch = self.stream.next_batch()
        b_local, n_global = batch.x.shape[0], batch.n_global
        if not self.data.is_array and ctx.world_size > 1:
            # Each process iterates its own shard: the global batch is the sum of the local ones.
            sizes = torch.tensor([b_local], dtype=torch.int64, device=self.device)
            dist.all_reduce(sizes)
            n_global = int(sizes)
        self.opt.zero_grad(set_to_none=False)
        local = self._forward_backward(batch.x, b_local, n_global)
        if ctx.world_size > 1:
            allreduce_grads(self.params)
            dist.all_reduce(local)
        local = local.cpu()
        if self.sae_config.variant != "paper":
            # Gao et al. 2024 (appendix): drop the gradient component parallel to each unit decoder row.
            model.remove_parallel_grad_()
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        self.opt.step()
        if self.sae_config.variant != "paper":
            model.normalize_decoder_()
        self.tracker.update(local[:n_latents].round().to(torch.int64), n_global)
        self.window += local[n_latents:]
        self.window_samples += n_global
        self.samples_log += n_global
        self.step_ += 1

    def _forward_backward(self, x_np: np.ndarray, b_local: int, n_global: int) -> torch.Tensor:
        """Backpropagate this rank's share; return its firing counts and loss sums ``(n_latents + 4,)``."""
        n_latents = self.sae_config.n_latents
        dead = self.tracker.dead_mask().to(self.device)
        # Firing counts and loss sums of this rank's share, reduced in one call (on the device: NCCL needs it).
        local = torch.zeros(n_latents + 4, dtype=torch.float64, device=self.device)
        if b_local == 0:
            return local
        xb = torch.from_numpy(x_np).to(self.device)
        out = self.model(xb, k=self.k_now, dead_mask=dead, x_var=self.x_var)
        # Weight this rank's mean by its share of the global batch; summed over ranks this is the
        # global-batch mean (one process: weight 1).
        (out.loss * (b_local / n_global)).backward()
        with torch.no_grad():
            active = out.active
            local[:n_latents] = firing_counts(out.indices, active, n_latents).double()
            local[n_latents:] = torch.stack(
                [out.loss.detach().double() * b_local, out.fvu.detach().double() * b_local,
                 out.aux.detach().double() * b_local, active.sum().double()]
            )
        return local

    # ------------------------------------------------------------------------------------------ log, validate
    def log(self, bar) -> None:
        """Every ``log_every`` steps (and at the end), append the window's means to the history."""
        if not (self.step_ % self.run_config.log_every == 0 or self.step_ == self.plan.n_steps):
            return
        now = time.perf_counter()
        w, n = self.window, self.window_samples
        rec = {
            "step": self.step_,
            "lr": self.lr_now,
            "k": self.k_now,
            "loss": float(w[0] / n),
            "fvu": float(w[1] / n),
            "aux": float(w[2] / n),
            "l0": float(w[3] / n),
            "dead_fraction": float(self.tracker.dead_mask().double().mean()),
            "samples_per_s": self.samples_log / max(now - self.t_log, 1e-9),
        }
        self.history.append(rec)
        self.window.zero_()
        self.window_samples = 0
        self.t_log, self.samples_log = now, 0
        if bar is not None:
            bar.set_postfix(
                fvu=f"{rec['fvu']:.4f}", l0=f"{rec['l0']:.1f}", dead=f"{rec['dead_fraction']:.3f}",
                sps=f"{rec['samples_per_s']:.0f}",
            )

    def validate(self) -> None:
        """Every ``val_every`` steps, evaluate on the held-out sample and record it."""
        if self.x_val is None or self.step_ % self.run_config.val_every != 0:
            return
        from sae.metrics import evaluate

        val, freq = evaluate(self.model, self.x_val, self.run_config.eval_batch_size, return_frequencies=True)
        self.model.train()
        if self.sae_config.variant == "paper":
            # The authors' quirk: evaluation batches also count towards the cumulative firing frequency.
            self.tracker.update(torch.from_numpy(np.rint(freq * val["n"]).astype(np.int64)), val["n"])
        self.val_history.append({"step": self.step_, **{k: v for k, v in val.items() if not isinstance(v, dict)}})

    # ------------------------------------------------------------------------------------------ checkpoint
    def checkpoint(self) -> None:
        """Every ``checkpoint_every`` steps (not at the end), rank 0 writes everything a resume needs."""
        every = self.run_config.checkpoint_every
        if not (every and self.step_ % every == 0 and self.step_ < self.plan.n_steps):
            return
        if self.ctx.is_main:
            save_checkpoint(
                self.ckpt_path,
                {
                    "format": CHECKPOINT_FORMAT,
                    "step": self.step_,
                    "fingerprint": self.fingerprint(),
                    "plan": self.plan.to_dict(),
                    "model": self.model.state_dict(),
                    "optimizer": self.opt.state_dict(),
                    "stream": self.stream.state_dict(),
                    "dead": self.tracker.state_dict(),
                    "history": self.history,
                    "val_history": self.val_history,
                    "x_var": self.x_var,
                    "elapsed_s": self.elapsed_before + time.perf_counter() - self.t_start,
                    "rng": rng_state(self.device),
                    "precision": self.precision,
                },
            )
        self.ctx.barrier()

    # ------------------------------------------------------------------------------------------ finish
    def finish(self, train_s: float, overwrite: bool) -> dict:
        """Evaluate on held-out rows, write the SAE into the work directory, and commit it as ``out_dir``."""
        from sae.checkpoint import save_sae

        self.model.eval()
        final, frequency = self._final_metrics(train_s)
        train_record = {**self.config.to_dict(), "plan": self.plan.to_dict()}
        # Build the final directory inside the work directory, so that the checkpoint survives until the
        # complete SAE has its final name.
        staged = self.work_dir / "sae"
        if staged.exists():
            shutil.rmtree(staged)
        metrics_json = {
            "final": final, "plan": self.plan.to_dict(), "history": self.history, "val_history": self.val_history,
        }
        save_sae(
            self.model, staged, train_config=train_record, parent_store_hash=self.parent["parent_store_hash"],
            provenance=self.parent["provenance"], metrics=final, extra_json={"metrics.json": metrics_json},
            latent_frequency=frequency, meta={"precision": self.precision},
        )
        commit_dir(staged, self.out_dir, overwrite=overwrite)
        shutil.rmtree(self.work_dir, ignore_errors=True)
        return final

    def _final_metrics(self, train_s: float) -> tuple[dict, dict | None]:
        """Held-out metrics and the per-latent firing frequency (on held-out rows, else on a training sample)."""
        from sae.metrics import evaluate

        metrics: dict = {}
        frequency = None
        x_held = self.data.heldout_sample(self.run_config.max_eval_rows, self.config.seed)
        if x_held is not None:
            metrics, freq = evaluate(self.model, x_held, self.run_config.eval_batch_size, return_frequencies=True)
            frequency = {"frequency": freq, "n_rows": int(metrics["n"]), "rows": "held-out"}
        else:
            sample = self.data.init_sample(self.config.n_init_samples, self.config.seed)
            _, freq = evaluate(self.model, sample, self.run_config.eval_batch_size, return_frequencies=True)
            frequency = {"frequency": freq, "n_rows": int(sample.shape[0]), "rows": "training sample"}
        summary = {
            "n_steps": self.step_,
            "train_seconds": train_s,
            "train_dead_fraction": float(self.tracker.dead_mask().double().mean()),
            "train_fvu_last": self.history[-1]["fvu"] if self.history else None,
        }
        return {"heldout": jsonable(metrics), "train": summary}, frequency
