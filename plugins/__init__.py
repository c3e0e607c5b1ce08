"""TaTok's built-in components, registered through the public hook exactly as a plugin package would."""

from __future__ import annotations

from pathlib import Path

from tatok_core import hookimpl
from tatok_core.contract.registry import Registry

PRETRAINED_DIR = Path(__file__).parent / "pretrained"


@hookimpl
def tatok_register(registry: Registry) -> None:
    from tatok_plugins.context_prior import ContextPrior
    from tatok_plugins.entropy_chain import DecodedChainEntropy
    from tatok_plugins.entropy_pixel import PixelHistogramEntropy
    from tatok_plugins.entropy_prior import GlobalConditionalPrior
    from tatok_plugins.entropy_residual import GlobalsResidualEntropy
    from tatok_plugins.filters import DynamicTokenFilter, KeepAll, RandomKFilter, RasterKFilter, TopKFilter
    from tatok_plugins.fsq import FSQ
    from tatok_plugins.generator import AdaptivePrior, RasterPrior
    from tatok_plugins.global_tokens import LearnedGlobalTokens, NoGlobalTokens
    from tatok_plugins.packed_decoder import PackedDecoder
    from tatok_plugins.vit import ViTDecoder, ViTEncoder
    from tatok_plugins.vq import VQ

    registry.add("encoder", "vit", ViTEncoder)
    registry.add("global_tokenizer", "learned", LearnedGlobalTokens)
    registry.add("global_tokenizer", "none", NoGlobalTokens)
    registry.add("quantizer", "fsq", FSQ)
    registry.add("quantizer", "vq", VQ)
    registry.add("entropy", "prior", GlobalConditionalPrior)
    registry.add("entropy", "pixel", PixelHistogramEntropy)
    registry.add("entropy", "residual", GlobalsResidualEntropy)
    registry.add("entropy", "chain", DecodedChainEntropy)
    registry.add("filter", "dtf", DynamicTokenFilter)
    registry.add("filter", "all", KeepAll)
    registry.add("filter", "topk", TopKFilter)
    registry.add("filter", "random", RandomKFilter)
    registry.add("filter", "raster", RasterKFilter)
    registry.add("decoder", "vit", ViTDecoder)
    registry.add("decoder", "packed", PackedDecoder)
    registry.add("generator", "adaptive", AdaptivePrior)
    registry.add("generator", "raster", RasterPrior)
    registry.add("generator", "context", ContextPrior)


@hookimpl
def tatok_pretrained() -> dict[str, str]:
    """Every folder under ``pretrained/`` holding a saved tokenizer, by folder name."""
    if not PRETRAINED_DIR.is_dir():
        return {}
    return {d.name: str(d) for d in sorted(PRETRAINED_DIR.iterdir()) if (d / "spec.toml").is_file()}
