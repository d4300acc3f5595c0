"""The TTT study of a store (and optionally its SAE and codes): the paper's Sections 3 (O2, O3) and 4.

``ttt_study`` returns a JSON-ready dict of Measure dicts and writes PNGs to ``out_dir``:
* ``ttt``: global head, local TTT and kNN majority accuracy on the test queries, the paired gain, and the
  ``locality`` table (each TTT head on its own neighbourhood and on the whole test set);
* with an SAE and codes: ``masks`` (TTT of a code-space head with no mask, the query's own concepts, a learned
  mask), ``sharing.mask_concepts_mean``, ``ttt.dense_sparse_agreement`` (dense TTT on reconstructions vs
  learned-mask TTT on codes, on the same neighbourhoods: those of the reconstruction space) and
  ``ttt.update_concentration``;
* ``sweeps``: accuracy against the neighbourhood size and against the training-set size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from analysis.ttt import plots as ttt_plots
from analysis.heads import HeadConfig, head_features, load_head, predict_head, save_head, train_head
from analysis.ttt.masks import MaskConfig, agreement, masked_ttt, union_problems, update_concentration
from analysis.parents import check_codes, inputs_hash
from analysis.progress import progress
from analysis.spaces import all_codes, make_space
from analysis.stats import accuracy, mean_of_proportions, measure, paired_difference
from analysis.local_ttt import LocalTTT, TTTConfig, run_local, take_rows, top_distribution
from analysis.ttt.chunks import evaluate
from artifacts import ArtifactError
from artifacts.ranks import Ranks
from artifacts.typed import check_seed


@dataclass(frozen=True)
class TTTStudyConfig:
    """Settings of the TTT study."""

    n_neighbours: int = 50
    """Neighbours per query (--n-neighbours)."""
    mode: str = "erm"
    """``erm`` or ``sequential`` (--mode)."""
    steps: int = 50
    """ERM Adam steps (--steps)."""
    lr: float = 1e-2
    """TTT Adam learning rate (--lr)."""
    metric: str = "l2"
    """Neighbour metric in the dense spaces (--metric)."""
    impl: str = "exact"
    """TTT implementation: reference, exact or fast (--impl)."""
    precision: str = "float32"
    """Matmul precision of the batched TTT (--precision)."""
    space: str = "embeddings"
    """Feature space of the main TTT evaluation: embeddings, reconstructions or codes (--space)."""
    head: str = "linear"
    """Global head: linear or mlp (--head)."""
    hidden: int = 256
    """MLP head width (--hidden)."""
    head_epochs: int = 50
    """Global head epochs; the paper's 50 (--head-epochs)."""
    head_lr: float = 1e-3
    """Global head Adam learning rate; the paper's 1e-3 (--head-lr)."""
    n_queries: int | None = None
    """Test queries: a seeded sample of this many; ``None``: the whole test split (--n-queries)."""
    mask_lambda: float = 0.2
    """Sparsity penalty of the learned concept mask; the paper's 0.2 (--mask-lambda)."""
    n_mask_queries: int = 500
    """Queries of the mask and agreement analyses (--n-mask-queries)."""
    n_locality_queries: int = 100
    """TTT heads evaluated on the whole test set (--n-locality-queries)."""
    locality_rows: int = 2000
    """Test rows the locality heads are evaluated on (a seeded sample) (--locality-rows)."""
    sweep_neighbours: tuple[int, ...] = (5, 10, 25, 50, 100)
    """Neighbourhood sizes of the sweep (--sweep-neighbours)."""
    sweep_train_fractions: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)
    """Training-set fractions of the data sweep; each retrains the global head (--sweep-train-fractions)."""
    n_sweep_queries: int = 1000
    """Queries of each sweep point (--n-sweep-queries)."""
    chunk_size: int = 1024
    """Queries per saved chunk of the main evaluation: the unit of resuming and of splitting over ranks
    (--chunk-size)."""
    memory_mb: int = 1024
    """Memory one batch of TTT queries may hold (--memory-mb)."""
    seed: int = 0
    """Seed of the samples and the global heads (--seed)."""
    device: str = "cpu"
    """Where heads and TTT compute (--device)."""

    def __post_init__(self):
        self.ttt()  # the shared TTT fields are checked by TTTConfig itself
        if self.n_queries is not None and self.n_queries < 2:
            raise ValueError(f"--n-queries must be >= 2, got {self.n_queries}")
        if min(self.n_mask_queries, self.n_locality_queries, self.locality_rows, self.n_sweep_queries) < 2:
            raise ValueError("--n-mask-queries, --n-locality-queries, --locality-rows, --n-sweep-queries must be >= 2")
        if self.chunk_size < 1 or self.memory_mb < 1:
            raise ValueError(f"--chunk-size and --memory-mb must be >= 1, got {self.chunk_size}, {self.memory_mb}")
        if any(not 0 < f <= 1 for f in self.sweep_train_fractions):
            raise ValueError(f"--sweep-train-fractions must be in (0, 1], got {self.sweep_train_fractions}")
        if any(k < 1 for k in self.sweep_neighbours):
            raise ValueError(f"--sweep-neighbours must all be >= 1, got {self.sweep_neighbours}")
        check_seed(self.seed)
        if self.head_epochs < 1:
            raise ValueError(f"--head-epochs must be >= 1 (a head that never trained makes every gain meaningless), "
                             f"got {self.head_epochs}")
        if not self.mask_lambda >= 0:
            raise ValueError(f"--mask-lambda must be >= 0, got {self.mask_lambda}")

    def ttt(self, **changes) -> TTTConfig:
        """The TTT protocol of this study (its shared fields), with ``changes`` applied."""
        return dataclasses.replace(TTTConfig(n_neighbours=self.n_neighbours, mode=self.mode, steps=self.steps,
                                             lr=self.lr, metric=self.metric, impl=self.impl,
                                             precision=self.precision, seed=self.seed), **changes)

    def head_config(self) -> HeadConfig:
        return HeadConfig(kind=self.head, hidden=self.hidden, epochs=self.head_epochs, lr=self.head_lr, seed=self.seed)


