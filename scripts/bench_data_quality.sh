#!/usr/bin/env bash
# What data quality costs on the request path: `aviary serve` with the 16-feature tabular
# model (tests/bench-models) under `aviary bench --concurrency 32`, at batch 1 and 64,
# with its model card as shipped (no rules), with [input_rules] on all 16 features
# (reject mode: min, max, NaN and infinities checked on every value), and with those
# rules plus [drift] (every input feature and output recorded, both outputs' classes
# too; /metrics, which runs
# the tests, scraped every second in every setting). Each round runs every setting
# once, in turn; the server's CPU time per request is the steadiest figure on a shared
# machine. Release build, 127.0.0.1 only; the load generator shares the cores.
# Usage: scripts/bench_data_quality.sh [ROUNDS] [SECONDS]. Output: markdown on stdout
# (and in target/bench/data_quality.md).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

rounds=${1:-3}
duration=${2:-10}
out=target/bench
mkdir -p "$out"
cargo build --release -p aviary-cli --bin aviary >&2
bin=target/release/aviary
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# One repository per card: the shipped card, plus the keys of the setting.
features=$(python3 -c 'print(", ".join(f"{{ name = \"f{i}\" }}" for i in range(16)))')
rules=$'[input_rules]\nmode = "reject"\n[input_rules.inputs.input]\nmin = -1.0\nmax = 1.0\nfeatures = ['"$features"$']'
drift=$'[drift]\ncapture = 1000\nwindow = 1000\nclasses = ["probabilities", "label"]'
repository() { # NAME EXTRA-CARD
  mkdir -p "$work/$1/tabular/1"
  cp tests/bench-models/tabular/1/model.onnx "$work/$1/tabular/1/"
  printf '%s\n\n%s\n' "$(cat tests/bench-models/tabular/1/model.toml)" "$2" >"$work/$1/tabular/1/model.toml"
  printf '[repository]\npath = "%s"\n\n[routes.tabular]\nversions = [ { version = "1", weight = 100 } ]\n' \
    "$work/$1" >"$work/$1.toml"
}
repository plain ''
repository rules "$rules"
repository rules-drift "$rules"$'\n\n'"$drift"

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
tck=$(getconf CLK_TCK)

run() { # NAME BATCH -> one JSON line on stdout
  local name=$1 batch=$2
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
  # What Prometheus does, every second: with [drift], each scrape runs the tests.
  (while sleep 1; do curl -s "http://$metrics/metrics" >/dev/null || true; done) &
  scraper=$!
  local load=(--addr "http://$addr" --model tabular --concurrency 32 --batch "$batch" --warmup 0)
  # Warm-up outside the measurement (it also fills the drift reference).
  "$bin" bench "${load[@]}" --duration 2 >/dev/null
  local before after result
  before=$(cpu_ticks $pid)
  result=$("$bin" bench "${load[@]}" --duration "$duration" --json)
  after=$(cpu_ticks $pid)
  kill "$scraper" 2>/dev/null
  kill -TERM $pid
  wait $pid 2>/dev/null || true
  python3 -c 'import json,sys; r=json.loads(sys.argv[1]); r["setting"]=sys.argv[2]; r["batch"]=int(sys.argv[3]); r["cpu_s"]=(int(sys.argv[5])-int(sys.argv[4]))/int(sys.argv[6]); print(json.dumps(r))' \
    "$result" "$name" "$batch" "$before" "$after" "$tck"
}

: >"$out/data_quality.jsonl"
for round in $(seq 1 "$rounds"); do
  for batch in 1 64; do
    for name in plain rules rules-drift; do
      run "$name" "$batch" | tee -a "$out/data_quality.jsonl" >&2
    done
  done
done

python3 - "$out/data_quality.jsonl" "$rounds" "$duration" >"$out/data_quality.md" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
order = ["plain", "rules", "rules-drift"]
label = {"plain": "no rules", "rules": "input rules (16 features)", "rules-drift": "input rules + drift tracking"}
print(f"`scripts/bench_data_quality.sh {sys.argv[2]} {sys.argv[3]}`: tabular (16 features), concurrency 32, {sys.argv[3]} s per run.")
print()
print("| batch | setting | round | req/s | p50 µs | p99 µs | server CPU µs/req | errors |")
print("|---:|---|---:|---:|---:|---:|---:|---:|")
for i, r in enumerate(rows):
    r["cpu_us"] = r["cpu_s"] * 1e6 / r["requests"]
    print(f"| {r['batch']} | {label[r['setting']]} | {i // 6 + 1} | {r['throughput']:.0f} | {r['p50_us']} | {r['p99_us']} | {r['cpu_us']:.1f} | {sum(r['errors'].values())} |")
print()
print("| batch | setting | median req/s | vs no rules | median CPU µs/req | vs no rules |")
print("|---:|---|---:|---:|---:|---:|")
for batch in (1, 64):
    med = lambda s, k: statistics.median(r[k] for r in rows if r["setting"] == s and r["batch"] == batch)
    base_t, base_c = med("plain", "throughput"), med("plain", "cpu_us")
    for s in order:
        t, c = med(s, "throughput"), med(s, "cpu_us")
        print(f"| {batch} | {label[s]} | {t:.0f} | {(t / base_t - 1) * 100:+.1f} % | {c:.1f} | {(c / base_c - 1) * 100:+.1f} % |")
PY
cat "$out/data_quality.md"
