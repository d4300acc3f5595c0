"""Batched local TTT: many queries' last layers trained at once.

Both modes take a batch of ``B`` local problems, each the features ``Z`` ``(B, n, h)`` of a query's ``n``
neighbours, their targets, the query's features ``(B, h)`` and the global last layer ``W0 (C, h)``, ``b0 (C,)``.
They train each head's *change* from ``(W0, b0)``, the bias as column ``h``, stacked into ``D (B, K, H)`` (``H``:
``h + 1`` padded for alignment), on outputs ``base + D [Z, 1, 0]ᵀ`` laid out ``(B, K, n)`` (outputs by rows);
``base`` holds the untrained outputs, computed once. Adam is invariant to that shift (its update depends on the
gradient only, which is the same for a weight and for its change), and the bias as one more column changes
nothing elementwise, so the algorithm is the reference loop's. What it buys: one matmul forward (the base added
in the same call) and one backward per step, one optimiser tensor, and per-step matmuls that carry only the
small change, so that their rounding in bf16 stays small.

* ``exact``: the reference loop's algorithm with the per-query changes stacked, ``K = C``: the cross-entropy
  gradient written out (``softmax − onehot``) and one ``torch.optim.Adam`` over the stack. It differs from the
  loop only by floating-point rounding. The queries go through in blocks of ``exact_block``: each step streams
  every head's change, gradient and Adam moments through memory, and a block of a few heads keeps that stream
  within the CPU's last-level cache, where a whole batch of heads would not.

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
  classes; ``fast`` is ``exact`` there. The problems go through sorted by their number of present classes, in
  chunks of ``FAST_CHUNK``, so that a chunk pads few rows.

``dtype=torch.bfloat16`` runs the per-step matmuls (and, in ``fast``, the global logits) in bf16; weights,
gradients, Adam moments and the exact mode's base stay float32. On a CPU, the blocks and chunks run side by side,
one per torch thread, each with torch single-threaded (``_map_chunks`` says why).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

EXACT_BLOCK_BYTES = 12 << 20
"""Most bytes of float32 training state (change, gradient, two Adam moments) one block of exact heads holds:
one head of a 1000-class, 512-d layer, which a server CPU's last-level cache keeps between steps; blocks of 1,
2 and 4 such heads ran alike in ``benchmarks/bench_ttt.py``'s setting, and small layers share a block."""
FAST_CHUNK = 32
"""Problems the fast mode trains together: enough that the per-step overhead of a dozen tensor operations is
shared, few enough that their features (2 MB in bf16 at ``n = 60``, ``h = 512``) stay in cache between the
forward and the backward matmul; chunks of 16 to 64 ran within the timing noise of each other on
``benchmarks/bench_ttt.py``'s problems."""


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
def stacked_adam(params: list[Tensor], lr: float) -> torch.optim.Adam:
    """One ``torch.optim.Adam`` (no weight decay) over parameters that stack one slice per query.

    Adam is elementwise and every query's head takes the same steps, so one optimiser over the stack is exactly
    one optimiser per head. Torch's fused kernel (one pass over memory instead of about seven) where the device
    has it, the multi-tensor path elsewhere; both agree with per-head Adam (tests/test_ttt.py).
    """
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except RuntimeError:  # a device or dtype without the fused kernel
        return torch.optim.Adam(params, lr=lr, foreach=True)


# -- one training loop for both modes ---------------------------------------------------------------------
ALIGN = 16
"""Columns of the augmented features are padded to a multiple of this (zeros, whose changes get no gradient and
never move), so that every row of the matmul operands starts on a 32-byte (bf16) or 64-byte (float32) boundary:
the fast mode ran about a quarter faster than with ``h + 1`` columns on ``benchmarks/bench_ttt.py``'s problems."""


def _augment(x: Tensor, column: Tensor | None = None) -> Tensor:
    """``[x, column, 0, …]`` ``(..., H)``: one more column (ones unless given), then zeros up to a multiple of
    ``ALIGN``. Features get ones and the layer gets its bias, so that ``[Z, 1, 0] [W0, b0, 0]ᵀ = Z W0ᵀ + b0``."""
    column = torch.ones_like(x[..., :1]) if column is None else column
    pad = -(x.shape[-1] + 1) % ALIGN
    return torch.cat([x, column, x.new_zeros(*x.shape[:-1], pad)], -1)


def _forward(base: Tensor, D: Tensor, Za: Tensor, dtype: torch.dtype) -> Tensor:
    """``base + D Zaᵀ`` ``(B, K, r)``: the matmul in ``dtype``, the sum in float32 (``Za`` already in ``dtype``)."""
    if dtype == torch.float32:
        return torch.baddbmm(base, D, Za.transpose(1, 2))
    return torch.add(base, torch.bmm(D.to(dtype), Za.transpose(1, 2)))       # promotes to float32