@dataclass
class _Data:
    """Labelled train rows and the (sampled) test queries of a store."""

    train: np.ndarray
    test: np.ndarray
    labels: np.ndarray


def _rows(store, config: TTTStudyConfig) -> _Data:
    split = store.split
    if "train" not in split or not ({"test", "val"} & split.keys()):
        raise ValueError(f"store {store.store_dir} needs a train and a test (or val) split; extract it with "
                         "--test-fraction")
    labels = np.asarray(store.labels)
    train = split["train"][labels[split["train"]] >= 0]
    test = split["test" if "test" in split else "val"]
    test = test[labels[test] >= 0]
    if train.size <= config.n_neighbours or test.size < 2:
        raise ValueError(f"store {store.store_dir} has {train.size} labelled train rows and {test.size} test rows; "
                         f"TTT needs more than --n-neighbours {config.n_neighbours} and at least 2")
    rng = np.random.default_rng(config.seed)
    if config.n_queries is not None and config.n_queries < test.size:
        test = np.sort(rng.choice(test, config.n_queries, replace=False))
    return _Data(np.sort(train), test, labels)


def _sample(rows: np.ndarray, n: int, seed: int) -> np.ndarray:
    return rows if n >= rows.size else np.sort(np.random.default_rng(seed).choice(rows, n, replace=False))


