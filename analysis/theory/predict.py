"""Predictors of the theory experiment on one draw of the linear-representation model, from the toolkit's core.

The global predictor is the toolkit's linear ``Head`` (``analysis/heads.py``) whose last layer is set to the
least-squares fit on the training features: the limit that ``train_head`` with MSE converges to, reached
exactly and in milliseconds instead of after thousands of Adam steps (which crawl along the badly conditioned
directions of ``A`` as d2 → d1). ``trained_head_error`` trains the same head with ``train_head`` as a check that
the two agree. Local TTT is ``LocalTTT`` (``analysis/local_ttt.py``) started from that head, with neighbours from
``NeighbourIndex`` in Ψ; the kNN baseline is the neighbours' mean target (majority vote for classification).

Errors are measured per test point: squared error against the *noiseless* score ``<Φ, w*>`` for regression
(the excess risk, so that the global head's is ``1 − d2/d1`` with unit target variance, as the paper states),
0/1 error against the label for classification.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from analysis.heads import Head, HeadConfig, predict_head, train_head
from analysis.neighbourhoods import neighbourhood_stats
from analysis.theory.model import ConceptData, ConceptModel, ConceptModelConfig
from analysis.local_ttt import LocalTTT, TTTConfig


@dataclass(frozen=True)
class PredictorConfig:
    """How the theory experiment predicts: the global head's fit and the local TTT protocol."""

    ttt: TTTConfig = TTTConfig(n_neighbours=50, mode="erm", steps=50, lr=1e-2, metric="l2", impl="exact")
    """Local TTT: the paper's ImageNet ERM protocol (50 neighbours by exact L2, 50 Adam steps at lr 1e-2)."""
    converged: TTTConfig | None = TTTConfig(n_neighbours=50, mode="erm", steps=300, lr=3e-2, metric="l2",
                                            impl="exact")
    """Local ERM run to convergence: the estimator whose rate the theory states (50 steps stop early, which
    regularises but hides the σ² and 1/n_neighbours scaling); evaluated where ``evaluate_draw`` is asked."""
    ridge: float = 1e-8
    """Ridge of the least-squares global head, relative to the mean feature variance (numerical safety only)."""
    classification_head: HeadConfig = HeadConfig(kind="linear", task="classification", epochs=30)
    """Recipe of the global head for classification targets (trained; there is no closed form)."""

    def __post_init__(self) -> None:
        if self.ridge < 0:
            raise ValueError(f"--ridge must be >= 0, got {self.ridge}")


@dataclass
class DrawResult:
    """Per-test-point errors of one model draw; ``by_k`` maps a neighbourhood size to its TTT/kNN errors."""

    config: ConceptModelConfig
    global_error: np.ndarray
    population_error: float
    by_k: dict = field(default_factory=dict)


def least_squares_head(x: np.ndarray, y: np.ndarray, ridge: float = 1e-8) -> Head:
    """The toolkit's linear regression ``Head`` with its last layer set to the (ridge-stabilised) least-squares
    fit of ``y`` on ``[x, 1]``."""
    x64 = np.asarray(x, dtype=np.float64)
    mean = x64.mean(0)
    xc = x64 - mean
    y64 = np.asarray(y, dtype=np.float64)
    y2 = y64[:, None] if y64.ndim == 1 else y64
    gram = xc.T @ xc
    gram[np.diag_indices_from(gram)] += ridge * max(np.trace(gram) / len(gram), 1e-12)
    coef = np.linalg.solve(gram, xc.T @ (y2 - y2.mean(0)))          # (d, n_outputs)
    bias = y2.mean(0) - mean @ coef
    head = Head(HeadConfig(kind="linear", task="regression"), x.shape[1], y2.shape[1])
    with torch.no_grad():
        head.last.weight.copy_(torch.from_numpy(coef.T.astype(np.float32)))
        head.last.bias.copy_(torch.from_numpy(bias.astype(np.float32)))
    return head.eval()


