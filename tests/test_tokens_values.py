"""Tokens as values: equality, plain lists, a compact repr, safe serialisation."""

from __future__ import annotations

import io

import attrs
import pytest
import torch

from tatok_core import Tokens
from tatok_core.contract.tokens import ImageTokens


def tokens(seed: int = 0, batch: int = 3) -> Tokens:
    g = torch.Generator().manual_seed(seed)
    images = []
    for _ in range(batch):
        keep = torch.rand(64, generator=g) < 0.5
        positions = keep.nonzero()[:, 0]
        images.append(ImageTokens(torch.randint(0, 1000, (8,), generator=g), torch.randint(0, 1000, positions.shape, generator=g),
                                  positions, (8, 8), (32, 30)))
    return Tokens.from_images(images)


def test_equality_compares_values() -> None:
    a, b = tokens(0), tokens(0)
    assert a is not b and a == b and a.equal(b)  # regression: == compared identity
    assert a != tokens(1) and a != "tokens"
    assert attrs.evolve(a, image_size=(32, 31)) != a
    with pytest.raises(TypeError):
        hash(a)  # mutable tensors inside: not hashable


def test_to_list_gives_globals_and_kept_pairs_per_image() -> None:
    t = tokens()
    listed = t.to_list()
    assert len(listed) == t.batch_size
    for item, image in zip(listed, t.per_image()):
        assert item["global_codes"] == image.global_codes.tolist()
        assert item["patches"] == list(zip(image.positions.tolist(), image.codes.tolist()))
        assert all(isinstance(v, int) for pair in item["patches"] for v in pair)
    assert Tokens.from_list(listed, t.grid, t.image_size) == t
    broken = [dict(listed[0], patches=listed[0]["patches"][::-1])]
    with pytest.raises(ValueError, match="positions must increase"):
        Tokens.from_list(broken, t.grid, t.image_size)


def test_repr_is_compact() -> None:
    text = repr(tokens(batch=3))
    assert len(text) < 160 and text.startswith("Tokens(batch=3, globals=8, kept=[") and "grid=(8, 8)" in text
    assert len(repr(tokens(batch=50))) < 200


def test_weights_only_torch_load_accepts_tokens() -> None:
    t = tokens()
    buffer = io.BytesIO()
    torch.save({"tokens": t, "step": 3}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)  # regression: the safe unpickler refused Tokens
    assert loaded["tokens"] == t and loaded["step"] == 3
    assert isinstance(loaded["tokens"].grid, tuple)