def ttt_study(store, sae, codes, config: TTTStudyConfig | None = None, out_dir: str | os.PathLike | None = None,
              *, cache_dir: str | os.PathLike | None = None, ranks: Ranks = Ranks(), log=None) -> dict:
    """The TTT study (module doc). ``cache_dir``: where the main evaluation's chunks persist (resumable);
    under ``torchrun`` the main evaluation is split over ``ranks`` and rank 0 alone runs the rest."""
    config = config or TTTStudyConfig()
    if sae is not None and codes is not None:  # codes of another store would pair rows with other concepts
        check_codes(store, sae, codes)
    data = _rows(store, config)
    space = make_space(config.space, store, sae, codes)
    x_train, x_test = space.queries(data.train), space.queries(data.test)
    y_train, y_test = data.labels[data.train], data.labels[data.test]
    check_finite(x_train, data.train, f"the {config.space} of store {store.store_dir}")
    inputs = inputs_hash(store, sae, codes)
    cache_dir = None if cache_dir is None else keyed_cache(Path(cache_dir), inputs, config, ranks)
    n_steps = 3 + len(config.sweep_neighbours) + len(config.sweep_train_fractions) + (codes is not None)
    bar = progress("ttt", n_steps, "steps")
    bar.step("global head")
    head = _global_head(x_train, y_train, int(data.labels.max()) + 1, config, cache_dir, ranks)
    bar.step(f"main evaluation of {len(data.test)} queries")
    ttt = LocalTTT(head, config.ttt(), device=config.device, memory_bytes=config.memory_mb << 20).fit(x_train, y_train)
    result = evaluate(ttt, x_test, chunk_size=config.chunk_size, chunk_dir=None if cache_dir is None else cache_dir / "main",
                      ranks=ranks, log=log, fingerprint={"config": dataclasses.asdict(config), "inputs": inputs})
    if not ranks.is_main:
        bar.close()
        return {}
    out_dir = Path(out_dir or ".")
    out_dir.mkdir(parents=True, exist_ok=True)
    where = f"{config.space}, {len(data.test)} test queries, {config.n_neighbours} neighbours"
    summary = _main_measures(result, y_test, where)
    bar.step("locality")
    summary["locality"] = locality(ttt, x_test, y_test, result.neighbours, config)
    report = {"ttt": summary, "sharing": {}, "sweeps": sweeps(head, x_train, space, data, config, bar)}
    plots = {"ttt_accuracy": ttt_plots.accuracy_bars(
        {"global": summary["global_acc"], "TTT": summary["ttt_acc"], "kNN majority": summary["majority_acc"]},
        out_dir / "ttt_accuracy.png", f"TTT on {config.space}",
        {"TTT − global head": summary["gain"], "TTT − kNN majority vote": summary["gain_over_majority"]}),
        "ttt_locality": ttt_plots.locality_bars(summary["locality"], out_dir / "ttt_locality.png"),
        "ttt_n_neighbours": ttt_plots.sweep_curve(report["sweeps"]["n_neighbours"], "n_neighbours",
                                                  out_dir / "ttt_n_neighbours.png", "neighbours", log_x=True),
        "ttt_train_size": ttt_plots.sweep_curve(report["sweeps"]["train_size"], "n_train",
                                                out_dir / "ttt_train_size.png", "training rows", log_x=True)}
    if sae is not None and codes is not None:
        bar.step("masks and agreement")
        concepts = concept_analyses(store, sae, codes, data, config)
        report["masks"] = concepts["masks"]
        report["sharing"]["mask_concepts_mean"] = concepts["masks"]["learned"]["kept"]
        report["sharing"]["mask_union_mean"] = concepts["masks"]["learned"]["union"]
        summary["dense_sparse_agreement"] = concepts["agreement"]["rate"]
        summary["dense_sparse_top10"] = concepts["agreement"]
        summary["update_concentration"] = concepts["update_concentration"]
        plots["ttt_masks"] = ttt_plots.mask_histogram(concepts["kept"], concepts["union"], out_dir / "ttt_masks.png",
                                                      config.mask_lambda)
    report["plots"] = plots
    bar.close()
    return report


