"""TaTok core: the contract every component plugs into, the Tokenizer, and the workflows over it.

The names research code needs are exported here (``__all__``; every one is listed in ``docs/api.md``).
The contract (interfaces, registry and hook, :func:`create`, value types, specs, errors) and the DTF
reference import eagerly; the :class:`Tokenizer` and the workflows import on first use, so ``import
tatok_core`` stays light. Where each lives: ``docs/architecture.md``.
"""


from tatok_core.contract.bitrate import TokenBits, token_bits
from tatok_core.contract.errors import (
    CompositionError,
    FilterInputError,
    GenerationError,
    ImageReadError,
    MissingExtraError,
    PluginError,
    SpecError,
    TatokError,
    TokenFileError,
    UnknownComponentError,
    WeightsFileError,
)
from tatok_core.contract.hooks import hookimpl
from tatok_core.contract.interfaces import (
    FILTER_ROLES,
    PIPELINE_KINDS,
    Component,
    Decoder,
    Encoder,
    EntropyContext,
    EntropyEstimate,
    EntropyEstimator,
    Facts,
    Generator,
    GlobalTokenizer,
    Grid,
    Pick,
    Quantized,
    Quantizer,
    TokenFilter,
)
from tatok_core.contract.registry import KINDS, Registry, get_registry
from tatok_core.contract.selection import Selection, cu_seqlens_from_lengths
from tatok_core.contract.spec import ComponentSpec, PipelineSpec, create
from tatok_core.contract.tokens import ImageTokens, Tokens
from tatok_core.ops.dtf.reference import dtf_select, epsilon_select, select_by_rule, theta_select

__version__ = "0.1.0"

#: Imported on first use (module attribute → module): torch-heavy or workflow code.
_LAZY = {
    "Tokenizer": "tatok_core.pipeline.tokenizer",
    "Analysis": "tatok_core.pipeline.tokenizer",
    "DEFAULT_PRETRAINED": "tatok_core.pipeline.tokenizer",
    "read_image": "tatok_core.io.images",
    "write_image": "tatok_core.io.images",
    "list_images": "tatok_core.io.images",
    "TokenDataset": "tatok_core.io.tokenfile",
    "TokenWriter": "tatok_core.io.tokenfile",
    "ImageSource": "tatok_core.workflows.data",
    "psnr": "tatok_core.workflows.metrics",
    "ssim": "tatok_core.workflows.metrics",
    "calibrate_bits": "tatok_core.workflows.rate_control",
    "calibrate_threshold": "tatok_core.workflows.rate_control",
    "encode_files": "tatok_core.workflows.encoding",
    "decode_tokens": "tatok_core.workflows.encoding",
    "evaluate_rate_distortion": "tatok_core.workflows.rate_distortion",
    "ImageCoder": "tatok_core.workflows.compression",
    "Recipe": "tatok_core.workflows.training",
    "TrainConfig": "tatok_core.workflows.training",
    "train": "tatok_core.workflows.training",
}

__all__ = [
    "Analysis", "Component", "ComponentSpec", "CompositionError", "DEFAULT_PRETRAINED", "Decoder", "Encoder",
    "EntropyContext", "EntropyEstimate", "EntropyEstimator", "FILTER_ROLES", "Facts", "FilterInputError",
    "GenerationError", "Generator", "GlobalTokenizer", "Grid", "ImageCoder", "ImageReadError", "ImageSource",
    "ImageTokens", "KINDS", "MissingExtraError", "PIPELINE_KINDS", "Pick", "PipelineSpec", "PluginError", "Quantized",
    "Quantizer", "Recipe", "Registry", "Selection", "SpecError", "TatokError", "TokenBits", "TokenDataset", "TokenFileError",
    "TokenFilter", "TokenWriter", "Tokenizer", "Tokens", "TrainConfig", "UnknownComponentError", "WeightsFileError",
    "calibrate_bits", "calibrate_threshold", "create", "cu_seqlens_from_lengths", "decode_tokens", "dtf_select",
    "encode_files", "epsilon_select", "evaluate_rate_distortion", "get_registry", "hookimpl", "list_images", "psnr",
    "read_image", "select_by_rule", "ssim", "theta_select", "token_bits", "train", "write_image",
]  # every name is listed in docs/api.md (tests/test_docs.py)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tatok_core' has no attribute {name!r}")
