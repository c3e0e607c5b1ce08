"""``context``: a local causal prior over a token grid — the code length an entropy coder would write.

The transformer priors in :mod:`tatok_plugins.generator` read a token set as a sequence. Neighbouring
patch codes of a photo are strongly alike (a sky's codes repeat its neighbours'), and most of what a
code's neighbours say is said by the few above and to the left. This prior models exactly that, like
PixelCNN over the grid in raster order: for each position, whether it is kept and, if kept, its code,
given what is kept (and the codes) at the positions before it within a few rows and columns, plus the
global codes. Its negative log-likelihood is the length of an arithmetic code of the whole token set —
globals, which positions are kept, and their codes — so it says what the plain count
(:mod:`tatok_core.contract.bitrate`: log2 of the codebook per code, an enumerative code of the kept
positions) leaves on the table. Its walk — one choice at a time in raster order — samples, and drives
the range coder that writes compressed files (:mod:`tatok_core.workflows.compression`).

Layout: a masked convolution of radius ``rings`` reads the positions before the centre (the centre row
to its left, and the ``rings`` rows above), then ``depth`` masked 3×3 convolutions that may also read
the centre's own hidden state; each position's input is its code's digit embedding where kept plus two
flags (kept, inside the grid). The global codes are predicted slot by slot from what came before them,
and their mean embedding conditions every position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tatok_core.contract.errors import GenerationError
from tatok_core.contract.interfaces import Facts, Grid, Pick
from tatok_core.contract.tokens import Tokens
from tatok_plugins import generator as token_priors  # its drawing(): one sampling rule (temperature, top-k) for every prior
from tatok_plugins.generator import DigitEmbedding, DigitHead, GridPrior
from tatok_plugins.layers import init_tokens


class CausalConv2d(nn.Conv2d):
    """A ``same`` 2-D convolution that reads only positions before the centre in raster order (and the
    centre itself with ``include_centre``): rows below and, on the centre row, columns to the right are
    masked out of the kernel."""

    def __init__(self, channels_in: int, channels_out: int, radius: int, *, include_centre: bool) -> None:
        super().__init__(channels_in, channels_out, 2 * radius + 1, padding=radius)
        mask = torch.ones_like(self.weight)  # (out, in, k, k)
        mask[:, :, radius, radius + int(include_centre):] = 0
        mask[:, :, radius + 1:] = 0
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class ContextPrior(GridPrior):
    """Keep flags and codes of a token grid in raster order, each given its causal neighbourhood (module docs).

    Works on any grid (convolutions), so one prior scores whole photos of every size. Unconditional:
    ``labels`` are refused.
    """

    def __init__(
        self,
        facts: Facts | None = None,
        *,
        width: int = 96,
        rings: int = 2,
        depth: int = 2,
        code_factors: tuple[int, ...] | None = None,
        num_global: int | None = None,
        grid: tuple[int, int] | None = None,
        patch_size: int | None = None,
        image_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(facts)
        if width < 1 or rings < 1 or depth < 0:
            raise ValueError(f"{self.label}: need width ≥ 1, rings ≥ 1 and depth ≥ 0, got {width}, {rings}, {depth}")
        self.read_token_facts(code_factors, num_global, grid, patch_size, image_size)
        self.width = width
        self.reach = rings + depth  # rows above a position its prediction reads
        self.code_in = DigitEmbedding(self.code_factors, width)
        self.slots = init_tokens(self.num_global, width)  # (M, W) which global slot comes next
        self.global_context = nn.Linear(width, width)
        self.reader = CausalConv2d(width + 2, width, rings, include_centre=False)
        self.layers = nn.ModuleList(CausalConv2d(width, width, 1, include_centre=True) for _ in range(depth))
        self.keep_head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 1))
        self.code_head = DigitHead(self.code_factors, width)

    # -- the two halves of the model ----------------------------------------------------------------
    def global_contexts(self, global_codes: Tensor) -> tuple[Tensor, Tensor]:
        """Global codes (B, M) → the context predicting each (B, M, W) from the slots before it, and the
        summary every patch position reads (B, W)."""
        return self.global_contexts_of(self.code_in(global_codes))

    def global_contexts_of(self, embedded: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`global_contexts` from the global codes' embeddings (B, M, W)."""
        before = F.pad(embedded.cumsum(1), (0, 0, 1, 0))[:, : self.num_global]  # (B, M, W) sum of the earlier slots
        counts = torch.arange(self.num_global, device=embedded.device).clamp_min(1)[:, None]  # (M, 1)
        contexts = self.slots + self.global_context(before / counts)  # (B, M, W)
        summary = self.global_context(embedded.mean(1)) if self.num_global else embedded.new_zeros(
            embedded.shape[0], self.width)  # (B, W)
        return contexts, summary

    def patch_states(self, codes: Tensor, kept: Tensor, summary: Tensor) -> Tensor:
        """Dense codes (B, H, W'), kept (B, H, W'), global summary (B, W) → (B, H, W', W) the state each
        position's keep flag and code are predicted from (it reads only positions before it)."""
        return self.patch_states_of(self.code_in(codes), kept, summary)

    def patch_states_of(self, embedded: Tensor, kept: Tensor, summary: Tensor) -> Tensor:
        """:meth:`patch_states` from the codes' embeddings (B, H, W', W)."""
        flags = torch.stack([kept, torch.ones_like(kept)], dim=1).to(summary.dtype)  # (B, 2, H, W'): kept, inside
        embedded = embedded.masked_fill(~kept[..., None], 0.0).permute(0, 3, 1, 2)  # (B, W, H, W')
        x = F.gelu(self.reader(torch.cat([embedded, flags], 1)) + summary[:, :, None, None])  # (B, W, H, W')
        for layer in self.layers:
            x = x + F.gelu(layer(x))
        return x.permute(0, 2, 3, 1)  # (B, H, W', W)

    # -- the Generator interface ---------------------------------------------------------------------
    def log_likelihood(self, tokens: Tokens, labels: Tensor | None = None) -> Tensor:
        return sum(self.log_likelihood_parts(tokens, labels).values())  # type: ignore[return-value]

    def log_likelihood_parts(self, tokens: Tokens, labels: Tensor | None = None) -> dict[str, Tensor]:
        """(B,) nats of each part of a token set: ``globals``, ``positions`` (the keep flags) and ``codes``
        (of the kept patch tokens) — where an arithmetic coder driven by this prior spends its bits."""
        self.refuse_labels(labels)
        codes, kept = dense_grid(tokens)  # (B, H, W'), (B, H, W')
        contexts, summary = self.global_contexts(tokens.global_codes)
        states = self.patch_states(codes, kept, summary)  # (B, H, W', W)
        keep_logit = self.keep_head(states)[..., 0].float()  # (B, H, W')
        keep_nats = -F.binary_cross_entropy_with_logits(keep_logit, kept.float(), reduction="none")  # (B, H, W')
        code_nats = self.code_head.log_prob(states, codes).masked_fill(~kept, 0.0)  # (B, H, W')
        return {"globals": self.code_head.log_prob(contexts, tokens.global_codes).sum(-1),
                "positions": keep_nats.flatten(1).sum(1), "codes": code_nats.flatten(1).sum(1)}

    def relaxed_log_likelihood(self, global_digits: Tensor, patch_digits: Tensor, kept: Tensor) -> Tensor:
        """(B,) nats of a token set given as digit weights — globals (B, M, ΣL_f), the grid's codes
        (B, H, W', ΣL_f), one-hot for codes (:meth:`Quantizer.relaxed_digits`) — and its keep mask
        (B, H, W'): :meth:`log_likelihood` differentiable in the weights, so refinement can weigh what a
        code change costs the coder against what it buys the decode."""
        contexts, summary = self.global_contexts_of(self.code_in.relaxed(global_digits))
        states = self.patch_states_of(self.code_in.relaxed(patch_digits), kept, summary)  # (B, H, W', W)
        keep_logit = self.keep_head(states)[..., 0].float()  # (B, H, W')
        keep_nats = -F.binary_cross_entropy_with_logits(keep_logit, kept.float(), reduction="none")  # (B, H, W')
        code_nats = self.code_head.relaxed_log_prob(states, patch_digits).masked_fill(~kept, 0.0)  # (B, H, W')
        global_nats = self.code_head.relaxed_log_prob(contexts, global_digits).sum(-1)  # (B,)
        return global_nats + keep_nats.flatten(1).sum(1) + code_nats.flatten(1).sum(1)

    @torch.no_grad()
    def sample(
        self, n: int, *, grid: Grid, temperature: float, top_k: int, labels: Tensor | None, rng: torch.Generator
    ) -> Tokens:
        self.refuse_labels(labels)
        return self.walk(token_priors.drawing(temperature, top_k, rng), grid=grid, n=n)

    @torch.no_grad()
    def walk(self, pick: Pick, *, grid: Grid, given: Tokens | None = None, n: int = 1) -> Tokens:
        """The global codes slot by slot, then each position's keep flag and, where kept, its code, in raster
        order (the interface's contract). The states are built as the walk goes (:class:`RasterStates`):
        a position costs the same on any grid."""
        if given is not None:
            if tuple(given.grid) != tuple(grid):
                raise GenerationError(f"{self.label}: tokens on a {given.grid} grid walked on {grid}")
            n = given.batch_size
            known_codes, known_kept = dense_grid(given)  # (n, H, W'), (n, H, W')
        device = self.slots.device
        global_codes = torch.zeros(n, self.num_global, dtype=torch.long, device=device)
        for slot in range(self.num_global):  # each slot's context reads only the slots before it
            contexts, _ = self.global_contexts(global_codes)
            known = None if given is None else given.global_codes[:, slot]
            global_codes[:, slot] = self.code_head.choose(contexts[:, slot], pick, known)
        _, summary = self.global_contexts(global_codes)
        rows, cols = grid
        codes = torch.zeros(n, rows, cols, dtype=torch.long, device=device)
        kept = torch.zeros(n, rows, cols, dtype=torch.bool, device=device)
        raster = RasterStates(self, summary, grid)
        for row in range(rows):
            raster.start_row(row)
            for col in range(cols):
                state = raster.state(col)  # (n, W)
                keep_logits = F.pad(self.keep_head(state), (1, 0))  # (n, 2): dropped, kept
                keep = pick(keep_logits, None if given is None else known_kept[:, row, col].long()).bool()  # (n,)
                kept[:, row, col] = keep
                if bool(keep.any()):  # a code only where kept: a dropped position has none
                    known = None if given is None else known_codes[keep, row, col]
                    codes[keep, row, col] = self.code_head.choose(state[keep], pick, known)
                raster.place(col, codes[:, row, col], keep)
        image_size = self.image_size(grid) if given is None else given.image_size
        return sparse_tokens(global_codes, codes, kept, image_size)

    def refuse_labels(self, labels: Tensor | None) -> None:
        if labels is not None:
            raise GenerationError(f"{self.label} is unconditional: it takes no labels")


