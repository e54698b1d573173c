#!/usr/bin/env bash
# Hot-swap benchmarks: latency of the larger model (mlp) in steady state and while it
# is reloaded every 200 ms (driven from the load generator's own process, and by one
# `aviary ctl` process per reload), time to load and swap, RSS after 1 and after 200
# swaps, and how soon a weight change is in effect. Release build, 127.0.0.1 only; the
# load generator shares the machine's cores with the server.
# Output: markdown on stdout (and in target/bench/swap.md).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

duration=${BENCH_DURATION:-10}
concurrency=${BENCH_CONCURRENCY:-4}
out=target/bench
mkdir -p "$out"
cargo build --release -p aviary-cli --bin aviary >&2
bin=target/release/aviary
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null || true' EXIT

"$bin" serve --config deploy/local/aviary.toml --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 \
  >"$out/swap-serve.out" 2>"$out/swap-serve.err" &
pid=$!
for _ in $(seq 1 200); do
  addr=$(sed -n 's/^aviary: listening on //p' "$out/swap-serve.out")
  admin=$(sed -n 's/^aviary: admin listening on //p' "$out/swap-serve.out")
  [ -n "$addr" ] && [ -n "$admin" ] && break
  sleep 0.1
done
[ -n "$admin" ] || { cat "$out/swap-serve.err" >&2; exit 1; }
ctl() { "$bin" ctl --admin "http://$admin" "$@"; }
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$pid/status"; }

bench() { "$bin" bench --addr "http://$addr" --model mlp --concurrency "$concurrency" --duration "$duration" --warmup 2 --json "$@"; }

steady=$(bench)

# The same load while the load generator itself reloads mlp 1 every 200 ms.
in_process=$(bench --reload-version 1 --reload-every-ms 200 --admin "http://$admin")

# The same load while mlp 1 is reloaded every 200 ms by a new `aviary ctl` each time.
bench >"$out/swap-during.json" &
bench_pid=$!
sleep 2 # the bench's warm-up
# The answers are parsed afterwards: a Python start per reload would cost more CPU
# than the reload itself and be measured with it.
: >"$out/swap-reloads.jsonl"
end=$((SECONDS + duration))
while [ $SECONDS -lt $end ]; do
  ctl reload mlp 1 --json >>"$out/swap-reloads.jsonl"
  sleep 0.2
done
wait $bench_pid
mapfile -t load_ms < <(python3 -c 'import json, sys; [print(json.loads(l)["load_ms"]) for l in open(sys.argv[1]) if l.strip()]' "$out/swap-reloads.jsonl")
during=$(cat "$out/swap-during.json")

# RSS after 1 and after 200 swaps (no load).
ctl reload mlp 1 --json >/dev/null
rss_1=$(rss_kib)
for _ in $(seq 1 199); do ctl reload mlp 1 --json >/dev/null; done
rss_200=$(rss_kib)

# A weight change: every request sent after set-weights returns follows the new table.
ctl set-weights demo 1=0 2=100 >/dev/null
after=$("$bin" infer --addr "http://$addr" --model demo --input '[[5.1,3.5,1.4,0.2]]' --repeat 200 --json)
old_split=$(python3 -c "import json,sys; v=json.loads(sys.argv[1])['versions']; print(sum(n for k,n in v.items() if k!='2'))" "$after")
started=$(date +%s%N)
ctl set-weights demo 1=90 2=10 >/dev/null
set_ms=$(( ($(date +%s%N) - started) / 1000000 ))

python3 - "$steady" "$in_process" "$during" "$rss_1" "$rss_200" "$old_split" "$set_ms" "${load_ms[@]}" >"$out/swap.md" <<'PY'
import json, statistics, sys
steady, in_process, during = (json.loads(a) for a in sys.argv[1:4])
rss_1, rss_200, old_split, set_ms = (int(a) for a in sys.argv[4:8])
loads = [int(x) for x in sys.argv[8:]]
print("| mlp, concurrency %d | req/s | p50 µs | p99 µs | p99 / steady | errors |" % steady["concurrency"])
print("|---|---:|---:|---:|---:|---:|")
for name, r in (("steady state", steady),
                ("reload every 200 ms, in-process driver", in_process),
                ("reload every 200 ms, one `aviary ctl` each", during)):
    print(f"| {name} | {r['throughput']:.0f} | {r['p50_us']} | {r['p99_us']} | "
          f"{r['p99_us'] / steady['p99_us']:.2f}x | {sum(r['errors'].values())} |")
print()
r = in_process["reloads"]
print(f"In-process driver: {r['done']} reloads ({r['failed']} failed), load + swap median "
      f"{r['load_ms_p50']} ms, max {r['load_ms_max']} ms. Through ctl: {len(loads)} reloads.")
print(f"Load + warm-up + swap of mlp (1.8 MB, 2 sessions), from the admin API: "
      f"median {statistics.median(loads):.0f} ms, max {max(loads)} ms.")
print(f"RSS after 1 swap {rss_1 / 1024:.1f} MiB, after 200 swaps {rss_200 / 1024:.1f} MiB "
      f"({(rss_200 - rss_1) * 100 / rss_1:+.1f}%).")
print(f"Weight change: 200 requests sent after `ctl set-weights demo 1=0 2=100` returned, "
      f"{old_split} answered by the old split; the `aviary ctl set-weights` process takes {set_ms} ms end to end.")
PY
cat "$out/swap.md"
