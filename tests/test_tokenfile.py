"""The token file format: exact round trips, determinism, atomicity and corruption detection."""

from __future__ import annotations

import pickle
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from tatok_core.contract.errors import TokenFileError
from tatok_core.contract.selection import Selection
from tatok_core.io.tokenfile import FORMAT_VERSION, MANIFEST, TokenDataset, TokenWriter
from tatok_core.contract.tokens import Tokens

DIGEST = "0123456789abcdef"


def meta(num_global: int = 2, codebook_size: int = 64) -> dict:
    return {
        "codebook_size": codebook_size,
        "code_factors": [codebook_size],
        "num_global": num_global,
        "patch_size": 16,
        "tau": 0.5,
        "filter": {"name": "dtf", "options": {"min_keep": 0}},
    }


def make_tokens(
    gen: torch.Generator, batch: int, grid: tuple[int, int], num_global: int = 2, codebook: int = 64, p: float = 0.5
) -> Tokens:
    keep = torch.rand(batch, grid[0] * grid[1], generator=gen) < p  # (B, N)
    sel = Selection.from_mask(keep)
    return Tokens(
        global_codes=torch.randint(codebook, (batch, num_global), generator=gen),
        codes=torch.randint(codebook, (sel.index.numel(),), generator=gen),
        positions=sel.index,
        cu_seqlens=sel.cu_seqlens,
        grid=grid,
        image_size=(grid[0] * 16 - 3, grid[1] * 16),
    )


def sources(n: int, start: int = 0) -> list[tuple[str, int]]:
    return [(f"img/{start + i:04d}.png", 1000 + start + i) for i in range(n)]


def write(path: Path, batches: list[Tokens], **kwargs) -> None:
    kwargs = {"spec_digest": DIGEST, "tokenizer": "tiny", "meta": meta(), **kwargs}
    with TokenWriter(path, **kwargs) as w:
        done = 0
        for t in batches:
            w.write(t, sources(t.batch_size, done))
            done += t.batch_size


def split_like(ds: TokenDataset, batches: list[Tokens]) -> list[Tokens]:
    images, out = list(ds), []
    for t in batches:
        out.append(Tokens.from_images(images[: t.batch_size]))
        images = images[t.batch_size :]
    assert not images
    return out


@st.composite
def token_batches(draw: st.DrawFn) -> tuple[int, int, list[Tokens]]:
    num_global = draw(st.integers(0, 3))
    codebook = draw(st.sampled_from([5, 300, 70_000, 2**40]))
    out = []
    for _ in range(draw(st.integers(1, 3))):
        batch = draw(st.integers(1, 4))
        grid = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
        n = grid[0] * grid[1]
        masks = draw(st.lists(st.lists(st.booleans(), min_size=n, max_size=n), min_size=batch, max_size=batch))
        masks[0] = [False] * n if draw(st.booleans()) else masks[0]  # zero-length rows are common
        sel = Selection.from_mask(torch.tensor(masks, dtype=torch.bool).reshape(batch, n))
        k = sel.index.numel()
        code = st.integers(0, codebook - 1)
        out.append(
            Tokens(
                global_codes=torch.tensor(
                    draw(st.lists(code, min_size=batch * num_global, max_size=batch * num_global)), dtype=torch.int64
                ).reshape(batch, num_global),
                codes=torch.tensor(draw(st.lists(code, min_size=k, max_size=k)), dtype=torch.int64),
                positions=sel.index,
                cu_seqlens=sel.cu_seqlens,
                grid=grid,
                image_size=(draw(st.integers(1, 99)), draw(st.integers(1, 99))),
            )
        )
    return num_global, codebook, out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=token_batches(), shard_size=st.integers(1, 5), single=st.booleans())
def test_round_trip_is_bit_exact(data: tuple[int, int, list[Tokens]], shard_size: int, single: bool) -> None:
    num_global, codebook, batches = data
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("tokens.safetensors" if single else "tokens")
        write(path, batches, meta=meta(num_global, codebook), shard_size=shard_size)
        ds = TokenDataset(path, expect_spec_digest=DIGEST)
        total = sum(t.batch_size for t in batches)
        assert len(ds) == total
        for original, back in zip(batches, split_like(ds, batches)):
            assert back.equal(original)
        assert [(ds[i].source, ds[i].source_bytes) for i in range(total)] == sources(total)
        assert all(ds[i].codes.dtype == torch.int64 and ds[i].positions.dtype == torch.int64 for i in range(total))
        assert torch.equal(ds[-1].codes, list(ds)[-1].codes)