def mean_loss(out: Tensor, y: Tensor, task: str) -> Tensor:
    """Per-problem mean loss ``(B,)`` of outputs ``out`` ``(B, K, r)`` (K outputs of r rows): cross-entropy against
    class ids ``y`` ``(B, r)``, or the mean squared error against targets ``y`` ``(B, K, r)``."""
    if task == "classification":
        return torch.log_softmax(out, dim=1).gather(1, y[:, None, :]).mean((1, 2)).neg_()
    return (out - y).pow(2).mean((1, 2))


def _train(D: Tensor, Za: Tensor, base: Tensor, y: Tensor, schedule, lr: float, task: str,
           dtype: torch.dtype) -> Tensor:
    """Adam on the changes ``D (B, K, H)`` of outputs ``base + D Zaᵀ``, in place; returns the loss before each
    step ``(B, steps)``. ``Za`` ``(B, n, H)`` in ``dtype``; ``base`` ``(B, K, n)``; ``y`` as ``mean_loss``.

    The gradient w.r.t. the outputs is written out: ``(softmax − onehot) / r`` for cross-entropy, ``2 (out − y)
    / (r K)`` for the mean squared error, with the constant factor folded into the features once. The tensors
    of the change's size that a step writes (its bf16 copy, the gradient) are allocated once here: allocated
    afresh, each is paged in anew on every step, which took longer than the casts themselves (the exact mode
    ran about a quarter faster with these buffers on ``benchmarks/bench_ttt.py``'s problems).
    """
    B, K, n = base.shape
    r = schedule[0].stop - schedule[0].start if schedule else 1              # rows per step: n (ERM) or 1
    scale = 1.0 / r if task == "classification" else 2.0 / (r * K)
    Zg = Za * scale if scale != 1.0 else Za
    if task == "classification":
        target = torch.zeros_like(base).scatter_(1, y[:, None, :], 1.0)      # one-hot (B, K, n)
    low = dtype != torch.float32
    out = torch.empty(B, K, r, device=D.device)                             # outputs (regression: gradient)
    D.grad = torch.empty_like(D)
    if low:
        D_low, grad_low = torch.empty_like(D, dtype=dtype), torch.empty_like(D, dtype=dtype)
        out_low, g_low = torch.empty_like(out, dtype=dtype), torch.empty_like(out, dtype=dtype)
    row_loss = torch.empty(len(schedule), B, 1, r, device=D.device)
    opt = stacked_adam([D], lr)
    for t, rows in enumerate(schedule):
        if low:
            torch.bmm(D_low.copy_(D), Za[:, rows].transpose(1, 2), out=out_low)
            torch.add(base[..., rows], out_low, out=out)
        else:
            torch.baddbmm(base[..., rows], D, Za[:, rows].transpose(1, 2), out=out)
        if task == "classification":
            logp = torch.log_softmax(out, 1)
            torch.gather(logp, 1, y[:, None, rows], out=row_loss[t])
            g = logp.exp_().sub_(target[..., rows])
        else:
            g = out.sub_(y[..., rows])
            torch.mean(g.pow(2), 1, keepdim=True, out=row_loss[t])
        if low:
            D.grad.copy_(torch.bmm(g_low.copy_(g), Zg[:, rows], out=grad_low))
        else:
            torch.bmm(g, Zg[:, rows], out=D.grad)
        opt.step()
    D.grad = None
    curve = row_loss.mean((2, 3)).T
    return curve.neg_() if task == "classification" else curve


def _rows(n: int, mode: str, steps: int):
    """Which neighbour rows each optimiser step uses: all (ERM, ``steps`` times) or one each, nearest first."""
    if mode == "erm":
        return [slice(0, n)] * steps
    return [slice(j, j + 1) for j in range(n)]


def _map_chunks(run, chunks: list[Tensor]) -> list[LocalOutputs]:
    """``run`` on every chunk. On a CPU with several torch threads: one Python thread per torch thread, each
    running its chunks with torch single-threaded, so that every core trains its own heads.

    Why not torch's own threads: a step is a dozen operations of a few hundred microseconds, and each of them is
    a fork and join of the OpenMP team. With waiting threads that sleep (``OMP_WAIT_POLICY=PASSIVE``, the
    toolkit's default, ``artifacts/threads.py``) every join wakes a sleeping core, which on a virtual machine
    costs about as much as the operation; with spinning threads a core descheduled by another process stalls
    the team. Chunks on their own threads share nothing and never wait for each other; torch releases the GIL
    inside every operation. Measured on ``benchmarks/bench_ttt.py``'s problems (2 cores): the exact mode twice
    as fast under the sleeping policy and a sixth faster under the spinning one, the fast mode likewise.
    """
    workers = min(torch.get_num_threads(), len(chunks))
    if workers < 2 or chunks[0].device.type != "cpu":
        return [run(c) for c in chunks]
    before = torch.get_num_threads()
    try:   # the thread count is per thread for OpenMP and MKL, but torch keeps a process-wide copy: restore it
        with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            return list(pool.map(run, chunks))
    finally:
        torch.set_num_threads(before)


