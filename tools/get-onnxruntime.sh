#!/usr/bin/env bash
# Fetches the ONNX Runtime shared library that darkwatch's `onnx` feature loads at run time
# (the file libonnxruntime.so.<version> inside the PyPI wheel `onnxruntime`; the wheel is
# self-contained: it needs only libc and libstdc++). Needs python3 with pip; nothing is
# installed system-wide.
#
#   eval "$(tools/get-onnxruntime.sh)"        # fetches into .onnxruntime/, sets ORT_DYLIB_PATH
#
# Prints the `export ORT_DYLIB_PATH=…` line on stdout (progress goes to stderr).
# ONNX Runtime >= 1.31 is required (ort 2.0.0-rc.15, api-31); 1.31.1 is what CI tests.
set -euo pipefail
VERSION=${ORT_VERSION:-1.31.1}
DEST=${ORT_DEST:-$(cd "$(dirname "$0")/.." && pwd)/.onnxruntime}
LIB="$DEST/libonnxruntime.so.$VERSION"
if [ ! -f "$LIB" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  echo "get-onnxruntime: downloading onnxruntime==$VERSION from PyPI" >&2
  python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$tmp" "onnxruntime==$VERSION" >&2
  mkdir -p "$DEST"
  python3 - "$tmp" "$DEST" "$VERSION" <<'PY'
import glob, os, sys, zipfile
tmp, dest, version = sys.argv[1:]
wheels = glob.glob(os.path.join(tmp, "onnxruntime-*.whl"))
if not wheels:
    sys.exit("get-onnxruntime: pip downloaded no onnxruntime wheel")
name = f"onnxruntime/capi/libonnxruntime.so.{version}"
with zipfile.ZipFile(wheels[0]) as z:
    if name not in z.namelist():
        sys.exit(f"get-onnxruntime: {wheels[0]} has no {name}")
    out = os.path.join(dest, os.path.basename(name))
    with z.open(name) as src, open(out + ".part", "wb") as dst:
        dst.write(src.read())
    os.replace(out + ".part", out)
PY
  echo "get-onnxruntime: wrote $LIB" >&2
fi
echo "export ORT_DYLIB_PATH=$LIB"
