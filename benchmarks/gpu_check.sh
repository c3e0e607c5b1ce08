#!/usr/bin/env bash
# GPU check: the Triton DTF kernel (versions, exactness tests on CUDA, benchmark) and the windowed
# attention / sync-free inference path of issue 14 (equality with the masked attention on CUDA, CUDA's
# sync detector, torch.compile with inductor, timing), the packed decoder's attention among kept tokens,
# the chain estimator against the CPU, test-time refinement's encode time and the set search batched
# across images (issue 15). Total < 10 minutes.
#
#   OUT_DIR=/some/dir bash benchmarks/gpu_check.sh      (default OUT_DIR: $OUT, else ./runs/gpu_check)
#
# Runs from the repository root. Writes $OUT_DIR/pytest.txt, $OUT_DIR/bench.txt, $OUT_DIR/dtf_bench.json,
# $OUT_DIR/windows_pytest.txt, $OUT_DIR/windows.json, $OUT_DIR/scaling.json (+ .png), $OUT_DIR/fsq.json,
# $OUT_DIR/refinement/refinement.json, $OUT_DIR/search.json.
# Exit status: 0 when the tests pass and the benchmark ran, else the first non-zero step status.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT_DIR="${OUT_DIR:-${OUT:-./runs/gpu_check}}"  # runs/ is git-ignored
mkdir -p "$OUT_DIR"
PYTHON="${PYTHON:-python}"
TEST_BUDGET_S="${TEST_BUDGET_S:-190}"
BENCH_BUDGET_S="${BENCH_BUDGET_S:-80}"
start=$(date +%s)

echo "== versions"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.memory --format=csv,noheader || true
else
  echo "nvidia-smi: not found"
fi
"$PYTHON" - <<'EOF'
import torch
print(f"torch {torch.__version__} cuda {torch.version.cuda} available={torch.cuda.is_available()}",
      f"device={torch.cuda.get_device_name() if torch.cuda.is_available() else '-'}")
try:
    import triton
    print(f"triton {triton.__version__}")
except Exception as exc:
    print(f"triton: not importable ({exc!r})")
EOF

echo "== tests (CUDA params run here; budget ${TEST_BUDGET_S}s)"
timeout -k 10 "$TEST_BUDGET_S" "$PYTHON" -m pytest -q -p no:cacheprovider --durations=5 \
  tests/test_dtf_triton.py tests/test_dtf_properties.py tests/test_dtf_absolute.py 2>&1 | tee "$OUT_DIR/pytest.txt" | tail -n 25
test_rc=${PIPESTATUS[0]}

echo "== benchmark (budget ${BENCH_BUDGET_S}s)"
timeout -k 10 "$BENCH_BUDGET_S" "$PYTHON" benchmarks/bench_dtf.py --json "$OUT_DIR/dtf_bench.json" 2>&1 \
  | tee "$OUT_DIR/bench.txt"
bench_rc=${PIPESTATUS[0]}
timeout -k 10 "${NOCAP_BUDGET_S:-60}" "$PYTHON" benchmarks/bench_dtf.py --mode theta --batch 8 --tokens 16384 65536 --json "$OUT_DIR/dtf_nocap.json" 2>&1 | tee "$OUT_DIR/nocap.txt" | tail -n 4  # beyond the old 8192 cap (exact= column); informational, not in the exit status
timeout -k 10 "${GEN_BUDGET_S:-150}" "$PYTHON" benchmarks/bench_generation.py --quick --device cuda --no-progress --out-dir "$OUT_DIR" --json "$OUT_DIR/generation.json" 2>&1 | tee "$OUT_DIR/generation.txt" | tail -n 4  # adaptive vs raster priors; informational, not in the exit status

echo "== windowed attention, sync-free inference, compile on CUDA (budget ${WINDOWS_TEST_BUDGET_S:-150}s)"
TATOK_COMPILE_BACKEND=inductor timeout -k 10 "${WINDOWS_TEST_BUDGET_S:-150}" "$PYTHON" -m pytest -q -p no:cacheprovider \
  -rs tests/test_windows.py tests/test_hot_path.py tests/test_packed_decoder.py tests/test_entropy_chain.py 2>&1 | tee "$OUT_DIR/windows_pytest.txt" | tail -n 12
windows_rc=${PIPESTATUS[0]}
timeout -k 10 "${WINDOWS_BENCH_BUDGET_S:-60}" "$PYTHON" benchmarks/bench_windows.py --device cuda \
  --json "$OUT_DIR/windows.json" 2>&1 | tail -n 8  # masked vs windowed: time, memory, max |diff|
timeout -k 10 "${SCALING_BUDGET_S:-120}" "$PYTHON" benchmarks/bench_scaling.py --device cuda --sides 256 512 1024 \
  --json "$OUT_DIR/scaling.json" --png "$OUT_DIR/scaling.png" 2>&1 | tail -n 10  # informational
timeout -k 10 60 "$PYTHON" benchmarks/bench_fsq.py --device cuda --json "$OUT_DIR/fsq.json" 2>&1 | tail -n 3
timeout -k 10 "${REFINE_BUDGET_S:-90}" "$PYTHON" benchmarks/refinement.py --device cuda --data builtin:photos:heldout \
  --settings 0,10:0.005 --timing-repeats 5 --no-progress --out "$OUT_DIR/refinement" 2>&1 | tail -n 8  # informational
timeout -k 10 "${SEARCH_BUDGET_S:-120}" "$PYTHON" benchmarks/bench_search.py --device cuda --images 32 --side 256 \
  --batches 16,128,512 --json "$OUT_DIR/search.json" 2>&1 | tail -n 4  # the set search batched across images; informational

echo "== report"
echo "windowed attention tests: rc=$windows_rc  $(grep -E '(passed|failed|error)' "$OUT_DIR/windows_pytest.txt" | tail -n 1)"
echo "tests: rc=$test_rc  $(grep -E '(passed|failed|error)' "$OUT_DIR/pytest.txt" | tail -n 1)"
if [ -f "$OUT_DIR/dtf_bench.json" ]; then
  "$PYTHON" - "$OUT_DIR/dtf_bench.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"bench: {r['device']} peak={r['peak_gbps']} GB/s {r['note']}")
for row in r["rows"]:
    if "skipped" in row:
        print(f"  B={row['batch']:5d} N={row['tokens']:5d} skipped ({row['skipped']})")
    elif "triton_s" in row:
        pct = f" {row['triton_cap_pct_peak']:.1f}% of peak" if "triton_cap_pct_peak" in row else ""
        print(f"  B={row['batch']:5d} N={row['tokens']:5d} ref {row['ref_s']*1e3:8.3f} ms  triton "
              f"{row['triton_s']*1e3:7.3f} ms ({row['speedup']:.1f}x)  +cap {row['triton_cap_s']*1e3:7.3f} ms "
              f"{row['triton_cap_gbps']:.0f} GB/s{pct}  exact={row['exact']}")
    else:
        print(f"  B={row['batch']:5d} N={row['tokens']:5d} ref {row['ref_s']*1e3:8.3f} ms")
EOF
else
  echo "bench: rc=$bench_rc, no JSON written"
fi
echo "elapsed: $(( $(date +%s) - start ))s"

if [ "$test_rc" -ne 0 ]; then exit "$test_rc"; fi
if [ "$windows_rc" -ne 0 ]; then exit "$windows_rc"; fi
exit "$bench_rc"
