#!/usr/bin/env bash
# The CUDA backend's device check: ONE script for a GPU machine (H100/H200, CUDA 13 driver).
#
#   tools/gpu-check.sh              on the GPU machine: nvidia-smi, build, GPU tests, benches
#   tools/gpu-check.sh --prepare    on a machine WITH cargo (no GPU needed): build the test and
#                                   bench executables (release, --features cuda) into .gpu-bin/
#                                   for a GPU machine without a Rust toolchain
#
# On the GPU machine it
#   1. prints nvidia-smi and finds libcublas.so.13 / libnvrtc.so.13 (ldconfig, the CUDA
#      toolkit, or the nvidia-* Python wheels) and puts their folders on LD_LIBRARY_PATH;
#   2. with cargo: `cargo build --release --features cuda`, then
#      `DARKWATCH_REQUIRE_GPU=1 cargo test --release --features cuda --test cuda` (the GPU
#      parity tests FAIL instead of skipping when no GPU is usable), then the CUDA bench
#      (`cargo bench --features cuda --bench cuda`: PAE batch-1 latency and batch-65536
#      throughput, CUDA beside native);
#      without cargo: the same tests and bench from .gpu-bin/ (made by --prepare and carried
#      along), or a clear message when there is neither;
#   3. writes everything to $OUT (default target/gpu-check/): gpu-check.log, nvidia-smi.txt,
#      tests.txt, bench.txt, summary.txt. Exit status 0 only when every step passed.
#
# Budget: with cargo, a build of a few minutes first; with prepared executables about 20 s
# on an H200 (tests 13 s, bench 7 s). Each step runs under `timeout`.
#
# Device tool call (from the repository root, after `tools/gpu-check.sh --prepare` here when
# the GPU machine may lack cargo):
#   run(command="bash tools/gpu-check.sh", carry=[".gpu-bin"], timeout_s=300)
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
BIN="$ROOT/.gpu-bin"

if [[ "${1:-}" == "--prepare" ]]; then
  set -e
  command -v cargo >/dev/null || { echo "gpu-check --prepare: needs cargo" >&2; exit 1; }
  mkdir -p "$BIN"
  grep -qxF '/.gpu-bin/' .git/info/exclude 2>/dev/null || echo '/.gpu-bin/' >> .git/info/exclude
  exe() { # the executable cargo reports for a --no-run build
    python3 -c 'import json,sys
for l in sys.stdin:
    try: m=json.loads(l)
    except Exception: continue
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["name"]==sys.argv[1]: print(m["executable"])' "$1" | tail -1
  }
  t=$(cargo test --release --features cuda --test cuda --no-run --message-format=json 2>/dev/null | exe cuda)
  b=$(cargo bench --features cuda --bench cuda --no-run --message-format=json 2>/dev/null | exe cuda)
  [[ -x "$t" && -x "$b" ]] || { echo "gpu-check --prepare: build failed" >&2; exit 1; }
  cp "$t" "$BIN/cuda-tests"; cp "$b" "$BIN/cuda-bench"
  strip --strip-debug "$BIN/cuda-tests" "$BIN/cuda-bench" 2>/dev/null || true
  echo "$ROOT" > "$BIN/manifest-dir"   # the tests find models/ and tests/data/ through it
  ls -la "$BIN"
  echo "now: run(command=\"bash tools/gpu-check.sh\", carry=[\".gpu-bin\"], timeout_s=300)"
  exit 0
fi

OUT=${OUT:-$ROOT/target/gpu-check}
mkdir -p "$OUT"
LOG="$OUT/gpu-check.log"
: > "$LOG"
: > "$OUT/summary.txt"
say() { echo "$*" | tee -a "$LOG"; }
result() { say "== $1: $2"; echo "$1: $2" >> "$OUT/summary.txt"; }
failed=0
step() { # step NAME SECONDS CMD... : run with a timeout, log, record PASS/FAIL
  local name=$1 secs=$2; shift 2
  say "== $name: $*"
  local t0=$SECONDS
  timeout "$secs" "$@" 2>&1 | tee -a "$LOG" "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]}
  if [[ $rc -eq 0 ]]; then result "$name" "PASS ($((SECONDS - t0)) s)"
  else result "$name" "FAIL rc=$rc ($((SECONDS - t0)) s)"; failed=1; fi
  return $rc
}

say "== gpu-check $(date -u +%FT%TZ) in $ROOT"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.txt" | tee -a "$LOG"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
else
  result nvidia-smi "FAIL: not found (no NVIDIA driver here?)"; failed=1
fi

# The CUDA 13 libraries cudarc loads at run time.
libdirs=()
for lib in libcuda.so.1 libcublas.so.13 libcublasLt.so.13 libnvrtc.so.13; do
  hit=$(ldconfig -p 2>/dev/null | awk -v l="$lib" '$1==l {print $NF; exit}')
  if [[ -z "$hit" ]]; then
    hit=$(find /usr/local/cuda*/lib64 /usr/local/cuda*/targets/*/lib /usr/lib/x86_64-linux-gnu \
            /opt /usr/local/lib /usr/lib/python3*/ -name "$lib" 2>/dev/null | head -1)
    [[ -n "$hit" ]] && libdirs+=("$(dirname "$hit")")
  fi
  say "library $lib: ${hit:-NOT FOUND}"
done
if ((${#libdirs[@]})); then
  export LD_LIBRARY_PATH="$(printf '%s:' "${libdirs[@]}" | awk -v RS=: '!s[$0]++ && $0 {printf "%s:", $0}')${LD_LIBRARY_PATH:-}"
  say "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
fi
export DARKWATCH_REQUIRE_GPU=1

# For the ONNX backend (#5): which execution providers this machine's ONNX Runtime offers.
if command -v python3 >/dev/null; then
  say "onnxruntime: $(python3 -c 'import onnxruntime as o; print(o.__version__, o.get_available_providers())' 2>&1 | tail -1)"
fi

if command -v cargo >/dev/null; then
  say "cargo: $(cargo --version)"
  step build 300 cargo build --release --features cuda
  step tests 180 cargo test --release --features cuda --test cuda -- --nocapture --test-threads 1
  DARKWATCH_BENCH_OUT="$OUT/bench-table.txt" step bench 150 cargo bench --features cuda --bench cuda
elif [[ -x "$BIN/cuda-tests" && -x "$BIN/cuda-bench" ]]; then
  say "no cargo on this machine: running the executables prepared by tools/gpu-check.sh --prepare"
  # The executables look for models/ and tests/data/ under the folder they were built in.
  built=$(cat "$BIN/manifest-dir" 2>/dev/null || true)
  if [[ -n "$built" && "$built" != "$ROOT" && ! -e "$built" ]]; then
    mkdir -p "$(dirname "$built")" && ln -s "$ROOT" "$built" && say "linked $built -> $ROOT"
  fi
  step tests 180 "$BIN/cuda-tests" --nocapture --test-threads 1
  DARKWATCH_BENCH_OUT="$OUT/bench-table.txt" step bench 150 "$BIN/cuda-bench" --bench
else
  result toolchain "FAIL: no cargo on this machine and no .gpu-bin/ executables. Run \
'tools/gpu-check.sh --prepare' on a machine with cargo, then carry .gpu-bin to this one"
  failed=1
fi

say "== summary"
cat "$OUT/summary.txt" | tee -a "$LOG"
exit $failed
