#!/usr/bin/env bash
# Runs the cargo-fuzz targets of fuzz/ (libFuzzer, with AddressSanitizer), each for a
# bounded time, two at a time (one per core), and prints each one's executions. Any
# crash, leak, timeout or out-of-memory fails the run and leaves the input that caused
# it in fuzz/artifacts/<target>/.
#
#   scripts/fuzz.sh [--seconds N | --runs N] [TARGET...]
#
# --seconds N   time per target (default 60); --runs N: executions per target instead.
# TARGET        infer_request, config, route_plan, admin_messages (default: all).
#
# Each target starts from its committed seeds (fuzz/seeds/<target>/, read only) and
# grows a corpus in a temporary folder, so a run never changes the checkout.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

limit=(-max_total_time=60)
while [ $# -gt 0 ]; do
  case $1 in
    --seconds) limit=(-max_total_time="$2"); shift 2 ;;
    --runs) limit=(-runs="$2"); shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    -*) echo "fuzz: unknown option $1" >&2; exit 2 ;;
    *) break ;;
  esac
done
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(infer_request config route_plan admin_messages)

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: cargo-fuzz is missing; scripts/setup.sh installs it" >&2
  exit 1
fi
# cargo-fuzz passes rustc the sanitizer and coverage options that only nightly
# accepts; the machine's one toolchain is stable, which accepts them when told to.
export RUSTC_BOOTSTRAP=1

echo "fuzz: building the targets (release, AddressSanitizer)"
if ! log=$(cargo fuzz build --release 2>&1); then
  echo "$log" >&2
  exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
run() {
  local target=$1
  mkdir -p "$work/$target"
  cargo fuzz run --release "$target" "$work/$target" "seeds/$target" -- \
    "${limit[@]}" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    >"$work/$target.log" 2>&1
}
report() {
  local target=$1 status=$2 runs speed
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$work/$target.log" | grep -o '[0-9]*$' || echo 0)
  speed=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$work/$target.log" | grep -o '[0-9]*$' || echo 0)
  if [ "$status" = 0 ]; then
    printf 'fuzz: %-15s ok      %12s executions  %8s/s  corpus %s\n' \
      "$target" "$runs" "$speed" "$(ls "$work/$target" | wc -l)"
  else
    printf 'fuzz: %-15s FAILED  (exit %s) after %s executions\n' "$target" "$status" "$runs"
    tail -60 "$work/$target.log"
  fi
}

failed=0
for ((i = 0; i < ${#targets[@]}; i += 2)); do
  pair=("${targets[@]:i:2}")
  pids=()
  for target in "${pair[@]}"; do
    run "$target" & pids+=($!)
  done
  for j in "${!pair[@]}"; do
    status=0
    wait "${pids[$j]}" || status=$?
    report "${pair[$j]}" "$status"
    [ "$status" = 0 ] || failed=1
  done
done
exit $failed
