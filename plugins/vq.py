"""Vector quantization: nearest neighbour in a learned codebook (VQ-VAE; ViT-VQGAN's cosine variant).

Design choices, and why:

- ``l2_normalized`` (default): look up by cosine similarity between unit vectors, as ViT-VQGAN does;
  it keeps codes and encoder outputs on the same scale and markedly improves codebook usage.
- The nearest-neighbour search runs without gradient; the chosen rows are then *gathered* from the
  codebook. Embedding backward keeps only the indices, so restarting codes in place never invalidates a
  graph still waiting for backward (gradient accumulation over several forwards stays legal).
- Straight-through as ``q + (z - z.detach())``: the value is exactly ``q`` (so :meth:`codes_to_vectors`
  is bit-identical to ``forward`` in eval) and the gradient reaches z unchanged.
- Dead codes: ``usage`` holds an EMA (rate ``decay``) of each code's share of the assignments; the mean
  share is 1/K. In training, codes whose share falls below ``dead_threshold / K`` are restarted to
  randomly chosen (projected) encoder outputs of the current batch and given back the mean share. With
  the defaults (0.01, decay 0.99) a code must go unused for ~460 steps in a row before it is restarted.
- DDP: assignment counts and EMA sums are all-reduced, and restart vectors are drawn on rank 0 and
  broadcast, so buffers and the codebook stay identical on every rank and are a deterministic function
  of the (global) batch and the torch RNG state. Restarts leave an optimizer's moments for those rows
  stale, as every restart scheme does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from tatok_core.contract.errors import SpecError
from tatok_core.contract.interfaces import Facts, Quantized, Quantizer
from tatok_plugins.fsq import float32_region


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class VQ(Quantizer):
    """Nearest-neighbour codebook quantizer.

    Options: ``codebook_size`` (K), ``codebook_dim`` (lookup width; projected from/to ``dim`` when
    different), ``l2_normalized`` (cosine lookup), ``ema`` (codebook updated by EMA with Laplace
    smoothing instead of by gradient), ``decay`` (EMA rate), ``commitment`` (weight of the commitment
    loss), ``restart_dead`` and ``dead_threshold`` (fraction of the mean usage below which a code is dead),
    ``eps`` (Laplace smoothing of the EMA cluster sizes).
    Metrics (training, a 0-d tensor): ``dead_codes`` (codes restarted this step); codebook usage and
    perplexity on request (:meth:`Quantized.code_statistics`).
    """

    def __init__(
        self,
        facts: Facts | None = None,
        *,
        codebook_size: int = 1024,
        codebook_dim: int = 8,
        l2_normalized: bool = True,
        ema: bool = False,
        decay: float = 0.99,
        commitment: float = 0.25,
        restart_dead: bool = True,
        dead_threshold: float = 0.01,
        eps: float = 1e-5,
        dim: int | None = None,
    ) -> None:
        super().__init__(facts)
        dim = self.need("dim", dim, default=codebook_dim)  # standalone default: no projection
        if codebook_size < 1 or codebook_dim < 1:
            raise SpecError(f"{self.label}: codebook_size and codebook_dim must be >= 1")
        if not 0.0 <= decay < 1.0 or not 0.0 <= dead_threshold < 1.0 or commitment < 0 or eps <= 0:
            raise SpecError(f"{self.label}: need 0 <= decay < 1, 0 <= dead_threshold < 1, commitment >= 0, eps > 0")
        self.code_factors = (int(codebook_size),)
        self.dim, self.codebook_dim = dim, int(codebook_dim)
        self.l2_normalized, self.ema, self.restart_dead = bool(l2_normalized), bool(ema), bool(restart_dead)
        self.decay, self.commitment = float(decay), float(commitment)
        self.dead_threshold, self.eps = float(dead_threshold), float(eps)
        project = dim != codebook_dim
        self.project_in: nn.Module = nn.Linear(dim, codebook_dim) if project else nn.Identity()
        self.project_out: nn.Module = nn.Linear(codebook_dim, dim) if project else nn.Identity()

        K = self.code_factors[0]
        init = torch.randn(K, codebook_dim)  # (K, d)
        if self.l2_normalized:
            init = F.normalize(init, dim=-1)
        if self.ema:
            self.register_buffer("codebook", init)  # (K, d) not learned by gradient
            self.register_buffer("cluster_size", torch.ones(K))  # (K,) EMA counts
            self.register_buffer("embed_avg", init.clone())  # (K, d) EMA sums; codebook = avg / size
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("usage", torch.full((K,), 1.0 / K))  # (K,) EMA share of assignments

    def _lookup_table(self) -> Tensor:
        return F.normalize(self.codebook, dim=-1) if self.l2_normalized else self.codebook

    def _gather(self, codes: Tensor) -> Tensor:
        """Codes (...) → codebook rows (..., d); differentiable wrt the codebook, saves only indices."""
        q = F.embedding(codes, self.codebook)
        return F.normalize(q, dim=-1) if self.l2_normalized else q

    def forward(self, x: Tensor) -> Quantized:
        dtype = x.dtype
        h = self.project_in(x)  # (..., d)
        with float32_region(x.device):
            z = h.float()
            if self.l2_normalized:
                z = F.normalize(z, dim=-1)
            flat = rearrange(z, "... d -> (...) d")  # (n, d)
            with torch.no_grad():
                table = self._lookup_table()  # (K, d)
                if self.l2_normalized:
                    codes = (flat @ table.t()).argmax(dim=-1)  # (n,) max cosine
                else:
                    dist2 = flat.pow(2).sum(-1, keepdim=True) - 2 * flat @ table.t() + table.pow(2).sum(-1)
                    codes = dist2.argmin(dim=-1)  # (n,) nearest in L2
            codes = codes.reshape(z.shape[:-1])  # (...)
            q = self._gather(codes)  # (..., d)
            commit = F.mse_loss(z, q.detach())
            aux = self.commitment * commit
            if not self.ema:
                aux = aux + F.mse_loss(q, z.detach())  # codebook loss: moves codes toward encoder outputs
            vectors = q.detach() + (z - z.detach())  # (..., d) value exactly q, gradient straight to z
        metrics = {}
        if self.training and not x.is_meta:
            metrics["dead_codes"] = self._update(flat.detach(), rearrange(codes, "... -> (...)"))
        return Quantized(vectors=self.project_out(vectors).to(dtype), codes=codes, aux_loss=aux, metrics=metrics)

    @torch.no_grad()
    def _update(self, flat: Tensor, codes: Tensor) -> Tensor:
        """Training-time state: usage EMA, EMA codebook, dead-code restarts. Returns #codes restarted ().

        Without a host sync: every code draws a candidate vector and only the dead ones take it.
        """
        K = self.codebook_size
        counts = torch.bincount(codes, minlength=K).float()  # (K,)
        sums = torch.zeros_like(self.codebook).index_add_(0, codes, flat) if self.ema else None  # (K, d)
        if _distributed():
            dist.all_reduce(counts)
            if sums is not None:
                dist.all_reduce(sums)
        self.usage.mul_(self.decay).add_(counts / counts.sum().clamp_min(1), alpha=1 - self.decay)
        if self.ema:
            self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
            self.embed_avg.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            n = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.eps) / (n + K * self.eps) * n  # Laplace: no empty cluster
            new = self.embed_avg / smoothed[:, None]
            self.codebook.copy_(F.normalize(new, dim=-1) if self.l2_normalized else new)
        if not self.restart_dead or flat.shape[0] == 0:
            return counts.new_zeros((), dtype=torch.int64)
        dead = self.usage < self.dead_threshold / K  # (K,) same on every rank
        fresh = flat[torch.randint(0, flat.shape[0], (K,), device=flat.device)]  # (K, d) a candidate per code
        if _distributed():
            dist.broadcast(fresh, src=0)
        self.codebook.copy_(torch.where(dead[:, None], fresh.to(self.codebook.dtype), self.codebook))
        self.usage.copy_(torch.where(dead, 1.0 / K, self.usage))
        if self.ema:
            mean_size = self.cluster_size.mean()
            self.cluster_size.copy_(torch.where(dead, mean_size, self.cluster_size))
            self.embed_avg.copy_(torch.where(dead[:, None], fresh * mean_size, self.embed_avg))
        return dead.sum()

    def codes_to_vectors(self, codes: Tensor) -> Tensor:
        """Codes (...) → vectors (..., D), bit-identical to ``forward`` in eval mode."""
        with float32_region(codes.device):
            q = self._gather(codes.long())  # (..., d)
        return self.project_out(q)
