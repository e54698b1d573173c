#!/usr/bin/env bash
# Benchmark of issue "Progressive delivery": gateway throughput and latency with plain
# weighted routing vs sticky routing (a random user key per request) + two match rules
# + 10% shadow traffic, and vs a shadow that takes 50 ms per call (every request
# mirrored, so nearly all mirrors are dropped), for the demo model at concurrency 1 and 32. Release build,
# 127.0.0.1 only; the load generator shares the machine's cores.
# Output: markdown on stdout (and in target/bench/routing.md).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

duration=${BENCH_DURATION:-10}
out=target/bench
mkdir -p "$out"
cargo build --release -p aviary-cli --bin aviary >&2
bin=target/release/aviary
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null || true' EXIT

# A repository with a third demo version to serve as the shadow.
repo=$(mktemp -d)
cp -r deploy/local/models/demo "$repo/demo"
cp -r "$repo/demo/2" "$repo/demo/3"

cat >"$out/plain.toml" <<TOML
[repository]
path = "$repo"
instances = 2
[routes.demo]
versions = [ { version = "2", weight = 10 }, { version = "1", weight = 90 } ]
TOML
cat >"$out/full.toml" <<TOML
[repository]
path = "$repo"
instances = 2
[routes.demo]
versions = [ { version = "2", weight = 10 }, { version = "1", weight = 90 } ]
sticky = { header = "x-user-id" }
rules = [
  { header = "x-canary", equals = "always", version = "2" },
  { parameter = "tier", prefix = "beta-", version = "2" },
]
shadow = { version = "3", percent = 10, queue = 64, concurrency = 1 }
TOML

cat >"$out/slow-shadow.toml" <<TOML
[repository]
path = "$repo"
instances = 2
[routes.demo]
versions = [ { version = "2", weight = 10 }, { version = "1", weight = 90 } ]
shadow = { version = "3", percent = 100, queue = 64, concurrency = 1, fault = { delay_ms = 50 } }
TOML

run() { # NAME CONFIG EXTRA-BENCH-ARGS...
  local name=$1 config=$2; shift 2
  local file="$out/routing-${name//[^a-z0-9]/_}"
  "$bin" serve --config "$config" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 >"$file.out" 2>"$file.err" &
  pid=$!
  local addr=
  for _ in $(seq 1 200); do
    addr=$(sed -n 's/^aviary: listening on //p' "$file.out")
    [ -n "$addr" ] && break
    sleep 0.1
  done
  [ -n "$addr" ] || { cat "$file.err" >&2; exit 1; }
  for concurrency in 1 32; do
    "$bin" bench --addr "http://$addr" --model demo --concurrency "$concurrency" --duration "$duration" --warmup 2 --json "$@" \
      | python3 -c "import json,sys; r=json.load(sys.stdin); print(f\"| $name | {r['concurrency']} | {r['throughput']:.0f} | {r['p50_us']} | {r['p99_us']} | {sum(r['errors'].values())} |\")"
  done
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
}

{
  echo "| routing | concurrency | req/s | p50 µs | p99 µs | errors |"
  echo "|---|---:|---:|---:|---:|---:|"
  run "weighted 90/10" "$out/plain.toml"
  run "sticky + 2 rules + 10% shadow" "$out/full.toml" --random-header x-user-id
  run "weighted + 100% shadow taking 50 ms" "$out/slow-shadow.toml"
} | tee "$out/routing.md"
rm -rf "$repo"
