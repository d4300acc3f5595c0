"""Extraction: a frozen backbone run over an image source, written to an EmbeddingStore.

The work is cut into fixed chunks of input rows (``embeddings/chunks.py``). Each process (one, or N under
``torchrun``) computes its chunks with a DataLoader whose workers decode and transform images, and writes each
chunk atomically into the store's partial directory. The per-image work stops at 8-bit tensors (decode, resize,
crop: ``Backbone.image_transform``); the float conversion and normalisation run once per batch on the forward
device (``Backbone.normalize_batch``). When every chunk exists, rank 0 assembles
``embeddings.npy`` with ordinary writes into reserved space (a full disk is an error naming the file, never a
crash), writes the other store files and renames the directory into place. The settings are
``embeddings.extract_config``; decoding is ``embeddings.loader``; what a run is keyed by is
``embeddings.fingerprints``.

Determinism: batches never cross chunks and always have the configured size, so a resumed run, or a run with
any number of processes, feeds the model exactly the same batches and produces a byte-identical store (on the
same device type and torch build; thread counts are kept out of results by the batch layout, not guaranteed by
every BLAS, so the tests pin them).

Images that cannot be read are skipped: their rows are not in the store (``ids``, ``labels`` and ``split``
follow the kept rows; ``split`` indices refer to store rows) and ``skipped.json`` lists each with its reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import time

import numpy as np
import torch

from artifacts import ArtifactError, check_replaceable, commit_dir, is_artifact_dir, lock, partial_dir
from artifacts.ranks import Ranks, resolve_device
from embeddings.backbone import load_backbone
from embeddings.chunks import (
    CHUNKS_DIRNAME,
    ChunkPlan,
    assemble,
    claim_partial,
    done_chunks,
    fingerprint_digest,
    write_chunk,
)
from embeddings.extract_config import DTYPES, ExtractConfig, ExtractRun
from embeddings.fingerprints import existing_store_fingerprint, extraction_fingerprint
from embeddings.loader import RowDataset, batch_loader, default_num_workers
from embeddings.sources import open_source
from embeddings.store import EmbeddingStore, finish_store
from embeddings.weights import state_sha256

__all__ = ["DTYPES", "KILL_AFTER_CHUNK_ENV", "ExtractConfig", "ExtractError", "ExtractRun", "default_num_workers",
           "extract"]

log = logging.getLogger(__name__)

KILL_AFTER_CHUNK_ENV = "EMBEDDINGS_TEST_KILL_AFTER_CHUNK"
"""Test-only hook: when set to ``j``, the process SIGKILLs itself right after writing chunk ``j``, so that
tests can interrupt a run at a deterministic point. Never set it outside tests."""


class ExtractError(ArtifactError):
    """Extraction produced something that must not be stored (NaN or Inf embeddings)."""


# ----------------------------------------------------------------------------------------------- the stage

_GO, _DONE, _REFUSED = 0, 1, 2


def extract(config: ExtractConfig, run: ExtractRun) -> EmbeddingStore:
    """Extract the embeddings of ``config.source`` into a store at ``run.out_dir`` and open it.

    Resumes a partial extraction with the same settings; returns an existing identical store untouched; refuses
    to replace a different store without ``run.overwrite``. Under ``torchrun`` every rank calls this; chunks are
    split across ranks and rank 0 assembles the store.
    """
    if run.chunk_size % config.batch_size:
        raise ValueError(
            f"--chunk-size ({run.chunk_size}) must be a multiple of --batch-size ({config.batch_size}), so that "
            f"every run feeds the model the same batches"
        )
    t_start = time.perf_counter()
    ranks = Ranks.from_env(run.device)
    n_threads_before = torch.get_num_threads()
    try:
        return _extract(config, run, ranks, t_start)
    finally:
        torch.set_num_threads(n_threads_before)
        ranks.close()


def _extract(config: ExtractConfig, run: ExtractRun, ranks: Ranks, t_start: float) -> EmbeddingStore:
    device = resolve_device(run.device, ranks)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if run.n_threads is not None:
        torch.set_num_threads(run.n_threads)
    comm_device = device if device.type == "cuda" else torch.device("cpu")
    # Rank 0 holds the lock of --out for the whole run, taken first so that a second run, or a --out that is
    # a user's own folder, is refused at once, before anything loads; the other ranks learn whether it got it.
    refused = None
    if ranks.rank == 0:
        try:
            lock.acquire(run.out_dir)
        except ArtifactError as e:
            refused = e
        else:
            try:
                check_replaceable(run.out_dir, overwrite=True)  # raises only for what is never replaced
            except ArtifactError as e:
                lock.release(run.out_dir)
                refused = e
    if ranks.broadcast_int(_REFUSED if refused else _GO, comm_device) == _REFUSED:
        raise refused or ArtifactError(f"another run is writing {run.out_dir}; see rank 0's error message")
    try:
        return _extract_locked(config, run, ranks, t_start, device, comm_device)
    finally:
        if ranks.rank == 0:
            lock.release(run.out_dir)


def _extract_locked(config, run, ranks: Ranks, t_start: float, device, comm_device) -> EmbeddingStore:
    out_dir = run.out_dir
    work_dir = partial_dir(out_dir)

    source = open_source(
        config.source, kind=config.kind, seed=config.seed,
        val_fraction=config.val_fraction, test_fraction=config.test_fraction,
    )
    # Random weights are drawn from the config's seed, so that a resumed run, every rank, a rerun and a query that
    # rebuilds the backbone from the store (embeddings.store_backbone) get the same network.
    backbone = load_backbone(
        config.backbone, weights=config.weights, output=config.output, normalize=config.normalize,
        device=str(device), seed=config.seed,
    )
    info = dict(backbone.info)
    if not info.get("weights_sha256"):  # hub weights whose cached file was not found
        info["weights_sha256"] = state_sha256(backbone.model)
        info["weights_sha256_of"] = "state dict tensors (no weights file)"
    fingerprint = extraction_fingerprint(config, run, source, info, device)
    digest = fingerprint_digest(fingerprint)
    t_loaded = time.perf_counter()

    # Rank 0 alone inspects and prepares the directories, then tells the others what it decided.
    decision, error = _decide(run, fingerprint, digest) if ranks.rank == 0 else (_GO, None)
    decision = ranks.broadcast_int(decision, comm_device)
    if decision == _REFUSED:
        if error is not None:
            raise error
        raise ArtifactError(f"rank 0 refused to extract into {out_dir}; see its error message")
    if decision == _DONE:
        if ranks.rank == 0:
            log.info("%s already holds this extraction (same settings and inputs); nothing to do", out_dir)
            shutil.rmtree(work_dir, ignore_errors=True)
        return EmbeddingStore.open(out_dir)

    chunks_dir = work_dir / CHUNKS_DIRNAME
    plan = ChunkPlan(len(source), run.chunk_size)
    done = done_chunks(chunks_dir)
    todo = [c for c in plan.chunks_of_rank(ranks.rank, ranks.world_size) if c not in done]
    n_rows_run, waits = _compute_chunks(config, run, source, backbone, device, plan, todo, chunks_dir, ranks.rank)
    t_computed = time.perf_counter()

    ranks.barrier()
    if ranks.rank == 0:
        _finish(config, run, source, info, plan, work_dir, digest, ranks, device,
                timings={"load_s": t_loaded - t_start, "compute_s": t_computed - t_loaded, **waits},
                n_rows_run=n_rows_run, t_start=t_start)
    ranks.barrier()
    return EmbeddingStore.open(out_dir)


def _decide(run, fingerprint: dict, digest: str) -> tuple[int, Exception | None]:
    """Rank 0's decision: ``_DONE`` when ``run.out_dir`` already holds this extraction, ``_GO`` after preparing
    the partial directory (resumed when it holds the same extraction), ``_REFUSED`` with the error to raise."""
    out_dir, work_dir = run.out_dir, partial_dir(run.out_dir)
    try:
        if out_dir.is_dir() and existing_store_fingerprint(out_dir) == digest:
            return _DONE, None
        if os.path.lexists(out_dir) and not run.overwrite and is_artifact_dir(out_dir):
            raise ArtifactError(
                f"{out_dir} already holds a different store; pass --overwrite to replace it, or choose another --out"
            )
        check_replaceable(out_dir, run.overwrite)  # a user's folder is never replaced
        if claim_partial(work_dir, fingerprint, restart=run.overwrite):
            log.info("resuming the partial extraction in %s", work_dir)
    except Exception as e:  # told to the other ranks, then raised by rank 0
        return _REFUSED, e
    return _GO, None


def _compute_chunks(config, run, source, backbone, device, plan, todo, chunks_dir, rank) -> tuple[int, dict]:
    """Compute and write the chunks in ``todo``; returns how many input rows this process read, and the
    seconds spent waiting for decoded batches and in the forward pass (rank 0's view)."""
    if not todo:
        return 0, {}
    from tqdm import tqdm

    batches = [b for c in todo for b in plan.batches(c, config.batch_size)]
    n_rows = sum(len(b) for b in batches)
    num_workers = default_num_workers(device.type) if run.num_workers is None else run.num_workers
    on_cuda = device.type == "cuda"
    loader = batch_loader(RowDataset(source, backbone.image_transform), batches, num_workers, pin=on_cuda)
    model = backbone.model
    # Channels-last suits convolutions on CPU (oneDNN) and tensor cores alike; harmless for ViTs.
    model.to(memory_format=torch.channels_last)
    out_dtype = np.dtype(config.dtype)
    d = int(backbone.info["d"])
    kill_after = os.environ.get(KILL_AFTER_CHUNK_ENV)

    pending: dict[int, dict] = {}
    chunk_of = {c: len(plan.rows(c)) for c in todo}
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16) if run.bf16 else contextlib.nullcontext()
    )
    bar = tqdm(total=n_rows, unit="img", desc="extract", disable=not run.progress or rank != 0, smoothing=0.1)
    waits = {"data_wait_s": 0.0, "forward_s": 0.0}
    batch_iter = iter(loader)
    with torch.inference_mode(), autocast:
        while True:
            t0 = time.perf_counter()
            batch = next(batch_iter, None)
            t1 = time.perf_counter()
            waits["data_wait_s"] += t1 - t0
            if batch is None:
                break
            rows = batch["rows"].numpy()
            chunk = int(rows[0]) // plan.chunk_size
            acc = pending.setdefault(chunk, {"x": [], "ok": [], "reasons": [], "n": 0})
            ok = batch["ok"].numpy()
            if batch["images"] is not None:
                # uint8 crosses to the device (4x fewer bytes than float) and is normalised there, in one batched
                # pass. The collated batch is channels-last already; contiguous() only guards that.
                images = batch["images"].to(device, non_blocking=on_cuda).contiguous(memory_format=torch.channels_last)
                images = backbone.normalize_batch(images)
                feats = backbone.features(images).float().cpu().numpy().astype(out_dtype)
                _check_finite(feats, [source.ids[r] for r in rows[ok]], config.dtype)
                acc["x"].append(feats)
                waits["forward_s"] += time.perf_counter() - t1
            acc["ok"].append(ok)
            acc["reasons"] += batch["reasons"]
            acc["n"] += len(rows)
            bar.update(len(rows))
            if acc["n"] == chunk_of[chunk]:
                x = np.concatenate(acc["x"]) if acc["x"] else np.zeros((0, d), dtype=out_dtype)
                write_chunk(chunks_dir, chunk, x, np.concatenate(acc["ok"]), acc["reasons"])
                del pending[chunk]
                if kill_after is not None and int(kill_after) == chunk:
                    os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    assert not pending, f"chunks left incomplete: {sorted(pending)}"
    return n_rows, waits


