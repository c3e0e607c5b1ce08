"""The Tokenizer: a PipelineSpec's components wired together along the data flow of docs/architecture.md."""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tatok_core.contract.errors import CompositionError, SpecError, TatokError, UnknownComponentError
from tatok_core.contract.extras import require
from tatok_core.contract.interfaces import (EntropyContext, EntropyEstimate, Facts, Generator, Grid, Quantized,
                                            Quantizer, TokenFilter)
from tatok_core.contract.interfaces import PIPELINE_KINDS
from tatok_core.io.atomic import atomic_write
from tatok_core.io.persistence import (cpu_state, fit_state, hub_snapshot, is_repo_id, load_weights,
                                    push_folder, save_weights, state_digest)
from tatok_core.contract.registry import Registry, get_registry
from tatok_core.contract.selection import Selection
from tatok_core.contract.spec import ComponentSpec, PipelineSpec, instantiate, build_components
from tatok_core.contract.tokens import Tokens
from tatok_core.pipeline.set_search import check_sweeps, exchange_search, searches

DEFAULT_PRETRAINED = "tatok-small8-covered"  # what `tatok demo`, the CLI and from_pretrained() load by default
SPEC_FILE = "spec.toml"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"  # the manifest: format, name, spec digest, weights checksum (huggingface_hub's name)
FORMAT = "tatok"
FORMAT_VERSION = 1


class TokenSources(NamedTuple):
    """What the tokens of one kept set are made from when they depend on the set: the features before
    quantization (re-expressed by a keep-aware encoder, optimised by refinement) and the images they
    must decode to."""

    images: Tensor  # (B, C, H', W') padded to the grid
    image_size: tuple[int, int]  # (H, W) before padding
    grid: Grid
    global_features: Tensor  # (B, M, D)
    patch_features: Tensor  # (B, N, D)

    def to(self, device: torch.device | str) -> TokenSources:
        return self._replace(images=self.images.to(device), global_features=self.global_features.to(device),
                             patch_features=self.patch_features.to(device))


def relaxed_bits(quantizer: Quantizer, prior: Generator, features: Tensor, m: int, keep: Tensor,
                 grid: Grid) -> Tensor:
    """Quantizer inputs (B, M + N, D) of globals then patches, keep (B, N) → (B,) bits of the token set
    under ``prior``, differentiable in the features (:meth:`Quantizer.relaxed_digits`): what
    rate-aware refinement weighs against the decode's error."""
    digits = quantizer.relaxed_digits(features)  # (B, M + N, ΣL)
    patch_digits = digits[:, m:].unflatten(1, grid)  # (B, H, W, ΣL)
    nats = prior.relaxed_log_likelihood(digits[:, :m], patch_digits, keep.unflatten(1, grid))  # (B,)
    return -nats / math.log(2)


class Analysis(NamedTuple):
    """Everything the encoder side computes for a batch, before filtering (a NamedTuple: dynamo traces it)."""

    images: Tensor  # (B, C, H', W') padded to the grid
    image_size: tuple[int, int]  # (H, W) before padding
    grid: Grid
    globals_: Quantized  # vectors (B, M, D), codes (B, M)
    patches: Quantized  # vectors (B, N, D), codes (B, N)
    entropy: EntropyEstimate  # bits (B, N)
    aux_loss: Tensor
    sources: TokenSources  # the features before quantization (references, no copy)
    base_reconstruction: Tensor | None = None  # (B, C, H', W') globals-only decode, when the estimator asked


@attrs.frozen(eq=False)
class TokenizerOutput:
    """What :meth:`Tokenizer.forward` returns for training."""

    reconstruction: Tensor  # (B, C, H, W)
    losses: Mapping[str, Tensor]  # unweighted: "mse", "log_mse", "l1", "quantizer", "entropy" (+ "globals",
    # "globals_log_mse"; "rate_bpp" — the kept set's bits per pixel under the coding prior — when one is attached)
    selection: Selection
    tau: float | Tensor | None  # the τ images were filtered with (None: the filter's default)
    metrics: Mapping[str, float]


#: How far outside [0, 1] pixel values may stray (resampling overshoot) before images are refused.
RANGE_TOLERANCE = 1 / 255


def check_images(images: Tensor, like: Tensor) -> Tensor:
    """``images`` (B, C, H, W) as floats in [0, 1] on ``like``'s device and dtype, or a one-line error.

    Converted, because it cannot change what the image shows: any floating dtype (float16, bfloat16,
    float64) is cast to the model's, images move to the model's device, and an overshoot of at most
    :data:`RANGE_TOLERANCE` beyond [0, 1] (resampling) is clamped. Refused rather than guessed at:
    integer images (uint8 0-255 and the like: divide by their maximum), NaN/inf values, meta
    tensors, and values further outside [0, 1] (a ×255 or [-1, 1] scale).
    """
    if not isinstance(images, Tensor):
        raise TatokError(f"images must be a torch.Tensor (B, C, H, W) in [0, 1], got {type(images).__name__}")
    if images.dim() != 4:
        raise TatokError(f"images must be a (B, C, H, W) tensor in [0, 1], got shape {tuple(images.shape)}")
    if images.is_meta:
        raise TatokError("images are on the meta device (shapes without data): create them on a real device")
    if not images.is_floating_point():
        hint = " — e.g. images.float() / 255 for uint8" if images.dtype == torch.uint8 else ""
        raise TatokError(f"images must be floating point in [0, 1], got {images.dtype}{hint}")
    if images.numel():  # ONE host sync for all value checks: the only one on the analysis path
        finite = torch.isfinite(images)
        clean = images.float().nan_to_num(0.5, 0.5, 0.5)  # the range of the finite values
        nonfinite, low, high = torch.stack([(~finite).sum().float(), clean.amin(), clean.amax()]).tolist()
        if nonfinite:
            raise TatokError(f"images contain {int(nonfinite)} NaN or infinite values: nothing to encode there")
        if low < -RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
            scale = " (0-255 pixels? divide by 255)" if high > 2 else " (a [-1, 1] scale? use (x + 1) / 2)" if low < 0 else ""
            raise TatokError(f"images must lie in [0, 1], got values in [{low:.4g}, {high:.4g}]{scale}")
    return images.to(device=like.device, dtype=like.dtype).clamp(0, 1)


