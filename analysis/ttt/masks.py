"""Concept masks (the paper's O2) and implicit concept selection (O3).

O2: TTT of a code-space head on each neighbourhood, with the codes multiplied by a binary concept mask:
* ``learned``: a mask learned jointly with the head, straight-through estimator (forward: ``1[a > 0]``,
  backward: the gradient of ``sigmoid(a)``), loss ``CE + λ · mean_j sigmoid(a_j)`` over the concepts active in
  the neighbourhood (λ = 0.2 as in the paper); reports how many concepts it keeps;
* ``query``: the fixed mask of the query's own k concepts;
* ``none``: every concept.
Only the concepts active somewhere in the neighbourhood or the query (their *union*) can matter: every other
code value is zero, so its head column gets no gradient and never moves. The problems are therefore built on
the union, ``(B, n, U)``, never on all ``n_latents``.

O3: agreement between two TTT runs (dense on reconstructions vs masked sparse on codes) and the similarity of
their top-10 distributions; and the concentration of a TTT update of the dense head on the SAE's decoder atoms:
the share of ``Σ_j ‖ΔW d_j‖²`` on the neighbourhood's active concepts against a random set of the same size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from analysis.neighbours import SparseCodes
from analysis.stats import accuracy, measure, paired_difference

MASK_KINDS = ("none", "query", "learned")


@dataclass(frozen=True)
class MaskConfig:
    """TTT with a concept mask on the codes."""

    kind: str = "learned"
    """``learned`` (straight-through), ``query`` (the query's own concepts) or ``none`` (--mask)."""
    lam: float = 0.2
    """Sparsity penalty λ on the mean mask probability; the paper's 0.2 (--mask-lambda)."""
    steps: int = 50
    """Full-batch Adam steps (--steps)."""
    lr: float = 1e-2
    """Adam learning rate of the head (--lr)."""
    mask_lr: float = 0.1
    """Adam learning rate of the mask logits (--mask-lr)."""
    mask_init: float = 0.5
    """Initial mask logit; positive, so that training starts from the full mask (--mask-init)."""

    def __post_init__(self):
        if self.kind not in MASK_KINDS:
            raise ValueError(f"--mask must be one of {MASK_KINDS}, got {self.kind!r}")
        if self.lam < 0 or self.steps < 0 or not self.lr >= 0 or not self.mask_lr >= 0:
            raise ValueError("--mask-lambda, --steps, --lr and --mask-lr must be >= 0")


@dataclass
class UnionProblems:
    """A batch of neighbourhoods restricted to the union of their active concepts."""

    latents: Tensor   # (B, U) latent ids, padded by repeating the last
    valid: Tensor     # (B, U) 1.0 for a real latent
    Z: Tensor         # (B, n, U) neighbour codes
    q: Tensor         # (B, U) query codes
    in_query: Tensor  # (B, U) 1.0 where the query itself uses the latent


def _positions(sorted_ids: Tensor, ids: Tensor) -> Tensor:
    return torch.searchsorted(sorted_ids.contiguous(), ids.contiguous())


def union_problems(train: SparseCodes, neighbours: np.ndarray, queries: SparseCodes) -> UnionProblems:
    """The neighbourhoods of ``queries`` (rows of ``train`` in ``neighbours`` ``(B, n)``) on their concept union."""
    B, n = neighbours.shape
    nb = train.take(neighbours.ravel())
    nb_idx = torch.from_numpy(np.asarray(nb.indices, dtype=np.int64)).reshape(B, n, -1)
    nb_val = torch.from_numpy(np.asarray(nb.values, dtype=np.float32)).reshape(B, n, -1)
    q_idx = torch.from_numpy(np.asarray(queries.indices, dtype=np.int64))
    q_val = torch.from_numpy(np.asarray(queries.values, dtype=np.float32))
    ids = torch.sort(torch.cat([nb_idx.reshape(B, -1), q_idx], 1), dim=1).values
    is_new = torch.ones_like(ids, dtype=torch.bool)
    is_new[:, 1:] = ids[:, 1:] != ids[:, :-1]
    counts = is_new.sum(1)
    U = int(counts.max())
    slot = torch.cumsum(is_new, 1) - 1
    big = torch.iinfo(torch.int64).max
    latents = torch.full((B, U), big, dtype=torch.int64).scatter_(1, slot, ids)
    valid = (torch.arange(U)[None] < counts[:, None]).float()
    Z = torch.zeros(B, n, U).scatter_add_(2, _positions(latents[:, None].expand(B, n, U), nb_idx), nb_val)
    pos_q = _positions(latents, q_idx)
    q = torch.zeros(B, U).scatter_add_(1, pos_q, q_val)
    in_query = torch.zeros(B, U).scatter_(1, pos_q, 1.0)
    latents = torch.where(valid > 0, latents, latents.gather(1, (counts - 1)[:, None]).expand(B, U))
    return UnionProblems(latents, valid, Z, q, in_query)


def masked_ttt(last: nn.Linear, prob: UnionProblems, y: Tensor, config: MaskConfig) -> dict:
    """TTT of ``last`` (a head on the codes) with a concept mask, batched over the problems.

    Returns ``logits (B, C)`` for the queries, ``kept (B,)`` concepts the mask keeps (of the union, ``n_union``).
    """
    B, n, U = prob.Z.shape
    Wt = last.weight.detach().T[prob.latents].clone().requires_grad_(True)          # (B, U, C)
    b = last.bias.detach().expand(B, -1).clone().requires_grad_(True)
    if config.kind == "learned":
        a = torch.full((B, U), config.mask_init).requires_grad_(True)
    # One Adam over the stacked problems is one Adam per problem: Adam is elementwise and all take the same steps.
    groups = [{"params": [Wt, b], "lr": config.lr}]
    if config.kind == "learned":
        groups.append({"params": [a], "lr": config.mask_lr})
    opt = torch.optim.Adam(groups)

    def mask() -> Tensor:
        if config.kind == "none":
            return prob.valid
        if config.kind == "query":
            return prob.in_query
        soft = torch.sigmoid(a)
        return ((a > 0).float() + soft - soft.detach()) * prob.valid   # straight-through estimator

    for _ in range(config.steps):
        m = mask()
        logits = torch.bmm(prob.Z * m[:, None, :], Wt) + b[:, None, :]
        loss = nn.functional.cross_entropy(logits.reshape(B * n, -1), y.reshape(-1), reduction="sum") / n
        if config.kind == "learned":
            # Per problem: λ times the mean keep-probability over its union (problems are summed, as the CE).
            kept = (torch.sigmoid(a) * prob.valid).sum(1) / prob.valid.sum(1).clamp_min(1)
            loss = loss + config.lam * kept.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        m = mask()
        logits = torch.bmm((prob.q * m)[:, None, :], Wt).squeeze(1) + b
        return {"logits": logits, "kept": (m * prob.valid).sum(1), "n_union": prob.valid.sum(1)}


# -- O3 -----------------------------------------------------------------------------------------------------
def agreement(pred_a: np.ndarray, pred_b: np.ndarray, top_a: dict, top_b: dict, provenance: str) -> dict:
    """How often two TTT runs predict the same class, and how alike their top-10 distributions are: each
    top-10 renormalised to sum 1, the mass they share (``Σ_c min(p_c, q_c)`` over classes in both; 1 = identical)."""
    shared = []
    for ca, pa, cb, pb in zip(top_a["top_classes"], top_a["top_probs"], top_b["top_classes"], top_b["top_probs"]):
        pa, pb = pa / pa.sum(), pb / pb.sum()
        qa, qb = dict(zip(ca.tolist(), pa.tolist())), dict(zip(cb.tolist(), pb.tolist()))
        shared.append(sum(min(qa[c], qb[c]) for c in qa.keys() & qb.keys()))
    overlap = [len(set(a.tolist()) & set(b.tolist())) / len(a) for a, b in zip(top_a["top_classes"], top_b["top_classes"])]
    return {"rate": accuracy(pred_a == pred_b, provenance),
            "top10_shared_mass": measure(shared, provenance),
            "top10_overlap": measure(overlap, provenance)}


def update_concentration(delta_W: Tensor, decoder: Tensor, active: list[np.ndarray], seed: int) -> dict:
    """Share of each update's energy on its active concepts vs a random set of the same size.

    ``delta_W`` ``(B, C, d)``: TTT updates of a dense head; ``decoder`` ``(n_latents, d)`` the SAE's atoms;
    ``active[i]``: latents active in neighbourhood ``i``. Energy of atom ``j``: ``‖ΔW d_j‖²`` (the update's
    response along the atom, summed over classes). Heads whose update is zero are left out; when every one is,
    the three measures are ``None`` and a ``note`` says why.
    """
    rng = np.random.default_rng(seed)
    energy = torch.matmul(delta_W, decoder.T.to(delta_W.dtype)).pow(2).sum(1).cpu().numpy()  # (B, n_latents)
    total = energy.sum(1)
    own, rand = [], []
    for e, t, ids in zip(energy, total, active):
        if not t > 0:  # a head that did not move (--steps 0, --lr 0) has no direction to share out
            continue
        ids = np.asarray(ids, dtype=np.int64)
        own.append(e[ids].sum() / t)
        rand.append(e[rng.choice(len(e), ids.size, replace=False)].sum() / t)
    if not own:
        return {"active": None, "random": None, "difference": None,
                "note": "every TTT update is zero (--steps 0 or --lr 0): no direction to measure"}
    where = "share of the TTT update's energy on the decoder atoms"
    return {"active": measure(own, where + " active in the neighbourhood"),
            "random": measure(rand, where + " of a random set of the same size"),
            "difference": paired_difference(own, rand, where + ", active minus random, paired")}
