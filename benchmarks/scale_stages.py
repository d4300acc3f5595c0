"""The stages of the scale rehearsal (``bench_scale.py``), each run in a process of its own.

Each stage drives the toolkit's real code on the generated store, in the order the imagenet-clip preset runs it:
store → SAE training (``train_sae_on_store``) → encoding (``encode_store``) → concept study (``concept_study``) →
local TTT (``LocalTTT`` with the resumable chunked ``analysis.ttt.chunks.evaluate``), then ``scripts/query.py``
(spawned by the driver). A stage returns a JSON record: what it measured and the largest single allocation it
makes, stated from the code it runs (with the sizes of this run).
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import numpy as np

PAPER_TRAIN_ROWS = 1_231_167
"""The paper's SAE training rows (ImageNet train minus 50 per class)."""
N_LATENTS, K, N_NEIGHBOURS = 4096, 16, 50


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:,.0f} MiB" if n_bytes < 2**30 else f"{n_bytes / 2**30:.2f} GiB"


def flat_index(n_rows: int, d: int) -> str:
    """A FAISS Flat index of ``n_rows`` float32 rows as ``analysis/dense_index.py`` builds it: its storage sized
    once, then filled 65,536 rows at a time."""
    return f"FAISS Flat storage ({n_rows:,}, {d}) float32 = {mib(n_rows * d * 4)}, sized once"


def paths(work: Path) -> dict[str, Path]:
    """Where each stage writes, under the work directory."""
    names = ("store", "sae", "codes", "concepts", "ttt", "ttt-head", "ttt-chunks", "ttt-exact", "query",
             "sae-uninterrupted", "records")
    return {name: work / name for name in names} | {"index": work / "codes-index"}


