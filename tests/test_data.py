"""Image reading/writing, the built-in photo split, folder loading and the crop streams."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tatok_core.workflows.data import (
    BUILTIN_PHOTOS,
    HELDOUT_PHOTOS,
    TRAIN_PHOTOS,
    Augment,
    ImageSource,
    RandomCrops,
    SampleStream,
    ShardSource,
    StreamLoader,
    evaluation_images,
    open_source,
    batches,
    fixed_crops,
    load_builtin_photo,
    split_builtin_photos,
)
from tatok_core.contract.errors import ImageReadError, TatokError
from tatok_core.io.images import list_images, read_image, write_image

RNG = np.random.default_rng(0)


def _rgb(h: int = 12, w: int = 16) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _check(t: torch.Tensor, h: int, w: int) -> None:
    assert t.shape == (3, h, w) and t.dtype == torch.float32
    assert 0.0 <= float(t.min()) and float(t.max()) <= 1.0


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    """Five good images (some nested) and two broken ones."""
    Image.fromarray(_rgb()).save(tmp_path / "rgb.png")
    Image.fromarray(_rgb()[..., 0]).save(tmp_path / "gray.png")
    Image.fromarray(_rgb()).save(tmp_path / "pic.webp")
    (tmp_path / "sub").mkdir()
    Image.fromarray(_rgb()).save(tmp_path / "sub" / "pic.tif")
    Image.fromarray(_rgb()).save(tmp_path / "sub" / "good.jpg", quality=90)
    (tmp_path / "corrupt.png").write_bytes(RNG.bytes(500))
    buf = io.BytesIO()
    Image.fromarray(_rgb(64, 64)).save(buf, "JPEG")
    (tmp_path / "sub" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


# ---- read_image ------------------------------------------------------------------------------


def test_rgb_png_exact(tmp_path: Path) -> None:
    a = _rgb()
    Image.fromarray(a).save(tmp_path / "a.png")
    t = read_image(tmp_path / "a.png")
    _check(t, 12, 16)
    assert torch.equal(t, torch.from_numpy(a).permute(2, 0, 1).float() / 255)


def test_grayscale_replicated(tmp_path: Path) -> None:
    Image.fromarray(_rgb()[..., 0]).save(tmp_path / "g.png")
    t = read_image(tmp_path / "g.png")
    _check(t, 12, 16)
    assert torch.equal(t[0], t[1]) and torch.equal(t[1], t[2])


def test_rgba_composited_over_white(tmp_path: Path) -> None:
    a = np.zeros((2, 2, 4), np.uint8)
    a[..., 0] = 255  # red
    a[..., 3] = [[0, 128], [255, 51]]
    Image.fromarray(a, "RGBA").save(tmp_path / "a.png")
    t = read_image(tmp_path / "a.png")
    alpha = torch.tensor([[0, 128], [255, 51]], dtype=torch.float32) / 255
    assert torch.allclose(t[0], torch.ones(2, 2))
    assert torch.allclose(t[1], 1 - alpha) and torch.allclose(t[2], 1 - alpha)
    assert abs(float(t[1, 0, 1]) - (1 - 128 / 255)) < 1e-6


def test_la_and_palette_transparency_over_white(tmp_path: Path) -> None:
    Image.new("LA", (3, 3), (0, 0)).save(tmp_path / "la.png")
    assert torch.equal(read_image(tmp_path / "la.png"), torch.ones(3, 3, 3))
    p = Image.new("P", (3, 3), 1)
    p.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    p.save(tmp_path / "p.png", transparency=1)
    assert torch.equal(read_image(tmp_path / "p.png"), torch.ones(3, 3, 3))


def test_16bit_png_scaled_by_65535(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0, 32768, 65535]], np.uint16)).save(tmp_path / "d.png")
    t = read_image(tmp_path / "d.png")
    _check(t, 1, 3)
    assert t[0, 0].tolist() == [0.0, np.float32(32768 / 65535), 1.0]
    assert abs(float(t[0, 0, 1]) - 0.50000763) < 1e-7
    assert torch.equal(t[0], t[2])


def test_tiff_webp_cmyk(tmp_path: Path) -> None:
    a = _rgb()
    Image.fromarray(a).save(tmp_path / "a.tif")
    assert torch.equal(read_image(tmp_path / "a.tif"), torch.from_numpy(a).permute(2, 0, 1) / 255)
    Image.fromarray(a).save(tmp_path / "a.webp", lossless=True)
    assert torch.equal(read_image(tmp_path / "a.webp"), torch.from_numpy(a).permute(2, 0, 1) / 255)
    Image.new("CMYK", (4, 5), (0, 255, 255, 0)).save(tmp_path / "c.tif")  # pure red in CMYK
    t = read_image(tmp_path / "c.tif")
    _check(t, 5, 4)
    assert torch.equal(t[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))


@pytest.mark.parametrize(("orientation", "display"), [
    (3, lambda a: np.rot90(a, 2)),  # upside down
    (6, lambda a: np.rot90(a, -1)),  # rotate 90° clockwise to display
    (8, lambda a: np.rot90(a, 1)),  # rotate 90° counter-clockwise to display
    (2, lambda a: a[:, ::-1]),  # mirrored
])
def test_exif_orientation_applied(tmp_path: Path, orientation: int, display) -> None:
    stored = _rgb(4, 6)  # 6 wide, 4 tall, distinct pixels
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / "o.png", exif=exif)  # lossless: the exact pixels must land right
    expected = torch.from_numpy(np.ascontiguousarray(display(stored))).permute(2, 0, 1).float() / 255
    assert torch.equal(read_image(tmp_path / "o.png"), expected)


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("missing.png", None, "no such file"),
        ("corrupt.png", b"\x00garbage" * 50, "not an image"),
        ("text.jpg", b"hello", "not an image"),
    ],
)
def test_read_errors_name_path(
    tmp_path: Path, name: str, content: bytes | None, reason: str
) -> None:
    p = tmp_path / name
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(ImageReadError) as e:
        read_image(p)
    msg = str(e.value)
    assert str(p) in msg and reason in msg and "\n" not in msg


def test_truncated_jpeg_reported(folder: Path) -> None:
    p = folder / "sub" / "truncated.jpg"
    with pytest.raises(ImageReadError, match="truncated") as e:
        read_image(p)
    assert str(p) in str(e.value)


def test_directory_is_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="directory"):
        read_image(tmp_path)


# ---- write_image -----------------------------------------------------------------------------


def test_write_roundtrip_clamped_and_atomic(tmp_path: Path) -> None:
    t = torch.rand(3, 7, 9)
    t[0, 0, 0], t[1, 0, 0], t[2, 0, 0] = -0.5, 1.7, float("nan")
    write_image(tmp_path / "o.png", t)
    back = read_image(tmp_path / "o.png")
    expect = (t.nan_to_num(0).clamp(0, 1) * 255).round() / 255
    assert torch.equal(back, expect)
    write_image(tmp_path / "o.png", torch.zeros(3, 2, 2))  # overwrite in place
    assert read_image(tmp_path / "o.png").shape == (3, 2, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.png"]  # no temp file left


def test_write_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="3, H, W"):
        write_image(tmp_path / "o.png", torch.zeros(1, 4, 4))
    with pytest.raises(TatokError, match="cannot write image"):
        write_image(tmp_path / "no" / "such" / "dir.png", torch.zeros(3, 2, 2))
    assert list(tmp_path.iterdir()) == []


# ---- list_images -----------------------------------------------------------------------------


def test_list_images_files_folders_globs(folder: Path) -> None:
    found = list_images([folder])
    assert found == sorted(found)
    assert [p.name for p in found] == [
        "corrupt.png", "gray.png", "pic.webp", "rgb.png", "good.jpg", "pic.tif", "truncated.jpg"
    ]
    notes = folder / "notes.txt"
    assert list_images([notes]) == [notes]  # an explicitly named file is kept
    pngs = [folder / "corrupt.png", folder / "gray.png", folder / "rgb.png"]
    assert list_images([str(folder / "*.png")]) == pngs
    jpgs = list_images([str(folder / "**" / "*.jpg")])
    assert [p.name for p in jpgs] == ["good.jpg", "truncated.jpg"]
    both = list_images([folder / "rgb.png", folder, str(folder / "*.png")])
    assert both[0] == folder / "rgb.png" and len(both) == len(found)  # deduplicated, order kept


def test_list_images_errors(folder: Path) -> None:
    with pytest.raises(ImageReadError, match="no such file"):
        list_images([folder / "nope.png"])
    with pytest.raises(ImageReadError, match="matches no images"):
        list_images([str(folder / "*.gif")])
    (folder / "empty").mkdir()
    with pytest.raises(ImageReadError, match="contains no images"):
        list_images([folder / "empty"])


# ---- ImageSource -----------------------------------------------------------------------------


def test_folder_source_skips_and_reports_corrupt(folder: Path) -> None:
    with pytest.warns(UserWarning, match="skipped 2 unreadable") as rec:
        src = ImageSource(str(folder))
    assert len(rec) == 1  # reported once
    assert len(src) == 5 and src.skipped == 2
    assert {p.name for p, _ in src.failures} == {"corrupt.png", "truncated.jpg"}
    for p, reason in src.failures:
        assert str(p) in reason and str(p) in str(rec[0].message)
    for t in src.images:
        _check(t, 12, 16)


def test_folder_source_callback_and_empty(folder: Path) -> None:
    seen: list[list[tuple[Path, str]]] = []
    src = ImageSource(str(folder), on_skip=seen.append)
    assert len(seen) == 1 and len(seen[0]) == 2 and src.skipped == 2
    bad = folder / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"junk")
    with pytest.raises(ImageReadError, match="no readable images"):
        ImageSource(str(bad), on_skip=lambda f: None)


def test_builtin_split_is_by_photo() -> None:
    train, held = split_builtin_photos()
    assert (train, held) == (TRAIN_PHOTOS, HELDOUT_PHOTOS)
    assert not set(train) & set(held)
    assert set(train) | set(held) == {p.name for p in BUILTIN_PHOTOS}
    assert len(held) >= 4 and len(train) >= 10
    assert {"motorcycle_left", "motorcycle_right"} <= set(train)  # stereo pair stays together


def test_all_builtin_photos_load() -> None:
    src = ImageSource("builtin:photos:all")
    assert src.names == [p.name for p in BUILTIN_PHOTOS] and src.skipped == 0
    for t in src.images:
        assert t.ndim == 3 and t.shape[0] == 3 and min(t.shape[1:]) >= 256
        assert 0.0 <= float(t.min()) and float(t.max()) <= 1.0 and float(t.std()) > 0.02
    assert ImageSource("builtin:photos").names == list(TRAIN_PHOTOS)
    assert ImageSource("builtin:photos:heldout").names == list(HELDOUT_PHOTOS)
    assert torch.equal(load_builtin_photo("chelsea"), src.images[src.names.index("chelsea")])


def test_builtin_unknown_names() -> None:
    with pytest.raises(ImageReadError, match="known"):
        load_builtin_photo("lena")
    with pytest.raises(ImageReadError, match="builtin:photos:heldout"):
        ImageSource("builtin:photo")


# ---- crops -----------------------------------------------------------------------------------

IMAGES = [torch.rand(3, 40, 50, generator=torch.Generator().manual_seed(i)) for i in range(3)]


def _take(ds: RandomCrops, n: int, bs: int = 4) -> list[torch.Tensor]:
    return [b for _, b in zip(range(n), batches(ds, bs))]


def test_random_crops_deterministic_per_rank() -> None:
    a = _take(RandomCrops(IMAGES, 16, seed=3, rank=0, world_size=2), 5)
    b = _take(RandomCrops(IMAGES, 16, seed=3, rank=0, world_size=2), 5)
    c = _take(RandomCrops(IMAGES, 16, seed=3, rank=1, world_size=2), 5)
    d = _take(RandomCrops(IMAGES, 16, seed=4, rank=0, world_size=2), 5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(torch.stack(a), torch.stack(c))
    assert not torch.equal(torch.stack(a), torch.stack(d))
    assert a[0].shape == (4, 3, 16, 16)


def test_random_crops_resume_bit_exact(tmp_path: Path) -> None:
    full = _take(RandomCrops(IMAGES, (8, 12), seed=7, rank=1, world_size=2), 6)
    first = RandomCrops(IMAGES, (8, 12), seed=7, rank=1, world_size=2)
    head = _take(first, 3)
    torch.save(first.state_dict(), tmp_path / "s.pt")
    assert first.drawn == 12
    resumed = RandomCrops(IMAGES, (8, 12), seed=7, rank=1, world_size=2)
    resumed.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    tail = _take(resumed, 3)
    assert all(torch.equal(x, y) for x, y in zip(full, head + tail))
    with pytest.raises(ValueError, match="rank"):
        RandomCrops(IMAGES, 8, seed=7, rank=0, world_size=2).load_state_dict(first.state_dict())


def test_random_crops_with_dataloader_matches_draw() -> None:
    loader = torch.utils.data.DataLoader(RandomCrops(IMAGES, 8, seed=1), batch_size=4)
    ref = RandomCrops(IMAGES, 8, seed=1)
    got = next(iter(loader))
    assert torch.equal(got, torch.stack([ref.draw() for _ in range(4)]))


def test_random_crops_content_area_weighting_and_flip() -> None:
    big, small = torch.zeros(3, 100, 100), torch.ones(3, 10, 10)
    ds = RandomCrops([big, small], 10, seed=0, flip=False)
    picks = [float(ds.draw().mean()) for _ in range(2000)]
    share_small = sum(picks) / len(picks)  # crops of `small` are all ones
    assert 0.005 < share_small < 0.02  # expected 100 / 10100 ≈ 0.0099
    ramp = torch.arange(6.0).expand(3, 1, 6) / 5
    flips = {tuple(RandomCrops([ramp], (1, 6), seed=s).draw()[0, 0].tolist()) for s in range(20)}
    assert len(flips) == 2  # both orientations occur


def test_small_images_upscaled() -> None:
    tiny = torch.rand(3, 5, 9)
    crop = next(iter(RandomCrops([tiny], (16, 20), seed=0)))
    assert crop.shape == (3, 16, 20) and 0 <= float(crop.min()) and float(crop.max()) <= 1
    with pytest.raises(ValueError):
        RandomCrops([tiny], 8, rank=2, world_size=2)
    with pytest.raises(ValueError):
        RandomCrops([tiny], 0)


def test_fixed_crops_identical_and_round_robin() -> None:
    a = fixed_crops(IMAGES, 16, 7, seed=5)
    assert a.shape == (7, 3, 16, 16) and torch.equal(a, fixed_crops(IMAGES, 16, 7, seed=5))
    assert not torch.equal(a, fixed_crops(IMAGES, 16, 7, seed=6))
    consts = [torch.full((3, 20, 20), v) for v in (0.1, 0.5, 0.9)]
    means = fixed_crops(consts, 8, 6).mean(dim=(1, 2, 3))
    assert torch.allclose(means, torch.tensor([0.1, 0.5, 0.9] * 2))


# ---- streaming sources and the resumable loader ------------------------------------------------


def _solid(value: int, h: int = 12, w: int = 16) -> np.ndarray:
    return np.full((h, w, 3), value, np.uint8)


def _labels(batch: torch.Tensor) -> list[int]:
    """The solid value of each image of a batch (the tests' files are one colour each)."""
    return [round(float(v) * 255) for v in batch[:, 0].flatten(1).mean(1)]


@pytest.fixture()
def solid_folder(tmp_path: Path) -> Path:
    """Twelve one-colour PNGs (value = 10·i), some nested, and one corrupt file."""
    root = tmp_path / "solid"
    (root / "sub").mkdir(parents=True)
    for i in range(12):
        Image.fromarray(_solid(10 * i)).save(root / ("sub" if i % 3 == 0 else "") / f"{i:02d}.png")
    (root / "broken.png").write_bytes(b"not a png")
    return root


def _tar(path: Path, values: list[int], corrupt: tuple[int, ...] = ()) -> Path:
    with tarfile.open(path, "w") as archive:
        for i, value in enumerate(values):
            buf = io.BytesIO()
            Image.fromarray(_solid(value)).save(buf, "PNG")
            members = {f"s{i:04d}.png": buf.getvalue() if i not in corrupt else b"garbage", f"s{i:04d}.cls": b"7"}
            for name, payload in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
    return path


CENTER = Augment(12, mode="center", flip=False)


def test_streams_deal_units_without_overlap_or_loss(solid_folder: Path) -> None:
    (solid_folder / "broken.png").unlink()
    source = open_source(str(solid_folder), 12)  # 12 units
    seen: list[int] = []
    for rank in range(2):
        for logical in range(3):  # 2 ranks × 3 workers = 6 streams; two units each = one epoch
            stream = SampleStream(source, CENTER, 1, seed=5, rank=rank, world_size=2, workers=3)
            batches_ = stream.batches(logical)
            seen += [v for _ in range(2) for v in _labels(next(batches_)["images"])]
    assert sorted(seen) == [10 * i for i in range(12)]  # every file once: no overlap, no loss
    assert sorted(stream.unit_at(p) for p in range(12, 24)) == list(range(12))  # the next epoch likewise
    assert [stream.unit_at(p) for p in range(12)] != [stream.unit_at(p) for p in range(12, 24)]  # reshuffled


def test_loader_workers_resume_exactly(solid_folder: Path) -> None:
    source = open_source(str(solid_folder), 8)
    augment = Augment(8, mode="resized", scale_min=0.5)
    reference = StreamLoader(source, augment, 3, seed=1, workers=2)
    it = iter(reference)
    full = [next(it) for _ in range(7)]
    it.close()
    first = StreamLoader(source, augment, 3, seed=1, workers=2)
    it = iter(first)
    head = [next(it) for _ in range(3)]
    it.close()
    state = first.state_dict()
    assert state["batches"] == 3 and len(state["cursors"]) == 2
    resumed = StreamLoader(source, augment, 3, seed=1, workers=2)
    resumed.load_state_dict(state)
    it = iter(resumed)
    tail = [next(it) for _ in range(4)]
    it.close()
    assert all(torch.equal(a, b) for a, b in zip(full, head + tail))
    single = StreamLoader(source, augment, 3, seed=1, workers=0)
    one = StreamLoader(source, augment, 3, seed=1, workers=1)
    assert torch.equal(next(iter(single)), next(iter(one)))  # 0 and 1 workers: the same single stream
    with pytest.raises(ImageReadError, match="number of loader workers"):
        single.load_state_dict(state)


def test_tar_shards_brace_pattern_skip_bad_shards_and_members(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    _tar(shards / "train-0000.tar", [10, 20, 30], corrupt=(1,))
    _tar(shards / "train-0001.tar", [40, 50])
    (shards / "train-0002.tar").write_bytes(b"")  # empty shard
    source = open_source(str(shards / "train-{0000..0002}.tar"), 12)
    assert isinstance(source, ShardSource) and len(source) == 3
    messages: list[str] = []
    loader = StreamLoader(source, CENTER, 4, workers=0, on_skip=messages.append)
    it = iter(loader)
    labels = [v for _ in range(4) for v in _labels(next(it))]
    it.close()
    assert set(labels) == {10, 30, 40, 50}
    assert loader.skipped == len(messages) >= 2
    assert any("train-0002.tar" in m for m in messages) and any("train-0000.tar:s0001" in m for m in messages)
    with pytest.raises(ImageReadError, match=r"1 of 4 shard\(s\).*train-0003.tar"):
        open_source(str(shards / "train-{0000..0003}.tar"), 12)
    with pytest.raises(ImageReadError, match="matches no files"):
        open_source(str(shards / "val-*.tar"), 12)


def test_folder_listing_cached_and_bad_folders(solid_folder: Path, tmp_path: Path) -> None:
    listing = tmp_path / "listing.txt"
    first = open_source(str(solid_folder), 12, listing)
    Image.fromarray(_solid(255)).save(solid_folder / "late.png")
    again = open_source(str(solid_folder), 12, listing)
    assert len(again) == len(first) == 13 and again.fingerprint() == first.fingerprint()
    assert len(open_source(str(solid_folder), 12)) == 14  # without the cache: listed afresh
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageReadError, match="contains no images"):
        open_source(str(empty), 12)
    broken = tmp_path / "broken"
    broken.mkdir()
    for i in range(3):
        (broken / f"{i}.png").write_bytes(b"junk")
    with pytest.raises(ImageReadError, match="no readable image") as e:
        next(iter(StreamLoader(open_source(str(broken), 12), CENTER, 2)))
    assert "\n" not in str(e.value)


def test_augment_modes_and_evaluation_images(solid_folder: Path) -> None:
    ramp = torch.linspace(0, 1, 40).expand(3, 20, 40)  # (3, 20, 40)
    g = torch.Generator().manual_seed(0)
    center = Augment(10, mode="center")(ramp, g)
    assert center.shape == (3, 10, 10)
    assert torch.allclose(center, F.interpolate(ramp[None], size=(10, 20), mode="bicubic", antialias=True,
                                                align_corners=False)[0].clamp(0, 1)[:, :, 5:15])
    assert Augment(16, mode="resized")(ramp, g).shape == (3, 16, 16)
    flips = {bool(Augment(8, flip=True)(ramp, torch.Generator().manual_seed(s))[0, 0, 0] >
                  Augment(8, flip=True)(ramp, torch.Generator().manual_seed(s))[0, 0, -1]) for s in range(16)}
    assert flips == {True, False}
    images = evaluation_images(str(solid_folder), 12, 5)
    assert images.shape == (5, 3, 12, 12) and _labels(images) == [10, 20, 40, 50, 70]  # listing order, centre crops
    assert torch.equal(evaluation_images("builtin:photos:heldout", 16, 3),
                       fixed_crops(ImageSource("builtin:photos:heldout").images, 16, 3))


def test_zoomed_crops_see_the_image_at_every_scale_down_to_zoom_min() -> None:
    """A horizontal ramp's slope in a crop is its zoom: zoomed crops span [zoom_min, 1] of the native slope,
    never beyond, and zoom_min = 1 is a random crop at the image's own scale."""
    ramp = torch.linspace(0, 1, 400).expand(3, 200, 400)  # (3, 200, 400): slope 1/399 per pixel
    native = 1 / 399

    def slope(out: torch.Tensor) -> float:
        return float((out[0, :, -1] - out[0, :, 0]).abs().mean() / (out.shape[-1] - 1))

    zoomed = Augment(32, mode="zoomed", zoom_min=0.25, flip=False)
    slopes = [slope(zoomed(ramp, torch.Generator().manual_seed(s))) / native for s in range(64)]
    assert all(0.99 <= s <= 4.05 for s in slopes)  # zoom in [0.25, 1] → slope × [1, 4]
    assert min(slopes) < 1.3 and max(slopes) > 3.0  # both ends are reached
    same = Augment(32, mode="zoomed", zoom_min=1.0, flip=False)(ramp, torch.Generator().manual_seed(5))
    assert slope(same) == pytest.approx(native, rel=1e-3)
    tiny = torch.rand(3, 20, 30)  # zoomed below the crop: upscaled, still a full crop of real content
    assert Augment(32, mode="zoomed", zoom_min=0.5)(tiny, torch.Generator().manual_seed(0)).shape == (3, 32, 32)