def keyed_cache(cache_dir: Path, inputs: str, config: TTTStudyConfig, ranks: Ranks) -> Path:
    """The subfolder of ``cache_dir`` for these inputs and settings (a SHA-256 of both); rank 0 deletes the folders
    of other inputs, so a resumed run never reuses a head or chunks computed from another store, SAE or codes."""
    text = json.dumps({"inputs": inputs, "config": dataclasses.asdict(config)}, sort_keys=True, default=str)
    keyed = cache_dir / hashlib.sha256(text.encode()).hexdigest()[:16]
    if ranks.is_main:
        if cache_dir.is_dir():
            for other in cache_dir.iterdir():
                if other != keyed and other.is_dir():
                    shutil.rmtree(other)
        keyed.mkdir(parents=True, exist_ok=True)
    ranks.barrier()
    return keyed


def check_finite(x, rows: np.ndarray, what: str, chunk: int = 65536) -> None:
    """Refuse NaN or Inf features ``x`` of ``rows`` (a head trained on them predicts garbage), naming the first bad
    row; sparse codes are checked by their reader."""
    if not isinstance(x, np.ndarray):
        return
    for start in range(0, len(x), chunk):
        bad = np.flatnonzero(~np.isfinite(x[start:start + chunk]).all(1))
        if bad.size:
            raise ValueError(f"{what} holds NaN or Inf, first in row {int(rows[start + bad[0]])}; re-extract the "
                             "store or drop those rows")


def _global_head(x_train, y_train, n_outputs: int, config: TTTStudyConfig, cache_dir, ranks: Ranks):
    """The main global head; with ``cache_dir`` trained once (rank 0) and saved there, so that every rank and a
    resumed run use the very head the finished chunks were computed with."""
    if cache_dir is None:
        return train_head(x_train, y_train, config.head_config(), n_outputs=n_outputs, device=config.device)
    head_dir = Path(cache_dir) / "head"
    if ranks.is_main and not head_dir.is_dir():
        head = train_head(x_train, y_train, config.head_config(), n_outputs=n_outputs, device=config.device)
        save_head(head, head_dir, parents={"study_config": dataclasses.asdict(config)})
    ranks.barrier()
    head = load_head(head_dir, device=config.device)
    if head.config != config.head_config() or head.n_outputs != n_outputs:
        raise ArtifactError(f"{head_dir} was trained with other settings ({head.config}); delete "
                            f"{Path(cache_dir)} to start again")
    return head


def _main_measures(result, y, where: str) -> dict:
    ttt_ok, global_ok, maj_ok = result.predictions == y, result.global_predictions == y, result.majority == y
    return {"global_acc": accuracy(global_ok, "global head, " + where),
            "ttt_acc": accuracy(ttt_ok, "local TTT, " + where),
            "majority_acc": accuracy(maj_ok, "kNN majority vote, " + where),
            "gain": paired_difference(ttt_ok, global_ok, "TTT minus global, paired, " + where),
            "gain_over_majority": paired_difference(ttt_ok, maj_ok, "TTT minus majority, paired, " + where),
            "final_loss": measure(result.final_loss, "TTT loss on the own neighbourhood, " + where),
            "update_norm": measure(result.update_norm, "norm of the TTT update, " + where),
            "n_queries": int(len(y))}


