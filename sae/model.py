"""TopKSAE: the top-k sparse autoencoder, with a fast sparse forward/backward."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae import losses
from sae.config import SAEConfig
from sae.selection import PRECISIONS, select_filtered, select_plain
from sae.sparse import SparsePattern, column_pre, gather_pre, sparse_decode


@dataclass
class SAEOutput:
    """What one forward pass returns; ``loss`` is the total that the trainer backpropagates."""

    recon: Tensor
    """Reconstruction ``(b, d_in)``."""
    values: Tensor
    """Code values ``(b, k)``, each row sorted descending."""
    indices: Tensor
    """Code latent indices ``(b, k)`` int64."""
    fvu: Tensor
    """Fraction of variance unexplained (scalar)."""
    recon_loss: Tensor
    """The reconstruction term of the loss: the FVU (``topk``) or the element-wise MSE (``paper``)."""
    aux: Tensor
    """AuxK loss (``topk``) or ghost-gradient loss (``paper``), unweighted; 0 without dead latents."""
    loss: Tensor
    """``recon_loss + auxk_coef * aux`` (``topk``) or ``recon_loss + ghost_coef * aux`` (``paper``)."""

    @property
    def active(self) -> Tensor:
        """``(b, k)`` bool: which selected latents fired (value > 0), for counting firing latents.

        For ``topk`` a zero value is a latent chosen among non-positive ReLU outputs; for ``paper`` the
        authors count a latent as active only when its (possibly negative) top-k value is > 0.
        """
        return self.values > 0


@dataclass
class _Selection:
    """The chosen latents of a batch and the no-grad values the differentiable gathers start from."""

    x_in: Tensor  # encoder input x - b_dec (or x), (b, d)
    indices: Tensor  # (b, k) top-k latents, sorted by (dropped-out) pre-activation, descending
    raw: Tensor  # (b, k) pre-activations before dropout at indices
    scale: Tensor | None  # (b, k) dropout multipliers at indices
    dead_raw: Tensor | None  # (b, n_dead) pre-activations of the dead latents
    dead_scale: Tensor | None  # (b, n_dead) dropout multipliers of the dead latents
    dead_cols: Tensor | None  # (n_dead,) dead latent indices


def dropout_scale(shape: tuple[int, ...], p: float, like: Tensor) -> Tensor:
    """Inverted-dropout multipliers: 0 with probability ``p``, else ``1 / (1 - p)`` (as ``nn.Dropout``)."""
    keep = torch.rand(shape, device=like.device) >= p
    return keep.to(like.dtype) / (1.0 - p)


class TopKSAE(nn.Module):
    """Top-k sparse autoencoder with weights ``W_enc (d, n)``, ``b_enc (n)``, ``W_dec (n, d)``, ``b_dec (d)``.

    ``topk`` variant (Gao et al. 2024, "Scaling and evaluating sparse autoencoders")::

        pre    = (x - b_dec) @ W_enc + b_enc          (the subtraction is optional: subtract_decoder_bias)
        z      = TopK_k(ReLU(pre))                    values >= 0, exactly k per row, sorted descending
        recon  = sum_i z_i W_dec[i] + b_dec           rows of W_dec kept at unit norm by the trainer
        loss   = FVU(x, recon) + auxk_coef * AuxK     AuxK: top-k_aux of the dead latents' pre-activations
                                                      reconstruct e = x - recon (no gradient to e)

    ``paper`` variant (the authors' model, github.com/patrikwolf/ttt_theory, sae/sae_topk.py)::

        pre    = Dropout_0.5(x @ W_enc + b_enc)       dropout in training only
        z      = TopK_k(pre)                          no ReLU: values may be negative
        recon  = sum_i z_i (W_dec[i] / ||W_dec[i]||) + b_dec     decoder normalised inside forward
        loss   = MSE(x, recon) + ghost_coef * MSE(D(pre * dead) + b_dec, x - recon)

    The forward never builds the dense ``(b, n)`` code: the dense pre-activations are computed once without
    autograd to choose the indices, and custom autograd functions (``sae/sparse.py``) give the exact sparse
    gradients. ``sae/reference.py`` is the plain dense twin.
    """

    def __init__(self, config: SAEConfig):
        super().__init__()
        self.config = config
        d, n = config.d_in, config.n_latents
        self.W_enc = nn.Parameter(torch.empty(d, n))
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.W_dec = nn.Parameter(torch.empty(n, d))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.precision = "fp32"
        self.last_exact_per_row = 0.0  # exact pre-activations per row that the last bf16 filter computed
        self.reset_parameters()

    @property
    def precision(self) -> str:
        """How the latents are chosen: ``"fp32"`` (one matmul in the parameters' dtype) or ``"bf16"`` (a bf16
        filter and exact float32 re-ranking: the same latents and values; the auxiliary losses on the dead
        latents then run in bfloat16). A run setting, not part of the saved model (``sae/precision.py``)."""
        return self._precision

    @precision.setter
    def precision(self, value: str) -> None:
        if value not in PRECISIONS:
            raise ValueError(f"--precision must be one of {PRECISIONS}, got {value!r}")
        self._precision = value

    @property
    def is_paper(self) -> bool:
        return self.config.variant == "paper"

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.is_paper:
                # Authors: xavier_uniform_ encoder, decoder = normalised encoder transpose (_init_weights).
                nn.init.xavier_uniform_(self.W_enc)
                self.W_dec.copy_(F.normalize(self.W_enc.t(), dim=1))
            else:
                # Gao et al. 2024, Sec. 2.2: random unit decoder rows, encoder initialised as their transpose.
                self.W_dec.normal_()
                self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))
                self.W_enc.copy_(self.W_dec.t())
            self.b_enc.zero_()
            self.b_dec.zero_()

    # ----------------------------------------------------------------------------------------- encoding
    def decoder_weight(self) -> Tensor:
        """The decoder rows actually used: ``W_dec``, or its row-normalised form for ``paper``."""
        return F.normalize(self.W_dec, dim=1) if self.is_paper else self.W_dec

    def _selection(self, x: Tensor, k: int, dead_cols: Tensor | None = None) -> "_Selection":
        """Choose the top-k latents of every row, without autograd (``sae/selection.py``, in ``precision``).

        Returns what the differentiable gathers need.
        """
        with torch.no_grad():
            x_in = x - self.b_dec if self.config.subtract_decoder_bias else x
            scale = None
            if self.training and self.config.dropout > 0:
                # Authors: nn.Dropout(0.5) on the pre-activations before top-k, active in training only. The
                # multipliers are drawn for the whole (b, n) batch at once, like nn.Dropout.
                scale = dropout_scale((x.shape[0], self.config.n_latents), self.config.dropout, x_in)
            n_exact = x.shape[0] * k
            if self._filtered(x):
                max_scale = 1.0 / (1.0 - self.config.dropout) if scale is not None else 1.0
                indices, raw, dead_raw, n_exact = select_filtered(
                    x_in, self.W_enc, self.b_enc, k, scale, dead_cols, max_scale
                )
            else:
                indices, raw, dead_raw = select_plain(x_in, self.W_enc, self.b_enc, k, scale, dead_cols)
            self.last_exact_per_row = n_exact / max(x.shape[0], 1)
            return _Selection(
                x_in=x_in,
                indices=indices,
                raw=raw,
                scale=None if scale is None else scale.gather(1, indices),
                dead_raw=dead_raw,
                dead_scale=None if scale is None or dead_cols is None else scale[:, dead_cols],
                dead_cols=dead_cols,
            )

    def _filtered(self, x: Tensor) -> bool:
        """Whether the bf16 filter chooses the latents: ``precision == "bf16"`` on float32 parameters and
        inputs, outside autocast (which picks the matmul's dtype itself)."""
        return (
            self.precision == "bf16"
            and self.W_enc.dtype == torch.float32
            and x.dtype == torch.float32
            and not torch.is_autocast_enabled(x.device.type)
        )

    def _values(self, x: Tensor, sel: "_Selection", pattern: SparsePattern) -> Tensor:
        """Differentiable (dropped-out, ReLU'd for ``topk``) pre-activations at the pattern; ``(b, k)``."""
        b_dec = self.b_dec if self.config.subtract_decoder_bias else None
        vals = gather_pre(x, self.W_enc, self.b_enc, b_dec, pattern, sel.raw, sel.x_in)
        if sel.scale is not None:
            vals = vals * sel.scale
        return vals if self.is_paper else F.relu(vals)

    def encode(self, x: Tensor, k: int | None = None) -> tuple[Tensor, Tensor]:
        """``x (b, d_in) -> (values (b, k), indices (b, k) int64)``, exactly k per row, sorted descending.

        ``k=None`` uses ``config.k``; the trainer may pass a larger k while annealing.
        """
        k = self._check_k(k)
        self._check_x(x)
        sel = self._selection(x, k)
        return self._values(x, sel, SparsePattern(sel.indices, self.config.n_latents)), sel.indices

    def decode(self, values: Tensor, indices: Tensor | SparsePattern) -> Tensor:
        """``(values (b, k), indices (b, k)) -> recon (b, d_in)`` without the dense ``(b, n)`` code."""
        return sparse_decode(values, indices, self.decoder_weight()) + self.b_dec

    # ----------------------------------------------------------------------------------------- forward
    def forward(
        self,
        x: Tensor,
        k: int | None = None,
        dead_mask: Tensor | None = None,
        x_var: float | Tensor | None = None,
    ) -> SAEOutput:
        """Encode, decode and compute the loss terms of ``x (b, d_in)``.

        ``dead_mask (n_latents,)`` bool marks latents the trainer considers dead (it owns the rule); they
        feed the AuxK (``topk``) or ghost-gradient (``paper``) loss. ``x_var`` normalises the FVU and AuxK
        (the data set's total variance); ``None`` uses the batch's own.
        """
        cfg = self.config
        k = self._check_k(k)
        self._check_x(x)
        dead_cols = None
        if dead_mask is not None:
            if dead_mask.shape != (cfg.n_latents,):
                raise ValueError(f"dead_mask must have shape ({cfg.n_latents},), got {tuple(dead_mask.shape)}")
            dead_cols = torch.nonzero(dead_mask.to(torch.bool), as_tuple=False).squeeze(1)
            if dead_cols.numel() == 0:
                dead_cols = None

        sel = self._selection(x, k, dead_cols)
        indices = sel.indices
        pattern = SparsePattern(indices, cfg.n_latents)  # shared by the encoder's and decoder's backward
        values = self._values(x, sel, pattern)

        recon = self.decode(values, pattern)
        fvu = losses.fvu(x, recon, x_var)
        zero = fvu.new_zeros(())
        if self.is_paper:
            recon_loss = losses.mse(x, recon)
            aux = zero
            if dead_cols is not None:
                aux = self._ghost(x, sel, recon)
            loss = recon_loss + cfg.ghost_coef * aux if cfg.ghost_coef > 0 and dead_cols is not None else recon_loss
        else:
            recon_loss = fvu
            aux = zero
            if dead_cols is not None:
                aux = self._auxk(x, sel, recon, x_var)
            loss = recon_loss + cfg.auxk_coef * aux if dead_cols is not None else recon_loss
        return SAEOutput(recon=recon, values=values, indices=indices, fvu=fvu, recon_loss=recon_loss, aux=aux, loss=loss)

    def _dead_pre(self, x: Tensor, sel: "_Selection") -> Tensor:
        """Differentiable (dropped-out) pre-activations of the dead latents only, ``(b, n_dead)``.

        The auxiliary losses touch only dead columns, so they are computed densely in that subspace: with
        few dead latents this costs ``b * d * n_dead``, far below the full matmul, and BLAS beats a scatter
        of the ``b * k_aux`` entries (k_aux = d/2 is large).
        """
        b_dec = self.b_dec if self.config.subtract_decoder_bias else None
        dead_pre = column_pre(x, self.W_enc, self.b_enc, b_dec, sel.dead_cols, sel.dead_raw, sel.x_in)
        if sel.dead_scale is not None:
            dead_pre = dead_pre * sel.dead_scale
        return dead_pre

    def _auxk(self, x: Tensor, sel: "_Selection", recon: Tensor, x_var) -> Tensor:
        """AuxK (Gao et al. 2024, Sec. A.2): the top-k_aux dead latents reconstruct the residual."""
        dead_cols = sel.dead_cols
        n_dead = dead_cols.numel()
        k_aux = min(self.config.auxk_k_effective, n_dead)
        dead_pre = self._dead_pre(x, sel)
        with torch.no_grad():
            # A 0/1 mask of each row's k_aux largest: dense (b, n_dead) ops then replace gather/scatter, and
            # when k_aux is more than half the dead latents it is cheaper to drop the smallest instead.
            # Only rows with more than k_aux positive pre-activations need it: elsewhere the k_aux largest
            # include every positive entry and the ReLU zeroes the rest. Dead latents seldom fire, so these
            # rows are few (none in the benchmark, where about half are positive): counting them (1 ms)
            # replaces a top-k over all rows (10 ms at b=4096 with 450 dead latents, measured).
            dp = dead_pre.detach()
            mask = None
            rows = torch.nonzero((dp > 0).sum(1) > k_aux).squeeze(1) if k_aux < n_dead else dp.new_empty(0)
            if rows.numel():
                sub = dp.index_select(0, rows)
                if 2 * k_aux > n_dead:
                    _, drop = torch.topk(sub, n_dead - k_aux, dim=1, largest=False, sorted=False)
                    sub_mask = torch.ones_like(sub).scatter_(1, drop, 0.0)
                else:
                    _, keep = torch.topk(sub, k_aux, dim=1, sorted=False)
                    sub_mask = torch.zeros_like(sub).scatter_(1, keep, 1.0)
                mask = torch.ones_like(dp).index_copy_(0, rows, sub_mask)
        code = F.relu(dead_pre) if mask is None else F.relu(dead_pre) * mask
        # In the dead pre-activations' dtype: bfloat16 after the bf16 filter (the matmul and its backward).
        residual_hat = code @ self.W_dec[dead_cols].to(code.dtype)
        residual = (x - recon).detach()
        return losses.auxk_loss(residual, residual_hat, x, x_var, min(n_dead / self.config.auxk_k_effective, 1.0))

    def _ghost(self, x: Tensor, sel: "_Selection", recon: Tensor) -> Tensor:
        """The authors' ghost loss on dead latents: dense over the dead columns only (others are zero)."""
        ghost_pre = self._dead_pre(x, sel)
        ghost_recon = ghost_pre @ self.decoder_weight()[sel.dead_cols].to(ghost_pre.dtype) + self.b_dec
        return losses.ghost_loss(ghost_recon, (x - recon).detach())

    # ----------------------------------------------------------------------------------------- helpers
    @torch.no_grad()
    def init_from_data_(self, x_sample: Tensor, method: str = "geometric_median") -> None:
        """Set ``b_dec`` from a data sample ``(m, d_in)``: its geometric median (Gao et al. 2024) or mean."""
        x = torch.as_tensor(x_sample, dtype=torch.float32, device=self.b_dec.device)
        self._check_x(x)
        if method == "mean":
            center = x.mean(0)
        elif method == "geometric_median":
            center = geometric_median(x)
        else:
            raise ValueError(f"--init-decoder-bias must be 'geometric_median' or 'mean', got {method!r}")
        self.b_dec.copy_(center.to(self.b_dec.dtype))

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale the rows of ``W_dec`` to unit norm (call after every optimizer step).

        A no-op for ``paper``, which normalises inside forward and never renormalises the stored weights.
        """
        if self.is_paper:
            return
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Project out the gradient component parallel to each decoder row (call before the step).

        With unit-norm rows this keeps Adam from spending its step on a direction that the renormalisation
        undoes (Gao et al. 2024, Sec. A.1). A no-op for ``paper``, whose gradient through the in-forward
        normalisation is already orthogonal to each row.
        """
        if self.is_paper or self.W_dec.grad is None:
            return
        w, g = self.W_dec, self.W_dec.grad
        # A norm reduction and an in-place addcmul_ instead of two more (n, d) temporaries: 2-3 ms a step.
        norm2 = torch.linalg.vector_norm(w, dim=1, keepdim=True).square_().clamp_min_(1e-30)
        g.addcmul_((g * w).sum(1, keepdim=True).div_(norm2), w, value=-1.0)

    def _check_k(self, k: int | None) -> int:
        if k is None:
            return self.config.k
        if not 1 <= int(k) <= self.config.n_latents:
            raise ValueError(f"k must be in [1, n_latents={self.config.n_latents}], got {k}")
        return int(k)

    def _check_x(self, x: Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != self.config.d_in:
            raise ValueError(f"the SAE takes inputs of shape (b, {self.config.d_in}), got {tuple(x.shape)}")


def geometric_median(x: Tensor, n_iter: int = 100, tol: float = 1e-7) -> Tensor:
    """Weiszfeld's iteration for the point minimising the sum of Euclidean distances to the rows of ``x``."""
    x = x.double()
    y = x.mean(0)
    for _ in range(n_iter):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-12)
        y_next = (w[:, None] * x).sum(0) / w.sum()
        if (y_next - y).norm() <= tol * max(y.norm().item(), 1.0):
            y = y_next
            break
        y = y_next
    return y.float()