class RasterStates:
    """:meth:`ContextPrior.patch_states` computed one position at a time, in raster order, for a walk.

    Why: a walk needs each position's state just after the choices before it are made. Recomputing the
    convolutions over the window a position reads costs ~(reach + 1)·(2·reach + 1) outputs per position;
    here each output is computed once. Every layer's output at a position depends only on positions
    before it (and on itself through earlier layers), so once computed it is final. A row's share from
    the rows above — most of each kernel — is one thin convolution per layer when the row starts; a
    position adds only its left neighbours' share (and, past the reader, its own). The same
    arithmetic as the dense convolutions, summed in another order: logits agree to float rounding
    (which is why both ends of a coder walk the same way).
    """

    def __init__(self, prior: ContextPrior, summary: Tensor, grid: Grid) -> None:
        self.prior, self.summary = prior, summary  # summary (n, W)
        n, width = summary.shape
        reader = prior.reader
        radius = reader.padding[0]
        weight = reader.weight * reader.mask  # (W, C, k, k)
        self.radius = radius
        self.reader_above = weight[:, :, :radius]  # (W, C, r, k) the rows above
        self.reader_left = weight[:, :, radius, :radius].permute(2, 1, 0).reshape(-1, width)  # (r·C, W)
        # the layers are 3×3: one row above, and the left neighbour and the position itself on its row
        self.layers_above = [(layer.weight * layer.mask)[:, :, :1] for layer in prior.layers]  # (W, W, 1, 3)
        self.layers_here = [(layer.weight * layer.mask)[:, :, 1, :2].permute(2, 1, 0).reshape(-1, width)
                            for layer in prior.layers]  # (2·W, W): left neighbour, then itself
        channels = width + 2
        # inputs (code embedding, kept, inside) of every row so far, zero beyond the grid and not yet placed
        self.inputs = summary.new_zeros(n, channels, grid[0] + radius, grid[1] + 2 * radius)  # (n, C, r + H, 2r + W')
        depth = len(prior.layers) + 1
        self.previous = [summary.new_zeros(n, width, grid[1] + 2) for _ in range(depth)]  # (n, W, 1 + W' + 1) per layer
        self.current = [summary.new_zeros(n, width, grid[1] + 2) for _ in range(depth)]
        self.row = -1

    def start_row(self, row: int) -> None:
        """Each layer's share from the rows above, for every column of ``row`` (the rows above are final)."""
        self.row = row
        self.previous, self.current = self.current, [torch.zeros_like(x) for x in self.current]
        above = self.inputs[:, :, row:row + self.radius]  # (n, C, r, 2r + W'): rows row − r … row − 1
        self.above_reader = F.conv2d(above, self.reader_above, self.prior.reader.bias)[:, :, 0]  # (n, W, W')
        self.above_layers = [F.conv2d(x[:, :, None], weight, layer.bias)[:, :, 0]  # (n, W, W')
                             for x, weight, layer in zip(self.previous, self.layers_above, self.prior.layers)]

    def state(self, col: int) -> Tensor:
        """(n, W) the state of (row, col): what its keep flag and code are predicted from."""
        r = self.radius
        left = self.inputs[:, :, self.row + r, col:col + r].permute(0, 2, 1).flatten(1)  # (n, r·C) columns col − r …
        x = F.gelu(self.above_reader[..., col] + left @ self.reader_left + self.summary)  # (n, W)
        self.current[0][..., col + 1] = x
        for k, (above, here) in enumerate(zip(self.above_layers, self.layers_here)):
            neighbours = self.current[k][..., col:col + 2].permute(0, 2, 1).flatten(1)  # (n, 2·W) left, itself
            x = x + F.gelu(above[..., col] + neighbours @ here)
            self.current[k + 1][..., col + 1] = x
        return x

    def place(self, col: int, codes: Tensor, keep: Tensor) -> None:
        """Record the choices at (row, col): codes (n,) where ``keep`` (n,)."""
        embedded = self.prior.code_in(codes).masked_fill(~keep[:, None], 0.0)  # (n, W)
        flags = torch.stack([keep, torch.ones_like(keep)], dim=1).to(embedded.dtype)  # (n, 2)
        self.inputs[:, :, self.row + self.radius, col + self.radius] = torch.cat([embedded, flags], dim=1)