def _check_finite(feats: np.ndarray, ids: list[str], dtype: str) -> None:
    bad = ~np.isfinite(feats).all(axis=1)
    if bad.any():
        names = [ids[i] for i in np.flatnonzero(bad)]
        hint = " (float16 overflows beyond ±65504: use --dtype float32)" if dtype == "float16" else ""
        raise ExtractError(
            f"the backbone produced NaN or Inf embeddings{hint} for {len(names)} image(s): "
            f"{', '.join(names[:20])}{' ...' if len(names) > 20 else ''}; check these images and the backbone's "
            f"weights; nothing was stored for their chunk"
        )


def _finish(config, run, source, info, plan, work_dir, digest, ranks, device, timings, n_rows_run, t_start) -> None:
    """Assemble the chunks into a complete store and rename it into place (rank 0)."""
    t0 = time.perf_counter()
    store_work = work_dir / "store"
    if store_work.exists():
        shutil.rmtree(store_work)
    store_work.mkdir()
    ok, reasons = assemble(work_dir / CHUNKS_DIRNAME, plan, store_work / "embeddings.npy", int(info["d"]), config.dtype)
    kept = np.flatnonzero(ok)
    store_row = np.full(len(ok), -1, dtype=np.int64)
    store_row[kept] = np.arange(kept.size)
    # Split indices refer to store rows; skipped inputs drop out of their split.
    split = {}
    for name, rows in (source.split or {}).items():
        mapped = store_row[np.asarray(rows, dtype=np.int64)]
        split[name] = mapped[mapped >= 0]
    ids = [str(i) for i in source.ids]
    # Files the source passed over (no image extension, outside class folders) are recorded too, after the rows.
    skipped = [{"id": ids[r], "reason": reasons[r]} for r in np.flatnonzero(~ok)]
    skipped += [{"id": str(e["id"]), "reason": str(e["reason"])} for e in getattr(source, "ignored", [])]
    timings["assemble_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    meta = {
        "stage": "extract",
        "fingerprint": digest,
        "backbone": info.get("name"),
        "backbone_info": info,
        "weights_source": info.get("weights_source"),
        "weights_sha256": info.get("weights_sha256"),
        "weights_seed": info.get("weights_seed"),
        "preprocessing": info.get("preprocessing"),
        "output_kind": info.get("output_kind"),
        "normalize": info.get("normalize"),
        "source": source.describe(),
        "n_inputs": len(source),
        "device": str(device),
        "bf16": run.bf16,
        "world_size": ranks.world_size,
        "timings": timings,
        # Throughput of this invocation's compute phase on rank 0, scaled by the number of processes.
        "images_per_s": (n_rows_run * ranks.world_size / timings["compute_s"]) if n_rows_run else None,
    }
    config_json = {
        **dataclasses.asdict(config),
        "run": {"chunk_size": run.chunk_size, "bf16": run.bf16, "device": str(device)},
    }
    finish_store(
        store_work,
        labels=np.asarray(source.labels, dtype=np.int64)[kept],
        ids=[ids[r] for r in kept],
        classes=list(source.classes),
        split=split,
        skipped=skipped,
        config=config_json,
        meta=meta,
    )
    commit_dir(store_work, run.out_dir, overwrite=run.overwrite)
    shutil.rmtree(work_dir, ignore_errors=True)