class Tokenizer(nn.Module):
    """Images ↔ variable-length :class:`~tatok_core.contract.tokens.Tokens`, built from a :class:`PipelineSpec`."""

    def __init__(self, spec: PipelineSpec | None = None, registry: Registry | None = None, name: str | None = None) -> None:
        super().__init__()
        self.spec = spec or PipelineSpec()
        self.name = name
        self._registry = registry
        built = build_components(self.spec, registry)
        self.encoder = built["encoder"]
        self.global_tokenizer = built["global_tokenizer"]
        self.quantizer = built["quantizer"]
        self.entropy = built["entropy"]
        self.filter: TokenFilter = built["filter"]  # type: ignore[assignment]
        self.decoder = built["decoder"]
        self.facts: Facts = self.filter.facts_in
        self.train_tau_min = float(self.spec.pipeline["train_tau_min"])
        self.refine_steps = int(self.spec.pipeline["refine_steps"])
        self.refine_lr = float(self.spec.pipeline["refine_lr"])
        self.refine_bpp_worth = float(self.spec.pipeline["refine_bpp_worth"])
        self.refine_coded_steps = int(self.spec.pipeline["refine_coded_steps"]) or self.refine_steps
        self.refine_coded_lr = float(self.spec.pipeline["refine_coded_lr"]) or self.refine_lr
        self.search_sweeps = int(self.spec.pipeline["search_sweeps"])
        self._attach_coding_prior(None)

    # -- facts ---------------------------------------------------------------------------
    @property
    def patch_size(self) -> int:
        return self.encoder.patch_size

    @property
    def num_global(self) -> int:
        return self.global_tokenizer.num_global

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per component kind (the registry's kinds, in data-flow order)."""
        return {kind: sum(p.numel() for p in getattr(self, kind).parameters()) for kind in PIPELINE_KINDS}

    def grid_for(self, height: int, width: int) -> Grid:
        p = self.patch_size
        return (-(-height // p), -(-width // p))

    def max_tokens(self, height: int, width: int) -> int:
        """Patch tokens of an H×W image when every token is kept."""
        rows, cols = self.grid_for(height, width)
        return rows * cols

    # -- pipeline --------------------------------------------------------------------------
    def pad_to_grid(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Checked images (see :func:`check_images`) padded to whole patches, and their size before padding."""
        images = check_images(images, next(self.parameters(), torch.empty(0)))
        _, channels, height, width = images.shape
        if channels != self.encoder.channels:
            raise TatokError(f"images have {channels} channels but the encoder expects {self.encoder.channels}")
        p = self.patch_size
        if height < p or width < p:
            raise TatokError(f"images of {height}×{width} are smaller than one {p}×{p} patch")
        rows, cols = self.grid_for(height, width)
        pad_h, pad_w = rows * p - height, cols * p - width
        if pad_h or pad_w:  # reflect where possible (no artificial edges), replicate for tiny images
            mode = "reflect" if pad_h < height and pad_w < width else "replicate"
            images = F.pad(images, (0, pad_w, 0, pad_h), mode=mode)
        return images, (height, width)

    def analyse(self, images: Tensor) -> Analysis:
        """Encode, add global tokens, quantize and estimate bits per patch token."""
        padded, size = self.pad_to_grid(images)
        grid = self.grid_for(*size)
        features = self.encoder(padded)  # (B, N, D)
        global_features, patch_features = self.global_tokenizer(features, grid)  # (B, M, D), (B, N, D)
        m = global_features.shape[1]
        quantized = self.quantizer(torch.cat([global_features, patch_features], dim=1))  # one codebook for both
        globals_, patches = _split(quantized, m)
        features = patch_features if self.encoder.keep_aware else None  # what each probe re-expresses
        context = self.entropy_context(padded, grid, globals_.vectors, globals_.codes, patches.vectors, patches.codes,
                                       features)
        sources = TokenSources(padded, size, grid, global_features, patch_features)
        return Analysis(padded, size, grid, globals_, patches, self.entropy(context), quantized.aux_loss, sources,
                        context.base_reconstruction)

    def express_kept(self, patch_features: Tensor, keep: Tensor, grid: Grid) -> Quantized:
        """A keep-aware encoder's patch tokens when ``keep`` (B, N) is kept: ``patch_features`` (B, N, D)
        re-expressed knowing the set, then quantized."""
        return self.quantizer(self.encoder.given_keep(patch_features, keep, grid))

    def tokens_depend_on_keep(self, refine_steps: int | None = None) -> bool:
        """Whether the kept set changes the tokens (a keep-aware encoder, or refinement at encode, the
        spec's or ``refine_steps``): then they are made per set by :meth:`tokens_for` and workflows keep
        the :class:`TokenSources`. A ``refine_steps`` that is not an integer >= 0 is refused here."""
        if refine_steps is not None and (isinstance(refine_steps, bool) or not isinstance(refine_steps, int)
                                         or refine_steps < 0):
            raise TatokError(f"refine_steps must be an integer >= 0, got {refine_steps!r}")
        return self.encoder.keep_aware or (self.refinement[0] if refine_steps is None else refine_steps) > 0

    @property
    def works_per_set(self) -> bool:
        """Whether encoding works on each chosen set — its tokens (:meth:`tokens_depend_on_keep`) or its
        members (the set search, ``search_sweeps`` > 0) — and so needs the image and its features until
        the set is known: workflows that calibrate a threshold over many images analyse each again then,
        rather than keep them all waiting."""
        return self.tokens_depend_on_keep() or self.search_sweeps > 0

    @property
    def rate_aware(self) -> bool:
        """Whether refinement weighs the coder's bits: a coding prior attached (:meth:`with_coding_prior`)
        and ``refine_bpp_worth`` > 0."""
        return self.coding_prior is not None and self.refine_bpp_worth > 0

    @property
    def refinement(self) -> tuple[int, float]:
        """The steps and Adam step encoding refines with by default: ``refine_coded_steps`` /
        ``refine_coded_lr`` when :attr:`rate_aware`, else ``refine_steps`` / ``refine_lr``. Why two: for
        pixels alone, longer fits wander to codes a coder finds unlikely; weighing the bits, they do not,
        so compression can afford more (docs/default-tokenizer.md)."""
        if self.rate_aware:
            return self.refine_coded_steps, self.refine_coded_lr
        return self.refine_steps, self.refine_lr

    def kept_tokens(self, analysis: Analysis, keep: Tensor,
                    refine_steps: int | None = None) -> tuple[Quantized, Quantized]:
        """The (global, patch) tokens a decoder receives when ``keep`` (B, N) is kept: the analysed ones,
        or, when they depend on the set, those :meth:`tokens_for` makes for this very set."""
        if not self.tokens_depend_on_keep(refine_steps):
            return analysis.globals_, analysis.patches
        return self.tokens_for(analysis.sources, keep, refine_steps, analysed_globals=analysis.globals_)

    def tokens_for(self, sources: TokenSources, keep: Tensor, refine_steps: int | None = None,
                   analysed_globals: Quantized | None = None) -> tuple[Quantized, Quantized]:
        """The (global, patch) tokens of the set ``keep`` (B, N) made from ``sources``: a keep-aware encoder
        re-expresses the patch features for it (:meth:`express_kept`), then ``refine_steps`` (default:
        :attr:`refinement`'s) of :meth:`refine` fit them to the images. Unrefined, ``analysed_globals``
        (when the caller has them) are used as they are rather than quantized again."""
        patch_features = sources.patch_features  # (B, N, D)
        if self.encoder.keep_aware:
            patch_features = self.encoder.given_keep(patch_features, keep, sources.grid)
        steps = self.refinement[0] if refine_steps is None else refine_steps
        if steps > 0:
            return self.refine(sources._replace(patch_features=patch_features), keep, steps)
        globals_ = self.quantizer(sources.global_features) if analysed_globals is None else analysed_globals
        return globals_, self.quantizer(patch_features)

    def refine(self, sources: TokenSources, keep: Tensor, steps: int) -> tuple[Quantized, Quantized]:
        """Test-time refinement: the (global, patch) tokens of the set ``keep`` (B, N) whose decode is closest
        to the images, found by ``steps`` Adam steps (:attr:`refinement`'s step size) on the quantizer's
        inputs through its straight-through gradient, starting from the encoder's.

        Why: the encoder is amortised — one pass for every image and every kept set — so its codes are
        good on average, not the best this decoder can do for this image and this set. Only the encoder
        side works harder: the tokens are ordinary codes, decoded as always (measured: +0.4–0.7 dB at
        every budget on held-out photos, the codes a little less predictable; docs/default-tokenizer.md).
        Each image keeps the best codes seen (the encoder's included), so a refined decode is never worse
        than the unrefined one; dropped positions get no gradient and keep their codes (never
        transmitted). The weights are untouched.

        Rate-aware (:attr:`rate_aware`: a coding prior attached, ``refine_bpp_worth`` > 0): the cost per
        image is −PSNR + worth · bpp under that prior, so the codes it lands on are also ones the coder
        writes in fewer bits; the best by that cost is kept, which may decode a little worse than the
        encoder's codes while costing fewer bits (measured on held-out photos against refining for pixels
        alone: files 8–16 % smaller at −0.23 to +0.28 dB at the adaptive points, 28 % for −0.56 dB with
        every token).
        """
        m = sources.global_features.shape[1]
        height, width = sources.image_size
        prior = self.coding_prior if self.rate_aware else None
        with torch.inference_mode(False), torch.enable_grad():
            start = torch.cat([sources.global_features, sources.patch_features], dim=1)  # (B, M + N, D)
            start = start.detach().clone()
            target = sources.images[..., :height, :width].detach().clone().float()  # (B, C, H, W)
            keep = keep.clone()  # an inference tensor (encode under inference_mode) cannot be saved for backward
            delta = torch.zeros_like(start, requires_grad=True)  # (B, M + N, D)
            optimizer = torch.optim.Adam([delta], lr=self.refinement[1])
            best = start.clone()  # (B, M + N, D)
            best_cost = torch.full(start.shape[:1], float("inf"), device=start.device)  # (B,)
            for step in range(steps + 1):
                features = start + delta  # (B, M + N, D)
                vectors = self.quantizer(features).vectors
                decoded = self.decoder(vectors[:, :m], vectors[:, m:], keep, sources.grid)[..., :height, :width]
                cost = (decoded.float().clamp(0, 1) - target).pow(2).flatten(1).mean(1)  # (B,) what decode scores
                if prior is not None:  # the rate–distortion Lagrangian in a user's units: −PSNR + worth · bpp
                    bits = relaxed_bits(self.quantizer, prior, features, m, keep, sources.grid)  # (B,)
                    cost = 10 * torch.log10(cost) + self.refine_bpp_worth * bits / (height * width)
                better = cost < best_cost  # (B,)
                best = torch.where(better[:, None, None], features.detach(), best)
                best_cost = torch.where(better, cost.detach(), best_cost)
                if step == steps:
                    break
                (delta.grad,) = torch.autograd.grad(cost.sum(), [delta])  # per image: images do not mix
                optimizer.step()
        with torch.no_grad():
            return _split(self.quantizer(best), m)

    def entropy_context(self, padded: Tensor, grid: Grid, global_vectors: Tensor, global_codes: Tensor,
                        patch_vectors: Tensor, patch_codes: Tensor,
                        patch_features: Tensor | None = None) -> EntropyContext:
        """What the entropy estimator conditions on, built in one place: the quantized tokens, plus the
        globals-only decode and this model's decoder for estimators that ask for them
        (``needs_base_reconstruction``, ``needs_decoder``). Given a keep-aware encoder's
        ``patch_features``, each decode uses the tokens that set would carry (:meth:`express_kept`)."""
        base = None
        if self.entropy.needs_base_reconstruction:  # the decoder's picture from the globals alone
            nothing_kept = torch.zeros(patch_codes.shape, dtype=torch.bool, device=padded.device)  # (B, N)
            base = self.decoder(global_vectors, patch_vectors, nothing_kept, grid)  # (B, C, H', W')
        decode = None
        if self.entropy.needs_decoder:
            decode = partial(self.decode_set, global_vectors, patch_vectors, grid=grid, patch_features=patch_features)
        return EntropyContext(padded, grid, global_vectors, global_codes, patch_vectors, patch_codes, base, decode)

    def decode_set(self, global_vectors: Tensor, patch_vectors: Tensor, keep: Tensor, *, grid: Grid,
                   patch_features: Tensor | None = None) -> Tensor:
        """(B, C, H', W') the decode of the globals (B, M, D) and the set ``keep`` (B, N) of
        ``patch_vectors`` (B, N, D) — or, given a keep-aware encoder's ``patch_features``, of the tokens
        this very set would carry (:meth:`express_kept`)."""
        if patch_features is not None:
            patch_vectors = self.express_kept(patch_features, keep, grid).vectors
        return self.decoder(global_vectors, patch_vectors, keep, grid)

    def search_kept(self, sources: TokenSources, global_vectors: Tensor, patch_vectors: Tensor, keep: Tensor,
                    sweeps: int | None = None) -> Tensor:
        """(B, N) the sets ``keep`` (B, N) with their members chosen again by ``sweeps`` (default: the
        spec's ``search_sweeps``) exchange sweeps judged by this decoder
        (:func:`~tatok_core.pipeline.set_search.exchange_search`); every image keeps its count. The
        images are searched together, ``search_batch`` masks of any of them per decode, each getting the
        set it would get alone. ``global_vectors`` (B, M, D) and ``patch_vectors`` (B, N, D) are the
        analysed tokens."""
        sweeps = self.search_sweeps if sweeps is None else sweeps
        if sweeps <= 0:
            return keep
        height, width = sources.image_size
        rows, cols = sources.grid
        p = self.patch_size
        pixels = torch.zeros(sources.images.shape[-2:], device=keep.device)  # (H', W')
        pixels[:height, :width] = 1  # padding is not the image: its error is not counted
        targets = sources.images.float()  # (B, C, H', W')
        features = sources.patch_features if self.encoder.keep_aware else None  # (B, N, D) or None

        def patch_errors(images: Tensor, masks: Tensor) -> Tensor:  # (P,), (P, N) → (P, N)
            decoded = self.decode_set(global_vectors[images], patch_vectors[images], masks, grid=sources.grid,
                                      patch_features=None if features is None else features[images])
            error = (decoded.float().clamp(0, 1) - targets[images]).pow(2).sum(1) * pixels  # (P, H', W')
            return error.reshape(len(images), rows, p, cols, p).sum((2, 4)).flatten(1)

        searched, _ = exchange_search(patch_errors, keep, sources.grid, sweeps=sweeps,
                                      stride=int(self.spec.pipeline["search_stride"]),
                                      share=float(self.spec.pipeline["search_share"]),
                                      chunk=int(self.spec.pipeline["search_batch"]))
        return searched  # (B, N)

    def token_filter(self, name: str | None = None, **options: Any) -> TokenFilter:
        """The spec's filter, or another one built with the same facts (for baselines on one model)."""
        if name is None and not options:
            return self.filter
        current = self.spec.filter
        name = name or current.name
        merged = {**(current.options if name == current.name else {}), **options}
        registry = self._registry or get_registry()
        return instantiate(registry.get("filter", name), self.facts, "filter", ComponentSpec(name, merged))  # type: ignore[return-value]

    def tau_filter(self, name: str | None = None, **options: Any) -> TokenFilter:
        """:meth:`token_filter` in its per-image τ rule: what a τ handed to :meth:`encode` or the training
        step means even when the spec ships an absolute rule (θ, ε: a number of bits, not a fraction).
        A filter without rules (fixed counts) is returned as it is."""
        token_filter = self.token_filter(name, **options)
        if getattr(token_filter, "mode", "tau") == "tau":
            return token_filter
        return self.token_filter(name, **{**options, "mode": "tau"})

    def baseline_filter(self, role: str, **options: Any) -> TokenFilter:
        """The registered filter playing ``role`` (:data:`~tatok_core.contract.interfaces.FILTER_ROLES`, e.g.
        "keep-all", "top-k"), built with this model's facts: workflows compare by role, never by plugin name."""
        return self.token_filter(self.registry.name_for_role("filter", role), **options)

    @property
    def registry(self) -> Registry:
        """The registry this model's components come from."""
        return self._registry or get_registry()

    @torch.no_grad()
    def encode(self, images: Tensor, tau: float | Tensor | None = None, filter: str | None = None, *,
               refine_steps: int | None = None, search_sweeps: int | None = None, **filter_options: Any) -> Tokens:
        """Images (B, C, H, W) in [0, 1] → Tokens; ``filter``/options swap the filter for this call.

        ``tau`` is DTF's per-image τ in [0, 1] (:meth:`tau_filter`) whatever rule the spec's filter uses,
        unless the options name a ``mode``: then it is that rule's threshold (``mode="theta"``: bits).
        Images are checked and converted by :func:`check_images` (other float dtypes and devices are
        converted; integer pixels, NaN, values outside [0, 1] and meta tensors are refused).
        ``refine_steps`` overrides the spec's test-time refinement (:meth:`refine`; 0: the encoder's tokens),
        ``search_sweeps`` the spec's search for which tokens to keep at the filter's count
        (:meth:`search_kept`; 0: the filter's own set).
        """
        self.tokens_depend_on_keep(refine_steps)  # a bad refine_steps fails before the encoder runs
        check_sweeps(search_sweeps)
        analysis = self.analyse(images)
        per_image = tau is not None and "mode" not in filter_options
        token_filter = (self.tau_filter if per_image else self.token_filter)(filter, **filter_options)
        selection = token_filter.select(analysis.entropy.bits, tau)
        if searches(token_filter):
            keep = self.search_kept(analysis.sources, analysis.globals_.vectors, analysis.patches.vectors,
                                    selection.keep, search_sweeps)
            if keep is not selection.keep:
                selection = Selection.from_mask(keep)
        globals_, patches = self.kept_tokens(analysis, selection.keep, refine_steps)
        return Tokens.from_selection(globals_.codes, patches.codes, selection, analysis.grid, analysis.image_size)

    @torch.no_grad()
    def decode(self, tokens: Tokens) -> Tensor:
        """Tokens → images (B, C, H, W) in [0, 1] at their original size.

        Refuses tokens this model cannot have made (codes outside its codebook, another number of
        global tokens) instead of decoding them into garbage; tokens move to the model's device.
        """
        tokens = self._check_tokens(tokens)
        grid_codes, keep = tokens.to_grid(fill=0)
        reconstruction = self.decoder(
            self.quantizer.codes_to_vectors(tokens.global_codes),
            self.quantizer.codes_to_vectors(grid_codes),
            keep,
            tokens.grid,
        )
        height, width = tokens.image_size
        return reconstruction[..., :height, :width].clamp(0, 1)

    def _check_tokens(self, tokens: Tokens) -> Tokens:
        if not isinstance(tokens, Tokens):
            raise TatokError(f"decode takes Tokens, got {type(tokens).__name__}")
        if tokens.global_codes.is_floating_point() or tokens.codes.is_floating_point():
            raise TatokError("cannot decode: codes must be integers, got floating-point codes")
        if tokens.global_codes.shape[-1] != self.num_global:
            raise TatokError(f"cannot decode: tokens carry {tokens.global_codes.shape[-1]} global codes per image, "
                             f"this model makes {self.num_global}")
        size = self.quantizer.codebook_size
        present = [(what, codes) for what, codes in (("global", tokens.global_codes), ("patch", tokens.codes))
                   if codes.numel()]
        if present:  # ONE host sync reads every range: the only wait in decode
            spans = torch.stack([torch.stack([c.min(), c.max()]).long().cpu() for _, c in present]).tolist()
            for (what, _), (low, high) in zip(present, spans):
                if low < 0 or high >= size:
                    raise TatokError(f"cannot decode: {what} codes span [{low}, {high}], outside this model's "
                                     f"codebook [0, {size}): tokens of another tokenizer?")
        return tokens.to(next(self.parameters(), torch.empty(0)).device)

    def sample_tau(self, batch: int, device: torch.device) -> Tensor:
        """τ per image ~ U(train_tau_min, 1), so the decoder learns every budget."""
        return self.train_tau_min + (1 - self.train_tau_min) * torch.rand(batch, device=device)

    def sample_topk(self, bits: Tensor) -> Selection:
        """Training selection ``train_keep = "topk"``: per image k ~ U{0 … ⌊f·N⌋} (0 = globals only,
        f = ``train_max_fraction``) of the highest-bits tokens, so the decoder learns every budget it
        will serve and the globals-only case; with probability ``train_random_rank`` an image ranks its
        tokens at random instead, so the decoder also fills arbitrary holes; with probability
        ``train_full_share`` it keeps every token, so the full set is not taxed by the budgets below it."""
        batch, n = bits.shape
        score = bits.float().clone()  # (B, N)
        shuffled = torch.rand(batch, device=bits.device) < float(self.spec.pipeline["train_random_rank"])
        score[shuffled] = torch.rand(int(shuffled.sum()), n, device=bits.device)
        order = score.argsort(dim=1, descending=True, stable=True)  # (B, N)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=bits.device).expand(batch, -1))
        largest = int(float(self.spec.pipeline["train_max_fraction"]) * n)
        k = torch.randint(0, largest + 1, (batch, 1), device=bits.device)  # (B, 1)
        full = torch.rand(batch, 1, device=bits.device) < float(self.spec.pipeline["train_full_share"])
        k = torch.where(full, n, k)  # (B, 1)
        return Selection.from_mask(rank < k)

    def forward(self, images: Tensor, tau: float | Tensor | None = None) -> TokenizerOutput:
        """Training step: reconstruction, unweighted losses by name, the selection and the τ used."""
        analysis = self.analyse(images)
        batch = images.shape[0]
        bits = analysis.entropy.bits.detach()
        if self.training and self.spec.pipeline["train_keep"] == "topk":
            selection = self.sample_topk(bits)
        else:
            if tau is None and self.training:
                tau = self.sample_tau(batch, images.device)
            selection = (self.filter if tau is None else self.tau_filter()).select(bits, tau)
        _, patches = self.kept_tokens(analysis, selection.keep, refine_steps=0)  # training stays amortised
        reconstruction = self.decoder(analysis.globals_.vectors, patches.vectors, selection.keep, analysis.grid)
        height, width = analysis.image_size
        reconstruction = reconstruction[..., :height, :width]
        target = images.to(reconstruction.dtype)
        aux_loss = analysis.aux_loss if patches is analysis.patches else analysis.aux_loss + patches.aux_loss
        losses = {**pixel_losses(reconstruction, target), "quantizer": aux_loss,
                  "entropy": analysis.entropy.loss}
        if analysis.base_reconstruction is not None:  # teaches the globals to carry the picture on their own
            base = pixel_losses(analysis.base_reconstruction[..., :height, :width], target)
            losses["globals"], losses["globals_log_mse"] = base["mse"], base["log_mse"]
        if self.coding_prior is not None:  # what the coder would write for this set: rate–distortion training
            sources = analysis.sources
            features = torch.cat([sources.global_features, sources.patch_features], dim=1)  # (B, M + N, D)
            bits = relaxed_bits(self.quantizer, self.coding_prior, features, sources.global_features.shape[1],
                                selection.keep, analysis.grid)  # (B,)
            losses["rate_bpp"] = (bits / (height * width)).mean()
        metrics = {
            "tokens": float(selection.lengths.float().mean()),
            "max_tokens": float(selection.num_patches),
            **analysis.patches.metrics,
            **analysis.entropy.metrics,
        }
        return TokenizerOutput(reconstruction, losses, selection, tau, metrics)

    # -- swapping components -------------------------------------------------------------------
    def with_component(self, kind: str, name: str, **options: Any) -> Tokenizer:
        """A copy with the ``kind`` component replaced by ``name`` (built with ``options``), the rest kept.

        The spec records the change (so ``save_pretrained`` → ``from_pretrained`` rebuilds the new
        model); every other component keeps its weights. Replacing a component by one of the same
        name keeps its other options. A component downstream whose inputs change (e.g. a new encoder
        width) cannot keep its weights: that is a :class:`CompositionError` naming it.
        """
        return self._replaced({kind: ComponentSpec(name, options)})

    def with_pipeline_options(self, **options: Any) -> Tokenizer:
        """A copy with pipeline options replaced (e.g. ``refine_steps``), every weight kept: they steer
        training and how hard encoding works, never what a token decodes to (the spec digest stays)."""
        model = type(self)(self.spec.updated({}, {"pipeline": options}), self._registry, name=self.name)
        model.load_state_dict(self.state_dict())
        return self._placed_like_me(model)

    def with_refinement_steps(self, steps: int) -> Tokenizer:
        """A copy whose default refinement (:attr:`refinement`) runs ``steps`` steps: the rate-aware one's
        when :attr:`rate_aware` (compression), else the pixels-only one's; 0 is no refinement at all (the
        rate-aware 0 would otherwise mean "as ``refine_steps``")."""
        if not self.rate_aware:
            return self.with_pipeline_options(refine_steps=steps)
        if steps == 0:
            return self.with_pipeline_options(refine_steps=0, refine_coded_steps=0)
        return self.with_pipeline_options(refine_coded_steps=steps)

    def with_coding_prior(self, prior: Generator | None) -> Tokenizer:
        """A copy that knows the prior its tokens will be coded with (an
        :class:`~tatok_core.workflows.compression.ImageCoder` attaches its own): with the pipeline option
        ``refine_bpp_worth`` > 0, refinement then minimises −PSNR + worth · bpp under it, so a file holds
        fewer bits for nearly the same picture. Weights, and what a token decodes to, are unchanged. The
        prior must sit on the tokenizer's device."""
        if prior is not None:
            self.check_prior_models_codes(prior)
        model = self.with_pipeline_options()
        model._attach_coding_prior(prior)
        model.check_rate_terms()
        return model

    def check_prior_models_codes(self, prior: Generator) -> None:
        """A prior that codes this tokenizer's tokens models the same code factors and number of globals:
        refused otherwise, naming both."""
        facts = prior.facts_in.values
        writes = {"code_factors": tuple(self.quantizer.code_factors), "num_global": self.num_global}
        for fact, value in writes.items():
            models = facts.get(fact)
            if models is not None and (tuple(models) if isinstance(models, (list, tuple)) else models) != value:
                who = f"tokenizer {self.name!r}" if self.name else "the tokenizer"
                raise CompositionError(f"{prior.label} models {fact}={models!r} but {who} writes {fact}={value!r}")

    @property
    def coding_prior(self) -> Generator | None:
        """The prior the tokens will be coded with, if known (:meth:`with_coding_prior`)."""
        return self._coding_prior

    def _attach_coding_prior(self, prior: Generator | None) -> None:
        object.__setattr__(self, "_coding_prior", prior)  # beside the tokenizer, never one of its weights

    def check_rate_terms(self, use: str | None = None) -> None:
        """Rate-aware refinement (a coding prior and ``refine_bpp_worth`` > 0) needs a quantizer with
        relaxed digits and a prior with a relaxed likelihood: refused here, naming both, not mid-encode.
        ``use`` names another use of the attached prior's relaxed bits that needs them whatever
        ``refine_bpp_worth`` says (rate–distortion training: the training output's ``rate_bpp``)."""
        prior = self.coding_prior
        if prior is None or (use is None and not self.rate_aware):
            return
        use = use or f"rate-aware refinement (refine_bpp_worth={self.refine_bpp_worth:g})"
        for component, method, base in ((self.quantizer, "relaxed_digits", Quantizer),
                                        (prior, "relaxed_log_likelihood", Generator)):
            if getattr(type(component), method) is getattr(base, method):
                whose = f" of tokenizer {self.name!r}" if self.name else ""
                raise CompositionError(
                    f"{use}{whose} with {prior.label}: {component.label} has no {method}() (the built-in 'fsq' "
                    "quantizer and 'context' prior have them; refine_bpp_worth=0 refines for pixels only)")

    def _replaced(self, changes: Mapping[str, ComponentSpec]) -> Tokenizer:
        """A copy with several components replaced at once (``from_pretrained(overrides=…)``)."""
        for kind in changes:
            self.spec.component(kind)  # unknown kinds fail here, naming the known ones
        spec = self.spec.updated({k: c.name for k, c in changes.items()}, {k: dict(c.options) for k, c in changes.items()})
        model = type(self)(spec, self._registry, name=self.name)
        for kind in PIPELINE_KINDS:
            if kind in changes:
                continue
            old, new = getattr(self, kind), getattr(model, kind)
            state = old.state_dict()
            if not state:
                continue  # nothing to keep (a filter, the pixel estimator)
            # the upstream facts it read (built-ins record them); else every fact it was given
            read = old.needed or old.facts_in.values
            changed = sorted(f for f in read if old.facts_in.values.get(f) != new.facts_in.values.get(f))
            if changed:
                fact = changed[0]
                raise CompositionError(
                    f"{old.label} cannot keep its weights: its input {fact} changes from "
                    f"{old.facts_in.values.get(fact)!r} to {new.facts_in.values.get(fact)!r}; replace it too"
                )
            try:
                new.load_state_dict(state)
            except RuntimeError as exc:
                raise CompositionError(f"{old.label} cannot keep its weights in the new composition: "
                                       f"{str(exc).splitlines()[-1].strip()}") from exc
        return self._placed_like_me(model)

    def _placed_like_me(self, model: Tokenizer) -> Tokenizer:
        """A copy of this tokenizer (:meth:`with_component`, …) on its device and dtype, in its mode, with
        its coding prior."""
        reference = next(iter(self.parameters()), None)
        if reference is not None:
            model.to(device=reference.device, dtype=reference.dtype if reference.is_floating_point() else None)
        model._attach_coding_prior(self.coding_prior)
        model.check_rate_terms()
        return model.train(self.training)

    # -- persistence ---------------------------------------------------------------------------
    def weights_digest(self) -> str:
        """sha256 (hex) of the weights and buffers themselves, as recorded by :meth:`save_pretrained`.

        Independent of device and file format; two tokenizers decode tokens identically only if their
        specs and weights digests agree (token files record both).
        """
        return state_digest(self.state_dict())

    def save_pretrained(self, directory: str | Path, *, push_to_hub: bool = False, repo_id: str | None = None,
                        **push_to_hub_kwargs: Any) -> Path:
        """Write ``spec.toml``, ``model.safetensors`` and ``config.json`` into ``directory``, each atomically.

        ``config.json`` (written last) records the format, the name, the spec digest and the weights'
        size, sha256 and :meth:`weights_digest`; :meth:`from_pretrained` verifies the sha256. With
        ``push_to_hub`` the folder is then uploaded as :meth:`push_to_hub` does (``repo_id`` defaults to
        the folder name), following huggingface_hub's ``save_pretrained``.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        weights = save_weights(directory / WEIGHTS_FILE, cpu_state(self), {"format": FORMAT})
        atomic_write(directory / SPEC_FILE, self.spec.to_toml().encode())
        config = {"format": FORMAT, "format_version": FORMAT_VERSION, "tatok_version": _version(), "name": self.name,
                  "spec_digest": self.spec.digest(), "weights": weights}
        atomic_write(directory / CONFIG_FILE, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
        if push_to_hub:
            self.push_to_hub(repo_id or directory.name, **push_to_hub_kwargs)
        return directory

    def push_to_hub(self, repo_id: str, *, commit_message: str = "Upload TaTok tokenizer", private: bool | None = None,
                    token: str | None = None, branch: str | None = None, create_pr: bool | None = None) -> Any:
        """Save into a temporary folder and upload it to Hub repository ``repo_id`` (needs ``tatok[hub]``).

        Returns huggingface_hub's ``CommitInfo``; load it back with ``from_pretrained(repo_id)``.
        """
        require("huggingface_hub", "push_to_hub")  # fail before saving anything
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            return push_folder(Path(folder), repo_id, commit_message=commit_message, private=private, token=token,
                               branch=branch, create_pr=create_pr)

    @classmethod
    def from_pretrained(
        cls,
        name_or_dir: str | Path = DEFAULT_PRETRAINED,
        registry: Registry | None = None,
        map_location: str | torch.device = "cpu",
        *,
        overrides: Mapping[str, str | Mapping[str, Any] | ComponentSpec] | None = None,
        revision: str | None = None,
        cache_dir: str | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
    ) -> Tokenizer:
        """Load a folder written by :meth:`save_pretrained`, a shipped name (``tatok-tiny``) or a Hub repository id.

        Local folders and shipped names never touch the network; an ``owner/name`` that is neither is
        fetched from the Hugging Face Hub (``tatok[hub]``; ``revision``, ``cache_dir``, ``token`` and
        ``local_files_only`` as in huggingface_hub). The weights' recorded sha256 is verified. The model
        is returned in eval mode on ``map_location``. ``overrides`` replaces components as
        :meth:`with_component` does, one entry per kind: a name, or a table ``{"name": …, "options": {…}}``
        as in ``spec.toml`` (``{"filter": {"name": "dtf", "options": {"tau": 0.5}}}``).
        """
        directory, name = _locate(name_or_dir, registry, revision=revision, cache_dir=cache_dir, token=token,
                                  local_files_only=local_files_only)
        spec = PipelineSpec.load(directory / SPEC_FILE)
        config = _read_config(directory)
        model = cls(spec, registry, name=name or directory.name)
        state = load_weights(directory / WEIGHTS_FILE, config.get("weights") if config else None)
        fit_state(model, state, directory / WEIGHTS_FILE, f"the spec in {directory / SPEC_FILE}")
        if overrides:
            model = model._replaced({kind: _component_spec(kind, value) for kind, value in overrides.items()})
        return model.to(map_location).eval()


def _split(quantized: Quantized, m: int) -> tuple[Quantized, Quantized]:
    """One quantizer output over globals + patches (B, M + N, …) → (globals, patches)."""
    return (Quantized(quantized.vectors[:, :m], quantized.codes[:, :m], quantized.aux_loss, quantized.metrics),
            Quantized(quantized.vectors[:, m:], quantized.codes[:, m:], quantized.aux_loss, quantized.metrics))


def pixel_losses(reconstruction: Tensor, target: Tensor) -> dict[str, Tensor]:
    """The pixel losses a recipe can train with (``train.reconstruction``), each a scalar."""
    error = reconstruction.float() - target.float()  # (B, C, H, W)
    per_image = error.pow(2).flatten(1).mean(1)  # (B,)
    return {
        "mse": per_image.mean(),
        # mean PSNR's own loss: every image's relative error counts alike, so images decoded from a few
        # tokens (large errors) do not drown the gradient of those that keep them all
        "log_mse": per_image.clamp_min(1e-10).log().mean(),
        "l1": error.abs().mean(),
    }


def _version() -> str:
    from tatok_core import __version__

    return __version__


def _component_spec(kind: str, value: str | Mapping[str, Any] | ComponentSpec) -> ComponentSpec:
    if isinstance(value, ComponentSpec):
        return value
    if isinstance(value, str):
        return ComponentSpec(value)
    if isinstance(value, Mapping) and "name" in value and set(value) <= {"name", "options"}:
        return ComponentSpec(str(value["name"]), value.get("options", {}))
    raise SpecError(f"override for {kind!r} must be a name or a table {{'name': …, 'options': {{…}}}}, got {value!r}")


def pretrained_folder(name_or_dir: str | Path, registry: Registry | None = None) -> Path:
    """The folder of a saved tokenizer or a shipped name — where what ships beside its weights lives."""
    return _locate(name_or_dir, registry, local_files_only=True)[0]


def _locate(name_or_dir: str | Path, registry: Registry | None, **hub: Any) -> tuple[Path, str | None]:
    """(folder holding ``spec.toml``, shipped or Hub name or None) for a folder, shipped name or Hub id."""
    directory = Path(name_or_dir)
    if (directory / SPEC_FILE).is_file():
        return directory, None
    shipped = (registry or get_registry()).pretrained()
    if str(name_or_dir) in shipped:
        return Path(shipped[str(name_or_dir)][0]), str(name_or_dir)
    if directory.exists():
        raise SpecError(f"{directory} holds no {SPEC_FILE}: not a saved tokenizer")
    if is_repo_id(str(name_or_dir)):
        folder = hub_snapshot(str(name_or_dir), [SPEC_FILE, WEIGHTS_FILE, CONFIG_FILE], **hub)
        if not (folder / SPEC_FILE).is_file():
            raise SpecError(f"Hub repository {name_or_dir!r} holds no {SPEC_FILE}: not a TaTok tokenizer")
        return folder, str(name_or_dir)
    raise UnknownComponentError("pretrained tokenizer", str(name_or_dir), shipped)


def _read_config(directory: Path) -> dict[str, Any] | None:
    """``config.json`` of a saved tokenizer (None for folders saved before it existed)."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SpecError(f"{path}: unreadable ({exc})") from exc
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise SpecError(f"{path}: not a TaTok tokenizer config (format {config.get('format') if isinstance(config, dict) else None!r})")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise SpecError(f"{path}: format version {config['format_version']} is newer than this tatok reads ({FORMAT_VERSION})")
    return config
