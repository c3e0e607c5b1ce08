"""Rate control and the token-file workflows: budgets, exact round trips, deterministic bytes, RD points."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tatok_core.workflows.data import ImageSource, fixed_crops
from tatok_core.contract.errors import TatokError
from tatok_core.io.images import read_image, write_image
from tatok_core.workflows.encoding import decode_tokens, encode_files, output_names, source_names, token_meta
from tatok_core.workflows.rate_control import calibrate_threshold, calibrate_tau
from tatok_core.workflows.rate_distortion import evaluate_rate_distortion
from tatok_core.io.tokenfile import TokenDataset, TokenWriter
from tatok_core.pipeline.tokenizer import Tokenizer
from tatok_core.workflows.training import evaluate
from tests.helpers import small_spec


@pytest.fixture(scope="module")
def heldout_crops() -> torch.Tensor:
    return fixed_crops(ImageSource("builtin:photos:heldout").images, 32, 20)  # (20, 3, 32, 32)


@pytest.fixture(scope="module", params=["pixel", "prior"])
def model(request: pytest.FixtureRequest) -> Tokenizer:
    """Pixel entropy: content-dependent bits without training; prior: the learned estimator, untrained."""
    torch.manual_seed(0)
    return Tokenizer(small_spec(entropy=request.param)).eval()


@pytest.fixture(scope="module")
def pixel_model() -> Tokenizer:
    torch.manual_seed(0)
    return Tokenizer(small_spec(entropy="pixel")).eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory, heldout_crops: torch.Tensor) -> Path:
    """Mixed sizes (interleaved, so batches finish out of order), a subfolder and one corrupt file."""
    root = tmp_path_factory.mktemp("images")
    (root / "sub").mkdir()
    for i in range(7):
        image = heldout_crops[i] if i % 3 else heldout_crops[i][:, :18, :27]
        write_image(root / f"{i:02d}.png", image)
    write_image(root / "sub" / "07.png", heldout_crops[7])
    (root / "03b.png").write_bytes(b"not a png")
    return root


def _encode(model: Tokenizer, folder: Path, out: Path, **kwargs) -> tuple:
    sources = source_names([folder])
    with TokenWriter(out, spec_digest=model.spec.digest(), tokenizer="small",
                     meta=token_meta(model, tau=kwargs.get("tau"), budget=kwargs.get("budget"))) as writer:
        report = encode_files(model, [p for p, _ in sources], writer, names=[n for _, n in sources], **kwargs)
    return sources, report


@pytest.mark.parametrize("budget", [6, 23.4, 41])
def test_budget_is_met_within_one_token_on_heldout_crops(model: Tokenizer, heldout_crops: torch.Tensor,
                                                         budget: float) -> None:
    result = calibrate_tau(model, heldout_crops, budget)
    assert abs(result.mean_tokens - budget) <= 1, result
    achieved = model.encode(heldout_crops, tau=result.tau).lengths.double().mean()
    assert float(achieved) == pytest.approx(result.mean_tokens)  # the reported mean is what encode keeps


def test_calibration_analyses_each_batch_once(pixel_model: Tokenizer, heldout_crops: torch.Tensor,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = pixel_model.analyse
    monkeypatch.setattr(pixel_model, "analyse", lambda images: calls.append(len(images)) or real(images))
    result = calibrate_tau(pixel_model, [heldout_crops[:12], heldout_crops[12:, :, :24, :16]], 17)
    assert calls == [12, 8] and result.iterations > 1


@pytest.mark.parametrize(("budget", "message"), [
    (-1, "budget must be a number of patch tokens per image > 0"),
    (float("nan"), "budget must be a number of patch tokens per image > 0"),
    (10_000, "outside what these images can reach"),
])
def test_unreachable_or_invalid_budgets_raise(pixel_model: Tokenizer, heldout_crops: torch.Tensor, budget: float,
                                              message: str) -> None:
    with pytest.raises(TatokError, match=message):
        calibrate_tau(pixel_model, heldout_crops[:4], budget)


def test_file_round_trip_is_exact(pixel_model: Tokenizer, folder: Path, tmp_path: Path) -> None:
    sources, report = _encode(pixel_model, folder, tmp_path / "tokens", tau=0.6, batch_size=4)
    assert report.encoded == 8 and [p.name for p, _ in report.failed] == ["03b.png"]
    dataset = TokenDataset(tmp_path / "tokens", expect_spec_digest=pixel_model.spec.digest())
    readable = [(p, n) for p, n in sources if p.name != "03b.png"]
    assert [image.source for image in dataset] == [n for _, n in readable]  # input order, folder-relative names
    written = decode_tokens(pixel_model, tmp_path / "tokens", tmp_path / "decoded")
    for stored, (path, _), png in zip(dataset, readable, written):
        image = read_image(path)[None]
        expected = pixel_model.encode(image, tau=0.6)
        assert expected.per_image()[0].codes.tolist() == stored.codes.tolist()
        assert expected.per_image()[0].positions.tolist() == stored.positions.tolist()
        assert torch.equal(expected.global_codes[0], stored.global_codes)
        reference = tmp_path / f"reference-{png.name}"
        write_image(reference, pixel_model.decode(expected)[0])
        assert png.read_bytes() == reference.read_bytes()
    assert sorted(p.name for p in (tmp_path / "decoded").rglob("*.png")) == sorted(p.name for p in written)


def test_bytes_do_not_depend_on_batch_size_or_run(pixel_model: Tokenizer, folder: Path, tmp_path: Path) -> None:
    shards = []
    for i, batch_size in enumerate([1, 3, 16, 3]):
        _, report = _encode(pixel_model, folder, tmp_path / f"t{i}.safetensors", budget=20, batch_size=batch_size)
        shards.append((tmp_path / f"t{i}.safetensors").read_bytes())
        assert report.calibration is not None and abs(report.calibration.mean_tokens - 20) <= 1
    assert all(s == shards[0] for s in shards)


def test_decode_never_overwrites_and_leaves_nothing_on_error(pixel_model: Tokenizer, folder: Path,
                                                            tmp_path: Path) -> None:
    _encode(pixel_model, folder, tmp_path / "tokens", tau=0.5)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "01.png").write_bytes(b"original")
    with pytest.raises(TatokError, match="already exists"):
        decode_tokens(pixel_model, tmp_path / "tokens", tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["01.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tokens"]  # no temp folder left


def test_source_names_are_relative_to_each_input(folder: Path) -> None:
    names = dict(source_names([folder / "sub" / "07.png", str(folder / "*" / "*.png"), folder]))
    assert names[folder / "sub" / "07.png"] == "07.png"  # a file: its name; first occurrence wins
    assert names[folder / "01.png"] == "01.png"  # a folder: relative to it
    assert list(names)[0] == folder / "sub" / "07.png" and len(names) == 9
    assert dict(source_names([str(folder / "s*" / "*.png")])) == {folder / "sub" / "07.png": "sub/07.png"}


def test_output_names_are_unique_and_stay_inside() -> None:
    assert output_names(["a/x.jpg", "b/x.png", "x.png", "X.png", "../../etc/passwd", "/abs/y.tif", ""]) == [
        "a/x.png", "b/x.png", "x.png", "X-2.png", "etc/passwd.png", "abs/y.png", "image-6.png"]


def test_rate_distortion_points_match_training_evaluation(pixel_model: Tokenizer, heldout_crops: torch.Tensor) -> None:
    images = heldout_crops[:6]
    points = evaluate_rate_distortion(pixel_model, images, taus=[0.5, 0.9], batch_size=4)
    by_key = {(p.filter, p.setting): p for p in points}
    reference = evaluate(pixel_model, images, taus=(0.5, 0.9))
    for tau in (0.5, 0.9):
        own = by_key[("model", f"tau={tau:g}")]  # the spec's filter, by role
        assert own.mean_tokens == pytest.approx(reference[f"tokens_dtf@{tau:g}"])
        assert own.psnr == pytest.approx(reference[f"psnr_dtf@{tau:g}"], abs=1e-4)
        k = round(own.mean_tokens)
        assert all(by_key[(name, f"k={k}")].mean_tokens == k for name in ("topk", "random", "raster"))
        for mode in ("theta", "epsilon"):  # one shared threshold, matched to the model's mean count
            shared = [p for p in points if p.filter == f"shared-{mode}" and p.matched == f"tau={tau:g}"]
            assert len(shared) == 1 and abs(shared[0].mean_tokens - own.mean_tokens) <= 2  # pixel bits tie a lot
    assert by_key[("all", "all")].mean_tokens == 64 and len(points) == 2 + 2 * 2 + 3 * 2 + 1
    assert all(0 <= p.ssim <= 1 for p in points)
    for p in points:  # bits per pixel: the parts add up, per image values are kept
        assert p.bpp == pytest.approx(p.bpp_codes + p.bpp_globals + p.bpp_side)
        assert len(p.per_image["psnr"]) == 6 and p.per_image["fraction"] == [t / 64 for t in p.per_image["tokens"]]
    with pytest.raises(TatokError, match="tau"):
        evaluate_rate_distortion(pixel_model, images, taus=[1.5])


def test_oracle_is_an_upper_bound_on_topk(pixel_model: Tokenizer, heldout_crops: torch.Tensor) -> None:
    points = evaluate_rate_distortion(pixel_model, heldout_crops[:6], taus=[0.7], filters=("topk",), oracle=True,
                                      oracle_levels=8, batch_size=6)
    topk, oracle = points
    assert oracle.filter == "oracle" and oracle.matched == topk.matched
    assert oracle.mean_tokens <= topk.mean_tokens + 0.5  # within the matched mean count K_τ (k = round(K_τ))
    assert all(k % 8 == 0 for k in oracle.per_image["tokens"])  # one of the 9 decoded counts 0, 8, …, 64
    assert oracle.bpp == pytest.approx(oracle.bpp_codes + oracle.bpp_globals + oracle.bpp_side)


@pytest.mark.parametrize("mode", ["theta", "epsilon"])
@pytest.mark.parametrize("budget", [6, 23.4, 41])
def test_shared_threshold_budget_is_met_within_one_token(model: Tokenizer, heldout_crops: torch.Tensor, mode: str,
                                                         budget: float) -> None:
    result = calibrate_threshold(model, heldout_crops, budget, mode)
    ties = model.spec.entropy.name == "pixel" and mode == "theta"
    # the pixel estimator's bits take few distinct values: one θ cannot split a tie shared by many images,
    # so its count jumps; the calibration then returns the step nearest the budget (checked: within 2)
    assert result.mode == mode and abs(result.mean_tokens - budget) <= (2 if ties else 1), result
    achieved = model.encode(heldout_crops, result.threshold, mode=mode).lengths.double()
    assert float(achieved.mean()) == pytest.approx(result.mean_tokens)
    assert float(achieved.std()) > 0  # one threshold, many counts: the set is allocated, not cut evenly


def test_floor_and_cap_bound_every_image(pixel_model: Tokenizer, heldout_crops: torch.Tensor) -> None:
    result = calibrate_threshold(pixel_model, heldout_crops, 20, "theta", min_keep=12, max_keep=30)
    kept = pixel_model.encode(heldout_crops, result.threshold, mode="theta", min_keep=12, max_keep=30).lengths
    assert abs(result.mean_tokens - 20) <= 1 and int(kept.min()) >= 12 and int(kept.max()) <= 30


def test_a_filter_without_modes_refuses_absolute_budgets(pixel_model: Tokenizer, heldout_crops: torch.Tensor) -> None:
    with pytest.raises(TatokError, match="filter 'topk' has no theta rule"):
        calibrate_threshold(pixel_model, heldout_crops[:4], 10, "theta", filter="topk")


def test_photos_beyond_the_old_token_cap_encode(pixel_model: Tokenizer) -> None:
    image = torch.rand(1, 3, 368, 368, generator=torch.Generator().manual_seed(0))  # 8464 patches > 8192
    tokens = pixel_model.encode(image, 0.5)
    assert tokens.num_patches == 8464 and 0 < int(tokens.lengths[0]) < 8464


def test_tau_sweeps_mean_tau_for_a_model_that_ships_the_theta_rule(pixel_model: Tokenizer,
                                                                     heldout_crops: torch.Tensor) -> None:
    """`tatok eval` and the training evaluation sweep τ: for a θ-rule model a τ must not be read as θ bits."""
    from tatok_core.workflows.training import evaluate

    absolute = pixel_model.with_component("filter", "dtf", mode="theta", theta=1e9, min_keep=0)
    images = heldout_crops[:6]
    for a, b in zip(evaluate_rate_distortion(absolute, images, taus=[0.5, 0.9], filters=("model",)),
                    evaluate_rate_distortion(pixel_model, images, taus=[0.5, 0.9], filters=("model",))):
        assert a.mean_tokens == b.mean_tokens and a.psnr == pytest.approx(b.psnr)
    on_absolute, on_tau = evaluate(absolute, images, taus=(0.5,)), evaluate(pixel_model, images, taus=(0.5,))
    assert on_absolute["tokens_dtf@0.5"] == on_tau["tokens_dtf@0.5"]
