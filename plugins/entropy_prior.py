"""A learned prior q(code_i | global tokens, position): bits of each patch token the globals do not explain."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tatok_core.contract.interfaces import EntropyContext, EntropyEstimate, EntropyEstimator, Facts, mixed_radix_digits
from tatok_plugins.layers import Transformer, check_heads, check_window, init_tokens, patch_layout

MEASURES = ("surprisal", "expected")


class GlobalConditionalPrior(EntropyEstimator):
    """Predicts every patch code from the global tokens and its position alone.

    Position queries (2-D sin-cos) and the quantized global vectors go through a small transformer;
    one softmax per code factor (FSQ: per dimension, VQ: over the codebook) gives q(code | globals,
    position). A token's information is ``-log2 q(actual code)`` (``measure="surprisal"``) or the
    entropy of q (``measure="expected"``). Its loss is the cross-entropy in bits/token.

    **No cheating**: the prior reads the globals and codes *detached*, so its loss trains only the
    prior; the encoder never learns to make tokens look predictable. ``condition_on_globals=False``
    hides the globals (for measuring how much they explain).
    """

    def __init__(
        self,
        facts: Facts | None = None,
        *,
        width: int = 128,
        depth: int = 2,
        heads: int = 4,
        measure: str = "surprisal",
        condition_on_globals: bool = True,
        window: int = 0,
        code_factors: tuple[int, ...] | None = None,
        dim: int | None = None,
    ) -> None:
        super().__init__(facts)
        self.window = check_window(window, self.label)
        if measure not in MEASURES:
            raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")
        check_heads(width, heads, self.label)
        self.code_factors = tuple(self.need("code_factors", code_factors))
        dim = self.need("dim", dim)
        self.measure, self.width, self.condition_on_globals = measure, width, condition_on_globals
        self.global_in = nn.Linear(dim, width)
        self.query = init_tokens(width)
        self.transformer = Transformer(width, depth, heads)
        self.head = nn.Linear(width, sum(self.code_factors))

    def log_probs(self, global_vectors: Tensor, grid: tuple[int, int]) -> list[Tensor]:
        """Per factor, log q over that factor's values: a list of (B, N, L_f)."""
        batch, m = global_vectors.shape[:2]
        m = m if self.condition_on_globals else 0
        positions, windows = patch_layout(grid, self.width, window=self.window, prefix=m, shift=self.training,
                                          device=global_vectors.device)
        queries = (self.query + positions).expand(batch, -1, -1)  # (B, N, W)
        x = torch.cat([self.global_in(global_vectors[:, :m].detach()), queries], dim=1)  # (B, M + N, W)
        x = self.transformer(x, windows=windows)
        logits = self.head(x[:, m:])  # (B, N, ΣL)
        return [F.log_softmax(part.float(), dim=-1) for part in logits.split(self.code_factors, dim=-1)]

    def forward(self, context: EntropyContext) -> EntropyEstimate:
        log_q = self.log_probs(context.global_vectors, context.grid)
        digits = mixed_radix_digits(context.patch_codes, self.code_factors)  # (B, N, F)
        nats = -torch.stack([lq.gather(-1, digits[..., f, None])[..., 0] for f, lq in enumerate(log_q)]).sum(0)  # (B, N)
        loss = nats.mean() / math.log(2)
        if self.measure == "surprisal":
            bits = nats / math.log(2)
        else:
            bits = -torch.stack([(lq.exp() * lq).sum(-1) for lq in log_q]).sum(0) / math.log(2)
        return EntropyEstimate(bits=bits.detach().clamp_min(0), loss=loss, metrics={"prior_bits_per_token": loss.detach()})

