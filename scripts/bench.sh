#!/usr/bin/env bash
# scripts/bench.sh [--kit DIR] [--record] [SECONDS]
#
# Aviary against its baselines, in one run on this machine: every server below is
# started on 127.0.0.1, then each row is loaded for SECONDS (default 5) at concurrency
# 1 and 32, in two interleaved rounds (so drift on a noisy machine shows), with server
# CPU per request read from /proc. Rows:
#
#   bare tonic + ORT server (v1)                 needs the kit
#   aviary worker, pinned v1
#   aviary serve, 90/10 split
#   nginx grpc_pass 90/10 -> the aviary worker   needs the kit and nginx
#   aviary gateway 90/10 -> the aviary worker    (default threads, and --async-threads 1,
#                                                 the thread budget of the nginx row)
#   MLServer (v1)                                needs the kit and MLSERVER=1
#
# The kit (--kit DIR, or AVIARY_BENCH_KIT) is the benchmark kit the performance goals
# are judged with (docs/benchmarks.md, "The benchmark kit"): `grpc-blast/` (the load
# tool), `bare-infer/`, `nginx.sh`, `make-infer-body.py`, `mlserver/run.sh`. It is not
# part of this repository. Without it, the Aviary rows are loaded by `aviary bench`
# and no ratio to a baseline is printed.
#
# Then the ratios the performance goals are stated in, and the per-model table of
# `aviary bench` (demo and mlp). Output: target/bench/results.md; with --record it is
# also appended to docs/benchmarks.md under today's date.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

kit=${AVIARY_BENCH_KIT:-}
record=0
seconds=5
while [ $# -gt 0 ]; do
  case $1 in
    --kit) kit=$(cd "$2" && pwd); shift 2 ;;
    --record) record=1; shift ;;
    *) seconds=$1; shift ;;
  esac
done
out=target/bench
mkdir -p "$out"
work=$(mktemp -d)
cargo build --release -p aviary-cli --bin aviary >&2
bin=$PWD/target/release/aviary
models=$PWD/deploy/local/models
export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$(ls "$PWD"/.aviary/onnxruntime/libonnxruntime.so.* | head -1)}

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start NAME ARGS...: an aviary process on port 0; sets $addr and $pid from its output.
start() {
  local name=$1; shift
  "$@" >"$out/$name.out" 2>"$out/$name.err" &
  pid=$!
  pids+=("$pid")
  for _ in $(seq 1 300); do
    addr=$(sed -n 's/^aviary: listening on //p' "$out/$name.out")
    [ -n "$addr" ] && return 0
    kill -0 "$pid" 2>/dev/null || { cat "$out/$name.err" >&2; return 1; }
    sleep 0.1
  done
  echo "bench: $name did not start" >&2
  return 1
}

# wait_grpc ADDR: until a v2 server answers an inference of demo v1 (the bare server
# and MLServer answer nothing else, so with the kit its load tool asks).
wait_grpc() {
  for _ in $(seq 1 600); do
    if [ -n "$blast" ]; then
      "$blast" --addr "http://$1" --body "$work/v1.bin" --concurrency 1 --duration 0.1 2>/dev/null |
        grep -q '"OK"' && return 0
    else
      "$bin" infer --addr "http://$1" --model demo --version 1 --input '[[5.1,3.5,1.4,0.2]]' >/dev/null 2>&1 && return 0
    fi
    sleep 0.1
  done
  echo "bench: nothing answers on $1" >&2
  return 1
}

# --- the servers -------------------------------------------------------------------
start worker "$bin" worker --repo "$models" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --instances 2
worker_addr=$addr; worker_pid=$pid
cat >"$work/serve.toml" <<TOML
[repository]
path = "$models"
instances = 2
[routes.demo]
versions = [ { version = "1", weight = 90 }, { version = "2", weight = 10 } ]
[routes.mlp]
versions = [ { version = "1", weight = 1 } ]
TOML
start serve "$bin" serve --config "$work/serve.toml" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0
serve_addr=$addr; serve_pid=$pid
cat >"$work/gateway.toml" <<TOML
[routes.demo]
versions = [ { version = "1", weight = 90, endpoint = "http://$worker_addr" },
             { version = "2", weight = 10, endpoint = "http://$worker_addr" } ]
[routes.mlp]
versions = [ { version = "1", weight = 1, endpoint = "http://$worker_addr" } ]
TOML
start gateway "$bin" gateway --config "$work/gateway.toml" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0
gateway_addr=$addr; gateway_pid=$pid
start gateway1 "$bin" --async-threads 1 gateway --config "$work/gateway.toml" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0
gateway1_addr=$addr; gateway1_pid=$pid

