#!/usr/bin/env bash
# What security costs: `aviary serve` (deploy/local/aviary.toml) under `aviary bench` at
# concurrency 1 and 32 with nothing on, with API keys, with keys and the audit trail
# recording 1 % and 100 % of predictions, and with TLS on the inference listener. Each
# round runs every setting once, in turn, on a fresh server; the server's CPU time per
# request (utime+stime over requests answered) is the steadiest figure on a shared
# machine. Release build, 127.0.0.1 only; the load generator shares the cores.
# Usage: scripts/bench_security.sh [ROUNDS] [SECONDS]. Output: markdown on stdout (and
# in target/bench/security.md). Needs openssl (for the test certificate).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

rounds=${1:-3}
duration=${2:-8}
out=target/bench
mkdir -p "$out"
cargo build --release -p aviary-cli --bin aviary >&2
bin=target/release/aviary
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# An API key and its hash; a CA and a server certificate for 127.0.0.1.
key=bench-key-0123456789
printf '[[keys]]\nname = "bench"\nsha256 = "%s"\nroles = ["infer"]\n' \
  "$(printf %s "$key" | sha256sum | cut -d' ' -f1)" >"$work/api-keys.toml"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
  -subj /CN=bench-ca -keyout "$work/ca.key" -out "$work/ca.crt" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=127.0.0.1 \
  -keyout "$work/tls.key" -out "$work/tls.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\n' >"$work/san.ext"
openssl x509 -req -in "$work/tls.csr" -CA "$work/ca.crt" -CAkey "$work/ca.key" \
  -CAcreateserial -days 1 -extfile "$work/san.ext" -out "$work/tls.crt" 2>/dev/null

models="$root/deploy/local/models"
base=$(sed "s|path = \"models\"|path = \"$models\"|" deploy/local/aviary.toml)
config() { # NAME EXTRA-TOML (before the demo config)
  printf '%s\n\n%s\n' "$2" "$base" >"$work/$1.toml"
}
auth=$'[auth]\nkeys_file = "api-keys.toml"'
config off ''
config keys "$auth"
config audit-1 "$auth"$'\n[audit]\ndir = "audit-1"\npredictions = 0.01'
config audit-100 "$auth"$'\n[audit]\ndir = "audit-100"\npredictions = 1.0'
# TLS goes into the demo config's [server] table.
sed 's|^\[server\]$|[server]\ntls = { cert = "tls.crt", key = "tls.key" }|' "$work/off.toml" >"$work/tls.toml"

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
tck=$(getconf CLK_TCK)

run() { # NAME CONCURRENCY -> one JSON line on stdout
  local name=$1 concurrency=$2
  rm -rf "$work/audit-1" "$work/audit-100"
  "$bin" serve --config "$work/$name.toml" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
    --metrics-listen 127.0.0.1:0 >"$work/$name.out" 2>"$work/$name.err" &
  local pid=$! addr=
  for _ in $(seq 1 300); do
    addr=$(sed -n 's/^aviary: listening on //p' "$work/$name.out")
    [ -n "$addr" ] && break
    sleep 0.1
  done
  [ -n "$addr" ] || { cat "$work/$name.err" >&2; exit 1; }
  local target=(--addr "http://$addr")
  case $name in
    keys|audit-*) target+=(--token "$key") ;;
    tls) target=(--addr "https://$addr" --tls-ca "$work/ca.crt") ;;
  esac
  # Warm-up outside the measurement.
  "$bin" bench "${target[@]}" --model demo --concurrency "$concurrency" --duration 1 --warmup 0 >/dev/null
  local before after result
  before=$(cpu_ticks $pid)
  result=$("$bin" bench "${target[@]}" --model demo --concurrency "$concurrency" --duration "$duration" --warmup 0 --json)
  after=$(cpu_ticks $pid)
  kill -TERM $pid
  wait $pid 2>/dev/null || true
  python3 -c 'import json,sys; r=json.loads(sys.argv[1]); r["setting"]=sys.argv[2]; r["concurrency"]=int(sys.argv[3]); r["cpu_s"]=(int(sys.argv[5])-int(sys.argv[4]))/int(sys.argv[6]); print(json.dumps(r))' \
    "$result" "$name" "$concurrency" "$before" "$after" "$tck"
}

: >"$out/security.jsonl"
for concurrency in 1 32; do
  for round in $(seq 1 "$rounds"); do
    for name in off keys audit-1 audit-100 tls; do
      run "$name" "$concurrency" | tee -a "$out/security.jsonl" >&2
    done
  done
done

python3 - "$out/security.jsonl" "$rounds" "$duration" >"$out/security.md" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
order = ["off", "keys", "audit-1", "audit-100", "tls"]
label = {"off": "nothing on", "keys": "API keys", "audit-1": "keys + audit 1 %",
         "audit-100": "keys + audit 100 %", "tls": "TLS"}
print(f"`scripts/bench_security.sh {sys.argv[2]} {sys.argv[3]}`: demo, {sys.argv[3]} s per run.")
print()
print("| setting | concurrency | round | req/s | p50 µs | p99 µs | server CPU µs/req | errors |")
print("|---|---|---:|---:|---:|---:|---:|---:|")
seen = {}
for r in rows:
    r["cpu_us"] = r["cpu_s"] * 1e6 / r["requests"]
    key = (r["setting"], r["concurrency"])
    seen[key] = seen.get(key, 0) + 1
    print(f"| {label[r['setting']]} | c={r['concurrency']} | {seen[key]} | {r['throughput']:.0f} | {r['p50_us']} | {r['p99_us']} | {r['cpu_us']:.1f} | {sum(r['errors'].values())} |")
print()
print("| setting | concurrency | median req/s | vs nothing on | median p50 µs | median CPU µs/req | vs nothing on |")
print("|---|---|---:|---:|---:|---:|---:|")
for c in sorted({r["concurrency"] for r in rows}):
    med = lambda s, k: statistics.median(r[k] for r in rows if r["setting"] == s and r["concurrency"] == c)
    base_t, base_c = med("off", "throughput"), med("off", "cpu_us")
    for s in order:
        t, p, u = med(s, "throughput"), med(s, "p50_us"), med(s, "cpu_us")
        print(f"| {label[s]} | c={c} | {t:.0f} | {(t / base_t - 1) * 100:+.1f} % | {p:.0f} | {u:.1f} | {(u / base_c - 1) * 100:+.1f} % |")
PY
cat "$out/security.md"
