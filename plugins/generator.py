"""Autoregressive priors over TaTok tokens: the adaptive-length ``adaptive`` and the fixed-rate ``raster``.

Sequence of ``adaptive`` for one image with M global codes g and k kept patch tokens (position p,
code c) on an N-patch grid; the state after each input predicts the next item::

    step      0       1 … M−1        M                  M+1          …   M+k
    input     [BOS]   g_1 … g_{M−1}  g_M                (p_1, c_1)   …   (p_k, c_k)
    predicts  g_1     g_2 … g_M      p_1 then c_1       p_2 then c_2 …   EOS

A patch step predicts the next kept position (one after the previous one, or EOS = N) and then, given
the chosen position, its code. So a kept token costs **one** transformer step, not two as with separate
position and code tokens, and an image costs M + k + 1 steps against M + N for ``raster``: the saving of
adaptive tokens carries over to generation. Positions only increase, so every sampled sequence is a
valid token set by construction.

Codes are predicted digit by digit over the quantizer's mixed-radix ``code_factors`` (see
:class:`DigitHead`): the likelihood stays exact while no layer is as wide as the code space (FSQ
(8,)*6 = 262144 codes). Grid positions are embedded by an MLP of 2-D sin-cos features, which is defined
for any grid, so a prior can also sample grids other than the one it was trained on.
"""

from __future__ import annotations

import math

import attrs
import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import Tensor, nn

from tatok_core.contract.errors import GenerationError
from tatok_core.contract.interfaces import Facts, Generator, Grid, Pick, mixed_radix_digits
from tatok_core.contract.tokens import Tokens
from tatok_plugins.layers import KVCache, Transformer, check_heads, init_tokens, sincos_2d


def draw(logits: Tensor, temperature: float, top_k: int, rng: torch.Generator) -> Tensor:
    """One index per row of ``logits`` (B, V), −inf meaning impossible: softmax at ``temperature``
    over the ``top_k`` largest logits (0 = all of them)."""
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, -math.inf)
    return torch.multinomial(logits.softmax(-1), 1, generator=rng)[:, 0]  # (B,)


def drawing(temperature: float, top_k: int, rng: torch.Generator) -> Pick:
    """The pick of a sampler: :func:`draw` at ``temperature`` over the ``top_k`` largest logits."""
    return lambda logits, _given: draw(logits, temperature, top_k, rng)


