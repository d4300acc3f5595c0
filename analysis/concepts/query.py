"""One image at a time: its concepts, its nearest neighbours, and the concepts its neighbourhood shares.

``QueryEngine(store, sae, codes)`` loads once (codes are encoded in memory when no CodeStore is given) and answers
``query(row=...)`` or ``query_vector(x)`` (a new image's embedding, see ``embed_image``) with a JSON-ready dict
whose schema (``QUERY_SCHEMA``) is documented in the README. Neighbours come from every row of the store but the
query itself, through each space's saved index (``analysis.space_index``: exact below a size, IVF with its
measured recall above it, built once beside the codes and reused). The neighbourhood's union size is placed
against random neighbourhoods of the same size as a percentile: the share of random neighbourhoods that use more
distinct concepts (100 means it shares concepts more than every random one). A query whose nearest similarity is
lower than that of 99% of the store's own rows is flagged as far from the store, with the evidence.

``sae`` may be a loaded ``TopKSAE``, an ``SAERecord`` or an SAE directory: with saved codes and a saved index an
answer needs no model, so torch is imported only when something must be encoded or decoded.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np

from analysis import neighbourhoods as nbh
from analysis.concepts.naming import ConceptNamer
from analysis.neighbours import SparseCodes
from analysis.parents import check_parents, codes_in_memory
from analysis.sae_record import SAERecord, as_record
from analysis.space_index import IndexSettings, SpaceIndex, open_space_index
from analysis.spaces import SPACE_NAMES
from artifacts import ArtifactError
from embeddings.store import EmbeddingStore
from sae.codes import CodeStore

QUERY_SCHEMA = "ttt-concepts.query/2"
N_RANDOM = 200
"""Random neighbourhoods the query's union size is placed against."""
FAR_PERCENTILE = 1.0
"""A query whose nearest similarity is at or below this percentile of the store's own nearest similarities is far."""


def default_index_dir(store: EmbeddingStore, codes: CodeStore | None) -> Path:
    """Where saved query indexes live: ``CODES_DIR-index`` beside the codes, else ``STORE_DIR-index``."""
    base = Path(codes.codes_dir) if codes is not None and Path(codes.codes_dir).is_dir() else Path(store.store_dir)
    return base.with_name(f"{base.name}-index")


