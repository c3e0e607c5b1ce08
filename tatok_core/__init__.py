"""TaTok core: the contract every component plugs into.

Interfaces (:mod:`tatok_core.contract.interfaces`), the registry and plugin hook (:mod:`tatok_core.contract.registry`,
:mod:`tatok_core.contract.hooks`), the factory :func:`create` (any registered component by name, from plain
keyword arguments), value types (:class:`Selection`, :class:`Tokens`, :class:`Quantized` …), pipeline
specs (:class:`PipelineSpec`), the :class:`Tokenizer` pipeline and the functional DTF
(:func:`dtf_select`, the reference every kernel matches).
"""

from tatok_core.ops.dtf.reference import dtf_select
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
    Quantized,
    Quantizer,
    TokenFilter,
)
from tatok_core.contract.registry import KINDS, Registry, get_registry
from tatok_core.contract.selection import Selection
from tatok_core.contract.spec import ComponentSpec, PipelineSpec, create
from tatok_core.contract.tokens import ImageTokens, Tokens

__version__ = "0.1.0"

__all__ = [
    "KINDS",
    "PIPELINE_KINDS",
    "Component",
    "ComponentSpec",
    "CompositionError",
    "Decoder",
    "Encoder",
    "EntropyContext",
    "EntropyEstimate",
    "EntropyEstimator",
    "Facts",
    "FilterInputError",
    "GenerationError",
    "Generator",
    "GlobalTokenizer",
    "Grid",
    "ImageReadError",
    "ImageTokens",
    "MissingExtraError",
    "PipelineSpec",
    "PluginError",
    "Quantized",
    "Quantizer",
    "Registry",
    "Selection",
    "SpecError",
    "TatokError",
    "TokenFileError",
    "TokenFilter",
    "Tokenizer",
    "Tokens",
    "UnknownComponentError",
    "WeightsFileError",
    "create",
    "dtf_select",
    "get_registry",
    "hookimpl",
]


def __getattr__(name: str):  # the Tokenizer pulls in torch-heavy code; import it lazily
    if name == "Tokenizer":
        from tatok_core.pipeline.tokenizer import Tokenizer

        return Tokenizer
    raise AttributeError(f"module 'tatok_core' has no attribute {name!r}")
