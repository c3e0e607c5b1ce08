"""Transformer building blocks shared by the built-in ViT encoder, decoder, global tokenizer and prior."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


def sincos_at(rows: Tensor, cols: Tensor, dim: int) -> Tensor:
    """(N, dim) fixed 2-D sin-cos embedding (MAE style) of N (row, col) coordinates: half the channels
    encode the row, half the column."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos positions need dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32, device=rows.device) / quarter))  # (D/4,)
    y = rows.float().reshape(-1, 1) * omega  # (N, D/4)
    x = cols.float().reshape(-1, 1) * omega
    return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=1)  # (N, D)


def relative_embedding(rows: Tensor, cols: Tensor, grid: tuple[int, int], dim: int) -> Tensor:
    """(N, dim) Fourier features of image-relative coordinates in [0, 1): the same for any image size.
    Why: within-window positions say where a patch sits in its window, never where in the picture; a
    token that must lay out the whole image (a global, a layout token) needs the image-relative place."""
    y = (rows.float() + 0.5) / grid[0]  # (N,)
    x = (cols.float() + 0.5) / grid[1]
    quarter = dim // 4
    freqs = math.pi * (2.0 ** torch.linspace(0, 4, quarter, device=rows.device))  # (D/4,) 1 … 16 cycles
    y, x = y[:, None] * freqs, x[:, None] * freqs  # (N, D/4)
    return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=1)


def grid_coordinates(grid: tuple[int, int], device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """(N,) row and (N,) column of every patch, raster order."""
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], device=device), torch.arange(grid[1], device=device), indexing="ij"
    )
    return rows.reshape(-1), cols.reshape(-1)


def sincos_2d(grid: tuple[int, int], dim: int, device: torch.device | None = None) -> Tensor:
    """(N, dim) sin-cos positions of every patch of ``grid``, raster order."""
    return sincos_at(*grid_coordinates(grid, device), dim)


def patch_layout(
    grid: tuple[int, int], dim: int, *, window: int, prefix: int, shift: bool, device: torch.device | None = None
) -> tuple[Tensor, Windows | None]:
    """Positions (N, dim) of the patches and the :class:`Windows` to attend in, or None.

    ``window = 0``: absolute positions, full attention. ``window = w``: each patch attends only to the
    patches of its w×w window and to the ``prefix`` tokens (the globals, which attend everywhere), and
    positions are taken *within* the window. Every window then looks like a training crop, whatever the
    image size: a model trained on small crops encodes whole photos without meeting unseen positions or
    longer contexts. ``shift`` (training) moves the window grid by a random offset, so training crops
    contain window borders and partial windows as whole photos do.
    """
    rows, cols = grid_coordinates(grid, device)
    if not window:
        return sincos_at(rows, cols, dim), None
    offset = (int(torch.randint(window, ())), int(torch.randint(window, ()))) if shift else (0, 0)
    windows = Windows(grid, window, prefix=prefix, offset=offset, device=device)
    return sincos_at((rows + offset[0]) % window, (cols + offset[1]) % window, dim), windows


