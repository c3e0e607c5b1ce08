"""Images analysed once, filtered many times: what every rate workflow keeps of an
:class:`~tatok_core.pipeline.tokenizer.Analysis`.

The expensive half of the pipeline (encoder, global tokens, quantizer, entropy model:
:meth:`Tokenizer.analyse`) runs **once** per image; the cheap token filter re-runs for each threshold
or baseline on the stored bits.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import attrs
import torch
from torch import Tensor

from tatok_core.contract.interfaces import Grid
from tatok_core.contract.selection import Selection
from tatok_core.contract.tokens import Tokens
from tatok_core.pipeline.set_search import check_sweeps, searches
from tatok_core.pipeline.tokenizer import TokenSources, Tokenizer


@attrs.frozen(eq=False)
class Analysed:
    """The part of an :class:`~tatok_core.pipeline.tokenizer.Analysis` that filtering and decoding need:
    codes and bits, on the CPU.

    Small (about 12 bytes per patch), so a whole data set's worth can wait for τ to be calibrated. When
    the tokens depend on the kept set (a keep-aware encoder, or refinement at encode:
    :meth:`Tokenizer.tokens_depend_on_keep`) or the model searches each set (``search_sweeps``), the
    :class:`~tatok_core.pipeline.tokenizer.TokenSources` stay too (4·D bytes per token and the image) and
    :meth:`tokens` makes each selection's tokens exactly as :meth:`Tokenizer.encode` does.
    """

    global_codes: Tensor  # (B, M) as analysed
    patch_codes: Tensor  # (B, N) as analysed: the codes when every token is kept blind to the others
    bits: Tensor  # (B, N)
    grid: Grid
    image_size: tuple[int, int]
    # keep (B, N) → global (B, M) and patch (B, N) codes, when the tokens depend on the kept set
    kept_codes: Callable[[Tensor], tuple[Tensor, Tensor]] | None = attrs.field(default=None, kw_only=True)
    # keep (B, N) → the searched set (B, N) at the same counts, when the model searches (search_sweeps > 0)
    kept_search: Callable[[Tensor], Tensor] | None = attrs.field(default=None, kw_only=True)

    @classmethod
    def of(cls, model: Tokenizer, images: Tensor, refine_steps: int | None = None,
           search_sweeps: int | None = None) -> Analysed:
        """Analyse ``images`` (B, C, H, W) with ``model`` once (no gradients); ``refine_steps`` and
        ``search_sweeps`` override the spec's test-time refinement and set search, as in
        :meth:`Tokenizer.encode`."""
        check_sweeps(search_sweeps)
        with torch.no_grad():
            analysis = model.analyse(images)
        per_set_tokens = model.tokens_depend_on_keep(refine_steps)
        per_set_search = (model.search_sweeps if search_sweeps is None else search_sweeps) > 0
        # the image and its features wait on the host only where a chosen set still needs them
        sources = analysis.sources.to("cpu") if per_set_tokens or per_set_search else None
        kept_codes = kept_search = None
        if per_set_tokens:
            kept_codes = partial(_kept_codes, model, sources, refine_steps)
        if per_set_search:
            kept_search = partial(_searched_keep, model, sources, analysis.globals_.vectors.cpu(),
                                  analysis.patches.vectors.cpu(), search_sweeps)
        return cls(analysis.globals_.codes.cpu(), analysis.patches.codes.cpu(), analysis.entropy.bits.float().cpu(),
                   analysis.grid, analysis.image_size, kept_codes=kept_codes, kept_search=kept_search)

    def searched(self, selection: Selection) -> Selection:
        """The set :meth:`Tokenizer.encode` keeps where a filter chose ``selection``: the same counts,
        the members chosen again by the model's set search (:meth:`Tokenizer.search_kept`), or
        ``selection`` itself when the model does not search."""
        if self.kept_search is None:
            return selection
        return Selection.from_mask(self.kept_search(selection.keep))

    def tokens(self, selection: Selection, *, search: bool = True) -> Tokens:
        """The tokens :meth:`Tokenizer.encode` makes where a filter chose ``selection``, laid out as it
        lays them out: searched first (:meth:`searched`) unless ``search`` is False — for a selection
        that already was, or a baseline (e.g. random) that must stay what it is."""
        if search:
            selection = self.searched(selection)
        global_codes, codes = ((self.global_codes, self.patch_codes) if self.kept_codes is None
                               else self.kept_codes(selection.keep))  # (B, M), (B, N)
        return Tokens.from_selection(global_codes, codes, selection, self.grid, self.image_size)


@torch.no_grad()
def analysed_bits(model: Tokenizer, images: Tensor) -> Tensor:
    """(B, N) bits of ``images`` (B, C, H, W), on the CPU, and nothing else kept: what calibrating one
    threshold over many images needs when each image's tokens are made again once it is known (tokens
    that depend on the kept set would otherwise keep every image's features and pixels waiting)."""
    return model.analyse(images).entropy.bits.float().cpu()


@torch.no_grad()
def _kept_codes(model: Tokenizer, sources: TokenSources, refine_steps: int | None,
                keep: Tensor) -> tuple[Tensor, Tensor]:
    """(B, M) global and (B, N) patch codes of the set ``keep`` (B, N), made from ``sources``."""
    device = next(model.parameters()).device
    globals_, patches = model.tokens_for(sources.to(device), keep.to(device), refine_steps)
    return globals_.codes.cpu(), patches.codes.cpu()


@torch.no_grad()
def _searched_keep(model: Tokenizer, sources: TokenSources, global_vectors: Tensor, patch_vectors: Tensor,
                   search_sweeps: int | None, keep: Tensor) -> Tensor:
    """(B, N) the set search's choice at the counts of ``keep`` (B, N), on the model's device."""
    device = next(model.parameters()).device
    found = model.search_kept(sources.to(device), global_vectors.to(device), patch_vectors.to(device),
                              keep.to(device), search_sweeps)
    return found.cpu()


def cannot_tokenize(model: Tokenizer, image: Tensor) -> str | None:
    """Why ``image`` (C, H, W) cannot be tokenized by ``model``, or None when it can.

    Checked before any encoder work. (The filters take any number of patches: their integer sums
    choose the fixed-point precision from N, see :func:`tatok_core.ops.dtf.reference.fixed_point_bits`.)
    """
    height, width = image.shape[-2:]
    p = model.patch_size
    if height < p or width < p:
        return f"image of {height}×{width} is smaller than one {p}×{p} patch"
    return None
