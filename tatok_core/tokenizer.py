"""The Tokenizer: a PipelineSpec's components wired together along DESIGN.md's data flow."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import attrs
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tatok_core.errors import SpecError, TatokError, UnknownComponentError
from tatok_core.interfaces import EntropyContext, EntropyEstimate, Facts, Grid, Quantized, TokenFilter
from tatok_core.interfaces import PIPELINE_KINDS
from tatok_core.registry import Registry, get_registry
from tatok_core.selection import Selection
from tatok_core.spec import ComponentSpec, PipelineSpec, _construct, build_components
from tatok_core.tokens import Tokens

SPEC_FILE = "spec.toml"
WEIGHTS_FILE = "model.safetensors"


class Analysis(NamedTuple):
    """Everything the encoder side computes for a batch, before filtering (a NamedTuple: dynamo traces it)."""

    images: Tensor  # (B, C, H', W') padded to the grid
    image_size: tuple[int, int]  # (H, W) before padding
    grid: Grid
    globals_: Quantized  # vectors (B, M, D), codes (B, M)
    patches: Quantized  # vectors (B, N, D), codes (B, N)
    entropy: EntropyEstimate  # bits (B, N)
    aux_loss: Tensor
    base_reconstruction: Tensor | None = None  # (B, C, H', W') globals-only decode, when the estimator asked


@attrs.frozen(eq=False)
class TokenizerOutput:
    """What :meth:`Tokenizer.forward` returns for training."""

    reconstruction: Tensor  # (B, C, H, W)
    losses: Mapping[str, Tensor]  # unweighted: "mse", "l1", "quantizer", "entropy"
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
    if images.numel():
        finite = torch.isfinite(images)
        if not bool(finite.all()):
            raise TatokError(f"images contain {int((~finite).sum())} NaN or infinite values: nothing to encode there")
        low, high = float(images.min()), float(images.max())
        if low < -RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
            scale = " (0-255 pixels? divide by 255)" if high > 2 else " (a [-1, 1] scale? use (x + 1) / 2)" if low < 0 else ""
            raise TatokError(f"images must lie in [0, 1], got values in [{low:.4g}, {high:.4g}]{scale}")
    return images.to(device=like.device, dtype=like.dtype).clamp(0, 1)


class Tokenizer(nn.Module):
    """Images ↔ variable-length :class:`~tatok_core.tokens.Tokens`, built from a :class:`PipelineSpec`."""

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
    def _pad(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
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
        padded, size = self._pad(images)
        grid = self.grid_for(*size)
        features = self.encoder(padded)  # (B, N, D)
        global_features, patch_features = self.global_tokenizer(features, grid)  # (B, M, D), (B, N, D)
        m = global_features.shape[1]
        quantized = self.quantizer(torch.cat([global_features, patch_features], dim=1))  # one codebook for both
        globals_ = Quantized(quantized.vectors[:, :m], quantized.codes[:, :m], quantized.aux_loss, quantized.metrics)
        patches = Quantized(quantized.vectors[:, m:], quantized.codes[:, m:], quantized.aux_loss, quantized.metrics)
        base = None
        if self.entropy.needs_base_reconstruction:  # the decoder's picture from the globals alone
            nothing_kept = torch.zeros(patches.codes.shape, dtype=torch.bool, device=padded.device)  # (B, N)
            base = self.decoder(globals_.vectors, patches.vectors, nothing_kept, grid)  # (B, C, H', W')
        context = EntropyContext(padded, grid, globals_.vectors, globals_.codes, patches.vectors, patches.codes, base)
        return Analysis(padded, size, grid, globals_, patches, self.entropy(context), quantized.aux_loss, base)

    def token_filter(self, name: str | None = None, **options: Any) -> TokenFilter:
        """The spec's filter, or another one built with the same facts (for baselines on one model)."""
        if name is None and not options:
            return self.filter
        current = self.spec.filter
        name = name or current.name
        merged = {**(current.options if name == current.name else {}), **options}
        registry = self._registry or get_registry()
        return _construct(registry.get("filter", name), self.facts, "filter", ComponentSpec(name, merged))  # type: ignore[return-value]

    @torch.no_grad()
    def encode(self, images: Tensor, tau: float | Tensor | None = None, filter: str | None = None, **filter_options: Any) -> Tokens:
        """Images (B, C, H, W) in [0, 1] → Tokens; ``filter``/options swap the filter for this call.

        Images are checked and converted by :func:`check_images` (other float dtypes and devices are
        converted; integer pixels, NaN, values outside [0, 1] and meta tensors are refused).
        """
        analysis = self.analyse(images)
        selection = self.token_filter(filter, **filter_options).select(analysis.entropy.bits, tau)
        return Tokens.from_selection(analysis.globals_.codes, analysis.patches.codes, selection, analysis.grid,
                                     analysis.image_size)

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
        for what, codes in (("global", tokens.global_codes), ("patch", tokens.codes)):
            if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= size):
                raise TatokError(f"cannot decode: {what} codes span [{int(codes.min())}, {int(codes.max())}], outside "
                                 f"this model's codebook [0, {size}): tokens of another tokenizer?")
        return tokens.to(next(self.parameters(), torch.empty(0)).device)

    def sample_tau(self, batch: int, device: torch.device) -> Tensor:
        """τ per image ~ U(train_tau_min, 1), so the decoder learns every budget."""
        return self.train_tau_min + (1 - self.train_tau_min) * torch.rand(batch, device=device)

    def sample_topk(self, bits: Tensor) -> Selection:
        """Training selection ``train_keep = "topk"``: per image k ~ U{0 … N} (0 = globals only) of the
        highest-bits tokens, so the decoder learns every budget and the globals-only case; with
        probability ``train_random_rank`` an image ranks its tokens at random instead, so the decoder
        also fills arbitrary holes."""
        batch, n = bits.shape
        score = bits.float().clone()  # (B, N)
        shuffled = torch.rand(batch, device=bits.device) < float(self.spec.pipeline["train_random_rank"])
        score[shuffled] = torch.rand(int(shuffled.sum()), n, device=bits.device)
        order = score.argsort(dim=1, descending=True, stable=True)  # (B, N)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=bits.device).expand(batch, -1))
        k = torch.randint(0, n + 1, (batch, 1), device=bits.device)  # (B, 1)
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
            selection = self.filter.select(bits, tau)
        reconstruction = self.decoder(analysis.globals_.vectors, analysis.patches.vectors, selection.keep, analysis.grid)
        height, width = analysis.image_size
        reconstruction = reconstruction[..., :height, :width]
        target = images.to(reconstruction.dtype)
        losses = {
            "mse": F.mse_loss(reconstruction.float(), target.float()),
            "l1": F.l1_loss(reconstruction.float(), target.float()),
            "quantizer": analysis.aux_loss,
            "entropy": analysis.entropy.loss,
        }
        if analysis.base_reconstruction is not None:  # teaches the globals to carry the picture on their own
            base = analysis.base_reconstruction[..., :height, :width]
            losses["globals"] = F.mse_loss(base.float(), target.float())
        metrics = {
            "tokens": float(selection.lengths.float().mean()),
            "max_tokens": float(selection.num_patches),
            **analysis.patches.metrics,
            **analysis.entropy.metrics,
        }
        return TokenizerOutput(reconstruction, losses, selection, tau, metrics)

    # -- persistence ---------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``spec.toml`` and ``model.safetensors`` (weights + buffers) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / SPEC_FILE).write_text(self.spec.to_toml())
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        metadata = {"format": "tatok", "spec_digest": self.spec.digest(), "name": json.dumps(self.name)}
        safetensors.torch.save_file(state, str(directory / WEIGHTS_FILE), metadata=metadata)
        return directory

    @classmethod
    def from_pretrained(cls, name_or_dir: str | Path, registry: Registry | None = None, map_location: str = "cpu") -> Tokenizer:
        """Load a directory written by :meth:`save_pretrained` or a shipped name such as ``tatok-tiny``."""
        directory = Path(name_or_dir)
        name: str | None = None
        if not (directory / SPEC_FILE).is_file():
            shipped = (registry or get_registry()).pretrained()
            if str(name_or_dir) not in shipped:
                if directory.exists():
                    raise SpecError(f"{directory} holds no {SPEC_FILE}: not a saved tokenizer")
                raise UnknownComponentError("pretrained tokenizer", str(name_or_dir), shipped)
            name = str(name_or_dir)
            directory = Path(shipped[name][0])
        spec = PipelineSpec.load(directory / SPEC_FILE)
        model = cls(spec, registry, name=name or directory.name)
        weights = directory / WEIGHTS_FILE
        if not weights.is_file():
            raise SpecError(f"{directory} holds no {WEIGHTS_FILE}")
        state = safetensors.torch.load_file(str(weights), device=map_location)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise SpecError(f"weights in {weights} do not match the spec: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return model.eval()
