"""The six component contracts of a TaTok pipeline (see docs/architecture.md, "Data flow").

Every component is a ``torch.nn.Module`` built as ``cls(facts, **options)`` when composed, or as
``cls(**options)`` on its own (``FSQ(levels=[8, 5, 5, 3])``). ``facts`` holds what the components
upstream of it provide (patch size, width, number of global tokens, code factors); a component reads
what it needs with :meth:`Component.need`, which takes the upstream value when composed (a keyword
argument given as well must agree with it) and the keyword argument (or a default) when standalone.
It adds what it provides in :meth:`Component.provides`. So a composition is checked when it is built
(on the meta device, before any tensor flows), and a mismatch names both components involved.

Build order: encoder → global_tokenizer → quantizer → entropy → filter → decoder.
"""

from __future__ import annotations

import abc
import functools
import inspect
import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import attrs
import torch
from torch import Tensor, nn

from tatok_core.contract.errors import CompositionError, GenerationError

if TYPE_CHECKING:
    from tatok_core.contract.selection import Selection
    from tatok_core.contract.tokens import Tokens

Grid = tuple[int, int]

Pick = Callable[[Tensor, "Tensor | None"], Tensor]
"""One choice of a prior's walk: logits (B, V) and the choice already known (B,) or None → the choice (B,).

Sampling draws from the logits; an entropy coder's encoder writes the known choice under the logits'
probabilities and returns it; its decoder reads the choice from the stream."""


@attrs.frozen
class Facts:
    """What the already-built components provide, and which component provided each fact."""

    values: Mapping[str, Any] = attrs.field(factory=dict)
    providers: Mapping[str, str] = attrs.field(factory=dict)
    building: str = ""  # label of the component being built with these facts, e.g. "decoder 'vit'"
    standalone: bool = False  # built on its own: upstream values come from the component's keyword arguments

    def need(self, fact: str, who: str) -> Any:
        """The value of ``fact``; a clear error when nothing upstream provides it."""
        if self.values.get(fact) is None:
            if fact in self.providers:
                raise CompositionError(f"{who} needs {fact!r}, which {self.providers[fact]} does not provide")
            have = ", ".join(f"{k} (from {self.providers[k]})" for k in self.values) or "nothing"
            raise CompositionError(f"{who} needs {fact!r}, which no upstream component provides (have: {have})")
        return self.values[fact]

    def describe(self, fact: str) -> str:
        """``"dim 128 from encoder 'vit'"``: for messages about a value that came from upstream."""
        return f"{fact} {self.values.get(fact)!r} from {self.providers.get(fact, 'nowhere')}"

    def agree(self, fact: str, value: Any, who: str) -> None:
        """Fail, naming both components, when ``who`` insists on a different value of ``fact``."""
        have = self.need(fact, who)
        if have != value:
            raise CompositionError(
                f"{who} requires {fact}={value!r} but {self.providers[fact]} provides {fact}={have!r}"
            )

    def extended(self, new: Mapping[str, Any], who: str) -> Facts:
        values, providers = dict(self.values), dict(self.providers)
        for fact, value in new.items():
            values[fact] = value
            providers[fact] = who
        return attrs.evolve(self, values=values, providers=providers)