def _in_chunks(run, order: Tensor, size: int, keep_weights: bool = False) -> LocalOutputs:
    """``run(rows)`` on consecutive chunks of ``order`` (``size`` rows each), reassembled in the input order."""
    parts = _map_chunks(run, [order[s:s + size] for s in range(0, order.numel(), size)])
    if len(parts) == 1 and torch.equal(order, torch.arange(order.numel(), device=order.device)):
        return parts[0]
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    cat = [torch.cat([getattr(p, k) for p in parts])[inverse]
           for k in ("outputs", "final_loss", "update_norm", "loss_curve")]
    weights = None
    if keep_weights:
        weights = tuple(torch.cat([p.weights[i] for p in parts])[inverse] for i in (0, 1))
    return LocalOutputs(*cat, weights)


# -- exact --------------------------------------------------------------------------------------------------
def exact_block(n_outputs: int, n_features: int) -> int:
    """Queries per block of the exact mode: as many as keep the block's training state in ``EXACT_BLOCK_BYTES``."""
    return max(1, EXACT_BLOCK_BYTES // (16 * n_outputs * (n_features + 1)))


def ttt_exact(W0: Tensor, b0: Tensor, Z: Tensor, y: Tensor, q: Tensor, *, mode: str, steps: int, lr: float,
              task: str, dtype: torch.dtype = torch.float32, keep_weights: bool = False) -> LocalOutputs:
    """Train ``B`` copies of the last layer ``(W0, b0)`` on their neighbourhoods, a block at a time (module doc).

    ``y``: ``(B, n)`` class ids, or ``(B, n, C)`` regression targets.
    """
    def run(rows: Tensor) -> LocalOutputs:
        return _exact(W0, b0, Z[rows], y[rows], q[rows], _rows(Z.shape[1], mode, steps), lr, task, dtype,
                      keep_weights)
    order = torch.arange(Z.shape[0], device=Z.device)
    return _in_chunks(run, order, exact_block(*W0.shape), keep_weights)


def _exact(W0, b0, Z, y, q, schedule, lr, task, dtype, keep_weights) -> LocalOutputs:
    B, n, h = Z.shape
    Wa, Za, qa = _augment(W0, b0[:, None]), _augment(Z), _augment(q)
    base = torch.matmul(Za, Wa.T).transpose(1, 2).contiguous()              # (B, C, n), float32, once
    y = y if task == "classification" else y.transpose(1, 2)                # targets by output, as the outputs
    Za = Za.to(dtype)
    D = torch.zeros(B, W0.shape[0], Za.shape[2], device=Z.device)
    curve = _train(D, Za, base, y, schedule, lr, task, dtype)
    final = mean_loss(_forward(base, D, Za, dtype), y, task)
    query = _forward(torch.matmul(qa, Wa.T)[..., None], D, qa[:, None].to(dtype), dtype).squeeze(2)
    norm = D.pow(2).sum((1, 2)).sqrt()                                     # the padding columns stay 0
    weights = (D[..., :h].add(W0), D[..., h].add(b0)) if keep_weights else None
    return LocalOutputs(query, final, norm, curve, weights)


# -- fast ---------------------------------------------------------------------------------------------------
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
    valid = torch.arange(P, device=y.device)[None, :] < counts[:, None]
    y_pos = torch.searchsorted(present.masked_fill(~valid, torch.iinfo(y.dtype).max).contiguous(), y)
    return present, valid, y_pos


def _fast_base(L0: Tensor, present: Tensor, valid: Tensor) -> Tensor:
    """Outputs ``(B, P + 1, n)`` of the untrained fast model from the global logits ``L0`` ``(B, n, C)``: the
    present classes' logits (−inf on padding) and, last, the absent classes' logsumexp (−inf if none)."""
    B, n, _ = L0.shape
    index = present[:, None, :].expand(-1, n, -1)
    base = torch.empty(B, present.shape[1] + 1, n, device=L0.device)
    base[:, :-1] = L0.gather(-1, index).transpose(1, 2).masked_fill_(~valid[:, :, None], float("-inf"))
    base[:, -1] = torch.logsumexp(L0.scatter_(-1, index, float("-inf")), dim=-1)   # L0 is not needed afterwards
    return base


def ttt_fast(W0: Tensor, b0: Tensor, Z: Tensor, y: Tensor, q: Tensor, *, mode: str, steps: int, lr: float,
             task: str, dtype: torch.dtype = torch.float32) -> LocalOutputs:
    """Present classes trained exactly, absent classes moved by one shared Adam-trained shift (module doc).

    Each problem's changes are stacked as ``D = [ΔW_present, Δb_present; s, s_b]`` ``(P + 1, H)``.
    """
    if task != "classification":
        return ttt_exact(W0, b0, Z, y, q, mode=mode, steps=steps, lr=lr, task=task, dtype=dtype)
    n_present = (torch.sort(y, dim=1).values.diff(dim=1) != 0).sum(1) + 1
    order = torch.argsort(n_present, stable=True)                      # a chunk of alike problems pads little

    Wa = _augment(W0, b0[:, None]).to(dtype)

    def run(rows: Tensor) -> LocalOutputs:
        return _fast(Wa, Z[rows], y[rows], q[rows], _rows(Z.shape[1], mode, steps), lr, dtype)
    return _in_chunks(run, order, FAST_CHUNK)


def _fast(Wa, Z, y, q, schedule, lr, dtype) -> LocalOutputs:
    """One chunk; ``Wa`` ``(C, H)``: the augmented global layer in ``dtype``."""
    B, n, h = Z.shape
    present, valid, y_pos = _present_classes(y)
    Za, qa = _augment(Z.to(dtype)), _augment(q.to(dtype))
    base = _fast_base(torch.matmul(Za, Wa.T).float(), present, valid)        # from the global logits, once
    D = torch.zeros(B, present.shape[1] + 1, Za.shape[2], device=Z.device)
    curve = _train(D, Za, base, y_pos, schedule, lr, "classification", dtype)
    final = mean_loss(_forward(base, D, Za, dtype), y_pos, "classification")
    change = _forward(torch.zeros(B, D.shape[1], 1, device=Z.device), D, qa[:, None], dtype).squeeze(2)
    query = torch.matmul(qa, Wa.T).float()                                 # (B, C) global logits
    trained = query.gather(1, present).add_(change[:, :-1])
    # Padding repeats the first present class: give it that class's value so that the duplicate writes agree.
    query.add_(change[:, -1:]).scatter_(1, present, torch.where(valid, trained, trained[:, :1]))
    n_absent = Wa.shape[0] - valid.sum(1)
    moved = D[:, :-1].pow(2).sum((1, 2))                                     # padding rows never move
    norm = (moved + n_absent * D[:, -1].pow(2).sum(1)).sqrt()
    return LocalOutputs(query, final, norm, curve)


# -- memory -------------------------------------------------------------------------------------------------
def query_bytes(impl: str, n_neighbours: int, n_features: int, n_outputs: int, keep_weights: bool = False) -> int:
    """Approximate bytes one query of a batch holds (float32): its gathered problem (neighbour features, targets,
    query features) and its results (query outputs, and the trained head when kept)."""
    n, h, C = n_neighbours, n_features, n_outputs
    return 4 * (n * h + 2 * n + h + 3 * C) + (4 * C * (h + 1) if keep_weights and impl == "exact" else 0)


def chunk_bytes(impl: str, n_neighbours: int, n_features: int, n_outputs: int) -> int:
    """Approximate peak working bytes of the chunk in training, whatever the batch: the exact block's base
    outputs, features and training state; the fast chunk's global logits, features and small heads."""
    n, h, C = n_neighbours, n_features, n_outputs
    if impl == "fast":
        P = min(n, C) + 1
        return FAST_CHUNK * 4 * (2 * n * C + 3 * n * (h + ALIGN) + 5 * P * (h + ALIGN) + 5 * P * n)
    block = exact_block(C, h)
    return block * 4 * (4 * C * n + 3 * n * (h + ALIGN) + 5 * C * (h + ALIGN))


def queries_per_batch(impl: str, memory_bytes: int, n_neighbours: int, n_features: int, n_outputs: int,
                      keep_weights: bool = False, limit: int = 4096) -> int:
    """How many queries fit in ``memory_bytes`` beside the chunks' working memory (at least 1, at most ``limit``)."""
    per = query_bytes(impl, n_neighbours, n_features, n_outputs, keep_weights)
    in_flight = max(1, torch.get_num_threads())                           # chunks trained at once (_map_chunks)
    free = memory_bytes - in_flight * chunk_bytes(impl, n_neighbours, n_features, n_outputs)
    return int(max(1, min(limit, free // per)))
