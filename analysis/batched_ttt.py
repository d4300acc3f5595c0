"""Batched local TTT: many queries' last layers trained at once.

Both modes take a batch of ``B`` local problems, each the features ``Z`` ``(B, n, h)`` of a query's ``n``
neighbours, their targets, the query's features ``(B, h)`` and the global last layer ``W0 (C, h)``, ``b0 (C,)``.

* ``exact``: the reference loop's algorithm with the per-query heads stacked into ``W (B, C, h)``: the
  cross-entropy gradient written out (``softmax − onehot``), two batched matmuls per step and a batched Adam
  (``adam_step``, the update of ``torch.optim.Adam``'s single-tensor path, op for op). It differs from the loop
  only by floating-point rounding.

* ``fast`` (classification): trains the rows of the classes *present* among the query's neighbours exactly and
  moves every *absent* class by one shared shift ``(s, s_b)``: ``logit_c(z) = W0_c·z + b0_c + s·z + s_b``.
  Why it is nearly the same: an absent class only ever receives the gradient ``g_c = Σ_i p_ic z_i / n``
  (positive weights on the neighbours), and Adam's update ``m̂/(√v̂+ε)`` does not depend on the gradient's
  scale; so whenever the profile ``p_ic / Σ_i p_ic`` over the neighbours is the same for every absent class,
  their Adam updates are identical, and the shift is Adam on ``Σ_{c absent} g_c``. Because the shift is shared,
  the absent classes enter the softmax as one logit ``logsumexp_{c absent}(W0_c·z_i + b0_c) + s·z_i + s_b``,
  precomputed once per neighbour, so each step costs ``O(n · n_present · h)`` instead of ``O(n · C · h)``.
  It is *not* equivalent when (a) the absent classes' profiles over the neighbours differ (neighbours far apart,
  so ``W0_c·z_i`` varies with ``i`` differently per class), or (b) their gradients are small against Adam's
  ``ε = 1e-8``; a prediction changes only if an absent class then wins at the query. Regression has no absent
  classes; ``fast`` is ``exact`` there.

``precision="bfloat16"`` runs the matmuls in bf16 while weights, gradients and Adam moments stay float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LocalOutputs:
    """Results of a batch of local problems."""

    outputs: Tensor
    """Query logits or values ``(B, C)``."""
    final_loss: Tensor
    """Loss of each trained head on its own neighbours ``(B,)``."""
    update_norm: Tensor
    """Frobenius norm of each head's change ``‖(W, b) − (W0, b0)‖`` ``(B,)``."""
    loss_curve: Tensor
    """Loss before each optimiser step ``(B, n_steps)``."""
    weights: tuple[Tensor, Tensor] | None = None
    """The trained ``(W (B, C, h), b (B, C))`` when asked for (exact mode only)."""


# -- the optimiser ----------------------------------------------------------------------------------------
@dataclass
class AdamMoments:
    """First and second moments of one stacked parameter."""

    m: Tensor
    v: Tensor

    @classmethod
    def like(cls, p: Tensor) -> "AdamMoments":
        return cls(torch.zeros_like(p), torch.zeros_like(p))


