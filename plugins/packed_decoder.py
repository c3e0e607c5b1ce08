"""The packed decoder: heavy layers over the globals and the KEPT tokens only, a light stage fills the rest.

Why: a decoder that pads back to the full grid with mask tokens costs the same at every budget and
learns nothing about filling holes on purpose. Here

1. **Heavy stage** (``depth`` blocks, ``width``): the globals, a few *layout* tokens and the kept patch
   tokens. Per-token work (LayerNorm, qkv, MLP) runs on the packed kept tokens — ``(K, W)``, the
   FlashAttention varlen layout — so it falls with the kept count. Patch tokens attend to the kept
   tokens of their w×w window (alternately shifted by w/2, Swin-style) plus to the *prefix* (globals +
   layout tokens); the prefix attends to every kept token of its image. Attention runs over the windows
   that hold a kept token, each padded only to the fullest one (:class:`Packing`): cost O(K·(L + P)),
   L ≤ w²; with nothing kept (the globals-only decode) only the prefix attends. The prefix is the same
   P tokens at every budget — a fixed cost — so ``prefix_mlp_ratio`` can give it a narrow MLP.
2. **Fill stage** (``fill_depth`` blocks, ``fill_width``): every grid position — the heavy output where
   a token was kept, a learned mask token where it was dropped (plus, with ``fill_spread``, the mean of
   the nearest kept positions: the fill starts from the neighbours' guess) — attends inside its window plus to the
   prefix, then a linear head makes pixels and a small conv smooths the seams. Cost O(N·(w² + P)) at a
   small width: the light part (the last block's prefix is read by nothing and is not updated).

Positions are given twice: within the window (local structure looks the same in a crop and in a
whole photo) and *image-relative* (normalised coordinates), so that the globals-only decode — no patch
token kept — can lay out a coarse image of the whole picture; within-window positions alone make every
window look alike to the globals, which then carry only the mean colour.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from tatok_core.contract.interfaces import Decoder, Facts, Grid
from tatok_plugins.layers import (cached_for_autograd, check_heads, grid_coordinates, init_tokens, init_weights,
                                   relative_embedding, sincos_at, start_missing)


@cached_for_autograd(maxsize=16)
def grid_positions(grid: Grid, window: int, width: int, device: torch.device) -> Tensor:
    """(N, width) position embedding of every grid position: half within its window, half image-relative.
    Cached: a decode of the same size reuses it (never modified in place)."""
    rows, cols = grid_coordinates(grid, device)  # (N,) each
    half = width // 2 - (width // 2) % 4
    local = sincos_at(rows % window, cols % window, half)  # (N, ~W/2) within the window
    relative = relative_embedding(rows, cols, grid, width - half)  # (N, ~W/2) within the image
    return torch.cat([local, relative], dim=1)


def scatter_packed(tokens: Tensor, where: Tensor) -> Tensor:
    """Packed (K, C) → dense (B, N, C), zeros where ``where`` (B, N) is False; a view when all are True
    (K = B·N is known from the shapes, so no host sync decides it)."""
    if tokens.shape[0] == where.numel():
        return tokens.reshape(*where.shape, -1)
    dense = tokens.new_zeros(*where.shape, tokens.shape[1])
    dense[where] = tokens
    return dense


def box_sum_3x3(x: Tensor) -> Tensor:
    """(B, C, H, W) → the sum over each 3×3 neighbourhood, zeros beyond the border; two separable
    shifted sums, ~10× faster on CPU than ``avg_pool2d`` on these small grids."""
    padded = F.pad(x, (1, 1, 1, 1))  # (B, C, H + 2, W + 2)
    rows = padded[..., :-2] + padded[..., 1:-1] + padded[..., 2:]  # (B, C, H + 2, W)
    return rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]  # (B, C, H, W)


def spread_kept(dense: Tensor, keep: Tensor, grid: Grid, steps: int) -> tuple[Tensor, Tensor]:
    """Fill dropped positions with the mean of their kept 3×3 neighbours; positions farther away take
    the mean of the ring filled before them, ``steps`` rings at most.

    dense (B, N, C) is read only where ``keep`` (B, N); the result (B, N, C) equals it there and is zero
    where no kept position lies within ``steps``. The second result, ``ring`` (B, N), says how far the
    nearest kept position is: 0 where kept, i where filled from the i-th ring, ``steps`` + 1 where
    none is within reach. Why: a dropped patch is best guessed from
    its kept neighbours (averaging them beats a mask token by several dB), so the fill stage starts from
    that guess and learns only the correction. Cost O(steps · N · C).
    """
    batch, n, channels = dense.shape
    keep_map = keep.reshape(batch, 1, *grid).to(dense.dtype)  # (B, 1, gh, gw)
    value = dense.transpose(1, 2).reshape(batch, channels, *grid) * keep_map  # (B, C, gh, gw)
    # the known-flag rides along as one more channel: one box sum per ring gives the neighbours' total and
    # their count, and total / count sets the flag of a freshly reached position to exactly 1
    state = torch.cat([value, keep_map], dim=1)  # (B, C + 1, gh, gw)
    ring = torch.where(keep, 0, steps + 1)  # (B, N)
    for step in range(1, steps + 1):
        total = box_sum_3x3(state)  # (B, C + 1, gh, gw): zero wherever nothing is known yet
        weight = total[:, -1:]  # (B, 1, gh, gw) how many known neighbours
        fresh = (state[:, -1:] == 0) & (weight > 0)  # (B, 1, gh, gw) reached for the first time
        state = torch.where(fresh, total / weight.clamp_min(1.0), state)
        ring = ring.masked_fill(fresh.reshape(batch, n), step)
    return state[:, :-1].reshape(batch, channels, n).transpose(1, 2), ring


class WindowLayout:
    """Which w×w window (shifted by ``offset``) each grid position falls in; windows are padded at the
    borders. ``window_of`` (N,) indexes the G windows of one image, row-major."""

    def __init__(self, grid: Grid, window: int, offset: int, device: torch.device) -> None:
        rows, cols = grid_coordinates(grid, device)  # (N,) each
        r, c = rows + offset, cols + offset  # (N,)
        windows_per_row = -(-(grid[1] + offset) // window)
        self.num_windows = -(-(grid[0] + offset) // window) * windows_per_row
        self.window_of = (r // window) * windows_per_row + c // window  # (N,)


class Packing:
    """Packed tokens (K, C) laid out as R groups of at most L, each group's tokens in its first slots.

    ``group`` (K,) says which of ``num_groups`` groups each token belongs to (image b owns groups
    b·``per_image`` … (b+1)·``per_image`` − 1); with ``compact`` only the groups holding a token get a
    row (R ≤ num_groups), else every group does. Attention inside a group then costs R·L², L the fullest
    group: it falls with the kept tokens, and dropped positions are neither queries nor keys.
    """

    def __init__(self, group: Tensor, num_groups: int, *, compact: bool, per_image: int = 1) -> None:
        counts = torch.bincount(group, minlength=num_groups)  # (num_groups,)
        held = counts > 0
        row_of = held.cumsum(0) - 1 if compact else torch.arange(num_groups, device=group.device)  # (num_groups,)
        order = group.argsort(stable=True)  # tokens grouped, row-major inside a group
        first = counts.cumsum(0) - counts  # (num_groups,) where each group starts in ``order``
        self.slot = torch.empty_like(group)
        self.slot[order] = torch.arange(group.numel(), device=group.device) - first[group[order]]  # (K,)
        self.row = row_of[group]  # (K,)
        groups = held.nonzero()[:, 0] if compact else torch.arange(num_groups, device=group.device)  # (R,)
        self.rows, self.image = groups.numel(), groups // per_image  # R, (R,) the image of each row
        self.length = int(counts.max()) if group.numel() else 0
        self.flat = self.row * self.length + self.slot  # (K,) each token's slot in the flattened (R·L) rows
        self.valid = torch.zeros(self.rows * self.length, dtype=torch.bool, device=group.device)
        self.valid[self.flat] = True
        self.valid = self.valid.view(self.rows, self.length)  # (R, L)

    def pack(self, tokens: Tensor) -> Tensor:
        """(K, C) → (R, L, C), zeros in the empty slots (index_copy: one flat row index, no advanced indexing)."""
        out = tokens.new_zeros(self.rows * self.length, tokens.shape[1])
        return out.index_copy_(0, self.flat, tokens).view(self.rows, self.length, tokens.shape[1])

    def unpack(self, grouped: Tensor) -> Tensor:
        """(R, L, C) → (K, C) in the packed order."""
        return grouped.reshape(self.rows * self.length, grouped.shape[-1]).index_select(0, self.flat)


def packings(layout: WindowLayout, where: Tensor) -> tuple[Packing, Packing]:
    """The kept tokens of ``where`` (B, N) by window (only windows holding one) and by image (every image)."""
    image, position = where.nonzero(as_tuple=True)  # (K,) each, row-major: the packed order
    windows = Packing(image * layout.num_windows + layout.window_of[position], where.shape[0] * layout.num_windows,
                      compact=True, per_image=layout.num_windows)
    return windows, Packing(image, where.shape[0], compact=False)


@cached_for_autograd(maxsize=64)
def window_layout(grid: Grid, window: int, offset: int, device: torch.device) -> WindowLayout:
    """:class:`WindowLayout`, cached: decodes of one size share it (and so :func:`dense_packings`)."""
    return WindowLayout(grid, window, offset, device)


@cached_for_autograd(maxsize=64)
def dense_packings(layout: WindowLayout, batch: int) -> tuple[Packing, Packing]:
    """:func:`packings` with every position kept (the fill stage): the same for every decode of a size, so
    built once — a fixed cost of each decode otherwise. Never modified in place."""
    return packings(layout, torch.ones(batch, layout.window_of.numel(), dtype=torch.bool,
                                       device=layout.window_of.device))


def per_block(layouts: tuple[WindowLayout, WindowLayout], where: Tensor | None, depth: int,
              batch: int = 0) -> list[tuple[Packing, Packing]]:
    """The packings of ``depth`` blocks that alternate between ``layouts``: each layout is packed once.
    ``where`` None: every position of ``batch`` images (:func:`dense_packings`)."""
    packed = [packings(layout, where) if where is not None else dense_packings(layout, batch)
              for layout in layouts[:depth]]
    return [packed[i % 2] for i in range(depth)]


class PrefixWindowAttention(nn.Module):
    """Patches attend to the kept patches of their window and to a prefix of P tokens; the prefix attends to
    itself and every kept patch of its image. One learned sink key keeps every softmax defined."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.sink = init_tokens(2, dim)  # one key and one value

    def forward(self, tokens: Tensor, prefix: Tensor, packed: tuple[Packing, Packing], *,
                update_prefix: bool = True) -> tuple[Tensor, Tensor | None]:
        """tokens (K, W) packed, prefix (B, P, W), ``packed``: the tokens by window and by image
        (:func:`packings`) → updated (tokens (K, W), prefix (B, P, W), or None without ``update_prefix``:
        the last block's prefix is read by nothing). Every projection runs on the K kept tokens only, and
        attention only among them (plus the prefix)."""
        windows, images = packed
        batch, width = prefix.shape[0], prefix.shape[2]
        pq, pk, pv = self.qkv(prefix).chunk(3, dim=-1)  # (B, P, W)
        sink_k, sink_v = (self.sink[i].expand(batch, 1, width) for i in range(2))  # (B, 1, W)
        pk, pv = torch.cat([sink_k, pk], 1), torch.cat([sink_v, pv], 1)  # (B, 1 + P, W)
        split = lambda t: rearrange(t, "b s (h d) -> b h s d", h=self.heads)  # noqa: E731
        merge = lambda t: rearrange(t, "b h s d -> b s (h d)")  # noqa: E731
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)  # (K, W) each
        if tokens.shape[0]:  # patches → the kept patches of their window + the prefix
            wq, wk, wv = windows.pack(q), windows.pack(k), windows.pack(v)  # (R, L, W)
            keys = torch.cat([pk.index_select(0, windows.image), wk], 1)  # (R, 1 + P + L, W); index_select:
            values = torch.cat([pv.index_select(0, windows.image), wv], 1)  # its backward adds rows, ~20× faster on CPU
            mask = torch.cat([windows.valid.new_ones(windows.valid.shape[0], pk.shape[1]), windows.valid], 1)
            out = F.scaled_dot_product_attention(split(wq), split(keys), split(values), attn_mask=mask[:, None, None])
            tokens = windows.unpack(merge(out))  # (K, W)
        if not update_prefix:
            return self.proj(tokens), None
        # prefix → prefix + every kept patch of its image
        keys = torch.cat([pk, images.pack(k)], 1)  # (B, 1 + P + L_img, W)
        values = torch.cat([pv, images.pack(v)], 1)
        mask = torch.cat([images.valid.new_ones(batch, pk.shape[1]), images.valid], 1)[:, None, None]  # (B, 1, 1, S)
        prefix_out = merge(F.scaled_dot_product_attention(split(pq), split(keys), split(values), attn_mask=mask))
        return self.proj(tokens), self.proj(prefix_out)


