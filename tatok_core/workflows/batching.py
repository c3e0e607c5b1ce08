"""Batches of same-size items: what a tensor batch (one shape) and a packed token batch (one grid) need."""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator

import torch
from torch import Tensor

from tatok_core.contract.errors import TatokError


def index_groups(keys: Iterable[Hashable]) -> list[list[int]]:
    """The indices of equal keys, groups in order of first appearance (one batch shape per group)."""
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def group_by_size(items: Iterable[tuple[int, Tensor]], batch_size: int) -> Iterator[tuple[list[int], Tensor]]:
    """Batches (indices, (B, C, H, W)) of same-size images, each yielded when full, leftovers at the end.

    Which images share a batch depends on ``batch_size``; callers restore input order, and the
    built-in components give each image the same result in any batch on the CPU (tested), so outputs
    do not depend on it. (GPU kernels picked by batch shape may change low bits, and so a code that
    sits on a quantization boundary.)
    """
    if batch_size < 1:
        raise TatokError(f"batch size must be >= 1, got {batch_size}")
    pending: dict[tuple[int, ...], list[tuple[int, Tensor]]] = {}
    for index, image in items:
        group = pending.setdefault(tuple(image.shape), [])
        group.append((index, image))
        if len(group) == batch_size:
            yield [i for i, _ in group], torch.stack([im for _, im in group])
            group.clear()
    for group in pending.values():
        if group:
            yield [i for i, _ in group], torch.stack([im for _, im in group])

