#!/usr/bin/env sh
# Puts ONNX Runtime's shared library (and its licence files) into DEST, from the
# official onnxruntime wheel on PyPI: the one source of the library, for the checkout
# (scripts/setup.sh) and for the container image (Dockerfile).
#   scripts/fetch-onnxruntime.sh DEST   ->  DEST/libonnxruntime.so.<version>
# Needs python3 with pip. Does nothing when the library is already there.
set -eu

version=1.31.1
dest=${1:?usage: fetch-onnxruntime.sh DEST}
python=${PYTHON:-python3}
lib=$dest/libonnxruntime.so.$version

[ -f "$lib" ] && exit 0
echo "fetch-onnxruntime: onnxruntime==$version from PyPI"
download=$(mktemp -d)
trap 'rm -rf "$download"' EXIT
"$python" -m pip download --quiet --no-deps --only-binary=:all: \
  --dest "$download" "onnxruntime==$version"
mkdir -p "$dest"
"$python" - "$download"/onnxruntime-"$version"-*.whl "$dest" "$version" <<'PY'
import sys, zipfile, pathlib
wheel, dest, version = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]
name = f"onnxruntime/capi/libonnxruntime.so.{version}"
with zipfile.ZipFile(wheel) as z:
    # Written under a temporary name and renamed: an interrupted fetch never leaves a
    # truncated library where the loader looks.
    partial = dest / f".libonnxruntime.so.{version}.partial"
    partial.write_bytes(z.read(name))
    for extra in ("LICENSE", "ThirdPartyNotices.txt"):
        for info in z.infolist():
            if info.filename.endswith("/" + extra) or info.filename == extra:
                (dest / extra).write_bytes(z.read(info))
                break
    partial.rename(dest / f"libonnxruntime.so.{version}")
PY
echo "fetch-onnxruntime: installed $lib"
