"""One image at a time: its concepts, its nearest neighbours, and the concepts its neighbourhood shares.

``QueryEngine(store, sae, codes)`` loads once (codes are encoded in memory when no CodeStore is given) and answers
``query(row=...)`` or ``query_vector(x)`` (a new image's embedding, see ``embed_image``) with a JSON-ready dict
whose schema (``QUERY_SCHEMA``) is documented in the README. Neighbours come from every row of the store but the
query itself. The neighbourhood's union size is placed against random neighbourhoods of the same size as a
percentile: the share of random neighbourhoods that use more distinct concepts (100 means it shares concepts more
than every random one).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from analysis import neighbourhoods as nbh
from analysis.concepts.naming import ConceptNamer
from analysis.neighbours import NeighbourIndex, SparseCodes
from analysis.parents import check_parents, codes_in_memory
from analysis.spaces import SPACE_NAMES, all_codes, make_space
from artifacts import ArtifactError, read_json
from embeddings.store import EmbeddingStore
from sae.checkpoint import check_compatible, sae_hash
from sae.codes import CodeStore
from sae.model import TopKSAE

QUERY_SCHEMA = "ttt-concepts.query/1"
N_RANDOM = 200
"""Random neighbourhoods the query's union size is placed against."""


class QueryEngine:
    """Loads a store, an SAE and its codes once; answers per-image queries."""

    def __init__(self, store: EmbeddingStore, sae: TopKSAE, codes: CodeStore | None = None, seed: int = 0):
        self.notes = check_parents(store, sae, codes)
        if codes is None:
            codes = codes_in_memory(store, sae)
            self.notes.append("codes encoded on the fly (no --codes given)")
        self.store, self.sae, self.codes = store, sae, codes
        self.sparse = all_codes(codes)
        self.namer = ConceptNamer(codes, store.labels, store.classes)
        self.rng_seed = seed
        self._indexes: dict[str, tuple] = {}
        self._row_of_id: dict[str, int] | None = None

    # -- rows, ids and indexes ----------------------------------------------------------------------------
    def row_of(self, index: int | None = None, image_id: str | None = None) -> int:
        """The store row of ``--index`` or ``--id``, refusing one that is out of range or unknown."""
        if image_id is not None:
            if self._row_of_id is None:
                self._row_of_id = {str(i): r for r, i in enumerate(self.store.ids)}
            if image_id not in self._row_of_id:
                raise ValueError(f"--id {image_id!r} is not an image of store {self.store.store_dir}")
            return self._row_of_id[image_id]
        if index is None or not -self.store.n <= index < self.store.n:
            raise ValueError(f"--index {index} is out of range for store {self.store.store_dir} "
                             f"({self.store.n} rows: 0..{self.store.n - 1})")
        return int(index) % self.store.n

    def index(self, space_name: str):
        """``(space, NeighbourIndex)`` over every row, built on first use."""
        if space_name not in SPACE_NAMES:
            raise ValueError(f"--space must be one of {SPACE_NAMES}, got {space_name!r}")
        if space_name not in self._indexes:
            space = make_space(space_name, self.store, self.sae, self.codes)
            self._indexes[space_name] = (space, NeighbourIndex().fit(space.index_data()))
        return self._indexes[space_name]

    # -- queries ------------------------------------------------------------------------------------------
    def query(self, row: int, n_neighbours: int = 10, space: str = "embeddings") -> dict:
        """The answer for store row ``row`` (never its own neighbour)."""
        space_obj, index = self.index(space)
        values, indices = self.codes.codes([row])
        scores, rows = index.search(space_obj.queries([row]), n_neighbours, exclude=np.array([row]))
        return self._answer(values[0], indices[0], scores[0], rows[0], space,
                            {"row": int(row), "id": str(self.store.ids[row]), "label": self._label(row),
                             "split": self._split_of(row), "image_path": None})

    def query_vector(self, x: np.ndarray, n_neighbours: int = 10, space: str = "embeddings",
                     image_path: str | None = None) -> dict:
        """The answer for a new embedding ``x (d,)`` (e.g. from ``embed_image``); all rows are candidates."""
        x = np.asarray(x, dtype=np.float32).reshape(1, -1)
        check_compatible(self.sae, x.shape[1], f"the query embedding (width {x.shape[1]})")
        with torch.no_grad():
            v, i = self.sae.encode(torch.from_numpy(x))
            recon = self.sae.decode(v, i).numpy()
        values, indices = v.numpy()[0], i.numpy()[0].astype(np.int64)
        queries = {"embeddings": x, "reconstructions": recon,
                   "codes": SparseCodes(values[None], indices[None], self.codes.n_latents)}
        space_obj, index = self.index(space)
        scores, rows = index.search(queries[space], n_neighbours)
        return self._answer(values, indices, scores[0], rows[0], space,
                            {"row": None, "id": None, "label": None, "split": None, "image_path": image_path})

    def _answer(self, values, indices, scores, rows, space: str, query: dict) -> dict:
        n_nb = len(rows)
        concepts = [{"latent": int(latent), "activation": float(value), **self._concept(latent)}
                    for value, latent in zip(values, indices) if value > 0]
        neighbours = [{"rank": r + 1, "row": int(row), "id": str(self.store.ids[row]), "label": self._label(row),
                       "similarity": float(score)} for r, (row, score) in enumerate(zip(rows, scores))]
        return {
            "schema": QUERY_SCHEMA,
            "query": query,
            "space": space,
            "metric": "cosine",
            "n_neighbours": n_nb,
            "store": {"dir": str(self.store.store_dir), "n": self.store.n, "d": self.store.d},
            "sae": {"n_latents": self.codes.n_latents, "k": self.codes.k},
            "concepts": concepts,
            "neighbours": neighbours,
            "shared_concepts": self._shared(rows, {c["latent"] for c in concepts}),
            "union": self._union(rows, query["row"]),
            "notes": list(self.notes),
        }

    def _concept(self, latent: int) -> dict:
        d = self.namer.describe(int(latent), n_top=0)
        labels = d["all_labels"] or {}
        return {"frequency": d["frequency"], "n_images": d["n_images"], "description": d["description"],
                "top_label": labels.get("top_label"), "purity": labels.get("purity")}

    def _shared(self, rows: np.ndarray, own: set[int]) -> list[dict]:
        """Concepts used by at least two neighbours: how many use each, their summed activation, most used first."""
        values, indices = self.codes.codes(np.asarray(rows))
        active = values > 0
        counts = np.bincount(indices[active], minlength=self.codes.n_latents)
        mass = np.bincount(indices[active], weights=values[active], minlength=self.codes.n_latents)
        shared = np.flatnonzero(counts >= 2)
        shared = shared[np.lexsort((-mass[shared], -counts[shared]))]
        return [{"latent": int(latent), "n_neighbours_using": int(counts[latent]),
                 "fraction": float(counts[latent] / len(rows)), "summed_activation": float(mass[latent]),
                 "in_query": int(latent) in own, "description": self._concept(latent)["description"]}
                for latent in shared]

    def _union(self, rows: np.ndarray, query_row: int | None) -> dict:
        n_nb, k = len(rows), self.codes.k
        union = float(nbh.union_sizes(self.sparse, np.asarray(rows)[None])[0])
        queries = np.full(N_RANDOM, -1 if query_row is None else query_row, dtype=np.int64)
        random_rows = nbh.random_neighbourhoods(np.arange(self.store.n), queries, n_nb, self.rng_seed)
        random_union = nbh.union_sizes(self.sparse, random_rows)
        percentile = 100.0 * (np.mean(random_union > union) + 0.5 * np.mean(random_union == union))
        return {"size": int(union), "min": k, "max": n_nb * k,
                "random_mean": float(random_union.mean()),
                "random_se": float(random_union.std(ddof=1) / np.sqrt(N_RANDOM)),
                "random_n": N_RANDOM, "percentile": float(percentile)}

    def _label(self, row: int) -> str | None:
        label = int(self.store.labels[row])
        if label < 0:
            return None
        return self.store.classes[label] if label < len(self.store.classes) else str(label)

    def _split_of(self, row: int) -> str | None:
        return next((name for name, rows in self.store.split.items() if np.isin(row, rows)), None)


