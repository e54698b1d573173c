#!/usr/bin/env bash
# What observability costs: `aviary serve` (deploy/local/aviary.toml) under `aviary bench
# --concurrency 32` with /metrics off, /metrics on and scraped every second, and traces
# exported to a local OTLP receiver (crates/cli/examples/otlp_sink.rs) at 100 % and 1 %
# sampling. Each round runs every setting once, in turn; the server's CPU time per
# request (utime+stime over requests answered) is the steadiest figure on a shared
# machine. Release build, 127.0.0.1 only; the load generator shares the cores.
# Usage: scripts/bench_observability.sh [ROUNDS] [SECONDS]. Output: markdown on stdout
# (and in target/bench/observability.md).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

rounds=${1:-3}
duration=${2:-10}
out=target/bench
mkdir -p "$out"
cargo build --release -p aviary-cli --bin aviary --example otlp_sink >&2
bin=target/release/aviary
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# The receiver: a free port picked by binding port 0.
target/release/examples/otlp_sink 127.0.0.1:0 >"$work/sink.out" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do
  sink=$(sed -n 's/^otlp_sink: listening on //p' "$work/sink.out")
  [ -n "$sink" ] && break
  sleep 0.1
done
[ -n "$sink" ] || { cat "$work/sink.out" >&2; exit 1; }

models="$root/deploy/local/models"
base=$(sed "s|path = \"models\"|path = \"$models\"|" deploy/local/aviary.toml)
config() { # NAME EXTRA-TOML
  printf '%s\n\n%s\n' "$2" "$base" >"$work/$1.toml"
}
config metrics-off $'[metrics]\nenabled = false'
config metrics-on ''
config traces-100 $'[tracing]\nendpoint = "http://'"$sink"$'"\nsample_ratio = 1.0'
config traces-1 $'[tracing]\nendpoint = "http://'"$sink"$'"\nsample_ratio = 0.01'

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
tck=$(getconf CLK_TCK)

run() { # NAME -> one JSON line on stdout
  local name=$1
  "$bin" serve --config "$work/$name.toml" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
    --metrics-listen 127.0.0.1:0 >"$work/$name.out" 2>"$work/$name.err" &
  local pid=$! addr= metrics= scraper=
  for _ in $(seq 1 300); do
    addr=$(sed -n 's/^aviary: listening on //p' "$work/$name.out")
    [ -n "$addr" ] && break
    sleep 0.1
  done
  [ -n "$addr" ] || { cat "$work/$name.err" >&2; exit 1; }
  metrics=$(sed -n 's/^aviary: metrics listening on //p' "$work/$name.out")
  if [ -n "$metrics" ]; then
    # What Prometheus does, every second.
    (while sleep 1; do curl -s "http://$metrics/metrics" >/dev/null || true; done) &
    scraper=$!
  fi
  # Warm-up outside the measurement.
  "$bin" bench --addr "http://$addr" --model demo --concurrency 32 --duration 2 --warmup 0 >/dev/null
  local before after result
  before=$(cpu_ticks $pid)
  result=$("$bin" bench --addr "http://$addr" --model demo --concurrency 32 --duration "$duration" --warmup 0 --json)
  after=$(cpu_ticks $pid)
  [ -n "$scraper" ] && kill "$scraper" 2>/dev/null
  kill -TERM $pid
  wait $pid 2>/dev/null || true
  python3 -c 'import json,sys; r=json.loads(sys.argv[1]); r["setting"]=sys.argv[2]; r["cpu_s"]=(int(sys.argv[4])-int(sys.argv[3]))/int(sys.argv[5]); print(json.dumps(r))' \
    "$result" "$name" "$before" "$after" "$tck"
}

: >"$out/observability.jsonl"
for round in $(seq 1 "$rounds"); do
  for name in metrics-off metrics-on traces-100 traces-1; do
    run "$name" | tee -a "$out/observability.jsonl" >&2
  done
done

python3 - "$out/observability.jsonl" "$rounds" "$duration" >"$out/observability.md" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
order = ["metrics-off", "metrics-on", "traces-100", "traces-1"]
label = {"metrics-off": "/metrics off", "metrics-on": "/metrics on, scraped every 1 s",
         "traces-100": "+ traces, 100 % sampled", "traces-1": "+ traces, 1 % sampled"}
print(f"`scripts/bench_observability.sh {sys.argv[2]} {sys.argv[3]}`: demo, concurrency 32, {sys.argv[3]} s per run.")
print()
print("| setting | round | req/s | p50 µs | p99 µs | server CPU µs/req | errors |")
print("|---|---:|---:|---:|---:|---:|---:|")
for i, r in enumerate(rows):
    n = r["requests"]
    r["cpu_us"] = r["cpu_s"] * 1e6 / n
    print(f"| {label[r['setting']]} | {i // 4 + 1} | {r['throughput']:.0f} | {r['p50_us']} | {r['p99_us']} | {r['cpu_us']:.1f} | {sum(r['errors'].values())} |")
print()
med = lambda s, k: statistics.median(r[k] for r in rows if r["setting"] == s)
base_t, base_c = med("metrics-off", "throughput"), med("metrics-off", "cpu_us")
print("| setting | median req/s | vs /metrics off | median CPU µs/req | vs /metrics off |")
print("|---|---:|---:|---:|---:|")
for s in order:
    t, c = med(s, "throughput"), med(s, "cpu_us")
    print(f"| {label[s]} | {t:.0f} | {(t / base_t - 1) * 100:+.1f} % | {c:.1f} | {(c / base_c - 1) * 100:+.1f} % |")
PY
cat "$out/observability.md"