@torch.no_grad()
def locality(ttt: LocalTTT, x_test, y_test: np.ndarray, neighbours: np.ndarray, config: TTTStudyConfig) -> dict:
    """Each of ``n_locality_queries`` TTT heads on its own neighbourhood and on a sample of the test set."""
    queries = _sample(np.arange(len(y_test)), config.n_locality_queries, config.seed)
    evals = _sample(np.arange(len(y_test)), config.locality_rows, config.seed + 1)
    x_evals = take_rows(x_test, evals)
    x_eval = head_features(ttt.head, x_evals)
    x_eval = torch.from_numpy(x_eval.dense() if hasattr(x_eval, "dense") else x_eval).to(ttt.device)
    y_eval = torch.from_numpy(y_test[evals]).to(ttt.device)
    own, whole = [], []
    exact = dataclasses.replace(ttt.config, impl="exact")
    step = ttt.batch_size(keep_weights=True)
    for start in range(0, queries.size, step):
        rows = queries[start:start + step]
        Z, y, q = ttt.local_problems(x_test, neighbours, rows)
        W, b = run_local(ttt.head.last, Z, y, q, exact, ttt.task, keep_weights=True).weights
        own.append((torch.bmm(Z, W.transpose(1, 2)) + b[:, None]).argmax(2).eq(y).float().mean(1).cpu())
        whole.append((torch.matmul(x_eval, W.transpose(1, 2)) + b[:, None]).argmax(2).eq(y_eval).float().mean(1).cpu())
    where = f"{queries.size} TTT heads, each on "
    global_ok = predict_head(ttt.head, x_evals) == y_test[evals]
    own, whole = torch.cat(own).numpy(), torch.cat(whole).numpy()
    return {"own_neighbourhood_acc": mean_of_proportions(own, where + "its own neighbourhood", neighbours.shape[1]),
            "whole_test_acc": mean_of_proportions(whole, where + f"{evals.size} test rows", evals.size),
            "specialisation": paired_difference(own, whole, where + "its own neighbourhood minus the test rows",
                                                proportions=True),
            "global_whole_test_acc": accuracy(global_ok, f"global head on the same {evals.size} test rows")}


def sweeps(head, x_train, space, data: _Data, config: TTTStudyConfig, bar=None) -> dict:
    """Accuracy against the neighbourhood size (with the main global ``head`` on ``x_train``, the features of
    ``data.train`` in ``space``) and against the number of training rows (a global head for each)."""
    queries = _sample(np.arange(data.test.size), config.n_sweep_queries, config.seed + 2)
    y_train = data.labels[data.train]
    x_q, y_q = space.queries(data.test[queries]), data.labels[data.test[queries]]
    n_out = int(data.labels.max()) + 1
    by_size = []
    for k in sorted({k for k in config.sweep_neighbours if k < data.train.size}):
        if bar is not None:
            bar.step(f"sweep: {k} neighbours")
        ttt = LocalTTT(head, config.ttt(n_neighbours=k), device=config.device, memory_bytes=config.memory_mb << 20)
        r = ttt.fit(x_train, y_train).predict(x_q)
        by_size.append({"n_neighbours": k, **_row(r, y_q, f"{k} neighbours, {queries.size} queries")})
    by_train = []
    rng = np.random.default_rng(config.seed + 3)
    for frac in sorted(set(config.sweep_train_fractions)):
        sub = np.sort(rng.choice(data.train.size, max(config.n_neighbours + 1, int(frac * data.train.size)), replace=False))
        if bar is not None:
            bar.step(f"sweep: {sub.size} training rows")
        sub_x = space.queries(data.train[sub])
        h = train_head(sub_x, y_train[sub], config.head_config(), n_outputs=n_out, device=config.device)
        ttt = LocalTTT(h, config.ttt(), device=config.device, memory_bytes=config.memory_mb << 20)
        r = ttt.fit(sub_x, y_train[sub]).predict(x_q)
        by_train.append({"n_train": int(sub.size), **_row(r, y_q, f"{sub.size} training rows, {queries.size} queries")})
    return {"n_neighbours": by_size, "train_size": by_train}


def _row(r, y, where: str) -> dict:
    ttt_ok, global_ok = r.predictions == y, r.global_predictions == y
    return {"global_acc": accuracy(global_ok, where), "ttt_acc": accuracy(ttt_ok, where),
            "majority_acc": accuracy(r.majority == y, where),
            "gain": paired_difference(ttt_ok, global_ok, "TTT minus global, paired, " + where)}


