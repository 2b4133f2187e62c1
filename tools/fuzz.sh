#!/usr/bin/env bash
# Fuzzes darkwatch's decoders with cargo-fuzz (libFuzzer + AddressSanitizer).
#
#   tools/fuzz.sh                  every target, 1,000,000 runs each, one after another
#   tools/fuzz.sh -r 50000         every target, 50,000 runs each
#   tools/fuzz.sh -r 1e6 npy csv   only the named targets
#   tools/fuzz.sh --build          only build the targets (checks that the fuzz crate compiles)
#
# Installs cargo-fuzz when missing. Uses a nightly toolchain when rustup has one;
# otherwise the stable compiler with RUSTC_BOOTSTRAP=1 (cargo-fuzz needs -Z flags). Set
# FUZZ_SANITIZER=none when the toolchain lacks the ASan runtime, FUZZ_JOBS to change
# the build jobs. The corpus grows in fuzz/corpus/<target>/ (seeded from the committed
# fuzz/seeds/<target>/); a crash is saved under fuzz/artifacts/<target>/ and stops the
# script (replay it with `cargo +nightly fuzz run <target> <file>` in fuzz/). Logs, with
# libFuzzer's final stats, go to fuzz/target/logs/<target>.log.
set -euo pipefail

runs=1000000
build_only=0
targets=()
while (($#)); do
  case "$1" in
    -r | --runs) runs=$(python3 -c "print(int(float('$2')))" 2>/dev/null || echo "$2"); shift 2 ;;
    --build) build_only=1; shift ;;
    -h | --help) sed -n '2,15p' "$0"; exit 0 ;;
    *) targets+=("$1"); shift ;;
  esac
done
cd "$(dirname "$0")/../fuzz"

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install --locked cargo-fuzz
fi

toolchain=()
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  toolchain=(+nightly)
else
  export RUSTC_BOOTSTRAP=1
fi
sanitizer="${FUZZ_SANITIZER:-address}"
# -a: debug assertions and overflow checks on, as in the tests; release optimisation.
build_flags=(--sanitizer "$sanitizer" -a)
export CARGO_BUILD_JOBS="${FUZZ_JOBS:-2}"

if ((${#targets[@]} == 0)); then
  mapfile -t targets < <(cargo "${toolchain[@]}" fuzz list)
fi

# One build of every requested target (one snapshot of the sources), then each binary is
# run directly: the same as `cargo fuzz run -a <target> corpus/<target> seeds/<target>
# -- <flags>`, minus a rebuild check before every target.
echo "== building ${targets[*]}"
if ((${#targets[@]} == $(cargo "${toolchain[@]}" fuzz list | wc -l))); then
  cargo "${toolchain[@]}" fuzz build "${build_flags[@]}"
else
  for t in "${targets[@]}"; do
    cargo "${toolchain[@]}" fuzz build "${build_flags[@]}" "$t"
  done
fi
((build_only)) && exit 0

bin_dir="target/$(rustc -vV | sed -n 's/^host: //p')/release"
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_odr_violation=0}"
mkdir -p target/logs
printf '%-14s %10s %6s %8s %6s %8s\n' target runs secs exec/s cov corpus
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t"
  log="target/logs/$t.log"
  # -max_len 4096: the decoders' own limits (ExaMon payloads default to 4 KiB) and
  # more than any seed; -rss_limit_mb 2048 flags runaway allocations; -timeout 10 s
  # flags hangs.
  if ! "$bin_dir/$t" -artifact_prefix="artifacts/$t/" -runs="$runs" -max_len=4096 \
    -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 "corpus/$t" "seeds/$t" \
    >"$log" 2>&1; then
    tail -40 "$log"
    echo "!! $t: crash or error; see fuzz/artifacts/$t/ and fuzz/$log" >&2
    exit 1
  fi
  # libFuzzer's own figures: runs and seconds of fuzzing (no build), final coverage.
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  secs=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  cov=$(grep -o 'DONE *cov: [0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  corpus=$(find "corpus/$t" -type f | wc -l)
  printf '%-14s %10s %6s %8s %6s %8s\n' "$t" "${execs:-?}" "${secs:-?}" "${rate:-?}" \
    "${cov:-?}" "$corpus"
done
