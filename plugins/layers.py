"""Transformer building blocks shared by the built-in ViT encoder, decoder, global tokenizer and prior."""

from __future__ import annotations

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
) -> tuple[Tensor, Tensor | None]:
    """Positions (N, dim) of the patches and the attention mask (prefix + N, prefix + N) or None.

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
    if shift:
        rows = rows + int(torch.randint(window, ()))
        cols = cols + int(torch.randint(window, ()))
    window_id = (rows // window) * (grid[1] + 2 * window) + cols // window  # (N,)
    mask = torch.ones(prefix + rows.numel(), prefix + rows.numel(), dtype=torch.bool, device=device)
    mask[prefix:, prefix:] = window_id[:, None] == window_id[None, :]
    return sincos_at(rows % window, cols % window, dim), mask


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


class Transformer(nn.Module):
    """A stack of blocks followed by a final LayerNorm."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.apply(init_weights)

    def forward(
        self, x: Tensor, attn_mask: Tensor | None = None, *, causal: bool = False, cache: list[KVCache] | None = None
    ) -> Tensor:
        """``cache`` (from :meth:`new_cache`) makes this an incremental step: ``x`` holds only the new steps."""
        for i, block in enumerate(self.blocks):
            x = block(x, attn_mask, causal=causal, cache=None if cache is None else cache[i])
        return self.norm(x)

    def new_cache(self, max_len: int) -> list[KVCache]:
        """An empty KV cache, one per block, for decoding up to ``max_len`` steps."""
        return [KVCache(max_len) for _ in self.blocks]


def init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


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