class Windows:
    """The w×w attention windows of a patch grid, laid out so that every window is one batch row.

    Window borders lie where ``(row + offset[0]) % w == 0`` (and likewise for columns), so the windows
    at the grid's borders may be partial. Swin-style, the grid is rolled by ``offset`` and padded to a
    multiple of w, so the windows become a dense (B, windows, w², D) layout; a rolled window that
    holds pieces of several real windows (the wrap-around) or padding keeps them apart with a *region*
    id per slot (padding slots are each a region of their own, so they never mix with real patches).

    With ``prefix = M`` global tokens, every patch also attends to the globals, and the globals attend
    to every patch and each other (:meth:`Attention.windowed`): O(N·(w² + M)) time, O(N·w²) memory,
    the same outputs as full attention under :meth:`dense_mask`.
    """

    def __init__(self, grid: tuple[int, int], window: int, *, prefix: int = 0, offset: tuple[int, int] = (0, 0),
                 device: torch.device | None = None) -> None:
        rows, cols = grid
        w = window
        self.grid, self.window, self.prefix, self.offset = grid, w, prefix, offset
        self.num_patches = rows * cols
        padded = (-(-rows // w) * w, -(-cols // w) * w)
        self.count = (padded[0] // w) * (padded[1] // w)  # windows per image
        # slot (R, C) of the rolled, padded grid, in window layout: (windows, w, w)
        win_r = torch.arange(padded[0] // w, device=device)[:, None, None, None] * w
        win_c = torch.arange(padded[1] // w, device=device)[None, :, None, None] * w
        in_r = torch.arange(w, device=device)[None, None, :, None]
        in_c = torch.arange(w, device=device)[None, None, None, :]
        r = (win_r + in_r - offset[0]) % padded[0]  # (Wr, Wc, w, 1) the grid row held by the slot
        c = (win_c + in_c - offset[1]) % padded[1]  # (Wr, Wc, 1, w)
        real = (r < rows) & (c < cols)  # (Wr, Wc, w, w)
        slots = self.count * w * w
        self.slot_token = torch.where(real, r * cols + c, self.num_patches).reshape(-1)  # (S,) N = padding
        region = ((r + offset[0]) // w) * (cols + 2 * w) + (c + offset[1]) // w  # the unrolled window
        padding_region = -1 - torch.arange(slots, device=device).reshape(real.shape)
        self.region = torch.where(real, region, padding_region).reshape(self.count, w * w)  # (W, w²)
        self.has_padding = slots != self.num_patches
        self.mixed = self.has_padding or offset != (0, 0)  # some window holds several regions
        row, col = grid_coordinates(grid, device)
        rolled_r, rolled_c = (row + offset[0]) % padded[0], (col + offset[1]) % padded[1]
        window_id = (rolled_r // w) * (padded[1] // w) + rolled_c // w
        self.token_slot = window_id * w * w + (rolled_r % w) * w + rolled_c % w  # (N,) inverse of slot_token

    def partition(self, x: Tensor) -> Tensor:
        """Patches (B, N, D) in raster order → window layout (B, W, w², D), padding slots zero."""
        if self.has_padding:
            x = torch.cat([x, x.new_zeros(x.shape[0], 1, x.shape[2])], dim=1)  # (B, N + 1, D)
        return x.index_select(1, self.slot_token).reshape(x.shape[0], self.count, self.window**2, x.shape[2])

    def merge(self, x: Tensor) -> Tensor:
        """Window layout (B, W, w², D) → patches (B, N, D) in raster order."""
        return x.reshape(x.shape[0], -1, x.shape[-1]).index_select(1, self.token_slot)

    def slot_keys(self, key_mask: Tensor | None) -> Tensor | None:
        """(B, W, w²) bool: which slots are keys (not padding, not masked), or None when all are."""
        if key_mask is None:
            return ~self.region.lt(0)[None] if self.has_padding else None
        padded = torch.cat([key_mask, key_mask.new_zeros(key_mask.shape[0], 1)], dim=1)  # (B, N + 1)
        return padded[:, self.slot_token].reshape(key_mask.shape[0], self.count, -1)

    def window_mask(self, key_mask: Tensor | None) -> Tensor | None:
        """(B·W or W, 1, w², M + w²) bool: what each slot's query may see in its window, or None for all.

        A slot sees the globals and the slots of its own region; a padding slot only sees itself.
        """
        if not self.mixed and key_mask is None:
            return None
        w2, m = self.window**2, self.prefix
        allowed = self.region[:, :, None] == self.region[:, None, :]  # (W, w², w²)
        if key_mask is not None:
            keys = self.slot_keys(key_mask) | self.region.lt(0)[None]  # (B, W, w²) padding stays its own key
            allowed = (allowed[None] & keys[:, :, None, :]).flatten(0, 1)  # (B·W, w², w²)
        globals_ = allowed.new_ones(allowed.shape[0], w2, m)
        return torch.cat([globals_, allowed], dim=2)[:, None]  # (·, 1, w², M + w²)

    def global_mask(self, key_mask: Tensor | None) -> Tensor | None:
        """(B or 1, 1, 1, M + S) bool: the keys the globals see (every real, unmasked patch), or None."""
        keys = self.slot_keys(key_mask)
        if keys is None:
            return None
        keys = keys.flatten(1)  # (B, S)
        return torch.cat([keys.new_ones(keys.shape[0], self.prefix), keys], dim=1)[:, None, None]

    def dense_mask(self, key_mask: Tensor | None = None) -> Tensor:
        """The same attention as a full (M + N)² boolean mask ((B, 1, M + N, M + N) with ``key_mask``).

        The reference the windowed computation is tested against (and the pre-windowing implementation).
        """
        n, m = self.num_patches, self.prefix
        region = torch.empty(n + 1, dtype=self.region.dtype, device=self.region.device)
        region[self.slot_token] = self.region.reshape(-1)  # padding slots all land on index N
        region = region[:n]
        mask = torch.ones(m + n, m + n, dtype=torch.bool, device=region.device)
        mask[m:, m:] = region[:, None] == region[None, :]
        if key_mask is None:
            return mask
        keys = torch.cat([key_mask.new_ones(key_mask.shape[0], m), key_mask], dim=1)  # (B, M + N)
        return (mask[None] & keys[:, None, :])[:, None]


class WindowMasks(NamedTuple):
    """The masks of one windowed forward, built once and shared by every block."""

    window: Tensor | None  # (B·W, 1, w², M + w²) what each slot's query sees in its window
    globals_: Tensor | None  # (B or 1, 1, 1, M + S) which slots the globals see
    any_key: Tensor | None  # (B·W, 1, w², 1) False where a query has no key at all (M = 0 only)

    @classmethod
    def of(cls, windows: Windows, key_mask: Tensor | None, batch: int) -> WindowMasks:
        window = windows.window_mask(key_mask)
        if window is not None and window.shape[0] != batch * windows.count:
            window = window.repeat(batch, 1, 1, 1)  # the same for every image
        empty_rows_possible = window is not None and key_mask is not None and not windows.prefix
        any_key = window.any(-1, keepdim=True) if empty_rows_possible else None
        return cls(window, windows.global_mask(key_mask), any_key)


class KVCache:
    """One block's keys and values of the steps seen so far, for incremental (autoregressive) decoding.

    Preallocated to ``max_len`` steps on the first call, so a new step costs one write instead of a
    concatenation of the whole prefix. Rows can be dropped (:meth:`select`) when sequences finish.
    """

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.length = 0
        self.keys: Tensor | None = None  # (B, H, max_len, d)
        self.values: Tensor | None = None

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append the new steps' keys and values (B, H, T, d); return every step's so far (B, H, S, d)."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} steps; {end} requested")
        if self.keys is None or self.values is None:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.keys, self.values = k.new_zeros(shape), v.new_zeros(shape)
        self.keys[:, :, start:end] = k
        self.values[:, :, start:end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def select(self, rows: Tensor) -> None:
        """Keep only batch ``rows`` (an index or a (B,) bool mask)."""
        if self.keys is not None and self.values is not None:
            self.keys, self.values = self.keys[rows], self.values[rows]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: Tensor, attn_mask: Tensor | None = None, *, causal: bool = False, cache: KVCache | None = None
    ) -> Tensor:
        """``causal``: step i sees steps ≤ i; with ``cache`` the T new steps also see every cached step."""
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        if cache is not None:
            k, v = cache.extend(k, v)  # (B, H, S, d): cached steps, then the new ones
        new, seen = q.shape[2], k.shape[2]
        if causal and attn_mask is not None:
            raise ValueError("pass either causal=True or an attn_mask, not both")
        is_causal = causal and new == seen and new > 1
        if causal and 1 < new < seen:  # the new steps are the last `new` of `seen`
            attn_mask = torch.ones(new, seen, dtype=torch.bool, device=x.device).tril(seen - new)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)  # (B, H, N, d)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))

    def windowed(self, globals_: Tensor, patches: Tensor, masks: WindowMasks) -> tuple[Tensor, Tensor]:
        """Attention under :class:`Windows`: globals (B, M, D), patches in window layout (B, W, w², D).

        Each window's queries see the globals' and their window's keys (one batched attention over all
        windows); the M globals see every key (one M-query attention). Same output as full attention
        with ``Windows.dense_mask``.
        """
        batch, count, w2, _ = patches.shape
        m = globals_.shape[1]
        qg, kg, vg = rearrange(self.qkv(globals_), "b m (three h d) -> three b h m d", three=3, h=self.heads)
        qp, kp, vp = rearrange(self.qkv(patches), "b w s (three h d) -> three (b w) h s d", three=3, h=self.heads)

        def per_window(t: Tensor) -> Tensor:  # (B, H, M, d) → (B·W, H, M, d): the globals in every window
            return t[:, None].expand(batch, count, *t.shape[1:]).flatten(0, 1)

        def per_image(t: Tensor) -> Tensor:  # (B·W, H, w², d) → (B, H, W·w², d): all slots of an image
            return rearrange(t, "(b w) h s d -> b h (w s) d", b=batch)

        out_p = F.scaled_dot_product_attention(
            qp, torch.cat([per_window(kg), kp], dim=2), torch.cat([per_window(vg), vp], dim=2), attn_mask=masks.window
        )  # (B·W, H, w², d)
        if masks.any_key is not None:  # no key at all (M = 0, whole region masked): zero, never NaN
            out_p = torch.where(masks.any_key, out_p, 0.0)
        patches_out = self.proj(rearrange(out_p, "(b w) h s d -> b w s (h d)", b=batch))  # (B, W, w², D)
        if not m:
            return globals_, patches_out
        out_g = F.scaled_dot_product_attention(
            qg, torch.cat([kg, per_image(kp)], dim=2), torch.cat([vg, per_image(vp)], dim=2), attn_mask=masks.globals_
        )  # (B, H, M, d)
        return self.proj(rearrange(out_g, "b h m d -> b m (h d)")), patches_out


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(
        self, x: Tensor, attn_mask: Tensor | None = None, *, causal: bool = False, cache: KVCache | None = None
    ) -> Tensor:
        x = x + self.attn(self.norm1(x), attn_mask, causal=causal, cache=cache)
        return x + self.mlp(self.norm2(x))

    def windowed(self, globals_: Tensor, patches: Tensor, masks: WindowMasks) -> tuple[Tensor, Tensor]:
        """The block under :class:`Windows`: globals (B, M, D), patches in window layout (B, W, w², D)."""
        attn_g, attn_p = self.attn.windowed(self.norm1(globals_), self.norm1(patches), masks)
        globals_, patches = globals_ + attn_g, patches + attn_p
        return globals_ + self.mlp(self.norm2(globals_)), patches + self.mlp(self.norm2(patches))


class Transformer(nn.Module):
    """A stack of blocks followed by a final LayerNorm."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.apply(init_weights)

    def forward(
        self, x: Tensor, attn_mask: Tensor | None = None, *, causal: bool = False, cache: list[KVCache] | None = None,
        windows: Windows | None = None, key_mask: Tensor | None = None,
    ) -> Tensor:
        """``cache`` (from :meth:`new_cache`) makes this an incremental step: ``x`` holds only the new steps.

        ``windows``: ``x`` is (B, M + N, D), the ``windows.prefix`` globals then the patches in raster
        order, attended window by window (:class:`Windows`). ``key_mask`` (B, N) bool, only with
        ``windows``: False marks a patch that no query may attend to (it is still a query itself).
        """
        if windows is not None:
            return self.norm(self._windowed(x, windows, key_mask))
        if key_mask is not None:
            raise ValueError("key_mask needs windows (pass a dense attn_mask for full attention)")
        for i, block in enumerate(self.blocks):
            x = block(x, attn_mask, causal=causal, cache=None if cache is None else cache[i])
        return self.norm(x)

    def _windowed(self, x: Tensor, windows: Windows, key_mask: Tensor | None) -> Tensor:
        m = windows.prefix
        if x.shape[1] != m + windows.num_patches:
            raise ValueError(f"windows expect {m} globals + {windows.num_patches} patches, got {x.shape[1]} tokens")
        if key_mask is not None and key_mask.shape != (x.shape[0], windows.num_patches):
            raise ValueError(f"key_mask must be (B, N) = {(x.shape[0], windows.num_patches)}, got {tuple(key_mask.shape)}")
        masks = WindowMasks.of(windows, key_mask, x.shape[0])
        globals_, patches = x[:, :m], windows.partition(x[:, m:])  # (B, M, D), (B, W, w², D)
        for block in self.blocks:
            globals_, patches = block.windowed(globals_, patches, masks)
        return torch.cat([globals_, windows.merge(patches)], dim=1)  # (B, M + N, D)

    def new_cache(self, max_len: int) -> list[KVCache]:
        """An empty KV cache, one per block, for decoding up to ``max_len`` steps."""
        return [KVCache(max_len) for _ in self.blocks]


def init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


Built = TypeVar("Built")


def cached_for_autograd(maxsize: int) -> Callable[[Callable[..., Built]], Callable[..., Built]]:
    """``functools.lru_cache`` whose values are built outside inference mode.

    Why: a cached tensor first built during an ``inference_mode`` decode is an inference tensor, and
    autograd refuses to save one for backward — so a later training step or test-time refinement of
    the same size failed. Built outside it, the value serves both (it is never modified in place).
    """

    def wrap(build: Callable[..., Built]) -> Callable[..., Built]:
        @functools.lru_cache(maxsize=maxsize)
        @functools.wraps(build)
        def cached(*args: object) -> Built:
            with torch.inference_mode(False):
                return build(*args)

        return cached

    return wrap


def start_missing(module: nn.Module, state_dict: dict[str, Tensor], prefix: str, optional: str) -> None:
    """For a ``_load_from_state_dict``: weights saved before ``module``'s entries named ``optional``… existed
    (an option added later) get those entries at their current, initial values — in place, so the
    submodules, which load from this dict next, find theirs. An option whose initial values leave the
    output unchanged then starts from trained weights (``train.init``). Entries that are only partly
    saved are left missing, for the strict load to name."""
    own = {prefix + name: value for name, value in module.state_dict().items() if name.startswith(optional)}
    if own and not any(key in state_dict for key in own):
        state_dict.update({key: value.detach().clone() for key, value in own.items()})


def init_tokens(*shape: int) -> nn.Parameter:
    """Learned token embeddings (mask token, global tokens) with the ViT initialisation."""
    return nn.Parameter(torch.randn(*shape) * 0.02)


def check_heads(dim: int, heads: int, who: str) -> None:
    if dim % heads or dim % 4:
        raise ValueError(f"{who}: width {dim} must be divisible by heads ({heads}) and by 4")


def check_window(window: int, who: str) -> int:
    """Attention window in patches: 0 (full attention) or ≥ 1."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"{who}: window must be 0 (full attention) or a positive number of patches, got {window!r}")
    return window
