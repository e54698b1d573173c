#!/usr/bin/env bash
# Benchmarks of issue "Foundation": the same load against
#   (a) a worker server alone            aviary worker
#   (b) the embedded gateway             aviary serve   (gateway + in-process worker)
#   (c) a gateway in front of (a)        aviary gateway (remote worker over gRPC)
# for the demo model and the larger mlp model at concurrency 1 and 32, plus idle RSS.
# Everything runs on 127.0.0.1 on this machine; the load generator shares its cores.
# Output: a markdown table on stdout (and in target/bench/results.md).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

duration=${BENCH_DURATION:-10}
warmup=${BENCH_WARMUP:-2}
out=target/bench
mkdir -p "$out"
cargo build --release -p aviary-cli --bin aviary >&2
bin=target/release/aviary
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

# start NAME ARGS... : starts the binary, waits for its listening line, sets $addr and $pid.
start() {
  local name=$1; shift
  "$bin" "$@" >"$out/$name.out" 2>"$out/$name.err" &
  pid=$!
  pids+=("$pid")
  for _ in $(seq 1 200); do
    addr=$(sed -n 's/^aviary: listening on //p' "$out/$name.out")
    [ -n "$addr" ] && return 0
    kill -0 "$pid" 2>/dev/null || { cat "$out/$name.err" >&2; return 1; }
    sleep 0.1
  done
  echo "bench: $name did not start" >&2
  return 1
}

rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

wait_ready() {
  for _ in $(seq 1 100); do
    "$bin" infer --addr "http://$1" --model demo --input '[[5.1,3.5,1.4,0.2]]' >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  return 1
}

start worker worker --repo deploy/local/models --listen 127.0.0.1:0 --instances 2
worker_addr=$addr; worker_pid=$pid
start serve serve --config deploy/local/aviary.toml --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0
serve_addr=$addr; serve_pid=$pid

cat >"$out/remote.toml" <<TOML
[routes.demo]
versions = [ { version = "1", weight = 90, endpoint = "http://$worker_addr" }, { version = "2", weight = 10, endpoint = "http://$worker_addr" } ]
[routes.mlp]
versions = [ { version = "1", weight = 1, endpoint = "http://$worker_addr" } ]
TOML
start gateway gateway --config "$out/remote.toml" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0
gateway_addr=$addr; gateway_pid=$pid
wait_ready "$gateway_addr"
sleep 1
gateway_idle_rss=$(rss_kib "$gateway_pid")
serve_idle_rss=$(rss_kib "$serve_pid")
worker_idle_rss=$(rss_kib "$worker_pid")

{
  echo "| setup | model | concurrency | req/s | p50 µs | p90 µs | p99 µs | errors |"
  echo "|---|---|---:|---:|---:|---:|---:|---:|"
} >"$out/results.md"
for model in demo mlp; do
  for concurrency in 1 32; do
    for setup in worker serve gateway; do
      case $setup in
        worker) a=$worker_addr; label="(a) worker alone" ;;
        serve) a=$serve_addr; label="(b) aviary serve (in-process)" ;;
        gateway) a=$gateway_addr; label="(c) gateway → remote worker" ;;
      esac
      json=$("$bin" bench --addr "http://$a" --model "$model" --concurrency "$concurrency" \
        --duration "$duration" --warmup "$warmup" --json)
      echo "$json" >>"$out/raw.jsonl"
      python3 - "$label" "$json" >>"$out/results.md" <<'PY'
import json, sys
label, r = sys.argv[1], json.loads(sys.argv[2])
errors = sum(r["errors"].values())
print(f"| {label} | {r['model']} | {r['concurrency']} | {r['throughput']:.0f} | {r['p50_us']} | {r['p90_us']} | {r['p99_us']} | {errors} |")
PY
    done
  done
done
{
  echo
  echo "Idle RSS after start-up and one request: gateway without models (aviary gateway) $((gateway_idle_rss / 1024)) MiB;"
  echo "aviary serve with demo v1, v2 and mlp loaded (2 sessions each) $((serve_idle_rss / 1024)) MiB; worker with the same models $((worker_idle_rss / 1024)) MiB."
} >>"$out/results.md"
cat "$out/results.md"
