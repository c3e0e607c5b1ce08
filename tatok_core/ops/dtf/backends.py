"""Which DTF implementation runs a call: the torch reference or the Triton kernel (bit-for-bit equal)."""

from __future__ import annotations

from torch import Tensor

from tatok_core.contract.selection import Selection
from tatok_core.ops.dtf.reference import select_by_rule

#: "torch": the vectorised reference; "triton": the kernel (compiled on CUDA, interpreted on CPU);
#: "auto": Triton for CUDA tensors when it is importable, the reference otherwise.
BACKENDS = ("auto", "torch", "triton")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def uses_triton(backend: str, bits: Tensor) -> bool:
    """Whether ``backend`` runs the Triton kernel for these bits."""
    if backend != "auto":
        return backend == "triton"
    if not (isinstance(bits, Tensor) and bits.is_cuda):
        return False
    from tatok_core.ops.dtf.triton_kernel import triton_available  # imports triton: only for CUDA tensors

    return triton_available()


def select_with_backend(bits: Tensor, mode: str, threshold: float | Tensor, min_keep: int, max_keep: int | None,
                        backend: str = "auto") -> Selection:
    """DTF under rule ``mode`` on ``backend``; every backend returns the same :class:`Selection`."""
    if uses_triton(backend, bits):
        from tatok_core.ops.dtf.triton_kernel import dtf_select_triton

        return dtf_select_triton(bits, threshold, min_keep, max_keep, mode=mode)
    return select_by_rule(bits, mode, threshold, min_keep, max_keep)