def test_multiple_shards_mixed_grids_and_metadata(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    batches = [make_tokens(gen, 4, (2, 3)), make_tokens(gen, 3, (4, 4)), make_tokens(gen, 2, (2, 3))]
    write(tmp_path / "ds", batches, shard_size=3)
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == [MANIFEST, *(f"shard-{i:05d}.safetensors" for i in range(3))]
    ds = TokenDataset(tmp_path / "ds")
    assert len(ds) == 9
    assert all(b.equal(a) for a, b in zip(batches, split_like(ds, batches)))
    assert ds.metadata == {**meta(), "format_version": FORMAT_VERSION, "spec_digest": DIGEST, "tokenizer": "tiny",
                           "weights_digest": None}


def test_narrow_dtypes_on_disk_and_int64_back(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    cases = [(300, (4, 4), "torch.int16", "torch.uint8"), (2**20, (20, 20), "torch.int32", "torch.int16"),
             (2**40, (2, 2), "torch.int64", "torch.uint8"), (200, (2, 2), "torch.uint8", "torch.uint8")]
    for codebook, grid, code_dtype, pos_dtype in cases:
        t = make_tokens(gen, 3, grid, codebook=codebook, p=1.0)
        top = codebook - 1  # the largest code decides the stored dtype
        t = Tokens(torch.full_like(t.global_codes, top), torch.full_like(t.codes, top), t.positions, t.cu_seqlens,
                   t.grid, t.image_size)
        path = tmp_path / f"{codebook}.safetensors"
        write(path, [t], meta=meta(codebook_size=codebook))
        with safe_open(str(path), framework="pt") as f:
            assert str(f.get_tensor("codes").dtype) == str(f.get_tensor("global_codes").dtype) == code_dtype
            assert str(f.get_tensor("positions").dtype) == pos_dtype
            assert f.get_tensor("cu_seqlens").dtype == torch.int64
        assert Tokens.from_images(list(TokenDataset(path))).equal(t)


def test_same_tokens_give_identical_bytes(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(2)
    batches = [make_tokens(gen, 5, (3, 3)), make_tokens(gen, 2, (2, 2))]
    for name in ("a", "b"):
        write(tmp_path / name, batches, shard_size=4)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert all((tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes() for n in names)


def test_append_continues_numbering_and_rejects_other_tokenizer(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(3)
    first, second = make_tokens(gen, 3, (2, 2)), make_tokens(gen, 2, (3, 3))
    write(tmp_path / "ds", [first], shard_size=2)
    with pytest.raises(TokenFileError, match="holds 2 shard.*append=True; `tatok encode --append`"):
        write(tmp_path / "ds", [second])
    write(tmp_path / "ds", [second], shard_size=2, append=True)
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == [MANIFEST, *(f"shard-{i:05d}.safetensors" for i in range(3))]
    ds = TokenDataset(tmp_path / "ds")
    assert Tokens.from_images(list(ds)[:3]).equal(first) and Tokens.from_images(list(ds)[3:]).equal(second)
    with pytest.raises(TokenFileError, match=f"another tokenizer.*'{DIGEST}'.*'ffff'") as info:
        write(tmp_path / "ds", [second], spec_digest="ffff", append=True)
    assert "shard-00000.safetensors" in str(info.value)
    with pytest.raises(TokenFileError, match="meta"):
        write(tmp_path / "ds", [second], meta=meta(num_global=2, codebook_size=65), append=True)
    assert len(TokenDataset(tmp_path / "ds")) == 5


def test_truncated_file_is_rejected_on_open(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    write(path, [make_tokens(torch.Generator().manual_seed(4), 4, (3, 3))])
    data = path.read_bytes()
    for cut in (data[:-3], data[:40], data[:5], b""):
        path.write_bytes(cut)
        with pytest.raises(TokenFileError, match=str(path)):
            TokenDataset(path)


def test_tampered_payload_and_metadata_are_detected(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    write(path, [make_tokens(torch.Generator().manual_seed(5), 4, (3, 3))])
    data = path.read_bytes()
    flipped = bytearray(data)
    flipped[-1] ^= 0x01  # last payload byte
    renamed = data.replace(b"img/0001.png", b"img/0009.png")  # same length, header stays valid JSON
    for bad in (bytes(flipped), renamed):
        path.write_bytes(bad)
        ds = TokenDataset(path)  # opening checks headers only
        for access in (lambda: ds[0], lambda: list(ds), ds.verify, lambda: next(ds.batches(2))):
            with pytest.raises(TokenFileError, match=f"{path}: checksum mismatch"):
                access()


def test_expected_spec_digest_mismatch_names_both(tmp_path: Path) -> None:
    write(tmp_path / "ds", [make_tokens(torch.Generator().manual_seed(6), 2, (2, 2))])
    with pytest.raises(TokenFileError, match=f"another tokenizer.*'{DIGEST}'.*'beef'"):
        TokenDataset(tmp_path / "ds", expect_spec_digest="beef")


def test_rank_shards_never_collide_and_read_in_rank_order(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(7)
    per_rank = {rank: make_tokens(gen, 3, (2, 2)) for rank in (2, 10, 0)}
    for rank, t in per_rank.items():
        write(tmp_path / "ds", [t], rank=rank, shard_size=2, append=rank != 2)
    names = sorted(p.name for p in (tmp_path / "ds").glob("shard-*"))
    assert names == [f"shard-r{r}-{i:05d}.safetensors" for r in (0, 10, 2) for i in range(2)]
    assert sorted(p.name for p in (tmp_path / "ds").glob("manifest*")) == [f"manifest-r{r}.json" for r in (0, 10, 2)]
    images = list(TokenDataset(tmp_path / "ds"))
    for k, rank in enumerate((0, 2, 10)):  # numeric rank order
        assert Tokens.from_images(images[3 * k : 3 * k + 3]).equal(per_rank[rank])


def test_batches_group_by_grid_and_padded_matches_images(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(8)
    batches = [make_tokens(gen, 3, (2, 3)), make_tokens(gen, 4, (3, 3), p=0.3), make_tokens(gen, 2, (2, 3))]
    write(tmp_path / "ds", batches, shard_size=4)
    ds = TokenDataset(tmp_path / "ds")
    tok = list(ds.batches(2))
    assert [(t.grid, t.batch_size) for t in tok] == [((2, 3), 2), ((3, 3), 2), ((3, 3), 2), ((2, 3), 2), ((2, 3), 1)]
    padded = list(ds.batches(2, padded=True))
    assert sorted(i for b in padded for i in b["index"].tolist()) == list(range(9))
    for t, b in zip(tok, padded):
        assert tuple(b["grid"].tolist()) == t.grid and tuple(b["image_size"].tolist()) == t.image_size
        assert torch.equal(b["global_codes"], t.global_codes) and torch.equal(b["lengths"], t.lengths)
        for row, i in enumerate(b["index"].tolist()):
            image, n = ds[i], int(b["lengths"][row])
            assert torch.equal(b["codes"][row, :n], image.codes)
            assert torch.equal(b["positions"][row, :n], image.positions)
            assert b["valid"][row].sum() == n and (b["codes"][row, n:] == -1).all()


def test_exception_inside_writer_leaves_nothing(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(9)
    with pytest.raises(RuntimeError, match="encode failed"):
        with TokenWriter(tmp_path / "ds", spec_digest=DIGEST, tokenizer="tiny", meta=meta(), shard_size=1) as w:
            w.write(make_tokens(gen, 3, (2, 2)), sources(3))  # three shards already in the temp dir
            raise RuntimeError("encode failed")
    assert list(tmp_path.iterdir()) == []
    write(tmp_path / "ds", [make_tokens(gen, 2, (2, 2))])
    before = {p.name: p.read_bytes() for p in (tmp_path / "ds").iterdir()}
    with pytest.raises(RuntimeError):
        with TokenWriter(tmp_path / "ds", spec_digest=DIGEST, tokenizer="tiny", meta=meta(), append=True) as w:
            w.write(make_tokens(gen, 2, (2, 2)), sources(2))
            raise RuntimeError
    assert {p.name: p.read_bytes() for p in (tmp_path / "ds").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_empty_set_and_no_globals(tmp_path: Path) -> None:
    with TokenWriter(tmp_path / "empty", spec_digest=DIGEST, tokenizer="tiny", meta=meta(num_global=0)):
        pass
    ds = TokenDataset(tmp_path / "empty")
    assert len(ds) == 0 and list(ds.batches(4)) == [] and ds.metadata["num_global"] == 0
    t = make_tokens(torch.Generator().manual_seed(10), 3, (2, 2), num_global=0, p=0.0)  # no globals, no patches
    write(tmp_path / "zero", [t], meta=meta(num_global=0))
    ds = TokenDataset(tmp_path / "zero")
    assert Tokens.from_images(list(ds)).equal(t) and ds[1].global_codes.shape == (0,)


def test_writer_rejects_invalid_tokens(tmp_path: Path) -> None:
    t = make_tokens(torch.Generator().manual_seed(11), 2, (2, 2), p=1.0)
    bad = {
        "codebook_size": Tokens(t.global_codes, t.codes + 64, t.positions, t.cu_seqlens, t.grid, t.image_size),
        "grid": Tokens(t.global_codes, t.codes, t.positions + 4, t.cu_seqlens, t.grid, t.image_size),
        "increase": Tokens(t.global_codes, t.codes, t.positions.flip(0), t.cu_seqlens, t.grid, t.image_size),
        "num_global": Tokens(t.global_codes[:, :1], t.codes, t.positions, t.cu_seqlens, t.grid, t.image_size),
    }
    for what, tokens in bad.items():
        with pytest.raises(TokenFileError, match=what):
            write(tmp_path / what, [tokens])
        assert not (tmp_path / what).exists()
    with pytest.raises(TokenFileError, match="sources"):
        with TokenWriter(tmp_path / "s", spec_digest=DIGEST, tokenizer="tiny", meta=meta()) as w:
            w.write(t, sources(1))
    with pytest.raises(TokenFileError, match="patch_size"):
        TokenWriter(tmp_path / "m", spec_digest=DIGEST, tokenizer="tiny", meta={**meta(), "patch_size": 0})


def test_dataset_pickles_for_dataloader_workers(tmp_path: Path) -> None:
    t = make_tokens(torch.Generator().manual_seed(12), 3, (2, 2))
    write(tmp_path / "ds", [t])
    ds = TokenDataset(tmp_path / "ds")
    _ = ds[0]  # opens the memory map
    assert Tokens.from_images(list(pickle.loads(pickle.dumps(ds)))).equal(t)


def test_interrupted_writer_resumes_to_the_same_bytes(tmp_path: Path) -> None:
    """Ctrl-C keeps the full staged shards; resume=True continues from them; an error keeps nothing."""
    gen = torch.Generator().manual_seed(13)
    batches = [make_tokens(gen, 1, (2, 2)) for _ in range(5)]
    write(tmp_path / "whole", batches, shard_size=2)
    with pytest.raises(KeyboardInterrupt):
        with TokenWriter(tmp_path / "ds", spec_digest=DIGEST, tokenizer="tiny", meta=meta(), shard_size=2) as w:
            for i, t in enumerate(batches[:3]):
                w.write(t, sources(1, i))
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ds.partial", "whole"]  # 1 full shard staged
    with pytest.raises(TokenFileError, match="no token shards"):
        TokenDataset(tmp_path / "ds")  # the target is still the previous state: nothing
    with TokenWriter(tmp_path / "ds", spec_digest=DIGEST, tokenizer="tiny", meta=meta(), shard_size=2,
                     resume=True) as w:
        assert w.resumed_sources == sources(2)
        for i in range(len(w.resumed_sources), len(batches)):
            w.write(batches[i], sources(1, i))
    whole = {p.name: p.read_bytes() for p in (tmp_path / "whole").iterdir()}
    assert {p.name: p.read_bytes() for p in (tmp_path / "ds").iterdir()} == whole
    with pytest.raises(RuntimeError):
        with TokenWriter(tmp_path / "ds", spec_digest=DIGEST, tokenizer="tiny", meta=meta(), shard_size=1,
                         append=True) as w:
            w.write(make_tokens(gen, 2, (2, 2)), sources(2, 10))
            raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "whole"]


def test_weights_digest_changes_with_any_weight_not_with_mode() -> None:
    from tatok_core.io.tokenfile import weights_digest

    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    assert weights_digest(a) != weights_digest(b) and len(weights_digest(a)) == 16
    before = weights_digest(a)
    a.eval()
    assert weights_digest(a) == before
    with torch.no_grad():
        a.weight[0, 0] += 1e-6
    assert weights_digest(a) != before