def dense_grid(tokens: Tokens) -> tuple[Tensor, Tensor]:
    """Tokens → dense codes (B, H, W) (0 where dropped) and the keep mask (B, H, W)."""
    n = tokens.num_patches
    codes, positions, _ = tokens.to_padded(pad_code=0, pad_position=n)  # (B, L)
    batch = codes.shape[0]
    dense = codes.new_zeros(batch, n + 1).scatter_(1, positions, codes)[:, :n]  # (B, N); the pad slot dropped
    kept = torch.zeros(batch, n + 1, dtype=torch.bool, device=codes.device).scatter_(1, positions, True)[:, :n]
    return dense.view(batch, *tokens.grid), kept.view(batch, *tokens.grid)


def sparse_tokens(global_codes: Tensor, codes: Tensor, kept: Tensor, image_size: tuple[int, int]) -> Tokens:
    """Dense codes (B, H, W) and keep mask (B, H, W) → Tokens (kept positions in raster order)."""
    batch, rows, cols = codes.shape
    flat_kept = kept.flatten(1)  # (B, N)
    positions = torch.arange(rows * cols, device=codes.device).expand(batch, -1)[flat_kept]  # (K,)
    cu_seqlens = F.pad(flat_kept.sum(1).cumsum(0), (1, 0)).to(torch.int32)  # (B + 1,)
    return Tokens(global_codes, codes.flatten(1)[flat_kept], positions, cu_seqlens, (rows, cols), image_size)

