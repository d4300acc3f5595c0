"""The dense backend of ``NeighbourIndex``: embeddings Ψ and reconstructions Ψ̂, searched with FAISS.

Exact ``"Flat"`` by default, or any FAISS factory string (``"IVF1024,Flat"``, ``"HNSW32"``, ``"IVF1024,PQ64"`` ...)
with its search-time knobs (``nprobe``, ``ef_search``). Rows are prepared (float32, finite, unit norm for cosine)
and added ``ADD_BATCH`` at a time, so a memory map or a space computed on demand is never copied whole; an index
that needs training (IVF, PQ) is trained on a seeded sample of at most ``TRAIN_ROWS_PER_LIST`` rows per list.
An IVF index keeps its direct map, so that any indexed row's vector can be read back (``vectors``).

Saved as FAISS's own binary file (never pickled); ``load(..., mmap=True)`` maps it instead of reading it, so a
large index costs no load time and only the pages a query touches. ``exact_search`` is the plain brute-force
twin (a blockwise matrix product) that approximate indexes are measured against.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

INDEX_FILE = "index.faiss"
ADD_BATCH = 65536
"""Rows prepared and added at a time (bounded memory on any number of rows)."""
TRAIN_ROWS_PER_LIST = 64
"""Training rows per IVF list (FAISS asks for at least 39 and samples down to 256)."""
EXACT_BLOCK = 32768
"""Indexed rows per block of ``exact_search``'s matrix product."""
SCAN_MIN_QUERIES = 256
"""From this many queries in one call, a Flat index on the CPU is searched by ``scan_search`` (torch's matrix
product) instead of FAISS's own scan. Fewer queries stay with FAISS, so that a process asking one query never
imports torch (``scripts/query.py --json``)."""
SCAN_BLOCK = 16384
"""Indexed rows per block of ``scan_search``: a (1024, 16384) float32 block of scores is 64 MiB."""


def prepare(x, metric: str, row_numbers: np.ndarray | None = None, what: str = "the features") -> np.ndarray:
    """Rows as contiguous float32 ``(m, d)``, refused when not finite (naming ``what`` and the first bad row, by its
    number in ``row_numbers`` when given); unit rows for ``metric="cosine"``."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected an (n, d) array, got shape {x.shape}")
    bad = np.flatnonzero(~np.isfinite(x).all(1))
    if bad.size:
        first = int(bad[0] if row_numbers is None else row_numbers[bad[0]])
        raise ValueError(f"{what} hold NaN or Inf in {bad.size} of {len(x)} rows, the first row {first}; re-extract "
                         "the store or drop those rows")
    if metric == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def take(data, rows: np.ndarray | None, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of ``data`` (all rows) or of ``data[rows]``: arrays, memory maps or spaces."""
    if rows is not None:
        return np.asarray(data[rows[start:stop]])
    return np.asarray(data[start:stop] if isinstance(data, np.ndarray) else data[np.arange(start, stop)])


def _numbers(rows: np.ndarray | None, start: int, stop: int) -> np.ndarray:
    return np.arange(start, stop) if rows is None else np.asarray(rows[start:stop])


def _what(data) -> str:
    """How an error names indexed data: its file when it is a memory map (a store's embeddings.npy)."""
    filename = getattr(data, "filename", None)
    return f"the rows of {filename}" if filename else "the indexed features"