def _same(a: Any, b: Any) -> bool:
    """Fact equality that does not tell a list from a tuple (options arrive as either)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return tuple(a) == tuple(b)
    return a == b


def _recording_options(init: Callable[..., None]) -> Callable[..., None]:
    """Wrap a component ``__init__`` so the instance remembers the arguments it was built with (``options``).

    Every named argument but ``self`` and ``facts`` counts. The outermost ``__init__`` of a subclass chain
    finishes last, so its complete set of options wins.
    """
    signature = inspect.signature(init)
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    recorded = [p.name for p in list(signature.parameters.values())[1:] if p.kind in named and p.name != "facts"]

    @functools.wraps(init)
    def __init__(self: Component, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError:  # a signature init accepted but bind cannot map: record nothing
            return
        bound.apply_defaults()
        self.options = {name: bound.arguments[name] for name in recorded}

    return __init__


class Component(nn.Module, abc.ABC):
    """Base of every component; ``kind`` names the registry namespace it lives in.

    Built with ``facts`` (composed into a pipeline) or without (standalone: ``FSQ(levels=[8, 5, 5, 3])``).
    ``options`` holds the arguments it was built with (defaults included, ``facts`` aside) and ``facts_in``
    the upstream values it was built on; both show in its ``repr``.
    """

    kind: ClassVar[str]
    options: dict[str, Any]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _recording_options(cls.__dict__["__init__"])  # type: ignore[method-assign]

    def __init__(self, facts: Facts | None = None, **options: Any) -> None:
        super().__init__()
        if options:
            raise TypeError(f"unexpected options: {', '.join(sorted(options))}")
        self.options = {}
        self.needed: dict[str, Any] = {}  # the upstream facts read through need(), for the repr
        self.facts_in = facts if facts is not None else Facts(standalone=True)
        self.label = self.facts_in.building or f"{self.kind} {type(self).__name__!r}"  # e.g. "decoder 'vit'", for errors

    def need(self, fact: str, given: Any = None, *, default: Any = None, optional: bool = False) -> Any:
        """The upstream value ``fact`` (``dim``, ``patch_size`` …) this component is built on.

        Composed: what upstream provides; ``given`` (the component's keyword argument of that name),
        when not ``None``, must agree with it. Standalone: ``given``, else ``default``; with neither,
        a ``TypeError`` naming the keyword. Standalone values are recorded in ``facts_in`` too.
        ``optional``: a fact only some upstream components provide (``global_grid``); where none does,
        ``default`` in both modes.
        """
        facts = self.facts_in
        if optional and facts.values.get(fact) is None and (facts.standalone or given is None):
            given = default if given is None else given
            self.needed[fact] = given
            return given
        if not facts.standalone:
            have = facts.need(fact, self.label)
            if given is not None and not _same(given, have):
                raise CompositionError(
                    f"{self.label} was given {fact}={given!r} but {facts.providers[fact]} provides {fact}={have!r}"
                )
            self.needed[fact] = have
            return have
        value = given if given is not None else default
        if value is None:
            raise TypeError(f"{self.label} built without facts needs the keyword argument {fact}=...")
        self.facts_in = facts.extended({fact: value}, f"{self.label} (keyword {fact})")
        self.needed[fact] = value
        return value

    def provides(self) -> dict[str, Any]:
        """Facts this component adds for the components built after it."""
        return {}

    def extra_repr(self) -> str:
        """Options and upstream facts, e.g. ``levels=(8, 5, 5, 3), dim=4`` (what ``print(model)`` shows)."""
        shown = {name: value for name, value in self.options.items() if value is not None}
        shown.update({fact: value for fact, value in self.needed.items() if fact not in shown})
        return ", ".join(f"{name}={value!r}" for name, value in shown.items())


class Encoder(Component):
    """Images (B, C, H, W) in [0, 1] → patch features (B, N, D), N = (H/p)(W/p) in raster order.

    Provides ``channels`` (C), ``patch_size`` (p) and ``dim`` (D). H and W are multiples of p (the
    :class:`~tatok_core.pipeline.tokenizer.Tokenizer` pads), any such size must work.
    """

    kind = "encoder"
    channels: int
    patch_size: int
    dim: int

    #: True when :meth:`given_keep` re-expresses the patch features knowing which tokens are kept.
    keep_aware: bool = False

    def provides(self) -> dict[str, Any]:
        return {"channels": self.channels, "patch_size": self.patch_size, "dim": self.dim}

    @abc.abstractmethod
    def forward(self, images: Tensor) -> Tensor: ...

    def given_keep(self, patches: Tensor, keep: Tensor, grid: Grid) -> Tensor:
        """Patch features (B, N, D) re-expressed knowing ``keep`` (B, N): a kept token may then carry
        what its dropped neighbours hold. The default keeps them as they are (``keep_aware`` False)."""
        return patches


class GlobalTokenizer(Component):
    """Patch features (B, N, D) → (global features (B, M, D), refined patch features (B, N, D)).

    The globals carry what is shared across patches; patches are refined knowing the globals.
    Provides ``num_global`` (M, may be 0 for a patch-only ablation); one whose first a×a globals stand
    for the cells of an a×a grid over the image (row-major) also provides ``global_grid`` = a, which a
    decoder may read (optionally: :meth:`Component.need` with ``optional=True``) to place them.
    """

    kind = "global_tokenizer"
    num_global: int

    def provides(self) -> dict[str, Any]:
        return {"num_global": self.num_global}

    @abc.abstractmethod
    def forward(self, patches: Tensor, grid: Grid) -> tuple[Tensor, Tensor]: ...


NO_METRICS: Mapping[str, Tensor] = MappingProxyType({})


# The containers on the encode path are NamedTuples, not attrs classes: torch.compile (dynamo) traces
# NamedTuples holding tensors, so encoder → globals → quantizer → entropy compiles as one graph.
class Quantized(NamedTuple):
    """A quantizer's output for vectors of shape (..., D).

    ``metrics`` holds only 0-d tensors computed without a host sync (e.g. VQ's ``dead_codes`` in
    training); read them (``float``) at log intervals. Codebook statistics are computed on request:
    :meth:`code_statistics`.
    """

    vectors: Tensor  # (..., D) quantized, straight-through gradient
    codes: Tensor  # (...) int64 in [0, codebook_size)
    aux_loss: Tensor  # () scalar, zero when the quantizer has none
    metrics: Mapping[str, Tensor] = NO_METRICS

    def code_statistics(self, codebook_size: int) -> dict[str, float]:
        """``codebook_usage`` (share of the codebook these codes use) and ``perplexity`` (exp entropy).

        For training logs and evaluation only: ``torch.unique`` and the conversion to floats wait for
        the device (a host sync), which is why no forward pass computes them.
        """
        if self.codes.is_meta or self.codes.numel() == 0:
            return {}
        with torch.no_grad():
            _, counts = torch.unique(self.codes.flatten(), return_counts=True)
            p = counts.double() / counts.sum()
            perplexity = math.exp(float(-(p * p.log()).sum()))
        return {"codebook_usage": counts.numel() / codebook_size, "perplexity": perplexity}


def mixed_radix_digits(codes: Tensor, factors: tuple[int, ...]) -> Tensor:
    """Codes (...) → digits (..., len(factors)) with the first factor least significant (FSQ order)."""
    digits = []
    rest = codes.long()
    for factor in factors:
        digits.append(rest % factor)
        rest = torch.div(rest, factor, rounding_mode="floor")
    return torch.stack(digits, dim=-1)


class Quantizer(Component):
    """Vectors (..., D) → :class:`Quantized`; codes ↔ vectors.

    ``code_factors`` is the mixed-radix shape of the code space (FSQ: its levels; VQ: ``(K,)``) with
    the **first factor least significant**, so entropy models can factorise over it. Provides
    ``code_factors``.
    """

    kind = "quantizer"
    code_factors: tuple[int, ...]

    @property
    def codebook_size(self) -> int:
        size = 1
        for factor in self.code_factors:
            size *= factor
        return size

    def provides(self) -> dict[str, Any]:
        return {"code_factors": tuple(self.code_factors)}

    @abc.abstractmethod
    def forward(self, x: Tensor) -> Quantized: ...

    @abc.abstractmethod
    def codes_to_vectors(self, codes: Tensor) -> Tensor:
        """Codes (...) → the same quantized vectors (..., D) ``forward`` gives for them."""

    def relaxed_digits(self, x: Tensor) -> Tensor:
        """Vectors (..., D) → digit weights (..., ΣL_f): per digit f a block of L_f weights, one-hot at the
        digit ``forward`` gives, with a gradient that says how the code would move with x. What lets a
        coder's bits (``Generator.relaxed_log_likelihood``) steer test-time refinement. Optional."""
        raise CompositionError(f"{self.label} has no relaxed digits: rate-aware refinement needs a quantizer "
                               "whose codes move smoothly with its input (the built-in 'fsq' has them)")

    def codes_to_digits(self, codes: Tensor) -> Tensor:
        """Codes (...) → mixed-radix digits (..., len(code_factors)), first digit least significant."""
        return mixed_radix_digits(codes, self.code_factors)

    def digits_to_codes(self, digits: Tensor) -> Tensor:
        codes = torch.zeros(digits.shape[:-1], dtype=torch.long, device=digits.device)
        for i in reversed(range(len(self.code_factors))):
            codes = codes * self.code_factors[i] + digits[..., i].long()
        return codes


class EntropyContext(NamedTuple):
    """Everything an entropy estimator may condition on (all tensors of one batch)."""

    images: Tensor  # (B, C, H, W), padded to the grid
    grid: Grid
    global_vectors: Tensor  # (B, M, D) quantized
    global_codes: Tensor  # (B, M)
    patch_vectors: Tensor  # (B, N, D) quantized
    patch_codes: Tensor  # (B, N)
    base_reconstruction: Tensor | None = None  # (B, C, H, W) globals-only decode, for estimators that ask
    #: For estimators that set ``needs_decoder``: keep (B, N) bool → (B, C, H, W), these images decoded
    #: from their globals and the kept patch tokens.
    decode: Callable[[Tensor], Tensor] | None = None


class EntropyEstimate(NamedTuple):
    """An estimator's output; ``metrics`` as in :class:`Quantized` (0-d tensors, no host sync)."""

    bits: Tensor  # (B, N) ≥ 0: information of each patch token not explained by the globals
    loss: Tensor  # () the estimator's own training loss (zero when training-free)
    metrics: Mapping[str, Tensor] = NO_METRICS


class EntropyEstimator(Component):
    """Bits per patch token, conditional on the global tokens, plus the estimator's training loss.

    The estimator must not change what the encoder learns: implementations train only on detached
    inputs (see the built-in ``prior``). An estimator that sets ``needs_base_reconstruction`` gets the
    decoder's globals-only picture in :attr:`EntropyContext.base_reconstruction`; one that sets
    ``needs_decoder`` gets :attr:`EntropyContext.decode`, to measure what kept tokens buy.
    """

    kind = "entropy"
    needs_base_reconstruction: ClassVar[bool] = False
    needs_decoder: ClassVar[bool] = False

    @abc.abstractmethod
    def forward(self, context: EntropyContext) -> EntropyEstimate: ...


class TokenFilter(Component):
    """Bits (B, N) → :class:`~tatok_core.contract.selection.Selection` of the patch tokens to keep.

    ``tau`` overrides the filter's default threshold for one call (a float, or a (B,) tensor with one
    τ per image); filters that keep a fixed count ignore it.
    """

    kind = "filter"

    #: The part this filter plays when a workflow compares a model with baselines (one of
    #: :data:`FILTER_ROLES`, or None): workflows ask for a role (:meth:`Registry.name_for_role`,
    #: ``Tokenizer.baseline_filter``), never for a plugin's name.
    role: ClassVar[str | None] = None

    @abc.abstractmethod
    def select(self, bits: Tensor, tau: float | Tensor | None = None) -> Selection: ...

    def forward(self, bits: Tensor, tau: float | Tensor | None = None) -> Selection:
        return self.select(bits, tau)


class Decoder(Component):
    """Globals (B, M, D) + patch vectors (B, N, D) with a keep mask (B, N) → images (B, C, H, W).

    Dropped positions (``keep`` False) carry no information: the decoder must not read their vectors.
    """

    kind = "decoder"

    @abc.abstractmethod
    def forward(self, global_vectors: Tensor, patch_vectors: Tensor, keep: Tensor, grid: Grid) -> Tensor: ...


FILTER_ROLES: tuple[str, ...] = ("entropy-rules", "keep-all", "top-k", "random-k", "raster-k")
"""Roles of token filters: the τ/θ/ε rules on entropy (DTF), every token (the fixed-rate tokenizer), and
a fixed count ranked by bits, at random, or in raster order (the baselines at a matched count)."""

PIPELINE_KINDS: tuple[str, ...] = ("encoder", "global_tokenizer", "quantizer", "entropy", "filter", "decoder")
"""The kinds a Tokenizer is built from, in data-flow (= build) order."""


class Generator(Component):
    """An autoregressive prior over :class:`~tatok_core.contract.tokens.Tokens`: exact likelihood and sampling.

    Not part of a tokenizer pipeline: it models the tokens a tokenizer writes, for downstream
    generation. Built as ``cls(facts, **options)`` with facts from
    :func:`tatok_core.workflows.generation.generator_facts`: ``code_factors``, ``num_global``, ``grid`` (the
    grid it is trained on), ``max_positions`` (N of that grid), ``patch_size`` and ``image_size``.
    """

    kind = "generator"

    @abc.abstractmethod
    def log_likelihood(self, tokens: Tokens, labels: Tensor | None = None) -> Tensor:
        """(B,) exact log-likelihood in nats of each image's tokens: globals, kept positions and codes."""

    @abc.abstractmethod
    def sample(
        self, n: int, *, grid: Grid, temperature: float, top_k: int, labels: Tensor | None, rng: torch.Generator
    ) -> Tokens:
        """``n`` images' tokens on ``grid``: always valid (positions increasing inside it, codes in range)."""

    def relaxed_log_likelihood(self, global_digits: Tensor, patch_digits: Tensor, kept: Tensor) -> Tensor:
        """(B,) nats of a token set given as digit weights (:meth:`Quantizer.relaxed_digits`): globals
        (B, M, ΣL_f), the grid's codes (B, H, W, ΣL_f) and its keep mask (B, H, W) — :meth:`log_likelihood`
        where the weights are one-hot, differentiable in them. Optional: what rate-aware refinement needs."""
        raise GenerationError(f"{self.label} cannot weigh bits in refinement: it has no relaxed_log_likelihood() "
                              "(the built-in 'context' prior has one)")

    def walk(self, pick: Pick, *, grid: Grid, given: Tokens | None = None, n: int = 1) -> Tokens:
        """Tokens built choice by choice in the prior's own order, each choice made by ``pick`` from its logits.

        With ``given`` (its images on ``grid``) every choice is known and ``pick`` sees it; the walk then
        returns ``given``. The same walk with the same choices computes the same logits, bit for bit —
        what lets an entropy coder's decoder (:mod:`tatok_core.workflows.compression`) follow its encoder.
        Optional: a prior without a walk still trains, scores and samples.
        """
        raise GenerationError(f"{self.label} cannot drive an entropy coder: it has no walk() "
                              "(the built-in 'context' prior has one)")


INTERFACES: dict[str, type[Component]] = {
    cls.kind: cls for cls in (Encoder, GlobalTokenizer, Quantizer, EntropyEstimator, TokenFilter, Decoder, Generator)
}
"""Every registrable kind and the interface its classes must subclass."""