def embed_image(store: EmbeddingStore, image_path: str | os.PathLike, device: str = "cpu") -> np.ndarray:
    """A new image's embedding ``(d,)`` with the backbone, weights and preprocessing recorded in the store."""
    from embeddings.backbone import WeightsError, load_backbone
    from embeddings.images import BadImage, load_rgb

    try:
        image = load_rgb(image_path)
    except BadImage as e:
        raise ValueError(f"--image {image_path} cannot be decoded: {e}") from e
    meta, config = store.meta, store.config
    name, weights = meta.get("backbone"), config.get("weights")
    if not name or weights is None:
        raise ArtifactError(f"store {store.store_dir} does not record its backbone and weights; cannot embed --image")
    try:
        backbone = load_backbone(name, weights, output=meta.get("output_kind", "auto"),
                                 normalize=meta.get("normalize"), device=device)
    except WeightsError as e:
        raise ArtifactError(f"the backbone weights of store {store.store_dir} cannot be loaded: {e}") from e
    recorded = meta.get("weights_sha256")
    if recorded and backbone.info.get("weights_sha256") not in (None, recorded):
        raise ArtifactError(f"the weights at {weights} are not those store {store.store_dir} was extracted with "
                            "(SHA-256 differs)")
    with torch.no_grad():
        x = backbone.features(backbone.transform(image)[None].to(device))
    return x[0].cpu().numpy()


def format_text(answer: dict, n_shared: int = 10) -> str:
    """The human-readable form of a query answer."""
    q = answer["query"]
    who = f"row {q['row']} (id {q['id']}, label {q['label']}, split {q['split']})" if q["row"] is not None \
        else f"image {q['image_path']}"
    lines = [f"query: {who}", f"active concepts ({len(answer['concepts'])} of k={answer['sae']['k']}):"]
    for c in answer["concepts"]:
        lines.append(f"  concept {c['latent']:>5}  activation {c['activation']:.3f}  {c['description']}")
    lines.append(f"nearest {answer['n_neighbours']} neighbours in {answer['space']} (cosine):")
    for nb in answer["neighbours"]:
        lines.append(f"  #{nb['rank']:<3} row {nb['row']:>7}  id {nb['id']:<20} label {str(nb['label']):<10} "
                     f"similarity {nb['similarity']:.4f}")
    u = answer["union"]
    lines.append(f"the neighbourhood uses {u['size']} distinct concepts (bounds {u['min']}..{u['max']}); random "
                 f"neighbourhoods of the same size use {u['random_mean']:.1f} ± {u['random_se']:.1f} "
                 f"(n={u['random_n']}): percentile {u['percentile']:.0f} (share of random ones using more)")
    shared = answer["shared_concepts"]
    lines.append(f"concepts shared by two or more neighbours ({len(shared)}; top {min(n_shared, len(shared))}):")
    for c in shared[:n_shared]:
        mark = "*" if c["in_query"] else " "
        lines.append(f" {mark}concept {c['latent']:>5}  used by {c['n_neighbours_using']:>3} neighbours  summed "
                     f"activation {c['summed_activation']:.3f}  {c['description']}")
    if any(c["in_query"] for c in shared[:n_shared]):
        lines.append("  (* also active in the query)")
    for note in answer["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)
