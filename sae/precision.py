"""Which way a training run chooses its latents (``TopKSAE.precision``), decided once at the start.

``auto`` takes the bf16 filter (``sae/selection.py``) where bfloat16 matmuls are native and it measures
faster, and float32 elsewhere. Both choose the same latents with the same values, so the decision changes the
speed, not the model; only the auxiliary losses on dead latents run in bfloat16 after the filter. The record
(choice, reason, timings) goes into the SAE's ``meta.json``.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from sae.model import TopKSAE
from sae.schedule import PRECISION_CHOICES
from sae.selection import CPU_BLOCK_ROWS

SMALL_MACS = 2**28
"""Below this many multiply-adds per step in the encoder matmul (e.g. 1024 rows x 512 x 512) the matmul takes
a few milliseconds at most: ``auto`` keeps float32 without measuring, so small runs never depend on timing."""

GAIN = 1.15
"""``auto`` takes the filter only when it measures at least this much faster than float32: a margin against
timing noise, since the filter adds re-ranking and bfloat16 auxiliary losses."""

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16(device: torch.device) -> bool:
    """Whether bfloat16 matmuls run natively: a CUDA device that supports them, or a CPU with ``avx512_bf16``
    or AMX (oneDNN emulates bfloat16 with float32 arithmetic elsewhere, which is slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(cpu_flags() & set(NATIVE_BF16_FLAGS))


def choose_precision(requested: str, model: TopKSAE, x_sample: Tensor, batch_rows: int, k: int) -> dict:
    """The precision of a run: ``requested`` unless it is ``auto``; then measured on ``x_sample (m, d)``.

    ``batch_rows`` is this process's share of a batch; ``k`` the largest k of the run. Returns ``{"precision",
    "requested", "reason"}`` plus, when measured, the median milliseconds of each way on ``"rows"`` rows.
    """
    if requested not in PRECISION_CHOICES:
        raise ValueError(f"--precision must be one of {PRECISION_CHOICES}, got {requested!r}")
    record = {"requested": requested}
    if requested != "auto":
        return {**record, "precision": requested, "reason": "requested"}
    device = model.W_enc.device
    cfg = model.config
    macs = batch_rows * cfg.d_in * cfg.n_latents
    if model.W_enc.dtype != torch.float32:
        return {**record, "precision": "fp32", "reason": f"parameters are {model.W_enc.dtype}, not float32"}
    if not native_bf16(device):
        return {**record, "precision": "fp32", "reason": f"no native bfloat16 matmul on {device.type}"}
    if macs < SMALL_MACS:
        return {**record, "precision": "fp32", "reason": f"encoder matmul of {macs} multiply-adds per step is too "
                f"small to gain (threshold {SMALL_MACS})"}
    times = time_selection(model, x_sample[: min(batch_rows, 2 * CPU_BLOCK_ROWS)].to(device), k)
    faster = times["bf16_ms"] * GAIN < times["fp32_ms"]
    reason = (f"bf16 filter {times['bf16_ms']:.1f} ms against float32 {times['fp32_ms']:.1f} ms per "
              f"{times['rows']} rows (needs {GAIN}x)")
    return {**record, "precision": "bf16" if faster else "fp32", "reason": reason, **times}


def time_selection(model: TopKSAE, x: Tensor, k: int, repeats: int = 3) -> dict:
    """Median milliseconds of choosing the latents of ``x`` each way, interleaved, after one warm-up each."""
    before = model.precision
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    try:
        for i in range(repeats + 1):
            for precision in times:
                model.precision = precision
                _sync(x.device)
                t0 = time.perf_counter()
                model._selection(x, k)
                _sync(x.device)
                if i:  # the first round warms up
                    times[precision].append(1e3 * (time.perf_counter() - t0))
    finally:
        model.precision = before
    median = {p: sorted(t)[len(t) // 2] for p, t in times.items()}
    return {"fp32_ms": round(median["fp32"], 3), "bf16_ms": round(median["bf16"], 3), "rows": int(x.shape[0])}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
