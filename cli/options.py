"""Option checks at parse time: a bad value is one line naming the option, before any work starts."""

from __future__ import annotations

import math
from typing import Any

import click

from tatok_core.contract.errors import TatokError
from tatok_core.workflows.rate_control import BUDGET_MODES


def at_least(minimum: int) -> Any:
    """A click callback refusing a number option below ``minimum`` (``None``, an unset option, passes)."""

    def check(_: click.Context, param: click.Parameter, value: float | None) -> float | None:
        if isinstance(value, float) and not minimum <= value < math.inf:  # NaN and infinity too
            raise TatokError(f"{param.opts[0]} must be a finite number >= {minimum}, got {value}")
        if value is not None and value < minimum:
            raise TatokError(f"{param.opts[0]} must be >= {minimum}, got {value}")
        return value

    return check


def absolute_rule_options(command: Any) -> Any:
    """``--theta`` / ``--epsilon``: DTF's absolute rules, the same on every command that keeps tokens."""
    command = click.option("--epsilon", type=float,
                           help="absolute rule: keep the fewest tokens dropping at most EPSILON bits")(command)
    return click.option("--theta", type=float, help="absolute rule: keep every token holding more than THETA bits")(command)


def budget_options(command: Any) -> Any:
    """``--budget`` / ``--budget-mode``: one threshold calibrated on the inputs of a command over many images."""
    command = click.option("--budget-mode", type=click.Choice(BUDGET_MODES), default="theta", show_default=True,
                           help="what --budget calibrates: shared θ or ε (allocates by amount) or per-image τ")(command)
    return click.option("--budget", type=float,
                        help="mean patch tokens per image; ONE threshold is calibrated on the inputs")(command)


def refine_option(command: Any) -> Any:
    """``--refine-steps``: how hard encoding works (``Tokenizer.refine``), the same on every command that encodes."""
    return click.option("--refine-steps", type=int, callback=at_least(0),
                        help="optimiser steps fitting each image's kept tokens to it (default: the model's own; "
                             "0: the encoder's tokens)")(command)


def search_option(command: Any) -> Any:
    """``--search-sweeps``: how hard encoding chooses which tokens to keep (``Tokenizer.search_kept``)."""
    return click.option("--search-sweeps", type=int, callback=at_least(0),
                        help="exchange sweeps choosing which tokens to keep at the filter's count (default: the "
                             "model's own; 0: the filter's set)")(command)


def bpp_worth_option(command: Any) -> Any:
    """``--bpp-worth``: what refinement weighs a bit per pixel of the coding prior as, on commands that code tokens."""
    return click.option("--bpp-worth", type=float, callback=at_least(0),
                        help="dB of PSNR one bit per pixel of the file is worth to refinement (default: the model's own; "
                             "0: refine for pixels only)")(command)


def with_refinement(model: Any, refine_steps: int | None, bpp_worth: float | None = None,
                    search_sweeps: int | None = None) -> Any:
    """``model`` with ``--bpp-worth``, ``--search-sweeps`` and ``--refine-steps`` applied; unchanged when none
    is given. ``--refine-steps`` is the steps of the refinement the command runs (``Tokenizer.with_refinement_steps``)."""
    if bpp_worth is not None:
        model = model.with_pipeline_options(refine_bpp_worth=bpp_worth)
    if search_sweeps is not None:
        model = model.with_pipeline_options(search_sweeps=search_sweeps)
    return model if refine_steps is None else model.with_refinement_steps(refine_steps)
