#!/usr/bin/env bash
# Build and install llama-cpp-python (GGUF export, quantization and an OpenAI-compatible
# server) for `oml eval --parts robustness`'s gguf_* attacks and their tests.
#
# Why a script and not a pip dependency: llama-cpp-python ships only as an sdist, and its
# default native build dies with "Illegal instruction" on machines whose CPU reports
# AVX-512/AMX features the VM does not allow, so the build must name the instruction sets
# explicitly. The wheel is built once per machine and cached outside the repository.
#
# Idempotent: a second run finds the installed package and the unpacked sdist and exits at
# once. A file lock keeps two callers (e.g. parallel test sessions) from building twice.
#
# Environment:
#   PYTHON     interpreter whose environment receives the package (default: python on PATH)
#   OML_CACHE  cache root (default ~/.cache/oml); everything goes under $OML_CACHE/llama-cpp/
#
# On success the last line printed is the llama.cpp source folder (the sdist's
# vendor/llama.cpp, which carries convert_hf_to_gguf.py and gguf-py/).
set -euo pipefail

VERSION="0.3.36"
PY="${PYTHON:-$(command -v python || command -v python3)}"
CACHE="${OML_CACHE:-$HOME/.cache/oml}/llama-cpp"
SDIST_DIR="$CACHE/sdist"
WHEEL_DIR="$CACHE/wheels"
SRC_ROOT="$CACHE/src"
SRC="$SRC_ROOT/llama_cpp_python-$VERSION"
# Portable x86-64 build: the native one uses instructions the VM traps (see header).
CMAKE_ARGS_PORTABLE="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"

mkdir -p "$CACHE"

installed() {
  # the server extra (uvicorn, fastapi, sse) and sentencepiece (the converter's Llama path)
  # must import too, not just the core package
  "$PY" - "$VERSION" <<'EOF' >/dev/null 2>&1
import sys, importlib.metadata as md
assert md.version("llama_cpp_python") == sys.argv[1]
import llama_cpp, llama_cpp.server.app, sentencepiece  # noqa: F401
EOF
}

ready() {
  installed && [ -f "$SRC/vendor/llama.cpp/convert_hf_to_gguf.py" ] \
    && [ -d "$SRC/vendor/llama.cpp/gguf-py" ]
}

if ready; then
  echo "$SRC/vendor/llama.cpp"
  exit 0
fi

exec 9>"$CACHE/.build.lock"
if ! flock -n 9; then
  echo "llama_cpp.sh: another build holds $CACHE/.build.lock; waiting for it" >&2
  flock 9
fi
# Someone else may have finished while we waited.
if ready; then
  echo "$SRC/vendor/llama.cpp"
  exit 0
fi

# 1. The sdist (kept: it is both the wheel's source and the converter's home).
SDIST="$(ls "$SDIST_DIR"/llama_cpp_python-"$VERSION".tar.gz 2>/dev/null || true)"
if [ -z "$SDIST" ]; then
  echo "llama_cpp.sh: downloading the llama-cpp-python $VERSION sdist" >&2
  "$PY" -m pip download -q --no-deps --no-binary=:all: "llama-cpp-python==$VERSION" \
    -d "$SDIST_DIR.tmp"
  mkdir -p "$SDIST_DIR"
  mv "$SDIST_DIR.tmp"/llama_cpp_python-"$VERSION".tar.gz "$SDIST_DIR"/
  rm -rf "$SDIST_DIR.tmp"
  SDIST="$SDIST_DIR/llama_cpp_python-$VERSION.tar.gz"
fi

# 2. The unpacked source, renamed into place only when complete.
if [ ! -f "$SRC/vendor/llama.cpp/convert_hf_to_gguf.py" ]; then
  rm -rf "$SRC_ROOT.tmp"
  mkdir -p "$SRC_ROOT.tmp" "$SRC_ROOT"
  tar -xzf "$SDIST" -C "$SRC_ROOT.tmp"
  rm -rf "$SRC"
  mv "$SRC_ROOT.tmp/llama_cpp_python-$VERSION" "$SRC"
  rm -rf "$SRC_ROOT.tmp"
fi

# 3. The wheel (~10 minutes on 2 cores), built in a scratch folder and moved in when done.
WHEEL="$(ls "$WHEEL_DIR"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -1 || true)"
if [ -z "$WHEEL" ]; then
  echo "llama_cpp.sh: building the llama-cpp-python $VERSION wheel (about 10 minutes)" >&2
  rm -rf "$WHEEL_DIR.tmp"
  mkdir -p "$WHEEL_DIR.tmp" "$WHEEL_DIR"
  CMAKE_ARGS="$CMAKE_ARGS_PORTABLE" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
    "$PY" -m pip wheel --no-deps -w "$WHEEL_DIR.tmp" "$SDIST"
  mv "$WHEEL_DIR.tmp"/llama_cpp_python-"$VERSION"-*.whl "$WHEEL_DIR"/
  rm -rf "$WHEEL_DIR.tmp"
  WHEEL="$(ls "$WHEEL_DIR"/llama_cpp_python-"$VERSION"-*.whl | head -1)"
fi

# 4. Install from the cached wheel; --only-binary keeps pip from rebuilding the sdist natively.
echo "llama_cpp.sh: installing $WHEEL" >&2
"$PY" -m pip install -q --find-links "$WHEEL_DIR" --only-binary=llama-cpp-python \
  "llama-cpp-python[server]==$VERSION" sentencepiece

if ! ready; then
  echo "llama_cpp.sh: installed, but llama_cpp / llama_cpp.server / sentencepiece do not import in $PY" >&2
  exit 1
fi
echo "$SRC/vendor/llama.cpp"