def global_head(train: ConceptData, config: ConceptModelConfig, predictor: PredictorConfig) -> Head:
    """Least-squares head for regression, ``train_head`` with cross-entropy for classification."""
    if config.task == "regression":
        return least_squares_head(train.x, train.y, predictor.ridge)
    head_config = dataclasses.replace(predictor.classification_head, seed=config.seed)
    return train_head(train.x, train.y, head_config, n_outputs=config.n_classes)


def point_errors(pred: np.ndarray, data: ConceptData, task: str) -> np.ndarray:
    """Squared error against the noiseless score (regression) or 0/1 error against the label."""
    if task == "regression":
        return (np.asarray(pred, dtype=np.float64) - data.f) ** 2
    return (np.asarray(pred) != data.y).astype(np.float64)


def evaluate_draw(config: ConceptModelConfig, predictor: PredictorConfig, n_neighbours: list[int] | None = None,
                  converged: bool = False) -> DrawResult:
    """Draw the model, fit the global head, and run TTT and the kNN baseline for each neighbourhood size
    (default: the predictor's); with ``converged`` also the converged local ERM (``ttt_converged``).
    Neighbours are searched once, for the largest size, and reused by prefix."""
    model = ConceptModel(config)
    train, test = model.train_test()
    head = global_head(train, config, predictor)
    sizes = sorted(set(n_neighbours or [predictor.ttt.n_neighbours]))
    if sizes[-1] > config.n_train:
        raise ValueError(f"--n-neighbours {sizes[-1]} exceeds --n-train {config.n_train}")
    widest = LocalTTT(head, dataclasses.replace(predictor.ttt, n_neighbours=sizes[-1])).fit(train.x, train.y)
    neighbours = widest.neighbours(test.x)
    global_pred = predict_head(head, test.x)
    population = model.global_population_error() if config.task == "regression" else float("nan")
    result = DrawResult(config, point_errors(global_pred, test, config.task), population)
    for k in sizes:
        out = _local(head, predictor.ttt, k, train, test, neighbours)
        result.by_k[k] = {
            "ttt": point_errors(out.predictions, test, config.task),
            "knn": point_errors(out.majority, test, config.task),
            "union": neighbourhood_stats(train.concepts, neighbours[:, :k])["union"],
            "same_cluster": (train.cluster[neighbours[:, :k]] == test.cluster[:, None]).mean(1),
        }
        if converged and predictor.converged is not None:
            out = _local(head, predictor.converged, k, train, test, neighbours)
            result.by_k[k]["ttt_converged"] = point_errors(out.predictions, test, config.task)
    return result


def _local(head: Head, protocol: TTTConfig, k: int, train: ConceptData, test: ConceptData, neighbours: np.ndarray):
    # Fitting only indexes the training features (milliseconds for a flat index); the search is reused.
    ttt = LocalTTT(head, dataclasses.replace(protocol, n_neighbours=k)).fit(train.x, train.y)
    return ttt.predict(test.x, neighbours=neighbours[:, :k])


def trained_head_error(config: ConceptModelConfig, head_config: HeadConfig = HeadConfig(task="regression")
                       ) -> dict:
    """Per-test-point squared errors of the least-squares head and of the same head trained by ``train_head``
    (Adam on MSE, the paper's recipe by default) on one draw: the check behind the least-squares shortcut."""
    if config.task != "regression":
        raise ValueError("the trained-head check compares against least squares: it needs --task regression")
    train, test = ConceptModel(config).train_test()
    trained = train_head(train.x, train.y, dataclasses.replace(head_config, task="regression", seed=config.seed))
    lstsq = least_squares_head(train.x, train.y)
    return {"trained": point_errors(predict_head(trained, test.x), test, "regression"),
            "lstsq": point_errors(predict_head(lstsq, test.x), test, "regression")}