@attrs.frozen(eq=False)
class StepSequence:
    """Tokens as the ``adaptive`` prior's steps (module docs): what it trains on and what it samples.

    ``positions`` (B, S) holds each image's kept positions in increasing order, then EOS (= N) from
    step k on; ``codes`` (B, S) the code of every kept step, 0 from step k on. S ≥ the longest k + 1.
    """

    global_codes: Tensor  # (B, M)
    positions: Tensor  # (B, S)
    codes: Tensor  # (B, S)
    grid: Grid
    image_size: tuple[int, int]

    @property
    def eos(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def kept(self) -> Tensor:
        """(B, S) bool: steps that keep a token (a prefix of each row)."""
        return self.positions < self.eos

    @classmethod
    def from_tokens(cls, tokens: Tokens) -> StepSequence:
        eos = tokens.num_patches
        codes, positions, _ = tokens.to_padded(pad_code=0, pad_position=eos)  # (B, L)
        return cls(
            global_codes=tokens.global_codes,
            positions=F.pad(positions, (0, 1), value=eos),  # (B, L + 1): every image ends with EOS
            codes=F.pad(codes, (0, 1), value=0),
            grid=tokens.grid,
            image_size=tokens.image_size,
        )

    def to_tokens(self) -> Tokens:
        kept = self.kept  # (B, S)
        cu_seqlens = F.pad(kept.sum(1).cumsum(0), (1, 0)).to(torch.int32)  # (B + 1,)
        return Tokens(self.global_codes, self.codes[kept], self.positions[kept], cu_seqlens, self.grid, self.image_size)


class DigitEmbedding(nn.Module):
    """Codes (...) → (..., W) as the sum of one learned vector per mixed-radix digit.

    (ΣL_f)·W parameters instead of K·W (K = 262144 for FSQ (8,)*6), and codes sharing digits — FSQ
    codes sharing channel values — share features.
    """

    def __init__(self, factors: tuple[int, ...], width: int) -> None:
        super().__init__()
        self.factors = factors
        self.table = nn.Embedding(sum(factors), width)
        nn.init.normal_(self.table.weight, std=0.02)
        self.register_buffer("offsets", torch.tensor([0, *factors[:-1]]).cumsum(0), persistent=False)

    def forward(self, codes: Tensor) -> Tensor:
        digits = mixed_radix_digits(codes, self.factors)  # (..., F)
        return self.table(digits + self.offsets).sum(-2)  # (..., W)

    def relaxed(self, digit_weights: Tensor) -> Tensor:
        """Digit weights (..., ΣL_f) — one block of L_f per digit, one-hot for a code
        (:meth:`Quantizer.relaxed_digits`) — → (..., W): the same embedding, differentiable in the weights."""
        return digit_weights.to(self.table.weight.dtype) @ self.table.weight  # (..., W)


class DigitHead(nn.Module):
    """p(code | context) = Π_f p(d_f | context, d_<f) over the code's mixed-radix digits.

    Digits go in the quantizer's order (first = least significant; FSQ's digits are the channels of
    one vector, so no order is more natural). Each digit has a small MLP reading the context plus the
    embeddings of the digits already chosen, so the likelihood is exact — not a product of independent
    marginals — while no layer is as wide as the code space: six 8-way softmaxes replace one
    262144-way softmax, and sampling a code costs F small MLPs.
    """

    def __init__(self, factors: tuple[int, ...], width: int) -> None:
        super().__init__()
        self.factors = factors
        self.heads = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Linear(width, size))
            for size in factors
        )
        self.chosen = nn.ModuleList(nn.Embedding(size, width) for size in factors[:-1])

    def log_prob(self, context: Tensor, codes: Tensor) -> Tensor:
        """Contexts (..., W) and codes (...) → log p(code | context) (...) in nats: :meth:`relaxed_log_prob`
        at the codes' one-hot digits."""
        digits = mixed_radix_digits(codes, self.factors)  # (..., F)
        one_hot = torch.cat([F.one_hot(digits[..., f], size) for f, size in enumerate(self.factors)], dim=-1)  # (..., ΣL_f)
        return self.relaxed_log_prob(context, one_hot.to(context.dtype))

    def relaxed_log_prob(self, context: Tensor, digit_weights: Tensor) -> Tensor:
        """Contexts (..., W) and digit weights (..., ΣL_f) → Σ_f Σ_l w_f(l) log p(d_f = l | context, d_<f)
        (...) in nats: :meth:`log_prob` where the weights are a code's one-hot digits, and differentiable
        in them — the rate term of rate-aware refinement (``Tokenizer.refine``)."""
        total = torch.zeros(digit_weights.shape[:-1], dtype=torch.float32, device=digit_weights.device)
        for f, weights in enumerate(digit_weights.split(list(self.factors), dim=-1)):  # (..., L_f) each
            log_p = F.log_softmax(self.heads[f](context).float(), dim=-1)  # (..., L_f)
            total = total + (weights.float() * log_p).sum(-1)
            if f < len(self.chosen):
                context = context + weights.to(context.dtype) @ self.chosen[f].weight
        return total

    def sample(self, context: Tensor, temperature: float, top_k: int, rng: torch.Generator) -> Tensor:
        """Contexts (B, W) → codes (B,), one digit after the other."""
        return self.choose(context, drawing(temperature, top_k, rng))

    def choose(self, context: Tensor, pick: Pick, given: Tensor | None = None) -> Tensor:
        """Contexts (B, W) → codes (B,), each digit made by ``pick`` (given codes (B,): known digits)."""
        known = None if given is None else mixed_radix_digits(given, self.factors)  # (B, F)
        codes = torch.zeros(context.shape[0], dtype=torch.long, device=context.device)
        place = 1
        for f, head in enumerate(self.heads):
            digit = pick(head(context), None if known is None else known[:, f])  # (B,)
            codes = codes + digit * place
            place *= self.factors[f]
            if f < len(self.chosen):
                context = context + self.chosen[f](digit)
        return codes