def concept_analyses(store, sae, codes, data: _Data, config: TTTStudyConfig) -> dict:
    """O2 masks and O3 agreement/concentration on ``n_mask_queries`` queries, neighbourhoods from Ψ̂."""
    recon = make_space("reconstructions", store, sae, codes)
    sparse = all_codes(codes)
    qrows = data.test[_sample(np.arange(data.test.size), config.n_mask_queries, config.seed + 4)]
    y_train, y_q = data.labels[data.train], data.labels[qrows]
    n_out = int(data.labels.max()) + 1
    recon_train = recon.rows(data.train)
    # Linear heads whatever --head says (the paper's Section 3 heads are linear): the mask multiplies the codes
    # the last layer reads, and the update concentration projects that layer's update on the decoder atoms.
    linear = dataclasses.replace(config.head_config(), kind="linear")
    dense_head = train_head(recon_train, y_train, linear, n_outputs=n_out, device=config.device)
    dense = LocalTTT(dense_head, config.ttt(impl="exact" if config.impl == "reference" else config.impl),
                     device=config.device, memory_bytes=config.memory_mb << 20).fit(recon_train, y_train)
    x_q = recon.rows(qrows)
    neighbours = dense.neighbours(x_q)
    dense_result = dense.predict(x_q, neighbours=neighbours)
    train_codes, q_codes = sparse.take(data.train), sparse.take(qrows)
    code_head = train_head(train_codes, y_train, linear, n_outputs=n_out, device=config.device)
    masks = {}
    outs = _masked(code_head, train_codes, neighbours, q_codes, y_train, config, ("none", "query", "learned"))
    for kind, out in outs.items():
        ok = out["logits"].argmax(1).numpy() == y_q
        where = f"code-space TTT, mask {kind}, {qrows.size} queries"
        masks[kind] = {"acc": accuracy(ok, where), "kept": measure(out["kept"].numpy(), "concepts kept, " + where),
                       "union": measure(out["n_union"].numpy(), "concepts in the neighbourhood and query, " + where)}
    learned = outs["learned"]
    logits = learned["logits"].numpy()
    o3 = agreement(dense_result.predictions, logits.argmax(1), dense_result.extras, top_distribution(logits),
                   f"dense TTT on reconstructions vs learned-mask TTT on codes, {qrows.size} queries")
    conc = _concentration(dense, x_q, neighbours, sae, train_codes, config)
    return {"masks": masks, "agreement": o3, "update_concentration": conc,
            "kept": learned["kept"].numpy(), "union": learned["n_union"].numpy()}


def _masked(head, train_codes, neighbours, q_codes, y_train, config: TTTStudyConfig, kinds: tuple[str, ...]) -> dict:
    """``masked_ttt`` outputs of each mask kind, the union problems of each batch of queries built once."""
    masks = {kind: MaskConfig(kind=kind, lam=config.mask_lambda, steps=config.steps, lr=config.lr) for kind in kinds}
    parts = {kind: [] for kind in kinds}
    for start in range(0, len(neighbours), 128):
        rows = np.arange(start, min(start + 128, len(neighbours)))
        prob = union_problems(train_codes, neighbours[rows], q_codes.take(rows))
        y = torch.from_numpy(y_train[neighbours[rows]])
        for kind, mask in masks.items():
            parts[kind].append(masked_ttt(head.last, prob, y, mask))
    return {kind: {k: torch.cat([p[k] for p in ps]) for k in ps[0]} for kind, ps in parts.items()}


@torch.no_grad()
def _concentration(dense: LocalTTT, x_q, neighbours, sae, train_codes, config: TTTStudyConfig) -> dict:
    rows = _sample(np.arange(len(neighbours)), config.n_locality_queries, config.seed + 5)
    decoder = sae.decoder_weight().detach().float().to(dense.device)
    W0 = dense.head.last.weight.detach().float()
    shares = []
    exact = dataclasses.replace(dense.config, impl="exact")
    for start in range(0, rows.size, 16):
        chunk = rows[start:start + 16]
        Z, y, q = dense.local_problems(x_q, neighbours, chunk)
        W, _ = run_local(dense.head.last, Z, y, q, exact, dense.task, keep_weights=True).weights
        active = [np.unique(np.asarray(train_codes.indices)[nb]) for nb in neighbours[chunk]]
        shares.append((W - W0, active))
    delta = torch.cat([d for d, _ in shares])
    active = [a for _, act in shares for a in act]
    return update_concentration(delta, decoder, active, config.seed)