class PackedBlock(nn.Module):
    """Pre-norm block whose per-token work runs only on the tokens that exist (the packed ones).

    The prefix's MLP uses only the first ``prefix_hidden`` hidden units of the patches' MLP (same
    weights, no extra parameters): the prefix is the same P tokens at every budget, so its share of a
    decode is a fixed cost that a full-width MLP makes as large as the work on ~P kept patches.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float, prefix_mlp_ratio: float | None = None) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.prefix_hidden = hidden if prefix_mlp_ratio is None else int(dim * prefix_mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = PrefixWindowAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def _prefix_mlp(self, prefix: Tensor) -> Tensor:
        """(B, P, W) → (B, P, W) through the first ``prefix_hidden`` hidden units of ``mlp``."""
        up, down, hidden = self.mlp[0], self.mlp[2], self.prefix_hidden
        if hidden == up.out_features:
            return self.mlp(prefix)
        inner = F.gelu(F.linear(prefix, up.weight[:hidden], up.bias[:hidden]))  # (B, P, hidden)
        return F.linear(inner, down.weight[:, :hidden], down.bias)

    def forward(self, tokens: Tensor, prefix: Tensor, packed: tuple[Packing, Packing], *,
                update_prefix: bool = True) -> tuple[Tensor, Tensor]:
        """tokens (K, W) packed; ``packed`` says where they sit (:func:`packings`). Without
        ``update_prefix`` (the last block) the prefix is only attended to and returned as it came."""
        update, prefix_update = self.attn(self.norm1(tokens), self.norm1(prefix), packed, update_prefix=update_prefix)
        tokens = tokens + update  # (K, W)
        tokens = tokens + self.mlp(self.norm2(tokens))
        if prefix_update is not None:
            prefix = prefix + prefix_update  # (B, P, W)
            if self.prefix_hidden:
                prefix = prefix + self._prefix_mlp(self.norm2(prefix))
        return tokens, prefix


class PackedDecoder(Decoder):
    """Heavy transformer over globals + layout tokens + kept tokens (packed), light fill of every position.

    Options: ``width`` (heavy width, 0 = the encoder's), ``depth``, ``heads``, ``fill_width``,
    ``fill_depth``, ``window`` (patches per window side), ``layout`` (a layout×layout grid of learned
    tokens at image-relative positions that gather the coarse picture), ``refine`` (conv channels, 0 =
    none), ``fill_spread`` (3×3 rings over which a dropped position takes the mean of the nearest kept
    ones before the fill stage; 0 = the mask token alone), ``canvas`` (a dropped position that no kept
    token is within ``fill_spread`` rings of starts from the layout tokens' output interpolated to its
    place instead: a coarse picture laid out by the globals, all there is in a globals-only decode),
    ``canvas_gate`` (the canvas at *every* dropped position, scaled per channel by a learned gain for
    its distance in rings to the nearest kept token — 1 beyond ``fill_spread`` and 0 nearer at
    initialisation, which is ``canvas`` alone: the decoder learns how much of the coarse picture a
    position near a kept token still needs), ``prefix_mlp_ratio`` (the heavy blocks' MLP width for the
    prefix, ≤ ``mlp_ratio``; 0 = attention only; default ``mlp_ratio``: the prefix is a fixed cost of
    every decode, so a narrow one lets the cost fall further with the kept tokens).

    Facts: ``dim``, ``patch_size``, ``channels``, ``num_global`` and, optionally, ``global_grid`` (a global
    tokenizer whose first a×a globals stand for grid cells: those get their cells' image-relative
    positions, the same features the layout tokens and fill positions carry).
    """

    def __init__(
        self,
        facts: Facts | None = None,
        *,
        dim: int | None = None,
        patch_size: int | None = None,
        channels: int | None = None,
        num_global: int | None = None,
        global_grid: int | None = None,
        width: int = 0,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        fill_width: int = 128,
        fill_depth: int = 2,
        window: int = 8,
        layout: int = 4,
        refine: int = 32,
        fill_spread: int = 0,
        canvas: bool = False,
        canvas_gate: bool = False,
        prefix_mlp_ratio: float | None = None,
    ) -> None:
        super().__init__(facts)
        dim = self.need("dim", dim)
        self.patch_size = self.need("patch_size", patch_size)
        self.channels = self.need("channels", channels, default=3)
        self.num_global = self.need("num_global", num_global)
        # a global tokenizer whose first a×a globals stand for the cells of an a×a grid says so: those
        # globals then carry their cell's image-relative place, which the layout and fill tokens match by
        self.global_grid = int(self.need("global_grid", global_grid, default=0, optional=True))
        if self.global_grid**2 > self.num_global:
            raise ValueError(f"{self.label}: global_grid = {self.global_grid} needs {self.global_grid}² ≤ "
                             f"num_global = {self.num_global}")
        if window < 1 or layout < 0 or depth < 0 or fill_depth < 1 or fill_spread < 0:
            raise ValueError(f"{self.label}: need window ≥ 1, layout ≥ 0, depth ≥ 0, fill_depth ≥ 1, fill_spread ≥ 0")
        if prefix_mlp_ratio is not None and not 0 <= prefix_mlp_ratio <= mlp_ratio:
            raise ValueError(f"{self.label}: prefix_mlp_ratio must lie in [0, mlp_ratio = {mlp_ratio:g}], "
                             f"got {prefix_mlp_ratio:g}")
        if canvas and not layout:
            raise ValueError(f"{self.label}: canvas = true interpolates the layout tokens, so it needs layout ≥ 1")
        if canvas_gate and not canvas:
            raise ValueError(f"{self.label}: canvas_gate = true weighs the canvas, so it needs canvas = true")
        self.fill_spread, self.canvas = fill_spread, canvas
        self.width, self.fill_width, self.window, self.layout = width or dim, fill_width, window, layout
        check_heads(self.width, heads, self.label)
        check_heads(self.fill_width, heads, self.label)
        self.project = nn.Linear(dim, self.width)
        self.global_position = init_tokens(max(self.num_global, 1), self.width)
        self.layout_tokens = init_tokens(max(layout * layout, 1), self.width)
        self.heavy = nn.ModuleList(PackedBlock(self.width, heads, mlp_ratio, prefix_mlp_ratio) for _ in range(depth))
        self.heavy_norm = nn.LayerNorm(self.width)
        self.to_fill = nn.Linear(self.width, self.fill_width)
        self.mask_token = init_tokens(self.fill_width)
        self.canvas_gain = None  # per ring 1 … fill_spread + 1 (out of reach): the share of the canvas a position takes
        if canvas_gate:
            start = torch.zeros(fill_spread + 1, self.fill_width)  # (spread + 1, F)
            start[-1] = 1.0  # the canvas rule: only out of reach
            self.canvas_gain = nn.Parameter(start)
        self.fill = nn.ModuleList(PackedBlock(self.fill_width, heads, mlp_ratio) for _ in range(fill_depth))
        self.fill_norm = nn.LayerNorm(self.fill_width)
        self.to_pixels = nn.Linear(self.fill_width, self.channels * self.patch_size**2)
        self.refine = nn.Sequential(
            nn.Conv2d(self.channels, refine, 3, padding=1), nn.GELU(), nn.Conv2d(refine, self.channels, 3, padding=1)
        ) if refine else None
        self.apply(init_weights)
        if self.refine is not None:
            nn.init.zeros_(self.refine[-1].weight)
            nn.init.zeros_(self.refine[-1].bias)

    def _load_from_state_dict(self, state_dict: dict[str, Tensor], prefix: str, *args: object) -> None:
        """Weights saved without ``canvas_gate`` load into a decoder with it: the gain keeps its initial
        value, with which the decoder computes exactly what the saved one did (so ``train.init`` can
        start a gated decoder from an ungated model)."""
        start_missing(self, state_dict, prefix, "canvas_gain")
        super()._load_from_state_dict(state_dict, prefix, *args)

    @staticmethod
    def _grid_positions(side: int, width: int, device: torch.device) -> Tensor:
        """(side², width) image-relative positions of the cells of a side×side grid, row-major."""
        return relative_embedding(*grid_coordinates((side, side), device), (side, side), width)

    def _canvas(self, layout_tokens: Tensor, grid: Grid) -> Tensor:
        """(B, L², F) layout tokens (row-major, image-relative) → (B, N, F) bilinear at every grid position."""
        batch, _, width = layout_tokens.shape
        coarse = layout_tokens.transpose(1, 2).reshape(batch, width, self.layout, self.layout)  # (B, F, L, L)
        return F.interpolate(coarse, size=grid, mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)

    def _layouts(self, grid: Grid, device: torch.device) -> tuple[WindowLayout, WindowLayout]:
        """The unshifted and the half-shifted windows blocks alternate between; in training add a random
        offset so crops contain window borders and partial windows as whole photos do."""
        base = int(torch.randint(self.window, ())) if self.training else 0
        shifted = (base + self.window // 2) % self.window
        return window_layout(grid, self.window, base, device), window_layout(grid, self.window, shifted, device)

    def forward(self, global_vectors: Tensor, patch_vectors: Tensor, keep: Tensor, grid: Grid) -> Tensor:
        batch, n, _ = patch_vectors.shape
        m, device = global_vectors.shape[1], patch_vectors.device
        layouts = self._layouts(grid, device)
        positions = grid_positions(grid, self.window, self.width, device).to(patch_vectors.dtype)  # (N, W)
        tokens = self.project(patch_vectors[keep]) + positions.expand(batch, -1, -1)[keep]  # (K, W) packed
        prefix = self.project(global_vectors) + self.global_position[:m]  # (B, M, W)
        if self.global_grid:
            cells = self._grid_positions(self.global_grid, self.width, device).to(prefix.dtype)  # (a², W)
            prefix = prefix + F.pad(cells, (0, 0, 0, m - cells.shape[0]))  # (B, M, W)
        if self.layout:
            layout_tokens = self.layout_tokens + self._grid_positions(self.layout, self.width, device)  # (L², W)
            prefix = torch.cat([prefix, layout_tokens.to(prefix.dtype).expand(batch, -1, -1)], dim=1)  # (B, P, W)
        for block, packed in zip(self.heavy, per_block(layouts, keep, len(self.heavy))):
            tokens, prefix = block(tokens, prefix, packed)
        tokens, prefix = self.to_fill(self.heavy_norm(tokens)), self.to_fill(self.heavy_norm(prefix))
        fill_positions = grid_positions(grid, self.window, self.fill_width, device).to(tokens.dtype)  # (N, F)
        kept = scatter_packed(tokens, keep)  # (B, N, F), zeros where dropped
        dropped = self.mask_token.to(tokens.dtype).expand(batch, n, -1)  # (B, N, F)
        ring = torch.where(keep, 0, self.fill_spread + 1)  # (B, N) rings to the nearest kept position
        if self.fill_spread:
            spread, ring = spread_kept(kept, keep, grid, self.fill_spread)
            dropped = dropped + spread
        if self.canvas:  # by default only where the neighbours say nothing: their mean is the better guess
            gain = ((ring > self.fill_spread)[..., None].to(tokens.dtype) if self.canvas_gain is None
                    else self.canvas_gain.to(tokens.dtype)[(ring - 1).clamp_min(0)])  # (B, N, 1 or F)
            dropped = dropped + self._canvas(prefix[:, m:], grid) * gain
        dense = torch.where(keep[..., None], kept, dropped) + fill_positions  # (B, N, F)
        dense = dense.reshape(batch * n, -1)  # every position, packed
        for i, (block, packed) in enumerate(zip(self.fill, per_block(layouts, None, len(self.fill), batch))):
            dense, prefix = block(dense, prefix, packed, update_prefix=i < len(self.fill) - 1)
        pixels = rearrange(
            self.to_pixels(self.fill_norm(dense)), "(b gh gw) (c p q) -> b c (gh p) (gw q)",
            b=batch, gh=grid[0], gw=grid[1], p=self.patch_size, q=self.patch_size,
        )
        if self.refine is not None:  # channels-last: 1.5× faster for these few channels on CPU
            pixels = pixels + self.refine(pixels.contiguous(memory_format=torch.channels_last))
        return pixels * 0.5 + 0.5
