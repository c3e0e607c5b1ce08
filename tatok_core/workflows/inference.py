"""Running a model for inference inside a workflow without leaving it in another mode."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[torch.device]:
    """Eval mode and no autograd for the duration; yields the module's device (CPU without parameters).

    The module's training mode is restored on exit, also when the body raises.
    """
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield next(iter(module.parameters()), torch.empty(0)).device
    finally:
        module.train(was_training)