# name|address|pinned (v1) or unpinned|pids whose CPU counts
rows=(
  "aviary worker (pinned v1)|$worker_addr|v1|$worker_pid"
  "aviary serve, 90/10 split|$serve_addr|unpinned|$serve_pid"
  "aviary gateway 90/10 -> aviary worker|$gateway_addr|unpinned|$gateway_pid,$worker_pid"
  "aviary gateway --async-threads 1, 90/10 -> aviary worker|$gateway1_addr|unpinned|$gateway1_pid,$worker_pid"
)

blast=
if [ -n "$kit" ]; then
  CARGO_TARGET_DIR=$PWD/target/bench-kit cargo build --release --quiet --manifest-path "$kit/grpc-blast/Cargo.toml" >&2
  CARGO_TARGET_DIR=$PWD/target/bench-kit cargo build --release --quiet --manifest-path "$kit/bare-infer/Cargo.toml" >&2
  blast=$PWD/target/bench-kit/release/grpc-blast
  .venv/bin/python "$kit/make-infer-body.py" "$work/unpinned.bin" demo input FP32 1,4 >/dev/null
  .venv/bin/python "$kit/make-infer-body.py" "$work/v1.bin" demo input FP32 1,4 1 >/dev/null
  port=$(free_port)
  "$PWD/target/bench-kit/release/bare-infer" "$models/demo/1/model.onnx" "$port" 2 1 >"$out/bare.log" 2>&1 &
  pids+=($!)
  rows=("bare tonic+ORT (v1)|127.0.0.1:$port|v1|$!" "${rows[@]}")
  if command -v nginx >/dev/null; then
    port=$(free_port)
    setsid "$kit/nginx.sh" "$port" "$worker_addr" "$worker_addr" 90 >"$out/nginx.log" 2>&1 &
    nginx_pid=$!
    pids+=("$nginx_pid")
    # nginx.sh execs the master; its one worker process does the proxying.
    sleep 1
    nginx_pids=$(pgrep -d, -s "$nginx_pid" nginx || echo "$nginx_pid")
    rows+=("nginx grpc_pass 90/10 -> aviary worker|127.0.0.1:$port|unpinned|$nginx_pids,$worker_pid")
  else
    echo "bench: nginx is not installed (apt-get install -y nginx-light); its row is left out" >&2
  fi
  if [ "${MLSERVER:-0}" = 1 ]; then
    port=$(free_port)
    "$kit/mlserver/run.sh" "$models/demo/1/model.onnx" demo "$port" >"$out/mlserver.log" 2>&1 &
    pids+=($!)
    rows+=("MLServer 1.7.1 (v1)|127.0.0.1:$port|v1|$!")
  fi
fi
for row in "${rows[@]}"; do
  IFS='|' read -r _ a _ _ <<<"$row"
  wait_grpc "$a"
done