class QueryEngine:
    """Loads a store, an SAE and its codes once; answers per-image queries.

    ``index_dir``: where each space's index is saved and found again (``"auto"``: ``default_index_dir``;
    ``None``: built in memory, never saved); ``settings``: how an index is chosen (``IndexSettings(exact=True)``
    for ``--exact``).
    """

    def __init__(self, store: EmbeddingStore, sae, codes: CodeStore | None = None, seed: int = 0, *,
                 index_dir: str | os.PathLike | None = "auto", settings: IndexSettings = IndexSettings()):
        _check_labels(store)
        record = SAERecord.read(sae) if isinstance(sae, (str, os.PathLike)) else as_record(sae)
        self._model = None if isinstance(sae, (str, os.PathLike, SAERecord)) else sae
        self.store, self.sae = store, record
        self.notes = check_parents(store, record, codes)
        index_root = default_index_dir(store, codes) if index_dir == "auto" else index_dir
        if codes is None:
            codes = codes_in_memory(store, self.model)
            self.notes.append("codes encoded on the fly (no --codes given)")
        # Plain views of the memory maps (no copy): numpy's memmap subclass costs more per small read than the read.
        self.codes, self.sparse = codes, SparseCodes(np.asarray(codes.values), np.asarray(codes.indices),
                                                     codes.n_latents)
        self.index_root = None if index_root is None else Path(index_root)
        self.settings, self.rng_seed = settings, seed
        self.namer = ConceptNamer(codes, store.labels, store.classes)
        self._indexes: dict[str, SpaceIndex] = {}
        self._row_of_id: dict[str, int] | None = None
        self._concepts: dict[int, dict] = {}  # descriptions asked for so far (they never change)
        self._random_unions: dict[int, np.ndarray] = {}  # random baseline per neighbourhood size

    @property
    def model(self):
        """The SAE itself, loaded on first need (encoding a new image, building the reconstructions index)."""
        if self._model is None:
            self._model = self.sae.load()
        return self._model

    # -- rows, ids and indexes ----------------------------------------------------------------------------
    def row_of(self, index: int | None = None, image_id: str | None = None) -> int:
        """The store row of ``--index`` or ``--id``, refusing one that is out of range or unknown."""
        if image_id is not None:
            if self._row_of_id is None:
                self._row_of_id = {str(i): r for r, i in enumerate(self.store.ids)}
            if image_id not in self._row_of_id:
                raise ValueError(f"--id {image_id!r} is not an image of store {self.store.store_dir}")
            return self._row_of_id[image_id]
        if index is None or not 0 <= index < self.store.n:
            raise ValueError(f"--index {index} is out of range for store {self.store.store_dir} "
                             f"({self.store.n} rows: 0..{self.store.n - 1})")
        return int(index)

    def index(self, space: str) -> SpaceIndex:
        """The saved index of ``space`` over every row (built and saved on first use)."""
        if space not in SPACE_NAMES:
            raise ValueError(f"--space must be one of {SPACE_NAMES}, got {space!r}")
        if space not in self._indexes:
            parents = self.parents(space)
            root = self.index_root if parents is not None else None
            self._indexes[space] = open_space_index(root, space, parents or {}, lambda: self.index_data(space),
                                                    self.settings)
        return self._indexes[space]

    def parents(self, space: str) -> dict | None:
        """The hashes of what the index of ``space`` indexes (``None``: nothing identifies it, never saved)."""
        parents = {"store_hash": self.store.content_hash}
        if space == "embeddings":
            return parents
        if self.sae.source_dir is None:
            return None
        # Reconstructions are decoded from the codes, so both indexes depend on them as well as on the SAE.
        return {**parents, "sae_hash": self.sae.weights_hash(), "codes": _codes_identity(self.codes)}

    def index_data(self, space: str):
        """What the index of ``space`` is fitted on: the store's memory map, decoded reconstructions, the codes."""
        if space == "embeddings":
            return self.store.x
        if space == "codes":
            return self.sparse
        return Reconstructions(self.model, self.codes)

    def features(self, space: str, rows) -> np.ndarray:
        """Dense float32 vectors of store ``rows`` in ``space`` as a head reads them (not normalised)."""
        rows = np.atleast_1d(np.asarray(rows, dtype=np.int64))
        if space == "embeddings":
            return np.asarray(self.store.x[rows], dtype=np.float32)
        if space == "codes":
            return self.codes.dense(rows)
        return Reconstructions(self.model, self.codes)[rows]

    # -- queries ------------------------------------------------------------------------------------------
    def query(self, row: int, n_neighbours: int = 10, space: str = "embeddings") -> dict:
        """The answer for store row ``row`` (never its own neighbour)."""
        index = self.index(space)
        if space == "embeddings":
            q = np.asarray(self.store.x[[row]], dtype=np.float32)
        elif space == "codes":
            q = self.sparse.take([row])
        else:
            q = index.index.vectors([row])
        own = self.sparse.take([row])
        scores, rows = index.search(q, n_neighbours, exclude=np.array([row]))
        return self._answer(own.values[0], own.indices[0], scores[0], rows[0], space,
                            {"row": int(row), "id": str(self.store.ids[row]), "label": self._label(row),
                             "split": self._split_of(row), "image_path": None})

    def encode(self, x: np.ndarray) -> dict:
        """A new embedding ``x (d,)`` in every space: ``{"embeddings", "reconstructions", "codes"}`` queries."""
        import torch

        x = np.asarray(x, dtype=np.float32).reshape(1, -1)
        self.sae.check_width(x.shape[1], f"the query embedding (width {x.shape[1]})")
        with torch.no_grad():
            v, i = self.model.encode(torch.from_numpy(x))
            recon = self.model.decode(v, i).numpy()
        return {"embeddings": x, "reconstructions": recon,
                "codes": SparseCodes(v.numpy(), i.numpy().astype(np.int64), self.codes.n_latents)}

    def query_vector(self, x: np.ndarray, n_neighbours: int = 10, space: str = "embeddings",
                     image_path: str | None = None) -> dict:
        """The answer for a new embedding ``x (d,)`` (e.g. from ``embed_image``); all rows are candidates."""
        queries = self.encode(x)
        scores, rows = self.index(space).search(queries[space], n_neighbours)
        codes = queries["codes"]
        return self._answer(codes.values[0], codes.indices[0], scores[0], rows[0], space,
                            {"row": None, "id": None, "label": None, "split": None, "image_path": image_path})

    def _answer(self, values, indices, scores, rows, space: str, query: dict) -> dict:
        concepts = [{"latent": int(latent), "activation": float(value), **self._concept(latent)}
                    for value, latent in zip(values, indices) if value > 0]
        neighbours = [{"rank": r + 1, "row": int(row), "id": str(self.store.ids[row]), "label": self._label(row),
                       "similarity": float(score)} for r, (row, score) in enumerate(zip(rows, scores))]
        shared = self._shared(rows, {c["latent"] for c in concepts})
        index = self.index(space)
        nearest = self._nearest(index, float(scores[0]), concepts, shared)
        return {
            "schema": QUERY_SCHEMA,
            "query": query,
            "space": space,
            "metric": "cosine",
            "n_neighbours": len(rows),
            "store": {"dir": str(self.store.store_dir), "n": self.store.n, "d": self.store.d},
            "sae": {"n_latents": self.codes.n_latents, "k": self.codes.k},
            "index": index.describe(),
            "concepts": concepts,
            "neighbours": neighbours,
            "label_counts": label_counts(n["label"] for n in neighbours),
            "shared_concepts": shared,
            "union": self._union(rows),
            "nearest": nearest,
            "prediction": None,
            "warnings": [far_warning(nearest)] if nearest["far"] else [],
            "notes": list(self.notes),
        }

    def _nearest(self, index: SpaceIndex, similarity: float, concepts: list[dict], shared: list[dict]) -> dict:
        """The query's nearest similarity against the store's own distribution, and how many of its concepts its
        neighbourhood shares (used by two or more neighbours)."""
        dist = index.quality["nearest_similarity"]
        percentile = index.nearest_percentile(similarity)
        return {"similarity": similarity, "store_percentile": percentile, "store_median": dist["median"],
                "store_p1": dist["p1"], "store_sample": index.quality["n_sample"],
                "far": percentile <= FAR_PERCENTILE,
                "query_concepts": len(concepts), "query_concepts_shared": sum(c["in_query"] for c in shared)}

    def _concept(self, latent: int) -> dict:
        latent = int(latent)
        if latent not in self._concepts:
            d = self.namer.describe(latent, n_top=0)
            labels = d["all_labels"] or {}
            self._concepts[latent] = {"frequency": d["frequency"], "n_images": d["n_images"],
                                      "description": d["description"], "top_label": labels.get("top_label"),
                                      "purity": labels.get("purity")}
        return dict(self._concepts[latent])

    def _shared(self, rows: np.ndarray, own: set[int]) -> list[dict]:
        """Concepts used by at least two neighbours: how many use each, their summed activation, most used first."""
        nb = self.sparse.take(np.asarray(rows))
        values, indices = nb.values, nb.indices
        active = values > 0
        latents, inverse = np.unique(indices[active], return_inverse=True)
        counts = np.bincount(inverse, minlength=latents.size)
        mass = np.bincount(inverse, weights=values[active], minlength=latents.size)
        keep = np.flatnonzero(counts >= 2)
        keep = keep[np.lexsort((-mass[keep], -counts[keep]))]
        return [{"latent": int(latents[j]), "n_neighbours_using": int(counts[j]),
                 "fraction": float(counts[j] / len(rows)), "summed_activation": float(mass[j]),
                 "in_query": int(latents[j]) in own, "description": self._concept(latents[j])["description"]}
                for j in keep]

    def _union(self, rows: np.ndarray) -> dict:
        n_nb, k = len(rows), self.codes.k
        union = float(nbh.union_sizes(self.sparse, np.asarray(rows)[None])[0])
        if n_nb not in self._random_unions:  # one baseline per size: it does not depend on the query
            random_rows = nbh.random_neighbourhoods(np.arange(self.store.n), np.full(N_RANDOM, -1), n_nb,
                                                    self.rng_seed)
            self._random_unions[n_nb] = nbh.union_sizes(self.sparse, random_rows)
        random_union = self._random_unions[n_nb]
        percentile = 100.0 * (np.mean(random_union > union) + 0.5 * np.mean(random_union == union))
        return {"size": int(union), "min": k, "max": n_nb * k,
                "random_mean": float(random_union.mean()),
                "random_se": float(random_union.std(ddof=1) / np.sqrt(N_RANDOM)),
                "random_n": N_RANDOM, "percentile": float(percentile)}

    def _label(self, row: int) -> str | None:
        label = int(self.store.labels[row])
        return None if label < 0 else self.store.classes[label]

    def _split_of(self, row: int) -> str | None:
        return next((name for name, rows in self.store.split.items() if np.any(rows == row)), None)