class GridPrior(Generator):
    """What every built-in prior reads from its facts — the code space, the number of globals, the grid
    and image size it trains on — and the image size its samples decode to. (The facts stay keyword
    arguments of each prior's own ``__init__``: that signature is what its options are checked against.)"""

    def read_token_facts(self, code_factors: tuple[int, ...] | None, num_global: int | None,
                         grid: tuple[int, int] | None, patch_size: int | None,
                         image_size: tuple[int, int] | None) -> None:
        self.code_factors = tuple(self.need("code_factors", code_factors))
        self.num_global = int(self.need("num_global", num_global))
        self.grid: Grid = tuple(self.need("grid", grid))  # type: ignore[assignment]
        self.patch_size = int(self.need("patch_size", patch_size))
        full = (self.grid[0] * self.patch_size, self.grid[1] * self.patch_size)
        self.trained_image_size = tuple(self.need("image_size", image_size, default=full))

    def image_size(self, grid: Grid) -> tuple[int, int]:
        """The image size sampled tokens decode to: the training size on its grid, else the full grid."""
        if grid == self.grid:
            return self.trained_image_size  # type: ignore[return-value]
        return (grid[0] * self.patch_size, grid[1] * self.patch_size)


class _TokenPrior(GridPrior):
    """The backbone both priors share: [BOS (+ class)], the M global codes, then patch steps, through
    one causal transformer; the code of whatever comes next is predicted from the state plus a query
    saying where it goes (a global slot or a grid position)."""

    def __init__(
        self,
        facts: Facts | None = None,
        *,
        width: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        code_factors: tuple[int, ...] | None = None,
        num_global: int | None = None,
        grid: tuple[int, int] | None = None,
        patch_size: int | None = None,
        image_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(facts)
        check_heads(width, heads, self.label)
        if num_classes < 0:
            raise ValueError(f"num_classes must be ≥ 0, got {num_classes}")
        self.read_token_facts(code_factors, num_global, grid, patch_size, image_size)
        self.width, self.num_classes = width, num_classes
        self.bos = init_tokens(width)
        self.classes = nn.Embedding(num_classes, width) if num_classes else None
        self.slots = init_tokens(self.num_global, width)  # where each global code goes
        self.where_mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
        self.code_in = DigitEmbedding(self.code_factors, width)
        self.query = nn.Linear(width, width)
        self.transformer = Transformer(width, depth, heads, mlp_ratio)
        self.code_head = DigitHead(self.code_factors, width)
        self._add_heads()

    def _add_heads(self) -> None:
        """Heads a prior needs beyond the shared ones."""

    def where(self, grid: Grid) -> Tensor:
        """(N, W) embedding of every grid position: an MLP of 2-D sin-cos, defined for any grid."""
        return self.where_mlp(sincos_2d(grid, self.width, self.bos.device))

    def _start(self, batch: int, labels: Tensor | None) -> Tensor:
        """(B, 1, W): the BOS step, carrying the class when the prior is class-conditional."""
        start = self.bos.expand(batch, 1, -1)
        if self.classes is None:
            if labels is not None:
                raise GenerationError(f"{self.label} is unconditional (num_classes=0) but was given labels")
            return start
        if labels is None or labels.shape != (batch,):
            raise GenerationError(f"{self.label} is class-conditional: it needs labels of shape ({batch},)")
        if bool(((labels < 0) | (labels >= self.num_classes)).any()):
            raise GenerationError(f"labels must lie in [0, {self.num_classes})")
        return start + self.classes(labels)[:, None]

    def _prefix(self, global_codes: Tensor, labels: Tensor | None) -> Tensor:
        """(B, 1 + M, W): BOS and the global codes, as teacher-forced input."""
        start = self._start(global_codes.shape[0], labels)
        return torch.cat([start, self.code_in(global_codes) + self.slots], dim=1)

    def _global_log_likelihood(self, states: Tensor, global_codes: Tensor) -> Tensor:
        """(B,) nats of the globals; the state at step j (B, ≥M, W) predicts global j."""
        context = states[:, : self.num_global] + self.query(self.slots)  # (B, M, W)
        return self.code_head.log_prob(context, global_codes).sum(-1)

    def _sample_globals(
        self, n: int, labels: Tensor | None, cache: list[KVCache], temperature: float, top_k: int,
        rng: torch.Generator,
    ) -> tuple[Tensor, Tensor]:
        """Decode BOS and the M globals into ``cache``: (state after the last one (n, W), codes (n, M))."""
        state = self.transformer(self._start(n, labels), causal=True, cache=cache)[:, -1]  # (n, W)
        codes = torch.zeros(n, self.num_global, dtype=torch.long, device=state.device)
        for j in range(self.num_global):
            codes[:, j] = self.code_head.sample(state + self.query(self.slots[j]), temperature, top_k, rng)
            step = self.code_in(codes[:, j]) + self.slots[j]  # (n, W)
            state = self.transformer(step[:, None], causal=True, cache=cache)[:, -1]
        return state, codes


class AdaptivePrior(_TokenPrior):
    """Adaptive-length prior: one step per kept patch token, then EOS (sequence: module docs).

    Each step predicts the next kept position among those after the previous one, or EOS, then its
    code given that position, so an image with k kept tokens costs M + k + 1 steps.
    """

    def _add_heads(self) -> None:
        self.position_key = nn.Linear(self.width, self.width)  # position p scores ⟨key(state), where(p)⟩
        self.eos_logit = nn.Linear(self.width, 1)

    def position_logits(self, states: Tensor, where: Tensor, previous: Tensor) -> Tensor:
        """States (B, T, W), where (N, W), previous kept position (B, T) (−1 before the first) →
        logits (B, T, N + 1) of the next position or EOS (index N); positions ≤ previous are −inf."""
        scores = einsum(self.position_key(states), where, "b t w, n w -> b t n") / math.sqrt(self.width)
        taken = torch.arange(where.shape[0], device=states.device) <= previous[..., None]  # (B, T, N)
        return torch.cat([scores.masked_fill(taken, -math.inf), self.eos_logit(states)], dim=-1).float()

    def log_likelihood(self, tokens: Tokens, labels: Tensor | None = None) -> Tensor:
        steps = StepSequence.from_tokens(tokens)
        where = self.where(tokens.grid)  # (N, W)
        last = tokens.num_patches - 1
        patch_in = self.code_in(steps.codes[:, :-1]) + where[steps.positions[:, :-1].clamp_max(last)]  # (B, S-1, W)
        states = self.transformer(torch.cat([self._prefix(tokens.global_codes, labels), patch_in], 1), causal=True)
        patch_states = states[:, self.num_global :]  # (B, S, W): state s predicts patch step s
        previous = F.pad(steps.positions[:, :-1], (1, 0), value=-1)  # (B, S)
        position_lp = F.log_softmax(self.position_logits(patch_states, where, previous), -1)  # (B, S, N + 1)
        position_lp = position_lp.gather(-1, steps.positions[..., None])[..., 0]  # (B, S)
        context = patch_states + self.query(where[steps.positions.clamp_max(last)])  # (B, S, W)
        code_lp = self.code_head.log_prob(context, steps.codes)  # (B, S)
        until_eos = F.pad(steps.kept[:, :-1], (1, 0), value=True)  # (B, S): kept steps and the EOS
        patches = position_lp.where(until_eos, 0).sum(1) + code_lp.where(steps.kept, 0).sum(1)
        return self._global_log_likelihood(states, tokens.global_codes) + patches

    @torch.no_grad()
    def sample(
        self, n: int, *, grid: Grid, temperature: float, top_k: int, labels: Tensor | None, rng: torch.Generator
    ) -> Tokens:
        eos = grid[0] * grid[1]
        where = self.where(grid)  # (N, W)
        cache = self.transformer.new_cache(1 + self.num_global + eos)
        state, global_codes = self._sample_globals(n, labels, cache, temperature, top_k, rng)  # (n, W)
        positions = torch.full((n, eos + 1), eos, dtype=torch.long, device=state.device)  # EOS until filled
        codes = torch.zeros_like(positions)
        rows = torch.arange(n, device=state.device)  # the images in the batch
        previous = torch.full((n,), -1, dtype=torch.long, device=state.device)
        for step in range(eos + 1):  # after position N−1 only EOS is left
            position = draw(self.position_logits(state[:, None], where, previous[:, None])[:, 0], temperature, top_k, rng)
            going = position < eos  # a finished image has previous = EOS, so it draws EOS again
            finished = int((~going).sum())
            if finished == len(rows):
                break
            if 4 * finished >= len(rows):
                # Finished images leave the batch and the cache once they are a quarter of it: one cache
                # copy per quarter, not per image. Until then they only draw EOS again.
                rows, position, state = rows[going], position[going], state[going]
                for layer in cache:
                    layer.select(going)
                going = going[going]
            code = torch.zeros_like(position)  # (A,), 0 for finished images
            code[going] = self.code_head.sample(state[going] + self.query(where[position[going]]), temperature, top_k, rng)
            positions[rows, step], codes[rows, step] = position, code
            previous = position
            step_in = self.code_in(code) + where[position.clamp_max(eos - 1)]  # (A, W)
            state = self.transformer(step_in[:, None], causal=True, cache=cache)[:, 0]
        return StepSequence(global_codes, positions, codes, grid, self.image_size(grid)).to_tokens()


class RasterPrior(_TokenPrior):
    """Fixed-rate counterpart of ``adaptive``: every patch code in raster order, M + N steps.

    Same backbone and code heads (no position head, no EOS), for comparisons at equal model size.
    It models complete grids: encode its training tokens with the filter ``all``.
    """

    def log_likelihood(self, tokens: Tokens, labels: Tensor | None = None) -> Tensor:
        n = tokens.num_patches
        lengths = tokens.lengths
        if not bool((lengths == n).all()):
            raise GenerationError(
                f"{self.label} models every patch token, but these images keep {int(lengths.min())}–"
                f"{int(lengths.max())} of {n}: encode them with the filter 'all'"
            )
        codes = rearrange(tokens.codes, "(b n) -> b n", n=n)  # N increasing positions in [0, N): raster order
        where = self.where(tokens.grid)  # (N, W)
        patch_in = self.code_in(codes[:, :-1]) + where[:-1]  # (B, N − 1, W)
        states = self.transformer(torch.cat([self._prefix(tokens.global_codes, labels), patch_in], 1), causal=True)
        patches = self.code_head.log_prob(states[:, self.num_global :] + self.query(where), codes)  # (B, N)
        return self._global_log_likelihood(states, tokens.global_codes) + patches.sum(1)

    @torch.no_grad()
    def sample(
        self, n: int, *, grid: Grid, temperature: float, top_k: int, labels: Tensor | None, rng: torch.Generator
    ) -> Tokens:
        num = grid[0] * grid[1]
        where = self.where(grid)  # (N, W)
        cache = self.transformer.new_cache(self.num_global + num)
        state, global_codes = self._sample_globals(n, labels, cache, temperature, top_k, rng)  # (n, W)
        codes = torch.zeros(n, num, dtype=torch.long, device=state.device)
        for i in range(num):
            codes[:, i] = self.code_head.sample(state + self.query(where[i]), temperature, top_k, rng)
            if i + 1 < num:
                step = self.code_in(codes[:, i]) + where[i]  # (n, W)
                state = self.transformer(step[:, None], causal=True, cache=cache)[:, 0]
        device = state.device
        return Tokens(
            global_codes=global_codes,
            codes=rearrange(codes, "b n -> (b n)"),
            positions=torch.arange(num, device=device).repeat(n),
            cu_seqlens=(torch.arange(n + 1, device=device) * num).to(torch.int32),
            grid=grid,
            image_size=self.image_size(grid),
        )