cpu_ticks() { local t=0; for p in ${1//,/ }; do t=$((t + $(awk '{print $14+$15}' "/proc/$p/stat"))); done; echo "$t"; }
tck=$(getconf CLK_TCK)

# load ADDR PINNING CONCURRENCY: prints "requests rps p50 p99 errors".
load() {
  if [ -n "$blast" ]; then
    local o
    o=$("$blast" --addr "http://$1" --body "$work/$2.bin" --concurrency "$3" --duration "$seconds")
    python3 - "$o" <<'PY'
import re, sys, json
o = sys.argv[1]
g = lambda k: re.search(k + r"=(\d+)", o).group(1)
codes = json.loads(re.search(r"codes=(\{[^}]*\})", o).group(1))
print(g("requests"), g("rps"), g("p50_us"), g("p99_us"), sum(n for c, n in codes.items() if c != "OK"))
PY
  else
    local version=()
    [ "$2" = v1 ] && version=(--version 1)
    "$bin" bench --addr "http://$1" --model demo "${version[@]}" --concurrency "$3" \
      --duration "$seconds" --warmup 1 --json | python3 -c '
import json, sys
r = json.load(sys.stdin)
print(r["requests"], round(r["throughput"]), r["p50_us"], r["p99_us"], sum(r["errors"].values()))'
  fi
}

results=$out/compare.tsv
: >"$results"
for round in 1 2; do
  for c in 1 32; do
    for row in "${rows[@]}"; do
      IFS='|' read -r name a pinning cpu_pids <<<"$row"
      before=$(cpu_ticks "$cpu_pids")
      read -r requests rps p50 p99 errors <<<"$(load "$a" "$pinning" "$c")"
      after=$(cpu_ticks "$cpu_pids")
      cpu=$(awk -v d=$((after - before)) -v n="$requests" -v t="$tck" 'BEGIN{printf "%.1f", n ? d/t*1e6/n : 0}')
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$name" "$c" "$rps" "$p50" "$p99" "$cpu" "$errors" >>"$results"
      echo "bench: round $round c=$c $name: $rps req/s, p50 $p50 µs" >&2
    done
  done
done

# --- the per-model table (aviary bench, random inputs) -------------------------------
models_table=$out/models.md
{
  echo "| setup | model | concurrency | req/s | p50 µs | p99 µs | errors |"
  echo "|---|---|---:|---:|---:|---:|---:|"
} >"$models_table"
for model in demo mlp; do
  for c in 1 32; do
    for setup in "aviary worker|$worker_addr" "aviary serve|$serve_addr" "aviary gateway -> worker|$gateway_addr"; do
      IFS='|' read -r label a <<<"$setup"
      json=$("$bin" bench --addr "http://$a" --model "$model" --concurrency "$c" --duration "$seconds" --warmup 1 --json)
      python3 - "$label" "$json" >>"$models_table" <<'PY'
import json, sys
label, r = sys.argv[1], json.loads(sys.argv[2])
errors = sum(r["errors"].values())
print(f"| {label} | {r['model']} | {r['concurrency']} | {r['throughput']:.0f} | {r['p50_us']} | {r['p99_us']} | {errors} |")
PY
    done
  done
done

# --- the report ----------------------------------------------------------------------
python3 - "$results" "$models_table" "$seconds" "$kit" >"$out/results.md" <<'PY'
import collections, platform, subprocess, sys
results, models_table, seconds, kit = sys.argv[1:5]
rows = [line.rstrip("\n").split("\t") for line in open(results)]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
cores = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
print(f"Machine: {cores} cores, {cpu}, Linux {platform.release()}. Build: `{commit}` (release).")
print(f"Command: `scripts/bench.sh{' --kit KIT' if kit else ''} {seconds}` ({seconds} s per row, "
      f"load tool {'grpc-blast from the kit' if kit else '`aviary bench`'}, two interleaved rounds).")
print()
print("| round | server | c | req/s | p50 µs | p99 µs | server CPU µs/req | errors |")
print("|---|---|---:|---:|---:|---:|---:|---:|")
for r in rows:
    print("| " + " | ".join(r) + " |")
by = collections.defaultdict(dict)
for rnd, name, c, rps, p50, p99, cpu_us, errors in rows:
    by[(rnd, c)][name] = (float(rps), float(p50), float(cpu_us))
def ratio(rnd, c, a, b, i):
    x, y = by[(rnd, c)].get(a), by[(rnd, c)].get(b)
    return f"{x[i] / y[i]:.2f}×" if x and y and y[i] else "n/a"
bare, nginx = "bare tonic+ORT (v1)", "nginx grpc_pass 90/10 -> aviary worker"
goals = [
    ("aviary worker / bare, req/s at c=32 (goal ≥ 0.9×)", "aviary worker (pinned v1)", bare, "32", 0),
    ("aviary serve / bare, req/s at c=32 (goal ≥ 0.9×)", "aviary serve, 90/10 split", bare, "32", 0),
    ("aviary worker / bare, p50 at c=1 (goal ≤ 1.1×)", "aviary worker (pinned v1)", bare, "1", 1),
    ("aviary serve / bare, p50 at c=1 (goal ≤ 1.1×)", "aviary serve, 90/10 split", bare, "1", 1),
    ("aviary gateway / nginx, req/s at c=32 (goal ≥ 1.5×)", "aviary gateway 90/10 -> aviary worker", nginx, "32", 0),
    ("aviary gateway / nginx, p50 at c=1 (goal ≤ 0.8×)", "aviary gateway 90/10 -> aviary worker", nginx, "1", 1),
    ("aviary gateway, 1 thread / nginx, req/s at c=32", "aviary gateway --async-threads 1, 90/10 -> aviary worker", nginx, "32", 0),
    ("aviary gateway, 1 thread / nginx, p50 at c=1", "aviary gateway --async-threads 1, 90/10 -> aviary worker", nginx, "1", 1),
]
if kit:
    print()
    print("| ratio | round 1 | round 2 |")
    print("|---|---:|---:|")
    for label, a, b, c, i in goals:
        print(f"| {label} | {ratio('1', c, a, b, i)} | {ratio('2', c, a, b, i)} |")
print()
print(open(models_table).read().rstrip())
PY
cat "$out/results.md"
if [ "$record" = 1 ]; then
  {
    echo
    echo "### scripts/bench.sh, $(date +%Y-%m-%d)"
    echo
    cat "$out/results.md"
  } >>docs/benchmarks.md
fi