class Reconstructions:
    """Ψ̂ of store rows from their saved codes, ``decode(codes)`` (the codes are ``encode(x)``), batch by batch;
    indexable like an array, so that an index is fitted on it without holding every row."""

    def __init__(self, model, codes: CodeStore):
        self.model, self.codes = model, codes

    def __len__(self) -> int:
        return self.codes.n

    def __getitem__(self, rows) -> np.ndarray:
        import torch

        values, indices = self.codes.codes(np.atleast_1d(np.asarray(rows, dtype=np.int64)))
        with torch.no_grad():
            out = self.model.decode(torch.from_numpy(np.asarray(values, np.float32)),
                                    torch.from_numpy(indices.astype(np.int64)))
        return out.float().numpy()


def label_counts(labels) -> list[dict]:
    """``[{"label", "n"}]`` of a neighbourhood, most common first (ties in order of appearance; ``None``:
    unlabelled)."""
    return [{"label": label, "n": n} for label, n in Counter(labels).most_common()]


def far_warning(nearest: dict) -> str:
    """The warning of a query far from everything in the store, with its evidence."""
    return (f"this image is far from everything in the store: its nearest similarity {nearest['similarity']:.3f} "
            f"is lower than that of {100 - nearest['store_percentile']:.1f}% of the store's own rows (their "
            f"median {nearest['store_median']:.3f}, 1st percentile {nearest['store_p1']:.3f}, over "
            f"{nearest['store_sample']} rows), and its neighbourhood shares {nearest['query_concepts_shared']} of "
            f"its {nearest['query_concepts']} concepts: its neighbours and their labels say little about it")


