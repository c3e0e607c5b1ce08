"""The inference hot path: no host syncs, and traceable by torch.compile as one graph."""

from __future__ import annotations

import os
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tatok_core import PipelineSpec
from tatok_core.contract.interfaces import EntropyContext, EntropyEstimate, Grid, Quantized
from tatok_core.pipeline.tokenizer import Tokenizer
from tests.helpers import small_spec

REPO = Path(__file__).resolve().parents[1]

# aten ops that make the host wait for the device: reading a value (item/bool/int/float all lower to
# _local_scalar_dense) or an output whose size depends on the data.
SYNC_OPS = {"_local_scalar_dense", "nonzero", "_unique2", "unique_dim", "unique_consecutive", "masked_select",
            "is_nonzero", "equal"}
# where the encode path may wait: the filter checks its input, and sizing the packed output
SIZING_FILES = {"tatok_core/ops/dtf/reference.py", "tatok_core/contract/selection.py", "tatok_core/contract/tokens.py", "plugins/filters.py"}


class HostSyncs(TorchDispatchMode):
    """Records every syncing aten op with the repository line that caused it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[tuple[str, str]] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        bool_index = name == "index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()))
        unsized_repeat = name == "repeat_interleave" and (kwargs or {}).get("output_size") is None
        if name in SYNC_OPS or bool_index or unsized_repeat:
            frames = [f for f in traceback.extract_stack()
                      if Path(f.filename).is_relative_to(REPO) and "site-packages" not in f.filename
                      and f.filename != __file__]
            where = frames[-1] if frames else None
            location = f"{Path(where.filename).relative_to(REPO)}:{where.lineno}" if where else "torch"
            self.calls[(name, location)] += 1
        return func(*args, **(kwargs or {}))

    def files(self) -> set[str]:
        return {location.rsplit(":", 1)[0] for _, location in self.calls}


def windowed_spec(quantizer: str = "fsq") -> PipelineSpec:
    spec = small_spec(quantizer=quantizer)
    window = {kind: {"window": 4} for kind in ("encoder", "global_tokenizer", "entropy", "decoder")}
    return spec.updated({}, window)


def test_host_sync_counter_catches_syncs() -> None:
    """The instrument itself: the syncs a careless change would add are all seen."""
    x = torch.rand(4)
    with HostSyncs() as syncs:
        float(x.sum())
        x.tolist()
        bool((x > 2).any())
        x[x > 0.5]
        torch.unique(x)
        x.nonzero()
        torch.repeat_interleave(torch.arange(4), torch.ones(4, dtype=torch.long))
    names = {name for name, _ in syncs.calls}
    assert names >= {"_local_scalar_dense", "nonzero", "_unique2", "repeat_interleave"}, syncs.calls


@pytest.mark.parametrize("model", ["tatok-tiny", "small-vq"])
def test_inference_path_has_no_host_sync(model: str) -> None:
    """encoder → globals → quantizer → entropy and the decoder never wait for the device (apart from one
    read of the input's NaN count and range); encode waits only where the filter checks its input and
    sizes the packed output."""
    torch.manual_seed(0)
    tokenizer = Tokenizer.from_pretrained(model) if model == "tatok-tiny" else Tokenizer(windowed_spec("vq")).eval()
    images = torch.rand(2, 3, 44, 60)  # partial windows
    with torch.no_grad(), HostSyncs() as analysis_syncs:
        analysis = tokenizer.analyse(images)
    # the one allowed wait: check_images reads NaN count, min and max together to refuse bad input
    assert analysis_syncs.files() <= {"tatok_core/pipeline/tokenizer.py"} and sum(analysis_syncs.calls.values()) <= 1, \
        dict(analysis_syncs.calls)
    with torch.no_grad(), HostSyncs() as encode_syncs:
        tokens = tokenizer.encode(images)
    assert encode_syncs.files() <= SIZING_FILES | {"tatok_core/pipeline/tokenizer.py"}, dict(encode_syncs.calls)
    with torch.no_grad(), HostSyncs() as decode_syncs:
        tokenizer.decode(tokens)
    # the one allowed wait: decode reads the codes' range once to refuse codes outside the codebook
    assert decode_syncs.files() <= {"tatok_core/pipeline/tokenizer.py"} and sum(decode_syncs.calls.values()) <= 1, \
        dict(decode_syncs.calls)
    assert analysis.patches.code_statistics(tokenizer.quantizer.codebook_size)["codebook_usage"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (benchmarks/gpu_check.sh runs it)")
def test_inference_path_has_no_host_sync_on_cuda() -> None:
    """CUDA's own sync detector agrees: it raises on any synchronising call in the encoder → globals →
    quantizer → entropy graph and the decoder (the boundary checks' one read each is outside it)."""
    tokenizer = Tokenizer.from_pretrained("tatok-tiny").cuda()
    images = torch.rand(2, 3, 44, 60, device="cuda")
    tokens = tokenizer.encode(images)
    grid_codes, keep = tokens.to("cuda").to_grid(fill=0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            encode_graph(tokenizer, images, tokens.grid)
            tokenizer.decoder(tokenizer.quantizer.codes_to_vectors(tokens.global_codes.cuda()),
                              tokenizer.quantizer.codes_to_vectors(grid_codes), keep, tokens.grid)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_encode_containers_are_named_tuples_with_the_same_fields() -> None:
    assert Quantized._fields == ("vectors", "codes", "aux_loss", "metrics")
    assert EntropyEstimate._fields == ("bits", "loss", "metrics")
    assert EntropyContext._fields == ("images", "grid", "global_vectors", "global_codes", "patch_vectors", "patch_codes",
                                      "base_reconstruction", "decode")
    q = Quantized(torch.zeros(1), torch.zeros(1, dtype=torch.long), torch.zeros(()))
    assert dict(q.metrics) == {}


# aot_eager: dynamo + AOTAutograd, the whole graph capture; inductor adds C++ code generation (about a
# minute cold on 2 CPU cores, which tests torch, not TaTok). benchmarks/gpu_check.sh runs inductor on CUDA.
COMPILE_BACKEND = os.environ.get("TATOK_COMPILE_BACKEND", "aot_eager")


def encode_graph(tokenizer: Tokenizer, images: torch.Tensor, grid: Grid) -> tuple[Quantized, EntropyEstimate]:
    features = tokenizer.encoder(images)  # (B, N, D)
    global_features, patch_features = tokenizer.global_tokenizer(features, grid)
    m = global_features.shape[1]
    quantized = tokenizer.quantizer(torch.cat([global_features, patch_features], dim=1))
    context = EntropyContext(images, grid, quantized.vectors[:, :m], quantized.codes[:, :m],
                             quantized.vectors[:, m:], quantized.codes[:, m:])
    return quantized, tokenizer.entropy(context)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
def test_encode_path_compiles_as_one_graph_and_matches_eager(device: str) -> None:
    torch.manual_seed(0)
    tokenizer = Tokenizer(windowed_spec()).eval().to(device)
    images = torch.rand(1, 3, 40, 56, device=device)  # grid 10×14: partial 4×4 windows
    grid = tokenizer.grid_for(40, 56)
    torch._dynamo.reset()
    compiled = torch.compile(encode_graph, fullgraph=True, backend=COMPILE_BACKEND)
    with torch.no_grad():
        eager_q, eager_e = encode_graph(tokenizer, images, grid)
        graph_q, graph_e = compiled(tokenizer, images, grid)
    torch._dynamo.reset()
    assert torch.equal(graph_q.codes, eager_q.codes)
    torch.testing.assert_close(graph_q.vectors, eager_q.vectors, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(graph_e.bits, eager_e.bits, rtol=1e-4, atol=1e-4)