class DenseIndex:
    """A FAISS index over prepared rows; positions are the order rows were added in."""

    def __init__(self, metric: str, factory: str, *, nprobe: int | None = None, ef_search: int | None = None,
                 device: str = "cpu"):
        self.metric, self.factory, self.device = metric, factory, device
        self.nprobe, self.ef_search = nprobe, ef_search

    def fit(self, data, rows: np.ndarray | None, seed: int = 0) -> "DenseIndex":
        n = len(data) if rows is None else rows.size
        first = prepare(take(data, rows, 0, min(ADD_BATCH, n)), self.metric, _numbers(rows, 0, min(ADD_BATCH, n)),
                        _what(data))
        self.dim_ = int(first.shape[1])
        index = self._make()
        if not index.is_trained:
            self._train(index, data, rows, n, seed)
        if isinstance(index, faiss.IndexFlatCodes) and n > ADD_BATCH:
            # Sized once: added batch by batch, its storage (a std::vector) would grow by doubling and, at the
            # last growth, hold the old buffer beside the new one (1.8 times the index at its peak).
            index.codes.resize(n * index.code_size)
            index.codes.resize(0)                                # the capacity stays
        index.add(first)
        for start in range(ADD_BATCH, n, ADD_BATCH):
            stop = min(start + ADD_BATCH, n)
            index.add(prepare(take(data, rows, start, stop), self.metric, _numbers(rows, start, stop), _what(data)))
        ivf = _ivf(index)
        if ivf is not None:
            ivf.make_direct_map()  # vectors(rows) of an IVF index: reconstruct needs the row -> list map
        self.index_ = self._to_device(index)
        self.apply_search_parameters()
        return self

    def _make(self):
        faiss_metric = faiss.METRIC_INNER_PRODUCT if self.metric == "cosine" else faiss.METRIC_L2
        try:
            return faiss.index_factory(self.dim_, self.factory, faiss_metric)
        except RuntimeError as e:
            raise ValueError(f"--factory {self.factory!r} is not a FAISS index factory string "
                             f"({str(e).strip().splitlines()[-1]})") from e

    def _train(self, index, data, rows, n: int, seed: int) -> None:
        ivf = _ivf(index)
        n_train = n if ivf is None else min(n, max(TRAIN_ROWS_PER_LIST * ivf.nlist, 256))
        # A seeded sample, read in row order (sequential on a memory map).
        pick = np.sort(np.random.default_rng(seed).choice(n, n_train, replace=False)) if n_train < n else None
        source = rows if pick is None or rows is None else rows[pick]
        sample = take(data, source if source is not None else pick, 0, n_train)
        try:
            index.train(prepare(sample, self.metric))
        except RuntimeError as e:
            raise ValueError(f"the FAISS index {self.factory!r} cannot be trained on {n_train} rows "
                             f"({str(e).strip().splitlines()[-1]}); use fewer lists/codes or 'Flat'") from e

    def _to_device(self, index):
        if self.device == "cpu":
            return index
        if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
            raise ValueError("--device cuda needs the FAISS GPU build (faiss-gpu) and a visible GPU; "
                             "this FAISS has no GPU support here: use --device cpu")
        self._gpu_resources = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(self._gpu_resources, 0, index)

    def apply_search_parameters(self) -> None:
        space = faiss.GpuParameterSpace() if self.device == "cuda" else faiss.ParameterSpace()
        for name, flag, value in (("nprobe", "--nprobe", self.nprobe), ("efSearch", "--ef-search", self.ef_search)):
            if value is None:
                continue
            try:
                space.set_index_parameter(self.index_, name, value)
            except RuntimeError as e:
                raise ValueError(f"{flag} does not apply to the FAISS index {self.factory!r}") from e

    @property
    def n_lists(self) -> int | None:
        """Lists of an IVF index (the most ``nprobe`` can usefully be), else ``None``."""
        ivf = _ivf(self.index_ if self.device == "cpu" else None)
        return None if ivf is None else int(ivf.nlist)

    def batches(self, queries, m: int, batch_size: int):
        yield from ((s, min(s + batch_size, m)) for s in range(0, m, batch_size))

    def search(self, q, want: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, positions)`` of the ``want`` nearest indexed rows of each query row."""
        q = prepare(q, self.metric)
        if q.shape[1] != self.dim_:
            raise ValueError(f"queries have width {q.shape[1]}, the index {self.dim_}")
        rows = flat_rows(self.index_) if self.device == "cpu" and len(q) >= SCAN_MIN_QUERIES else None
        if rows is not None and want <= len(rows):
            return scan_search(rows, q, want, self.metric)
        scores, pos = self.index_.search(q, want)
        if (pos < 0).any():
            raise RuntimeError(f"the FAISS index {self.factory!r} found fewer than {want} neighbours; "
                               "raise nprobe or use the exact 'Flat' index")
        return scores, pos

    def vectors(self, positions) -> np.ndarray:
        """The indexed (prepared) vectors at ``positions``, ``(m, dim)``: exact for Flat, IVF-Flat and HNSW-Flat,
        the decoded approximation for compressed codes (PQ, SQ)."""
        positions = np.asarray(positions, dtype=np.int64)
        return np.stack([self.index_.reconstruct(int(p)) for p in positions]) if positions.size else \
            np.zeros((0, self.dim_), np.float32)

    def save(self, work_dir: Path) -> None:
        cpu = faiss.index_gpu_to_cpu(self.index_) if self.device == "cuda" else self.index_
        faiss.write_index(cpu, str(work_dir / INDEX_FILE))

    @classmethod
    def load(cls, index_dir: Path, cfg: dict, dim: int, *, device: str = "cpu", mmap: bool = False) -> "DenseIndex":
        self = cls(cfg["metric"], cfg["factory"], nprobe=cfg["nprobe"], ef_search=cfg["ef_search"], device=device)
        self.dim_ = dim
        # IO_FLAG_MMAP_IFC maps flat codes and IVF lists alike; with IO_FLAG_MMAP as well FAISS refuses IVF.
        flags = getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP) if mmap and device == "cpu" else 0
        self.index_ = self._to_device(faiss.read_index(str(index_dir / INDEX_FILE), flags))
        self.apply_search_parameters()
        return self


def _ivf(index):
    """The IVF layer of ``index`` (or ``None`` when it has none)."""
    if index is None:
        return None
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def flat_rows(index) -> np.ndarray | None:
    """The rows a FAISS Flat index stores, as an ``(n, d)`` float32 view of its own memory (no copy; a memory-
    mapped index stays mapped), or ``None`` for any other index."""
    if not isinstance(index, faiss.IndexFlat) or index.ntotal == 0:
        return None
    return faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)


def scan_search(rows: np.ndarray, q: np.ndarray, want: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """FAISS Flat's answer, ``(scores, positions)`` nearest first (cosine, or squared L2 distance), computed by
    blocks of ``SCAN_BLOCK`` rows through torch's matrix product and a running top-``want``.

    Why: FAISS's CPU wheel scans with its bundled BLAS several times slower than torch's matrix product (1,024
    queries over 100,000 rows of width 512 on 2 cores: 3.0 s against 0.85 s, of which 0.6 s the product at 175
    GFLOP/s), and the exact searches of a run at ImageNet's size are tens of TFLOP (50,000 TTT queries over 1.23M
    rows: 63). Ties are broken towards the lower position, as in ``exact_search``, this function's plain twin.
    """
    import torch

    qt = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32))
    m = qt.shape[0]
    best_s, best_r = torch.empty(m, 0), torch.empty(m, 0, dtype=torch.int64)
    for start in range(0, len(rows), SCAN_BLOCK):
        block = torch.from_numpy(rows[start:start + SCAN_BLOCK])
        s = qt @ block.T                                        # higher is nearer: the cosine, or
        if metric != "cosine":                                  # 2 q·x − |x|², the squared distance less |q|²
            s.mul_(2).sub_(block.pow(2).sum(1))
        s, r = torch.topk(s, min(want, s.shape[1]), dim=1)
        s, r = torch.cat([best_s, s], 1), torch.cat([best_r, r.add_(start)], 1)
        best_s, keep = torch.topk(s, min(want, s.shape[1]), dim=1)
        best_r = r.gather(1, keep)
    order = torch.sort(best_r, dim=1).indices                      # lower position first among equal scores
    best_s, best_r = best_s.gather(1, order), best_r.gather(1, order)
    order = torch.sort(best_s, dim=1, descending=True, stable=True).indices
    best_s, best_r = best_s.gather(1, order), best_r.gather(1, order)
    if metric != "cosine":
        best_s = qt.pow(2).sum(1, keepdim=True) - best_s
    return best_s.numpy(), best_r.numpy()


def exact_search(data, queries: np.ndarray, want: int, metric: str = "cosine",
                 exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Brute force: ``(scores, rows)`` of the ``want`` nearest rows of ``data`` (all of it, read ``EXACT_BLOCK``
    rows at a time) for each query, nearest first; ``exclude`` ``(m,)``: a row never
    returned for each query (cosine, or squared L2 distance)."""
    q = prepare(queries, metric)
    m, n = q.shape[0], len(data)
    drop = None if exclude is None else np.asarray(exclude, dtype=np.int64)[:, None]
    best_s, best_r = np.zeros((m, 0), dtype=np.float32), np.zeros((m, 0), dtype=np.int64)
    for start in range(0, n, EXACT_BLOCK):
        block = prepare(take(data, None, start, min(start + EXACT_BLOCK, n)), metric)
        s = q @ block.T  # "higher is nearer": the cosine, or minus the squared distance
        if metric != "cosine":
            s = 2 * s - (q * q).sum(1, keepdims=True) - (block * block).sum(1)[None]
        r = np.arange(start, start + len(block), dtype=np.int64)[None].repeat(m, 0)
        if drop is not None:
            s[r == drop] = -np.inf
        if s.shape[1] > want:  # only the block's best want can enter the result
            keep = np.argpartition(-s, want - 1, axis=1)[:, :want]
            s, r = np.take_along_axis(s, keep, 1), np.take_along_axis(r, keep, 1)
        s, r = np.concatenate([best_s, s], 1), np.concatenate([best_r, r], 1)
        order = np.lexsort((r, -s), axis=1)[:, :want]
        best_s, best_r = np.take_along_axis(s, order, 1), np.take_along_axis(r, order, 1)
    return (best_s if metric == "cosine" else -best_s).astype(np.float32), best_r
