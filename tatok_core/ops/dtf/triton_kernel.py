"""Dynamic Token Filtering as a Triton kernel — bit-for-bit the reference :func:`tatok_core.ops.dtf.reference.select_by_rule`,
for all three rules (per-image τ, absolute θ, absolute ε; see :mod:`tatok_core.ops.dtf.reference`).

Public entry point: :func:`dtf_select_triton`. CUDA tensors run the compiled kernel; CPU tensors run the
*same kernel source* through Triton's interpreter (no ``TRITON_INTERPRET=1`` needed before import), which
is how the test suite checks the kernel on machines without a GPU.

Why integer fixed point
-----------------------
Floating-point prefix sums depend on summation order (torch's CPU cumsum, a sequential interpreter loop
and a GPU tree scan round differently), so near the threshold two backends can pick different k — even
float64 can be forced to disagree (``[1.0] + [2**-60]*1023`` at τ = 1). Like the reference we therefore
count in integers: e = exponent of the row maximum (max < 2^e), q_i = floor(h_i · 2^(P−e)) as int64, with
P = ``fixed_point_bits(N)`` (40 up to N = 8192, smaller beyond so that N·2^P ≤ 2^53: no token cap).
The scaling is an exact power of two, so q is computed here with integer shifts from the float32 bit
pattern (mantissa · 2^(E−150) · 2^(P−e)) — the same numbers the reference gets from float64, with no
float rounding mode, FTZ or libdevice involved. Integer sums are associative, so every order (sort +
cumsum, count tiles, GPU scan) gives the same C_k; the only float operation left is the threshold
float64(Σq) · float64(float32 τ), one IEEE multiply, identical on every backend. For ε the threshold is
float64(float32 ε) · 2^(P−e) (a power of two built from its bit pattern: exact) compared with the exact
integers Σq − C_k; for θ the kernel compares the float32 bit patterns of h and θ as integers.

Kernel design
-------------
One program handles ``ROWS`` rows (a power of two; 1 on CUDA, up to 16 in the interpreter, where
per-program Python overhead dominates) with the whole row in one block of BLOCK = next_pow2(N) ≥ 16:

1. Load bits, clean them on the *integer* bit pattern (negative/−0/NaN → 0, +inf → FLT_MAX; the Python
   boundary already rejected bad input, this only makes the kernel total), build the unique key
   ``(bits << 32) | (BLOCK − 1 − pos)`` (value descending, then smaller position first; padding −1) and q.
2. Order statistics, two exact variants (``algorithm``):

   * ``"sort"`` (default on CUDA): ``tl.sort`` the int64 keys descending, decode q of the sorted keys
     from their high 32 bits, int64 ``tl.cumsum`` → C_k. kth key = sorted[k−1]; keep = key ≥ kth.
   * ``"count"`` (default in the interpreter, where ``tl.sort`` costs ~100× more): for each token i,
     S_i = Σ_j q_j·[key_j ≥ key_i] and c_i = Σ_j [key_j ≥ key_i] over [ROWS, BLOCK, BJ] tiles. Because
     keys are unique, S_i is exactly C at token i's sorted position and c_i − 1 its rank, so no sort
     and no scatter are needed: keep_i = c_i ≤ k. O(N²) work, hence only for the interpreter/small N.

3. τ: threshold = float64(Σq)·float64(τ_b); k* = #(C < threshold) + (threshold > 0). θ: k* = #(h > θ).
   ε: k* = #(Σq − C > ε·2^(P−e)) + (Σq > ε·2^(P−e)). Then
   k = clamp(k*, min(min_keep, upper), upper); store the mask and k (= lengths).

Packing is a second tiny kernel: the row starts are the exclusive prefix of the lengths (torch cumsum on
device, int64 so packing never wraps; returned as int32 ``cu_seqlens``), and each row writes position p of
every kept token to ``index[start_b + rank]`` with rank the exclusive cumsum of its mask — increasing
positions per row, rows concatenated, exactly :meth:`Selection.from_mask`. All offsets are int64
(B·N may exceed 2^31). The compiled kernels were checked to build for sm_90 without register spills; the
CUDA launch heuristics (num_warps by BLOCK, one row per program) are not yet tuned on hardware.

Host syncs: input validation (shared with the reference, so errors are identical) checks the bits for
NaN/inf/negatives on the host, and sizing the packed ``index`` needs the total kept count. Passing
``max_total`` removes the second one (see :func:`dtf_select_triton`).

Running the kernel on CPU without ``TRITON_INTERPRET``
------------------------------------------------------
``triton.jit`` decides at decoration time whether it builds a compiled ``JITFunction`` or an
``InterpretedFunction``; the standard library (``tl.sort``, ``tl.cumsum``, ``tl.max`` …) was decorated when
``triton.language`` was imported. We keep both a compiled and an ``InterpretedFunction`` of each kernel,
and while an interpreted launch runs (under a lock) nested calls of compiled ``@jit`` helpers are routed to
their interpreted rewrite. This uses Triton's interpreter internals (checked against Triton 3.9);
if ``TRITON_INTERPRET=1`` *was* set at import, Triton's own interpreter path is used unchanged. As with
Triton's interpreter itself, ``triton.language`` is patched process-wide while an interpreted launch runs,
so do not compile CUDA kernels from another thread at the same moment.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, NamedTuple

import torch
from torch import Tensor

from tatok_core.ops.dtf.reference import MODES, fixed_point_bits, validate_bits, validate_bounds, validate_mode, validate_threshold
from tatok_core.contract.errors import FilterInputError, TatokError
from tatok_core.contract.selection import Selection, cu_seqlens_from_lengths

__all__ = ["TritonUnavailableError", "dtf_select_triton", "triton_available", "DEFAULT_ROWS_INTERPRETER"]

DEFAULT_ROWS_INTERPRETER = 16  # rows per program in the interpreter (power of two)
_MIN_BLOCK = 16
_INTERP_TILE = 1 << 20  # elements of one [ROWS, BLOCK, BJ] count tile in the interpreter
_CUDA_TILE = 1 << 12  # … and on CUDA (register budget), for the optional "count" algorithm


class TritonUnavailableError(TatokError, ImportError):
    """The Triton backend was asked for but the ``triton`` package cannot be imported."""


try:  # Triton is optional: the module imports without it, the function raises a clear error.
    import triton
    import triton.language as tl
    from triton.language import core as _tl_core  # noqa: F401  (the interpreter patches modules in our globals)

    _TRITON_IMPORT_ERROR: BaseException | None = None
except Exception as _exc:  # pragma: no cover - depends on the environment
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    _TRITON_IMPORT_ERROR = _exc


def triton_available() -> bool:
    """Whether ``triton`` imported (the kernel can run: compiled on CUDA, interpreted on CPU)."""
    return triton is not None


def _require_triton() -> None:
    if triton is None:
        raise TritonUnavailableError(
            "backend='triton' needs the 'triton' package: pip install 'tatok[triton]' "
            f"(import failed: {_TRITON_IMPORT_ERROR!r})"
        )


# ----------------------------------------------------------------------------------------------------
# kernels (defined only when triton imports; the source is shared by the compiled and interpreted paths)
# ----------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _clean_bits(xb):
        """float32 bit patterns (int32) → cleaned: NaN/negative/−0 → 0, +inf → FLT_MAX (pure integer ops)."""
        xb = tl.where(xb > 0x7F800000, 0, xb)  # +NaN (−NaN has the sign bit: caught below)
        xb = tl.where(xb == 0x7F800000, 0x7F7FFFFF, xb)  # +inf → FLT_MAX
        return tl.where(xb < 0, 0, xb)  # sign bit set: negative, −0.0, −inf, −NaN

    @triton.jit
    def _fixed_point(xb, e, precision):
        """q = floor(h · 2^(P−e)) as int64 from cleaned float32 bits xb (int32 ≥ 0); e broadcasts.

        h = m · 2^(E'−150) with m the 24-bit significand (implicit 1 for normals) and E' = max(E, 1), so
        q = floor(m · 2^s) with s = E' − 150 + P − e ≤ P − 24 ≤ 16 (h < 2^e): a left or right shift, exact.
        """
        biased = (xb >> 23) & 0xFF
        frac = (xb & 0x7FFFFF).to(tl.int64)
        m = tl.where(biased > 0, frac | 0x800000, frac)
        s = (tl.maximum(biased, 1) - 150 + precision).to(tl.int64) - e
        left = m << tl.minimum(tl.maximum(s, 0), 63)  # s ≤ 16 when e is the row's exponent
        right = m >> tl.minimum(tl.maximum(-s, 0), 63)
        return tl.where(s >= 0, left, right)

    @triton.jit
    def _row_exponent(xb):
        """e (int64, per row) with row max < 2^e, from the float32 exponent field of the row max."""
        row_max = tl.max(xb, axis=1)  # non-negative float bit patterns order like the values
        biased = (row_max >> 23) & 0xFF
        return tl.maximum(biased, 1).to(tl.int64) - 126

    @triton.jit(do_not_specialize=["n_rows", "n_tokens", "lower", "upper", "precision"])  # few compiled variants
    def _dtf_rows_kernel(
        bits_ptr,  # (B, N) float32, contiguous
        value_ptr,  # (B,) float32: τ, θ or ε (cleaned: ≥ +0.0)
        keep_ptr,  # (B, N) uint8 out
        len_ptr,  # (B,) int64 out
        n_rows,
        n_tokens,
        lower,  # min(min_keep, upper)
        upper,  # min(max_keep, N)
        precision,  # P = fixed_point_bits(N)
        ROWS: tl.constexpr,
        BLOCK: tl.constexpr,
        BJ: tl.constexpr,
        USE_SORT: tl.constexpr,
        MODE: tl.constexpr,  # 0: τ, 1: θ, 2: ε (the index in tatok_core.ops.dtf.reference.MODES)
    ):
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * ROWS + tl.arange(0, ROWS).to(tl.int64)  # (R,)
        row_ok = rows < n_rows
        cols = tl.arange(0, BLOCK)  # (BLOCK,)
        valid = row_ok[:, None] & (cols < n_tokens)[None, :]  # (R, BLOCK)
        offs = rows[:, None] * n_tokens + cols[None, :]  # (R, BLOCK) int64

        x = tl.load(bits_ptr + offs, mask=valid, other=0.0)
        xb = _clean_bits(x.to(tl.int32, bitcast=True))  # (R, BLOCK) int32
        key = (xb.to(tl.int64) << 32) | (BLOCK - 1 - cols).to(tl.int64)[None, :]
        key = tl.where(valid, key, -1)  # unique per valid token; padding sorts last
        e = _row_exponent(xb)  # (R,) int64
        q = _fixed_point(xb, e[:, None], precision)  # (R, BLOCK) int64, 0 on padding
        total = tl.sum(q, axis=1)  # (R,) exact
        total64 = total.to(tl.float64)  # exact: total < 2^53

        value = tl.load(value_ptr + rows, mask=row_ok, other=0.0)  # (R,) float32
        if MODE == 0:
            threshold = total64 * value.to(tl.float64)  # τ·T, one IEEE multiply
        else:  # ε on the scale of q: ε·2^(P−e), a power of two built from its bit pattern — exact
            scale = ((1023 + precision - e) << 52).to(tl.float64, bitcast=True)
            threshold = value.to(tl.float64) * scale

        if USE_SORT:
            skey = tl.sort(key, dim=1, descending=True)  # (R, BLOCK)
            sxb = tl.maximum((skey >> 32).to(tl.int32), 0)  # padding (−1) → bits 0 → q 0
            cum = tl.cumsum(_fixed_point(sxb, e[:, None], precision), axis=1)  # C_1 … C_BLOCK, int64
            sorted_ok = skey >= 0
        else:
            csum = tl.zeros([ROWS, BLOCK], dtype=tl.int64)  # S_i = C at token i's sorted position
            count = tl.zeros([ROWS, BLOCK], dtype=tl.int32)  # c_i = 1 + rank of token i
            for j0 in range(0, n_tokens, BJ):
                cj = j0 + tl.arange(0, BJ)
                vj = row_ok[:, None] & (cj < n_tokens)[None, :]
                xj = tl.load(bits_ptr + rows[:, None] * n_tokens + cj[None, :], mask=vj, other=0.0)
                xbj = _clean_bits(xj.to(tl.int32, bitcast=True))  # (R, BJ)
                keyj = (xbj.to(tl.int64) << 32) | (BLOCK - 1 - cj).to(tl.int64)[None, :]
                keyj = tl.where(vj, keyj, -1)
                qj = _fixed_point(xbj, e[:, None], precision)
                ge = keyj[:, None, :] >= key[:, :, None]  # (R, BLOCK, BJ)
                csum += tl.sum(tl.where(ge, qj[:, None, :], 0), axis=2)
                count += tl.sum(ge.to(tl.int32), axis=2)
            cum = csum  # C at each token's sorted position: the same multiset of C_k as the sorted cumsum
            sorted_ok = valid

        if MODE == 0:  # k* = #(C_k < τ·T) + [τ·T > 0]
            k = tl.sum((sorted_ok & (cum.to(tl.float64) < threshold[:, None])).to(tl.int32), axis=1)
            k += (threshold > 0).to(tl.int32)
        elif MODE == 1:  # k* = #(h > θ): non-negative float32 bit patterns order like the values
            theta_bits = value.to(tl.int32, bitcast=True)
            k = tl.sum((valid & (xb > theta_bits[:, None])).to(tl.int32), axis=1)
        else:  # k* = #(D_k > ε·s) + [T > ε·s], D_k = T − C_k exact
            dropped = (total[:, None] - cum).to(tl.float64)
            k = tl.sum((sorted_ok & (dropped > threshold[:, None])).to(tl.int32), axis=1)
            k += (total64 > threshold).to(tl.int32)
        k = tl.minimum(tl.maximum(k, lower), upper)  # (R,) int32

        if USE_SORT:
            pos = tl.arange(0, BLOCK)[None, :]
            kth = tl.max(tl.where(pos == (k - 1)[:, None], skey, -1), axis=1)  # k-th largest key (−1: k = 0)
            keep = valid & (key >= kth[:, None]) & (k > 0)[:, None]
        else:
            keep = valid & (count <= k[:, None])
        tl.store(keep_ptr + offs, keep.to(tl.uint8), mask=valid)
        tl.store(len_ptr + rows, k.to(tl.int64), mask=row_ok)

    @triton.jit(do_not_specialize=["n_rows", "n_tokens", "capacity"])
    def _pack_kernel(
        keep_ptr,  # (B, N) uint8
        cu_ptr,  # (B+1,) int64 row starts
        index_ptr,  # (capacity,) int64 out
        n_rows,
        n_tokens,
        capacity,
        ROWS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * ROWS + tl.arange(0, ROWS).to(tl.int64)
        row_ok = rows < n_rows
        cols = tl.arange(0, BLOCK)
        valid = row_ok[:, None] & (cols < n_tokens)[None, :]
        kept = tl.load(keep_ptr + rows[:, None] * n_tokens + cols[None, :], mask=valid, other=0).to(tl.int32)
        rank = tl.cumsum(kept, axis=1) - kept  # exclusive: kept positions before this one in the row
        start = tl.load(cu_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        dst = start[:, None] + rank.to(tl.int64)
        ok = valid & (kept > 0) & (dst < capacity)  # never write past the buffer (max_total too small)
        tl.store(index_ptr + dst, (cols.to(tl.int64))[None, :] + tl.zeros([ROWS, BLOCK], dtype=tl.int64), mask=ok)


# ----------------------------------------------------------------------------------------------------
# running the same kernels through the interpreter on CPU tensors
# ----------------------------------------------------------------------------------------------------
_INTERP_LOCK = threading.RLock()
_INTERPRETED: dict[int, Any] = {}  # id(JITFunction) → InterpretedFunction (kept alive by the JITFunction)
_NESTED: dict[int, tuple[Any, Any]] = {}  # id(JITFunction) → (JITFunction, rewritten python function)


def _interpreted(kernel: Any) -> Any:
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(kernel, InterpretedFunction):  # TRITON_INTERPRET=1 was set at import
        return kernel
    entry = _INTERPRETED.get(id(kernel))
    if entry is None:
        entry = _INTERPRETED[id(kernel)] = InterpretedFunction(kernel.fn)
    return entry


@contextlib.contextmanager
def _route_nested_jit_to_interpreter():
    """While an interpreted launch runs, calls of compiled ``@triton.jit`` helpers (ours and ``tl.sort``,
    ``tl.cumsum`` …) run their interpreter rewrite instead of raising "outside of the scope of a kernel".

    The launch itself (GridExecutor) patches ``triton.language`` and ``triton.language.core`` for its whole
    duration (both modules are globals of this file) and restores them afterwards, so the nested call only
    has to run the rewritten function.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    original = JITFunction.__call__

    def _call(self: Any, *args: Any, **kwargs: Any) -> Any:
        entry = _NESTED.get(id(self))
        if entry is None or entry[0] is not self:
            entry = _NESTED[id(self)] = (self, InterpretedFunction(self.fn).rewrite())
        return entry[1](*args, **kwargs)

    JITFunction.__call__ = _call
    try:
        yield
    finally:
        JITFunction.__call__ = original


def _launch(kernel: Any, grid: tuple[int, ...], device: torch.device, *args: Any, **meta: Any) -> None:
    if device.type == "cuda":
        with torch.cuda.device(device):
            kernel[grid](*args, **meta)
        return
    with _INTERP_LOCK, _route_nested_jit_to_interpreter():
        _interpreted(kernel)[grid](*args, **meta)


# ----------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------
def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _check_tunable(name: str, value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value & (value - 1):
        raise FilterInputError(f"{name} must be a power of two ≥ 1, got {value!r}")


def _check_options(device: torch.device, rows_per_program: int | None, max_total: int | None,
                   algorithm: str | None) -> None:
    """The launcher's own options (the bits and bounds are checked like the reference's)."""
    _check_tunable("rows_per_program", rows_per_program)
    if max_total is not None and (isinstance(max_total, bool) or not isinstance(max_total, int) or max_total < 0):
        raise FilterInputError(f"max_total must be an integer ≥ 0 or None, got {max_total!r}")
    if algorithm not in (None, "sort", "count"):
        raise FilterInputError(f"algorithm must be 'sort', 'count' or None, got {algorithm!r}")
    if device.type not in ("cuda", "cpu"):
        raise FilterInputError(
            f"dtf_select_triton runs on CUDA tensors (compiled) or CPU tensors (interpreter), got {device}; "
            "use tatok_core.ops.dtf.reference.dtf_select for other devices"
        )


class _LaunchConfig(NamedTuple):
    grid: tuple[int, ...]
    meta: dict[str, Any]  # ROWS, BLOCK (+ num_warps, enable_fp_fusion on CUDA)
    bj: int  # column tile of the "count" algorithm, a power of two ≤ BLOCK
    use_sort: bool


def _launch_config(batch: int, n: int, device: torch.device, rows_per_program: int | None,
                   algorithm: str | None) -> _LaunchConfig:
    """Rows per program, block and tile sizes and the algorithm: tuning only, never the result."""
    on_cuda = device.type == "cuda"
    use_sort = (algorithm or ("sort" if on_cuda else "count")) == "sort"
    block = max(_MIN_BLOCK, _next_pow2(n))
    if rows_per_program is None:
        if on_cuda:
            rows_per_program = 1
        else:
            rows_per_program = max(1, min(DEFAULT_ROWS_INTERPRETER, _next_pow2(batch), 65536 // block))
    rows = rows_per_program
    tile = _CUDA_TILE if on_cuda else _INTERP_TILE
    bj = min(block, 1 << (max(1, tile // (rows * block)).bit_length() - 1))  # power of two ≤ BLOCK
    meta: dict[str, Any] = {"ROWS": rows, "BLOCK": block}
    if on_cuda:
        # ~8 int64 keys per thread: no spills on sm_90 (checked with ptxas), fp fusion off: no FMA may
        # round the threshold differently from the interpreter (there is no a·b+c today; this keeps it so)
        meta["num_warps"] = 4 if block <= 512 else (8 if block <= 2048 else 16)
        meta["enable_fp_fusion"] = False
    return _LaunchConfig((triton.cdiv(batch, rows),), meta, bj, use_sort)


def dtf_select_triton(
    bits: Tensor,
    threshold: float | Tensor,
    min_keep: int = 0,
    max_keep: int | None = None,
    *,
    mode: str = "tau",
    rows_per_program: int | None = None,
    max_total: int | None = None,
    algorithm: str | None = None,
) -> Selection:
    """DTF-family selection by the Triton kernel; equal, field for field and bit for bit, to
    :func:`tatok_core.ops.dtf.reference.select_by_rule` (``dtf_select`` for the default τ mode).

    Args:
        bits: (B, N) floating tensor of per-token bits (h ≥ 0, finite), any N. CUDA tensors run
            the compiled kernel, CPU tensors Triton's interpreter (slow; meant for tests).
        threshold: τ ∈ [0, 1], θ ≥ 0 or ε ≥ 0 (bits) by ``mode``: a float or a scalar / (B,) tensor (one
            value per row), used as float32.
        min_keep: lower bound on the kept count.
        mode: the rule, one of ``tatok_core.ops.dtf.reference.MODES`` ("tau", "theta", "epsilon").
        max_keep: upper bound on the kept count (``None``: N).
        rows_per_program: rows handled by one program, a power of two (default 1 on CUDA; up to
            ``DEFAULT_ROWS_INTERPRETER`` in the interpreter). Does not change the result.
        max_total: optional capacity of the packed ``index``. Without it the total kept count is read back
            to size ``index`` exactly (one device→host sync; ``index`` then equals ``from_mask``'s). With it,
            no sizing sync happens: ``index`` has length ``max_total``; entries ``[0, cu_seqlens[-1])`` are
            the packed positions and the rest are ``-1``. ``max_total ≥ B·min(max_keep, N)`` (or ``B·N``)
            always suffices; if it is too small the kernel writes only the first ``max_total`` positions
            (never out of bounds), which callers detect as ``cu_seqlens[-1] > max_total``. ``keep``,
            ``lengths`` and ``cu_seqlens`` are always complete and exact. (Input validation, shared with
            the reference, still checks the bits on the host.)
        algorithm: ``"sort"`` (bitonic ``tl.sort``, default on CUDA) or ``"count"`` (sort-free O(N²)
            counting, default in the interpreter). Both are exact; the result never depends on it.

    Returns:
        :class:`Selection` with keep (B, N) bool, lengths (B,) int64, cu_seqlens (B+1,) int32 and
        index (K,) int64, on the device of ``bits``.

    Raises:
        FilterInputError: bad bits, τ, bounds, tunables (identical messages to the reference).
        TritonUnavailableError: ``triton`` is not installed.
    """
    _require_triton()
    validate_mode(mode)
    h = validate_bits(bits).contiguous()  # (B, N) float32, cleaned — same checks and errors as the reference
    batch, n = h.shape
    upper = validate_bounds(n, min_keep, max_keep)
    value32 = validate_threshold(threshold, batch, h.device, mode).to(torch.float32).contiguous()
    _check_options(h.device, rows_per_program, max_total, algorithm)
    device = h.device
    launch = _launch_config(batch, n, device, rows_per_program, algorithm)
    keep_u8 = torch.zeros((batch, n), dtype=torch.uint8, device=device)  # (B, N)
    lengths = torch.zeros(batch, dtype=torch.int64, device=device)  # (B,)
    grid, meta = launch.grid, launch.meta
    if batch and n:
        _launch(
            _dtf_rows_kernel, grid, device,
            h, value32, keep_u8, lengths, batch, n, min(min_keep, upper), upper, fixed_point_bits(n),
            BJ=launch.bj, USE_SORT=launch.use_sort, MODE=MODES.index(mode), **meta,
        )  # fmt: skip

    cu64 = cu_seqlens_from_lengths(lengths, torch.int64)  # (B+1,) int64: packing never wraps
    capacity = int(cu64[-1]) if max_total is None else max_total  # the one sizing sync
    index = torch.full((capacity,), -1, dtype=torch.int64, device=device)  # (K,)
    if batch and n and capacity:
        _launch(_pack_kernel, grid, device, keep_u8, cu64, index, batch, n, capacity, **meta)
    cu_seqlens = cu64.to(torch.int32)  # (B+1,) the FlashAttention varlen dtype, as Selection.from_mask
    return Selection(keep=keep_u8.view(torch.bool), lengths=lengths, cu_seqlens=cu_seqlens, index=index)
