"""save_pretrained / from_pretrained / push_to_hub, component swaps, and the integrity of weights files."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from tatok_core import CompositionError, MissingExtraError, SpecError, Tokenizer, WeightsFileError
from tatok_core.workflows.generation import build_generator, generator_facts, load_prior, save_prior
from tatok_core.io.atomic import atomic_write
from tatok_core.io.persistence import sha256_hex, state_digest
from tatok_core.pipeline.tokenizer import CONFIG_FILE, SPEC_FILE, WEIGHTS_FILE
from tests.helpers import small_spec

IMAGES = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model() -> Tokenizer:
    torch.manual_seed(0)
    return Tokenizer(small_spec()).eval()


@pytest.fixture
def saved(model: Tokenizer, tmp_path: Path) -> Path:
    return model.save_pretrained(tmp_path / "tok")


def test_round_trip_records_and_verifies_the_weights(model: Tokenizer, saved: Path) -> None:
    assert sorted(os.listdir(saved)) == [CONFIG_FILE, WEIGHTS_FILE, SPEC_FILE]
    config = json.loads((saved / CONFIG_FILE).read_text())
    data = (saved / WEIGHTS_FILE).read_bytes()
    assert config["weights"] == {"file": WEIGHTS_FILE, "bytes": len(data), "sha256": sha256_hex(data),
                                 "digest": model.weights_digest()}
    loaded = Tokenizer.from_pretrained(saved)
    assert loaded.weights_digest() == model.weights_digest() and not loaded.training
    assert loaded.encode(IMAGES) == model.encode(IMAGES)


def test_weights_digest_tracks_the_weights_not_the_device_or_file(model: Tokenizer) -> None:
    twin = Tokenizer(model.spec)
    twin.load_state_dict(model.state_dict())
    assert twin.weights_digest() == model.weights_digest()
    with torch.no_grad():
        twin.decoder.mask_token.add_(1e-3)
    assert twin.weights_digest() != model.weights_digest()


def test_map_location_moves_the_model(saved: Path) -> None:
    loaded = Tokenizer.from_pretrained(saved, map_location="meta")
    assert {p.device.type for p in loaded.parameters()} == {"meta"}


def test_saved_files_follow_the_umask(model: Tokenizer, tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        directory = model.save_pretrained(tmp_path / "tok")
    finally:
        os.umask(previous)
    assert {(directory / f).stat().st_mode & 0o777 for f in os.listdir(directory)} == {0o640}


def test_an_interrupted_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "file"
    atomic_write(target, b"old")

    def crash(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, b"new contents")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["file"]  # no temporary left behind


DAMAGE = {
    "truncated": lambda data: data[: len(data) // 2],
    "empty": lambda data: b"",
    "garbage": lambda data: os.urandom(len(data)),
    "bit flip": lambda data: data[:-1] + bytes([data[-1] ^ 1]),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("recorded", [True, False], ids=["checksum", "no-checksum"])
def test_damaged_weights_are_one_line_naming_the_file(saved: Path, damage: str, recorded: bool) -> None:
    weights = saved / WEIGHTS_FILE
    weights.write_bytes(DAMAGE[damage](weights.read_bytes()))
    if not recorded:  # a folder saved before config.json existed: parse errors still name the file
        (saved / CONFIG_FILE).unlink()
    if damage == "bit flip" and not recorded:
        Tokenizer.from_pretrained(saved)  # a flipped bit in a tensor is only detectable with a checksum
        return
    with pytest.raises(WeightsFileError) as caught:
        Tokenizer.from_pretrained(saved)
    message = str(caught.value)
    assert message.startswith(f"{weights}: ") and "\n" not in message
    expected = {"empty": "empty weights file"}.get(damage, "checksum mismatch" if recorded else "not a readable safetensors")
    assert expected in message


def test_weights_of_another_architecture_name_the_mismatch(saved: Path, tmp_path: Path) -> None:
    other = Tokenizer(small_spec(quantizer="vq")).save_pretrained(tmp_path / "other")
    (saved / WEIGHTS_FILE).write_bytes((other / WEIGHTS_FILE).read_bytes())
    (saved / CONFIG_FILE).unlink()
    with pytest.raises(WeightsFileError, match=r"model.safetensors: weights of another architecture than the spec in .*"
                                               r"unexpected quantizer\.codebook"):
        Tokenizer.from_pretrained(saved)
    (saved / WEIGHTS_FILE).unlink()
    with pytest.raises(WeightsFileError, match="weights file not found"):
        Tokenizer.from_pretrained(saved)


# -- swapping components ---------------------------------------------------------------------------
def test_with_component_keeps_the_other_weights_and_round_trips(model: Tokenizer, tmp_path: Path) -> None:
    swapped = model.with_component("entropy", "pixel", bins=8)
    assert swapped.spec.entropy.name == "pixel" and swapped.spec.entropy.options == {"bins": 8}
    assert swapped.spec.encoder == model.spec.encoder
    for kind in ("encoder", "global_tokenizer", "quantizer", "decoder"):
        before, after = getattr(model, kind).state_dict(), getattr(swapped, kind).state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), kind
    tokens = swapped.encode(IMAGES)
    assert torch.equal(swapped.decode(tokens), model.decode(tokens))  # same decoder weights
    reloaded = Tokenizer.from_pretrained(swapped.save_pretrained(tmp_path / "swapped"))
    assert reloaded.spec == swapped.spec and reloaded.encode(IMAGES) == tokens


def test_same_name_keeps_other_options_and_downstream_inputs_are_checked(model: Tokenizer) -> None:
    base = model.with_component("filter", "dtf", tau=0.5, min_keep=3)
    retuned = base.with_component("filter", "dtf", tau=0.7)
    assert dict(retuned.spec.filter.options) == {"tau": 0.7, "min_keep": 3}
    with pytest.raises(CompositionError, match=r"entropy 'prior' cannot keep its weights: its input code_factors changes"):
        model.with_component("quantizer", "fsq", levels=[8, 5, 5, 3])
    with pytest.raises(SpecError, match="unknown component kind 'entropi'"):
        model.with_component("entropi", "pixel")


def test_from_pretrained_overrides(model: Tokenizer, saved: Path) -> None:
    loaded = Tokenizer.from_pretrained(saved, overrides={"entropy": "pixel",
                                                          "filter": {"name": "topk", "options": {"k": 3}}})
    assert (loaded.spec.entropy.name, loaded.spec.filter.name, loaded.filter.k) == ("pixel", "topk", 3)
    assert torch.equal(loaded.decoder.mask_token, model.decoder.mask_token)
    assert int(loaded.encode(IMAGES).lengths.max()) == 3
    with pytest.raises(SpecError, match="override for 'filter' must be a name or a table"):
        Tokenizer.from_pretrained(saved, overrides={"filter": {"tau": 0.5}})


# -- the Hub (huggingface_hub faked: nothing may download here) -----------------------------------
def test_hub_without_the_extra_names_it(model: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(MissingExtraError, match=r"push_to_hub needs huggingface_hub.*pip install 'tatok\[hub\]'"):
        model.push_to_hub("someone/tok")
    with pytest.raises(MissingExtraError, match=r"'someone/tok' is no local folder.*tatok\[hub\]"):
        Tokenizer.from_pretrained("someone/tok")


def test_hub_push_and_pull_follow_huggingface_hub(model: Tokenizer, saved: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple] = []
    uploaded = tmp_path / "uploaded"

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("api", token))

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls.append(("create_repo", repo_id, private, exist_ok))

        def upload_folder(self, repo_id, folder_path, commit_message, revision=None, create_pr=None):
            calls.append(("upload_folder", repo_id, commit_message, revision))
            uploaded.mkdir()
            for name in os.listdir(folder_path):
                (uploaded / name).write_bytes((Path(folder_path) / name).read_bytes())
            return "commit-info"

    def snapshot_download(repo_id, **kwargs):
        calls.append(("snapshot_download", repo_id, kwargs["allow_patterns"], kwargs["revision"]))
        return str(uploaded)

    fake = types.SimpleNamespace(HfApi=FakeApi, snapshot_download=snapshot_download)
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake)
    assert model.push_to_hub("someone/tok", token="t", private=True) == "commit-info"
    assert calls[:3] == [("api", "t"), ("create_repo", "someone/tok", True, True),
                         ("upload_folder", "someone/tok", "Upload TaTok tokenizer", None)]
    assert sorted(os.listdir(uploaded)) == sorted(os.listdir(saved))
    pulled = Tokenizer.from_pretrained("someone/tok", revision="main")
    assert calls[-1] == ("snapshot_download", "someone/tok", [SPEC_FILE, WEIGHTS_FILE, CONFIG_FILE], "main")
    assert pulled.name == "someone/tok" and pulled.weights_digest() == model.weights_digest()


# -- generation priors -----------------------------------------------------------------------------
def test_prior_weights_are_verified_too(tmp_path: Path) -> None:
    facts = generator_facts([4, 4], 2, (2, 2), 4)
    prior = build_generator("adaptive", facts, width=16, depth=1, heads=2)
    directory = save_prior(prior, tmp_path / "prior")
    record = json.loads((directory / "prior.json").read_text())
    assert record["weights"]["digest"] == state_digest(prior.state_dict())
    assert state_digest(load_prior(directory).state_dict()) == record["weights"]["digest"]
    weights = directory / "prior.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(WeightsFileError, match=r"prior.safetensors: checksum mismatch"):
        load_prior(directory)
