"""DenseTopKSAE: the plain dense twin of ``TopKSAE`` (dense code, dense matmul decode, ordinary autograd).

Slow on purpose and written to be obviously right; the tests check that the fast model's values, indices,
reconstruction, losses and every parameter gradient agree with it. Same parameters and state-dict keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sae import losses
from sae.model import SAEOutput, TopKSAE, dropout_scale


class DenseTopKSAE(TopKSAE):
    """``TopKSAE`` computed densely: ``z`` is the full ``(b, n_latents)`` code."""

    def _dense_pre(self, x: Tensor) -> Tensor:
        x_in = x - self.b_dec if self.config.subtract_decoder_bias else x
        pre = x_in @ self.W_enc + self.b_enc
        if self.training and self.config.dropout > 0:
            pre = pre * dropout_scale(tuple(pre.shape), self.config.dropout, pre)
        return pre

    def _activation(self, pre: Tensor) -> Tensor:
        return pre if self.is_paper else F.relu(pre)

    def encode(self, x: Tensor, k: int | None = None) -> tuple[Tensor, Tensor]:
        k = self._check_k(k)
        return torch.topk(self._activation(self._dense_pre(x)), k, dim=1, sorted=True)

    def dense_code(self, values: Tensor, indices: Tensor) -> Tensor:
        """Scatter ``(values, indices)`` into the dense ``(b, n_latents)`` code."""
        z = values.new_zeros(values.shape[0], self.config.n_latents)
        return z.scatter(1, indices, values)

    def decode(self, values: Tensor, indices: Tensor) -> Tensor:
        return self.dense_code(values, indices) @ self.decoder_weight() + self.b_dec

    def forward(self, x, k=None, dead_mask=None, x_var=None) -> SAEOutput:
        cfg = self.config
        k = self._check_k(k)
        pre = self._dense_pre(x)
        values, indices = torch.topk(self._activation(pre), k, dim=1, sorted=True)
        recon = self.dense_code(values, indices) @ self.decoder_weight() + self.b_dec
        fvu = losses.fvu(x, recon, x_var)
        residual = (x - recon).detach()
        dead = dead_mask.to(torch.bool) if dead_mask is not None else None
        has_dead = dead is not None and bool(dead.any())
        aux = fvu.new_zeros(())
        if self.is_paper:
            recon_loss = losses.mse(x, recon)
            if has_dead:
                # Exactly the authors' form: all dead pre-activations, no top-k, decoder with bias.
                ghost_recon = (pre * dead.float()) @ self.decoder_weight() + self.b_dec
                aux = losses.ghost_loss(ghost_recon, residual)
                loss = recon_loss + cfg.ghost_coef * aux
            else:
                loss = recon_loss
        else:
            recon_loss = fvu
            if has_dead:
                n_dead = int(dead.sum())
                k_aux = min(cfg.auxk_k_effective, n_dead)
                masked = pre.masked_fill(~dead, float("-inf"))
                aux_values, aux_indices = torch.topk(masked, k_aux, dim=1, sorted=True)
                residual_hat = self.dense_code(F.relu(aux_values), aux_indices) @ self.W_dec
                aux = losses.auxk_loss(residual, residual_hat, x, x_var, min(n_dead / cfg.auxk_k_effective, 1.0))
                loss = recon_loss + cfg.auxk_coef * aux
            else:
                loss = recon_loss
        return SAEOutput(recon=recon, values=values, indices=indices, fvu=fvu, recon_loss=recon_loss, aux=aux, loss=loss)