def embed_image(store: EmbeddingStore, image_path: str | os.PathLike, device: str = "cpu") -> np.ndarray:
    """A new image's embedding ``(d,)`` with the backbone, weights and preprocessing recorded in the store."""
    import torch

    from embeddings.images import BadImage, load_rgb
    from embeddings.store_backbone import load_store_backbone

    try:
        image = load_rgb(image_path)
    except BadImage as e:
        raise ValueError(f"--image {image_path} cannot be decoded: {e}") from e
    # The very network the store was made with: its weights, or its random weights' seed, checked by their hash.
    backbone = load_store_backbone(store, device=device)
    with torch.no_grad():
        x = backbone.features(backbone.transform(image)[None].to(device))
    return x[0].cpu().numpy()


def _check_labels(store: EmbeddingStore) -> None:
    """Refuse labels outside ``-1 .. len(classes) - 1`` before any per-class count is allocated."""
    if store.n and (int(store.labels.min()) < -1 or int(store.labels.max()) >= len(store.classes)):
        raise ArtifactError(f"store {store.store_dir} holds labels {int(store.labels.min())}..."
                            f"{int(store.labels.max())} but names {len(store.classes)} classes; a label is -1 "
                            f"(unknown) or a class number: rebuild the store")


def _codes_identity(codes: CodeStore) -> dict:
    """What identifies the codes an index was built from: their recorded parents and, for a codes directory,
    the size and modification time of its arrays (re-encoded codes get a new index)."""
    out = {key: codes.meta.get(key) for key in ("sae_hash", "store_hash", "n", "k", "n_latents")}
    directory = Path(codes.codes_dir)
    if directory.is_dir():
        out["files"] = {name: [os.stat(directory / name).st_size, os.stat(directory / name).st_mtime_ns]
                        for name in ("indices.npy", "values.npy")}
    return out