def adam_step(p: Tensor, grad: Tensor, moments: AdamMoments, step: int, lr: float,
              beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> None:
    """One Adam step (Kingma & Ba 2015) on a stack of parameters, in place; step counts from 1.

    The same operations, in the same order, as ``torch.optim.Adam``'s single-tensor update without weight
    decay, so that a batched head follows the reference loop's head up to the gradient's rounding.
    """
    moments.m.lerp_(grad, 1 - beta1)
    moments.v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias1 = 1 - beta1 ** step
    bias2_sqrt = math.sqrt(1 - beta2 ** step)
    denom = (moments.v.sqrt() / bias2_sqrt).add_(eps)
    p.addcdiv_(moments.m, denom, value=-lr / bias1)


def fused_adam_step(p: Tensor, grad: Tensor, moments: AdamMoments, step: int, lr: float,
                    beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> None:
    """``adam_step`` in one pass over memory: torch's fused Adam kernel (what ``torch.optim.Adam(fused=True)``
    runs), on CPU about five times faster than the seven elementwise passes; the pure formula when a torch
    build lacks it. The two agree to float rounding (tests/test_ttt.py)."""
    if not hasattr(torch, "_fused_adam_") or p.dtype != torch.float32:
        return adam_step(p, grad, moments, step, lr, beta1, beta2, eps)
    steps = [torch.tensor(float(step), device=p.device)]
    torch._fused_adam_([p], [grad.contiguous()], [moments.m], [moments.v], [], steps, lr=lr, beta1=beta1,
                       beta2=beta2, weight_decay=0.0, eps=eps, amsgrad=False, maximize=False)


# -- losses written out -----------------------------------------------------------------------------------
def loss_and_grad(out: Tensor, y: Tensor, task: str) -> tuple[Tensor, Tensor]:
    """Per-problem mean loss ``(B,)`` and its gradient w.r.t. ``out`` ``(B, r, C)`` (r rows per problem).

    Classification: cross-entropy, gradient ``(softmax − onehot) / r``; regression: mean squared error over
    rows and outputs, gradient ``2 (out − y) / (r C)`` (``y`` ``(B, r, C)``).
    """
    r = out.shape[1]
    if task == "classification":
        lse = torch.logsumexp(out, dim=-1, keepdim=True)
        loss = (lse.squeeze(-1) - out.gather(-1, y[..., None]).squeeze(-1)).mean(1)
        grad = torch.exp(out - lse)
        grad.scatter_add_(-1, y[..., None], torch.full_like(grad[..., :1], -1.0))
        return loss, grad.div_(r)
    diff = out - y
    return diff.pow(2).mean((1, 2)), diff.mul_(2.0 / (r * out.shape[2]))


def _mm(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """Batched ``a @ b`` computed in ``dtype`` (float32 or bfloat16), returned as float32."""
    if dtype == torch.float32:
        return torch.matmul(a, b)
    return torch.matmul(a.to(dtype), b.to(dtype)).float()


def _rows(n: int, mode: str, steps: int):
    """Which neighbour rows each optimiser step uses: all (ERM, ``steps`` times) or one each, nearest first."""
    if mode == "erm":
        return [slice(0, n)] * steps
    return [slice(j, j + 1) for j in range(n)]


# -- exact --------------------------------------------------------------------------------------------------
def ttt_exact(W0: Tensor, b0: Tensor, Z: Tensor, y: Tensor, q: Tensor, *, mode: str, steps: int, lr: float,
              task: str, dtype: torch.dtype = torch.float32, keep_weights: bool = False) -> LocalOutputs:
    """Train ``B`` copies of the last layer ``(W0, b0)`` on their neighbourhoods at once (see module doc)."""
    B, n, _ = Z.shape
    W = W0.expand(B, -1, -1).clone()
    b = b0.expand(B, -1).clone()
    mW, mb = AdamMoments.like(W), AdamMoments.like(b)
    schedule = _rows(n, mode, steps)
    curve = torch.empty(B, len(schedule))
    for t, rows in enumerate(schedule, start=1):
        Zr = Z[:, rows]
        out = _mm(Zr, W.transpose(1, 2), dtype).add_(b[:, None, :])
        loss, g = loss_and_grad(out, y[:, rows], task)
        curve[:, t - 1] = loss
        gW = _mm(g.transpose(1, 2), Zr, dtype)
        fused_adam_step(W, gW, mW, t, lr)
        fused_adam_step(b, g.sum(1), mb, t, lr)
    out = _mm(Z, W.transpose(1, 2), dtype).add_(b[:, None, :])
    final = loss_and_grad(out, y, task)[0]
    query = _mm(q[:, None, :], W.transpose(1, 2), dtype).squeeze(1).add_(b)
    norm = ((W - W0).pow(2).sum((1, 2)) + (b - b0).pow(2).sum(1)).sqrt()
    return LocalOutputs(query, final, norm, curve, (W, b) if keep_weights else None)


# -- fast ---------------------------------------------------------------------------------------------------
@dataclass
class _FastProblem:
    """The present classes of each problem and the frozen pieces of the shared-shift model."""

    present: Tensor   # (B, P) class ids, padded by repeating the first
    valid: Tensor     # (B, P) 1.0 for a real present class, 0.0 for padding
    y_pos: Tensor     # (B, n) position of each neighbour's label within `present`
    offset: Tensor    # (B, n, P + 1) added to the logits: −inf on padding; last column: the absent classes'
                      # logsumexp of the global logits (−inf if there are none)


def _present_classes(y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per problem, the sorted distinct labels padded to a common width, their validity, and label positions."""
    B, n = y.shape
    sorted_y = torch.sort(y, dim=1).values
    is_new = torch.ones_like(sorted_y, dtype=torch.bool)
    is_new[:, 1:] = sorted_y[:, 1:] != sorted_y[:, :-1]
    counts = is_new.sum(1)
    P = int(counts.max())
    slot = torch.cumsum(is_new, 1) - 1                                    # (B, n) rank of each distinct label
    # Every row with the same label writes the same value to the same slot; padding repeats the first label.
    present = sorted_y[:, :1].expand(B, P).clone().scatter_(1, slot, sorted_y)
    valid = (torch.arange(P, device=y.device)[None, :] < counts[:, None]).float()
    y_pos = torch.searchsorted(present.masked_fill(valid == 0, torch.iinfo(y.dtype).max).contiguous(), y)
    return present, valid, y_pos


def _fast_problem(L0: Tensor, y: Tensor) -> _FastProblem:
    present, valid, y_pos = _present_classes(y)
    B, n, _ = L0.shape
    L0.scatter_(-1, present[:, None, :].expand(-1, n, -1), float("-inf"))   # L0 is not needed afterwards
    offset = torch.zeros(B, n, present.shape[1] + 1, device=L0.device)
    offset[..., :-1].masked_fill_(valid[:, None, :] == 0, float("-inf"))
    offset[..., -1] = torch.logsumexp(L0, dim=-1)
    return _FastProblem(present, valid, y_pos, offset)


def ttt_fast(W0: Tensor, b0: Tensor, Z: Tensor, y: Tensor, q: Tensor, *, mode: str, steps: int, lr: float,
             task: str, dtype: torch.dtype = torch.float32) -> LocalOutputs:
    """Present classes trained exactly, absent classes moved by one shared Adam-trained shift (module doc).

    The trained rows are stacked as ``V = [W_present; s]`` ``(B, P + 1, h)`` and ``c = [b_present; s_b]``, so that
    each step is one batched matmul forward and one backward.
    """
    if task != "classification":
        return ttt_exact(W0, b0, Z, y, q, mode=mode, steps=steps, lr=lr, task=task, dtype=dtype)
    B, n, h = Z.shape
    prob = _fast_problem(_mm(Z, W0.T, dtype).add_(b0), y)                # from the (B, n, C) global logits, once
    V = torch.cat([W0[prob.present], torch.zeros(B, 1, h, device=Z.device)], 1)
    c = torch.cat([b0[prob.present], torch.zeros(B, 1, device=Z.device)], 1)
    mV, mc = AdamMoments.like(V), AdamMoments.like(c)
    schedule = _rows(n, mode, steps)
    curve = torch.empty(B, len(schedule))
    for t, rows in enumerate(schedule, start=1):
        Zr = Z[:, rows]
        logits = _mm(Zr, V.transpose(1, 2), dtype).add_(c[:, None, :]).add_(prob.offset[:, rows])
        loss, g = loss_and_grad(logits, prob.y_pos[:, rows], task)        # padding columns get exactly 0
        curve[:, t - 1] = loss
        fused_adam_step(V, _mm(g.transpose(1, 2), Zr, dtype), mV, t, lr)
        fused_adam_step(c, g.sum(1), mc, t, lr)
    logits = _mm(Z, V.transpose(1, 2), dtype).add_(c[:, None, :]).add_(prob.offset)
    final = loss_and_grad(logits, prob.y_pos, task)[0]
    query = _fast_query(W0, b0, q, V, c, prob, dtype)
    n_absent = W0.shape[0] - prob.valid.sum(1)
    dW = (V[:, :-1] - W0[prob.present]).pow(2).sum(2) + (c[:, :-1] - b0[prob.present]).pow(2)
    norm = ((dW * prob.valid).sum(1) + n_absent * (V[:, -1].pow(2).sum(1) + c[:, -1].pow(2))).sqrt()
    return LocalOutputs(query, final, norm, curve)


def _fast_query(W0, b0, q, V, c, prob: _FastProblem, dtype) -> Tensor:
    """Full query logits ``(B, C)``: global logits shifted for absent classes, trained rows for present ones."""
    trained = _mm(q[:, None, :], V.transpose(1, 2), dtype).squeeze(1) + c     # (B, P + 1)
    out = _mm(q, W0.T, dtype).add_(b0).add_(trained[:, -1:])
    # Padding repeats the first present class: give it that class's trained logit so the duplicate writes agree.
    present = torch.where(prob.valid > 0, trained[:, :-1], trained[:, :1])
    return out.scatter_(1, prob.present, present)


# -- memory -------------------------------------------------------------------------------------------------
def query_bytes(impl: str, n_neighbours: int, n_features: int, n_outputs: int, keep_weights: bool = False) -> int:
    """Approximate peak bytes one query's local problem holds during batched TTT (float32)."""
    n, h, C = n_neighbours, n_features, n_outputs
    gathered = 4 * n * h * 2                                      # neighbour features, and a copy
    if impl == "fast":
        present = min(n, C)
        return gathered + 4 * (6 * n * C + 5 * present * (h + 1) + 4 * n * present)
    return gathered + 4 * (5 * C * (h + 1) + 4 * n * C) + (4 * C * (h + 1) if keep_weights else 0)


def queries_per_batch(impl: str, memory_bytes: int, n_neighbours: int, n_features: int, n_outputs: int,
                      keep_weights: bool = False, limit: int = 4096) -> int:
    """How many queries fit in ``memory_bytes`` at once (at least 1, at most ``limit``)."""
    per = query_bytes(impl, n_neighbours, n_features, n_outputs, keep_weights)
    return int(max(1, min(limit, memory_bytes // per)))
