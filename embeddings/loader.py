"""Decoding images into batches for extraction: in DataLoader worker processes, or on threads in this process.

Every path yields the same batches: rows in the order given, skipped rows marked rather than dropped, the images of
a batch stacked channels-last as 8-bit tensors (``Backbone.image_transform``); the float conversion and
normalisation run later, once per batch, on the forward device.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.utils.data import DataLoader, Dataset

from embeddings.images import BadImage


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


class RowDataset(Dataset):
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


def collate(items):
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


def batches_in_process(dataset: RowDataset, batches: list[list[int]], pin: bool):
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
                batch = collate(list(pool.map(dataset.__getitem__, rows)))
            finally:
                torch.set_num_threads(n_threads)
            if pin and batch["images"] is not None:
                batch["images"] = batch["images"].pin_memory()
            yield batch


def batch_loader(dataset: RowDataset, batches: list[list[int]], num_workers: int, pin: bool):
    """The batches of ``dataset``: decoded by ``num_workers`` DataLoader worker processes, or in this process on
    threads (``batches_in_process``) when it is 0."""
    if not num_workers:
        return batches_in_process(dataset, batches, pin=pin)
    return DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=collate, pin_memory=pin,
                      prefetch_factor=4)