def spec_of(args):
    from scale_data import ScaleData

    classes = args.classes if args.classes else min(1000, max(2, args.rows // 100))
    return ScaleData(n=args.rows, n_classes=classes, dtype=args.dtype, seed=args.seed)


# -- store --------------------------------------------------------------------------------------------------
def stage_store(args, work: Path) -> dict:
    from scale_data import BLOCK_ROWS, write_scale_store

    spec = spec_of(args)
    store = write_scale_store(paths(work)["store"], spec)
    itemsize = np.dtype(spec.dtype).itemsize
    return {"n": store.n, "d": store.d, "dtype": spec.dtype, "classes": spec.n_classes,
            "split": {k: int(len(v)) for k, v in store.split.items()},
            "largest": f"one generated block ({BLOCK_ROWS}, {spec.d}) float32 and its noise, "
                       f"{mib(BLOCK_ROWS * spec.d * 4)} each; ids: {store.n:,} strings; rows written as "
                       f"{spec.dtype} ({mib(store.n * spec.d * itemsize)} on disk, never in memory)"}


def _store(work: Path):
    from embeddings.store import EmbeddingStore

    return EmbeddingStore.open(paths(work)["store"])


# -- SAE ----------------------------------------------------------------------------------------------------
def train_config(args, precision: str = "auto"):
    from sae.train import TrainConfig

    return TrainConfig(n_steps=args.sae_steps, seed=args.seed, precision=precision)


def stage_sae(args, work: Path, out_key: str = "sae", precision: str = "auto") -> dict:
    from analysis.run.store_stages import sae_config_for_store, train_sae_on_store
    from sae.train import RunConfig

    store = _store(work)
    config = sae_config_for_store(store.d, n_latents=N_LATENTS, k=K)
    run = RunConfig(checkpoint_every=args.checkpoint_every, log_every=100, progress=False, device=args.device)
    result, heldout = train_sae_on_store(store, paths(work)[out_key], config, train_config(args, precision), run,
                                         resume=out_key == "sae", overwrite=out_key != "sae")
    train = result.metrics.get("train", {})
    steps, seconds = int(train.get("n_steps", args.sae_steps)), float(train.get("train_seconds", 0.0))
    rate = steps / seconds if seconds else float("nan")
    paper_steps = -(-100 * PAPER_TRAIN_ROWS // 4096)
    n_held = min(len(store.split.get(heldout, [])) or 0, 100_000)
    return {"steps": steps, "train_seconds": seconds, "steps_per_s": rate, "resumed_from_step": result.resumed_from_step,
            "paper_steps": paper_steps, "paper_hours": paper_steps / rate / 3600 if rate == rate else None,
            "heldout": result.metrics.get("heldout", {}), "precision": _sae_precision(paths(work)[out_key]),
            "largest": f"held-out rows for the final metrics ({n_held:,}, {store.d}) float32 "
                       f"({mib(n_held * store.d * 4)}); per step a (4096, {store.d}) batch and (1024, {N_LATENTS}) "
                       f"float32 pre-activation blocks ({mib(1024 * N_LATENTS * 4)})"}


def _sae_precision(sae_dir: Path) -> str:
    from artifacts import read_json

    record = read_json(sae_dir / "meta.json").get("precision") or {}
    return str(record.get("precision", "fp32"))


# -- codes --------------------------------------------------------------------------------------------------
def stage_codes(args, work: Path) -> dict:
    from analysis.run.chain import sae_quality
    from analysis.run.store_stages import encode_store
    from embeddings.store import EmbeddingStore
    from sae.checkpoint import load_sae

    p = paths(work)
    t = time.perf_counter()
    EmbeddingStore.open(p["store"], verify=True)  # what encode_store does first, timed apart from the encoding
    verify_s = time.perf_counter() - t
    t = time.perf_counter()
    codes = encode_store(p["store"], p["sae"], p["codes"], overwrite=True, verify_store=False,
                         device=args.device)
    encode_s = time.perf_counter() - t
    quality = sae_quality(_store(work), load_sae(p["sae"]), codes)
    n = codes.n
    return {"n": n, "verify_seconds": verify_s, "encode_seconds": encode_s, "rows_per_s": n / encode_s,
            "fvu": quality["fvu"], "dead_fraction": quality["dead_fraction"],
            "largest": f"codes firing summary: indices of the active entries ({n * K:,},) int64 "
                       f"({mib(n * K * 8)}); per batch (1024, {N_LATENTS}) float32 pre-activation blocks; "
                       f"indices/values/inverted lists are written through memory maps"}


# -- concepts -----------------------------------------------------------------------------------------------
def stage_concepts(args, work: Path) -> dict:
    from analysis.concepts.sharing import ConceptConfig, concept_study
    from artifacts import building, write_json
    from sae.checkpoint import load_sae
    from sae.codes import CodeStore

    p = paths(work)
    store, sae, codes = _store(work), load_sae(p["sae"]), CodeStore.open(p["codes"])
    n_test, n_train = len(store.split["test"]), len(store.split["train"])
    config = ConceptConfig(n_queries=min(args.concept_queries, n_test), probe=args.probe_epochs > 0,
                           probe_epochs=max(1, args.probe_epochs), umap=args.umap, seed=args.seed,
                           device=args.device)
    with building(p["concepts"], overwrite=True) as out:
        result = concept_study(store, sae, codes, config, out)
        plots = {k: Path(v).name for k, v in result.pop("plots", {}).items()}
        write_json(out / "result.json", {"metrics": result, "plots": plots})
    sharing, down = result["sharing"], result["downstream"]
    pick = {"union_concepts_mean": sharing["union_concepts_mean"],
            "union_concepts_random": sharing["union_concepts_random"],
            "union_concepts_same_label": sharing["union_concepts_same_label"],
            "o1_distance": sharing["o1_distance"]}
    pick.update({k: down[k] for k in ("acc_raw", "acc_recon", "acc_codes") if k in down})
    m = config.n_queries
    return {"n_queries": m, "metrics": pick, "probe_epochs": args.probe_epochs, "umap": args.umap,
            "largest": f"the train pool's {flat_index(n_train, store.d)} (embeddings, then reconstructions)"
                       + (f"; the probes' features of the pool, ({n_train:,}, {store.d}) float32" if args.probe_epochs
                          else "") + f"; per space ({m:,}, {N_NEIGHBOURS}) int64 neighbours; code space searched "
                       f"through inverted lists, never a dense ({store.n:,}, {N_LATENTS}) array"}


# -- TTT ----------------------------------------------------------------------------------------------------
def ttt_data(work: Path):
    """``(x_train, y_train, x_test, y_test)``: in-memory float32 copies, as the TTT study makes them
    (``space.queries``); the store's memory map is closed before the index copies the rows."""
    from analysis.spaces import embedding_space

    store = _store(work)
    train, test = np.sort(store.split["train"]), np.sort(store.split["test"])
    labels = np.asarray(store.labels)
    space = embedding_space(store)
    data = space.rows(train), labels[train], space.rows(test), labels[test]
    del space, store
    gc.collect()
    return data


def ttt_head(args, work: Path, x_train, y_train):
    """The global linear head, trained once (the paper's recipe for ``--head-epochs``) and kept for resumes."""
    from analysis.heads import HeadConfig, load_head, save_head, train_head

    head_dir = paths(work)["ttt-head"]
    if not (head_dir / "meta.json").is_file():
        head = train_head(x_train, y_train, HeadConfig(epochs=args.head_epochs, seed=args.seed),
                          n_outputs=int(y_train.max()) + 1, device=args.device)
        save_head(head, head_dir, overwrite=True)
    return load_head(head_dir)


def ttt_config(args, impl: str):
    from analysis.local_ttt import TTTConfig

    return TTTConfig(n_neighbours=N_NEIGHBOURS, impl=impl, precision=args.ttt_precision, seed=args.seed)


def stage_ttt(args, work: Path) -> dict:
    from analysis.local_ttt import LocalTTT
    from analysis.stats import accuracy, paired_difference
    from analysis.ttt.chunks import evaluate
    from artifacts import building, write_json

    p = paths(work)
    x_train, y_train, x_test, y_test = ttt_data(work)
    t = time.perf_counter()
    head = ttt_head(args, work, x_train, y_train)
    head_s = time.perf_counter() - t
    ttt = LocalTTT(head, ttt_config(args, "fast"), device=args.device).fit(x_train, y_train)
    done_before = len(list(p["ttt-chunks"].glob("chunk_*.npz"))) if p["ttt-chunks"].is_dir() else 0
    fingerprint = {"rows": args.rows, "seed": args.seed, "dtype": args.dtype, "config": repr(ttt.config)}
    p["records"].mkdir(parents=True, exist_ok=True)
    (p["records"] / "ttt.eval_started").write_text(repr(time.time()))
    t = time.perf_counter()
    r = evaluate(ttt, x_test, chunk_dir=p["ttt-chunks"], chunk_size=args.chunk_size, fingerprint=fingerprint,
                 log=lambda line: print(line, flush=True))
    eval_s = time.perf_counter() - t
    search_share = _search_share(ttt, x_test[:min(args.chunk_size, len(x_test))])
    ok, glob_ok, maj_ok = r.predictions == y_test, r.global_predictions == y_test, r.majority == y_test
    m, n_train = len(y_test), len(y_train)
    record = {"n_queries": m, "eval_seconds": eval_s, "head_seconds": head_s, "chunks_reused": done_before,
              "search_share": search_share,
              "chunk_size": args.chunk_size, "precision": ttt.precision_["precision"],
              "global_acc": accuracy(glob_ok), "ttt_acc": accuracy(ok), "majority_acc": accuracy(maj_ok),
              "gain": paired_difference(ok, glob_ok),
              "largest": f"the train features ({n_train:,}, {x_train.shape[1]}) float32 ({mib(x_train.nbytes)}) "
                         f"held by LocalTTT, and the {flat_index(n_train, x_train.shape[1])}"}
    with building(p["ttt"], overwrite=True) as out:
        np.savez(out / "result.npz", predictions=r.predictions, neighbours=r.neighbours, labels=y_test)
        write_json(out / "result.json", record)
    return record


def _search_share(ttt, x) -> float:
    """The exact neighbour search's share of ``LocalTTT.predict`` on the queries ``x`` (one chunk), measured after
    the evaluation so as not to disturb it: the search alone, then TTT on the neighbours found."""
    t = time.perf_counter()
    neighbours = ttt.neighbours(x)
    search_s = time.perf_counter() - t
    t = time.perf_counter()
    ttt.predict(x, neighbours=neighbours)
    return search_s / (search_s + time.perf_counter() - t)


def stage_ttt_exact(args, work: Path) -> dict:
    """Exact mode on a seeded sample of the test queries, on the fast run's neighbourhoods: agreement, accuracies."""
    from analysis.local_ttt import LocalTTT
    from analysis.stats import accuracy, paired_difference
    from artifacts import building, write_json

    p = paths(work)
    x_train, y_train, x_test, y_test = ttt_data(work)
    head = ttt_head(args, work, x_train, y_train)
    with np.load(p["ttt"] / "result.npz") as z:
        fast, neighbours = z["predictions"], z["neighbours"]
    sample = np.sort(np.random.default_rng(args.seed).choice(len(y_test), min(args.exact_queries, len(y_test)),
                                                             replace=False))
    ttt = LocalTTT(head, ttt_config(args, "exact"), device=args.device).fit(x_train, y_train)
    t = time.perf_counter()
    r = ttt.predict(x_test[sample], neighbours=neighbours[sample])
    exact_s = time.perf_counter() - t
    y = y_test[sample]
    record = {"n_queries": int(sample.size), "exact_seconds": exact_s, "queries_per_s": sample.size / exact_s,
              "agreement": accuracy(r.predictions == fast[sample]), "exact_acc": accuracy(r.predictions == y),
              "fast_acc": accuracy(fast[sample] == y),
              "fast_minus_exact": paired_difference(fast[sample] == y, r.predictions == y),
              "largest": f"as the fast stage: the train features ({mib(x_train.nbytes)}) and the "
                         f"{flat_index(len(y_train), x_train.shape[1])}; stacked heads within LocalTTT's 1 GiB"}
    with building(p["ttt-exact"], overwrite=True) as out:
        write_json(out / "result.json", record)
    return record


# -- resume checks ------------------------------------------------------------------------------------------
def stage_verify_ttt(args, work: Path, chunks: list[int]) -> dict:
    """Recompute ``chunks`` of the fast evaluation in this fresh process (no chunk directory) and compare every
    array with the chunk files of the killed-and-resumed run."""
    from analysis.local_ttt import LocalTTT
    from analysis.ttt.chunks import ARRAYS

    p = paths(work)
    x_train, y_train, x_test, _ = ttt_data(work)
    ttt = LocalTTT(ttt_head(args, work, x_train, y_train), ttt_config(args, "fast"),
                   device=args.device).fit(x_train, y_train)
    equal, same_predictions, float_diff = {}, {}, 0.0
    for i in chunks:
        rows = np.arange(i * args.chunk_size, min((i + 1) * args.chunk_size, len(x_test)))
        fresh = ttt.predict(x_test[rows[0]:rows[-1] + 1])
        with np.load(p["ttt-chunks"] / f"chunk_{i:06d}.npz") as z:
            saved = {k: z[k] for k in z.files}
        arrays = {**{k: getattr(fresh, k) for k in ARRAYS}, **fresh.extras}
        equal[str(i)] = all(np.array_equal(arrays[k], saved[k]) for k in saved)
        same_predictions[str(i)] = all(np.array_equal(arrays[k], saved[k]) for k in saved if saved[k].dtype.kind in "iu")
        float_diff = max([float_diff] + [float(np.abs(arrays[k] - saved[k]).max()) for k in saved
                                         if saved[k].dtype.kind == "f" and saved[k].size])
    return {"chunks": chunks, "equal": equal, "all_equal": all(equal.values()),
            "integer_outputs_equal": same_predictions, "max_float_difference": float_diff,
            "largest": "as the fast TTT stage"}


def stage_verify_sae(args, work: Path) -> dict:
    """Train the same SAE uninterrupted (the killed run's precision) and compare the weights files byte for byte."""
    from artifacts import sha256_file

    p = paths(work)
    record = stage_sae(args, work, out_key="sae-uninterrupted", precision=_sae_precision(p["sae"]))
    resumed, fresh = sha256_file(p["sae"] / "sae.safetensors"), sha256_file(p["sae-uninterrupted"] / "sae.safetensors")
    return {**record, "weights_sha256_resumed": resumed, "weights_sha256_uninterrupted": fresh,
            "all_equal": resumed == fresh}
