"""TaTok core: the contract every component plugs into.

Interfaces (:mod:`tatok_core.interfaces`), the registry and plugin hook (:mod:`tatok_core.registry`,
:mod:`tatok_core.hooks`), value types (:class:`Selection`, :class:`Tokens`), pipeline specs
(:class:`PipelineSpec`), the :class:`Tokenizer` pipeline and the DTF reference (:mod:`tatok_core.dtf`).
"""

from tatok_core.errors import (
    CompositionError,
    FilterInputError,
    ImageReadError,
    PluginError,
    SpecError,
    TatokError,
    TokenFileError,
    UnknownComponentError,
)
from tatok_core.hooks import hookimpl
from tatok_core.interfaces import (
    Decoder,
    Encoder,
    EntropyContext,
    EntropyEstimate,
    EntropyEstimator,
    Facts,
    Generator,
    GlobalTokenizer,
    Quantized,
    Quantizer,
    TokenFilter,
)
from tatok_core.registry import KINDS, Registry, get_registry
from tatok_core.selection import Selection
from tatok_core.spec import ComponentSpec, PipelineSpec
from tatok_core.tokens import ImageTokens, Tokens

__version__ = "0.1.0"

__all__ = [
    "KINDS",
    "ComponentSpec",
    "CompositionError",
    "Decoder",
    "Encoder",
    "EntropyContext",
    "EntropyEstimate",
    "EntropyEstimator",
    "Facts",
    "FilterInputError",
    "Generator",
    "GlobalTokenizer",
    "ImageReadError",
    "ImageTokens",
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
    "get_registry",
    "hookimpl",
]


def __getattr__(name: str):  # the Tokenizer pulls in torch-heavy code; import it lazily
    if name == "Tokenizer":
        from tatok_core.tokenizer import Tokenizer

        return Tokenizer
    raise AttributeError(f"module 'tatok_core' has no attribute {name!r}")
