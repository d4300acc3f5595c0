"""Extraction: a frozen backbone run over an image source, written to an EmbeddingStore.

The work is cut into fixed chunks of input rows (``embeddings/chunks.py``). Each process (one, or N under
``torchrun``) computes its chunks with a DataLoader whose workers decode and transform images, and writes each
chunk atomically into the store's partial directory. The per-image work stops at 8-bit tensors (decode, resize,
crop: ``Backbone.image_transform``); the float conversion and normalisation run once per batch on the forward
device (``Backbone.normalize_batch``). When every chunk exists, rank 0 assembles
``embeddings.npy`` through a memory map, writes the other store files and renames the directory into place.

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
import hashlib
import logging
import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from artifacts import (
    SCHEMA_VERSION,
    ArtifactError,
    check_replaceable,
    commit_dir,
    is_artifact_dir,
    lock,
    partial_dir,
    read_json,
)
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
from embeddings.images import BadImage
from embeddings.sources import open_source
from embeddings.store import EmbeddingStore, finish_store

log = logging.getLogger(__name__)

DTYPES = ("float32", "float16")
KILL_AFTER_CHUNK_ENV = "EMBEDDINGS_TEST_KILL_AFTER_CHUNK"
"""Test-only hook: when set to ``j``, the process SIGKILLs itself right after writing chunk ``j``, so that
tests can interrupt a run at a deterministic point. Never set it outside tests."""


class ExtractError(ArtifactError):
    """Extraction produced something that must not be stored (NaN or Inf embeddings)."""


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
    """Seed of the source's split, where the source makes one (--seed)."""
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


