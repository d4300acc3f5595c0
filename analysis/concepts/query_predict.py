"""What a global head and local TTT predict for one query, beside its neighbourhood's labels.

The head is either saved (``--head HEAD_DIR``, the format of ``analysis.heads.save_head``) or, with
``--predict``, trained once on the store's train split with the paper's recipe (``HeadConfig()``: linear, Adam
lr 1e-3, batch 250, 50 epochs) in the space the query searches, saved beside the query indexes under a key of
what it was trained on (store, SAE and codes hashes, recipe) and reused by every later query. A TTT study's own
head lives in its resumable cache and is removed when the study finishes, so a saved one must be exported with
``save_head`` to be passed here.

Local TTT follows the paper's protocol (``TTTConfig``: a fresh copy of the head's last layer, 50 full-batch Adam
steps at lr 1e-2) on the labelled neighbours the answer shows, so what a reader sees is what TTT trained on.
Everything here imports torch; a query that asks for no prediction never loads this module.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from analysis.heads import HeadConfig, head_outputs, load_head, save_head, train_head
from analysis.local_ttt import LocalTTT, TTTConfig, top_distribution
from artifacts import ArtifactError, LockHeld, read_json


def _width(engine, space: str) -> int:
    return engine.codes.n_latents if space == "codes" else engine.store.d


def _train_rows(engine) -> tuple[np.ndarray, str]:
    store = engine.store
    rows = np.asarray(store.split["train"]) if "train" in store.split else np.arange(store.n)
    rows = rows[store.labels[rows] >= 0]
    if rows.size == 0:
        raise ValueError(f"store {store.store_dir} has no labelled training rows: no head can be trained for "
                         "--predict; pass a saved one with --head HEAD_DIR")
    return np.sort(rows), "train split" if "train" in store.split else "every labelled row (no train split)"


def head_for(engine, space: str, head_dir: str | None = None):
    """``(head, info)``: the saved head at ``head_dir``, or the store's own (trained once, saved, reused)."""
    if head_dir is not None:
        head, info = load_head(head_dir_ok(head_dir)), {"path": str(head_dir), "trained": False, "reused": True}
    else:
        head, info = _store_head(engine, space)
    if head.config.task != "classification":
        raise ArtifactError(f"the head at {info['path']} is a {head.config.task} head; predictions need a "
                            "classification head")
    if head.n_inputs != _width(engine, space):
        raise ArtifactError(f"the head at {info['path']} reads {head.n_inputs} inputs, but the {space} space has "
                            f"width {_width(engine, space)}: pass the --space the head was trained in")
    return head, info


def _store_head(engine, space: str):
    rows, which = _train_rows(engine)
    config = HeadConfig()
    parents = engine.parents(space)
    key = json.dumps({"parents": parents, "head": asdict(config), "rows": which,
                      "n_classes": len(engine.store.classes)}, sort_keys=True)
    path = None if engine.index_root is None or parents is None else \
        engine.index_root / f"head-{space}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if path is not None and path.is_dir():
        if read_json(path / "meta.json").get("parents") != {"key": key}:
            raise ArtifactError(f"the head at {path} was trained on other data; delete {path} and it is retrained")
        return load_head(path), {"path": str(path), "trained": True, "reused": True, "rows": which}
    x = engine.sparse.take(rows) if space == "codes" else engine.features(space, rows)
    head = train_head(x, engine.store.labels[rows], config, n_outputs=len(engine.store.classes))
    info = {"path": None, "trained": True, "reused": False, "rows": which}
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_head(head, path, parents={"key": key})
            info["path"] = str(path)
        except (LockHeld, OSError, ArtifactError):
            pass  # kept in memory for this process: the path stays None in the answer
    return head, info


def predict(engine, answer: dict, query_features: np.ndarray, head, info: dict, seed: int = 0) -> dict:
    """The ``prediction`` block of ``answer``: global head, local TTT on the labelled neighbours, kNN vote."""
    classes = engine.store.classes
    rows = np.array([nb["row"] for nb in answer["neighbours"]], dtype=np.int64)
    labels = engine.store.labels[rows]
    rows, labels = rows[labels >= 0], labels[labels >= 0]
    if labels.size and int(labels.max()) >= head.n_outputs:
        raise ArtifactError(f"the head at {info['path']} has {head.n_outputs} outputs, but the store has labels up "
                            f"to {int(labels.max())}: use a head trained on this store's classes")
    q = np.asarray(query_features, dtype=np.float32).reshape(1, -1)
    top = top_distribution(head_outputs(head, q), 1)
    out = {"head": info, "n_labelled_neighbours": int(rows.size),
           "global": _choice(top["top_classes"][0, 0], top["top_probs"][0, 0], classes)}
    config = TTTConfig(n_neighbours=max(int(rows.size), 1), metric="cosine", impl="reference", seed=seed)
    if rows.size == 0:
        out["ttt"] = {"label": None, "probability": None, "steps": config.steps, "lr": config.lr,
                      "reason": "no labelled neighbour to train on"}
        out["knn"] = {"label": None}
        return out
    result = LocalTTT(head, config).fit(engine.features(answer["space"], rows), labels) \
        .predict(q, neighbours=np.arange(rows.size)[None])
    out["ttt"] = {**_choice(result.extras["top_classes"][0, 0], result.extras["top_probs"][0, 0], classes),
                  "steps": config.steps, "lr": config.lr}
    out["knn"] = {"label": _name(result.majority[0], classes)}
    return out


def _name(label, classes: list[str]) -> str:
    label = int(label)
    return classes[label] if label < len(classes) else str(label)


def _choice(label, probability, classes: list[str]) -> dict:
    return {"label": _name(label, classes), "probability": float(probability)}


def query_features(engine, answer: dict, x: np.ndarray | None = None) -> np.ndarray:
    """The query's features in its answer's space: a store row's, or those of a new embedding ``x``."""
    space = answer["space"]
    if answer["query"]["row"] is not None:
        return engine.features(space, [answer["query"]["row"]])
    encoded = engine.encode(x)[space]
    return encoded.dense() if space == "codes" else np.asarray(encoded)


def head_dir_ok(path) -> Path:
    """``--head HEAD_DIR`` refused early when it is not a saved head."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ArtifactError(f"--head {path} is not a saved head (no config.json); save one with "
                            "analysis.heads.save_head or use --predict to train one on the store")
    return path