def default_num_workers(device_type: str) -> int:
    """Decode worker processes, 0 meaning decode in this process between forward passes (on threads).

    On CUDA the forward leaves the CPU free, so workers decode while the GPU computes: most of the cores. On
    CPU the forward and the decoding share the cores. A JPEG decode and resize costs a few milliseconds, a CNN
    forward tens, so one worker per ~4 cores keeps the model fed without stealing much; on 4 cores or fewer a
    worker process preempts threads of the forward and stalls it at its next barrier, and decoding in this
    process between batches is faster (``benchmarks/bench_extract.py --num-workers``).
    """
    n_cpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device_type == "cuda":
        return max(1, min(16, n_cpu - 1))
    return min(8, n_cpu // 4) if n_cpu > 4 else 0


# ----------------------------------------------------------------------------------------------- data loading


class _RowDataset(Dataset):
    """Input row -> (row, transformed image (uint8 for a split transform) or None, skip reason), run in DataLoader
    workers.

    A bad image is not an error here: the worker returns a skip marker so that one file cannot stop a run.
    """

    def __init__(self, source, transform):
        self.source = source
        self.transform = transform

    def __len__(self):
        return len(self.source)

    def __getitem__(self, row: int):
        try:
            image = self.source.load(row)
        except BadImage as e:
            return row, None, str(getattr(e, "reason", None) or e) or "unreadable"
        return row, self.transform(image), ""


def _collate(items):
    """Stack the good images of a batch; keep rows and skip reasons of all (no image for skipped rows).

    The batch is laid out channels-last, as the forward wants it. The ``(C, H, W)`` uint8 images are views of
    Pillow's ``(H, W, C)`` pixels, so stacking them in that order is a plain copy and permuting the stack back to
    ``(b, C, H, W)`` is free; a contiguous ``(C, H, W)`` image (the fallback float transform) is transposed here.
    """
    good = [t for _, t, _ in items if t is not None]
    return {
        "rows": torch.tensor([r for r, _, _ in items], dtype=torch.int64),
        "ok": torch.tensor([t is not None for _, t, _ in items], dtype=torch.bool),
        "reasons": [why for _, _, why in items],
        "images": torch.stack([t.permute(1, 2, 0) for t in good]).permute(0, 3, 1, 2) if good else None,
    }


def _batches_in_process(dataset: _RowDataset, batches: list[list[int]], pin: bool):
    """The batches decoded in this process, between forward passes, on as many threads as the forward uses.

    Without worker processes the cores would sit idle while one thread decodes; Pillow's decoders and resizes
    release the GIL, so a thread per core decodes a batch about that many times faster. ``map`` keeps the row
    order, so the batches are the same as with one thread. Torch runs one intra-op thread meanwhile: the
    transform's small tensor operations would otherwise be split over every thread of the forward pass, and the
    synchronisation costs far more than it saves (measured 40x slower per image on a busy 2-core machine).
    """
    n_decode = max(1, torch.get_num_threads())
    with ThreadPoolExecutor(max_workers=n_decode, thread_name_prefix="decode") as pool:
        for rows in batches:
            n_threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                batch = _collate(list(pool.map(dataset.__getitem__, rows)))
            finally:
                torch.set_num_threads(n_threads)
            if pin and batch["images"] is not None:
                batch["images"] = batch["images"].pin_memory()
            yield batch


# ----------------------------------------------------------------------------------------------- fingerprint


def _listing_sha256(source) -> str:
    """Hash of what the source lists (ids, labels, classes, split): a changed folder must not resume."""
    h = hashlib.sha256()
    for i in source.ids:
        h.update(_name_bytes(str(i)))
        h.update(b"\0")
    h.update(np.ascontiguousarray(np.asarray(source.labels, dtype=np.int64)).tobytes())
    h.update(_name_bytes("\0".join(source.classes)))
    for name in sorted(source.split or {}):
        h.update(name.encode())
        h.update(np.ascontiguousarray(np.asarray(source.split[name], dtype=np.int64)).tobytes())
    return h.hexdigest()


def _name_bytes(name: str) -> bytes:
    """The bytes of a file or folder name: a name that is not valid UTF-8 carries its bytes as surrogate escapes
    (``os.fsdecode``), which go back to exactly those bytes here instead of failing to encode."""
    return name.encode("utf-8", "surrogateescape")


def _state_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of a model's parameters and buffers (names, shapes, bytes), for weights that have no file."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _fingerprint(config: ExtractConfig, run: ExtractRun, source, info: dict, device: torch.device) -> dict:
    """Everything a chunk's bytes depend on. World size and worker count are deliberately absent."""
    return {
        "schema_version": SCHEMA_VERSION,
        "config": dataclasses.asdict(config),
        "source_n": len(source),
        "source_listing_sha256": _listing_sha256(source),
        "backbone": {k: info.get(k) for k in ("name", "weights_sha256", "preprocessing", "output_kind", "normalize", "d")},
        "chunk_size": run.chunk_size,
        "bf16": run.bf16,
        "device_type": device.type,
    }


def _existing_store_fingerprint(out_dir: Path) -> str | None:
    try:
        return read_json(out_dir / "meta.json").get("fingerprint")
    except (ArtifactError, AttributeError):
        return None


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
    # Random weights come from a generator seeded by the config, so that a resumed run, every rank and a rerun
    # build the same model; the caller's global RNG is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        backbone = load_backbone(
            config.backbone, weights=config.weights, output=config.output, normalize=config.normalize,
            device=str(device),
        )
    info = dict(backbone.info)
    if not info.get("weights_sha256"):
        info["weights_sha256"] = _state_sha256(backbone.model)
        info["weights_sha256_of"] = "state dict tensors (no weights file)"
    fingerprint = _fingerprint(config, run, source, info, device)
    digest = fingerprint_digest(fingerprint)
    t_loaded = time.perf_counter()

    # Rank 0 alone inspects and prepares the directories, then tells the others what it decided.
    decision, error = _GO, None
    if ranks.rank == 0:
        try:
            if out_dir.is_dir() and _existing_store_fingerprint(out_dir) == digest:
                decision = _DONE
            else:
                if os.path.lexists(out_dir) and not run.overwrite and is_artifact_dir(out_dir):
                    raise ArtifactError(
                        f"{out_dir} already holds a different store; pass --overwrite to replace it, or choose "
                        f"another --out"
                    )
                check_replaceable(out_dir, run.overwrite)  # a user's folder is never replaced
                resumed = claim_partial(work_dir, fingerprint, restart=run.overwrite)
                if resumed:
                    log.info("resuming the partial extraction in %s", work_dir)
        except Exception as e:  # told to the other ranks, then raised here
            decision, error = _REFUSED, e
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
    dataset = _RowDataset(source, backbone.image_transform)
    if num_workers:
        loader = DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=num_workers,
            collate_fn=_collate,
            pin_memory=on_cuda,
            prefetch_factor=4,
        )
    else:
        loader = _batches_in_process(dataset, batches, pin=on_cuda)
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
