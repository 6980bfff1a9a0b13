#!/usr/bin/env bash
# One prepared GPU run: fills every GPU row of docs/benchmarks.md in one go.
#
#   bash benchmarks/gpu.sh [--cpu-tiny] [--budget SECONDS] [OUTFILE]
#
# Full mode (default; one H100/H200-class GPU, about 8 min): random weights throughout,
#   adapter        benchmarks/adapter.py     --preset paper, bfloat16, 1/3/8 concepts
#   mod-diffusers  benchmarks/modulation.py  --host diffusers --preset flux1-full, 1024x1024
#   mod-comfy      benchmarks/modulation.py  --host comfy (only when COMFYUI_PATH is set)
#   learn          benchmarks/learn.py       --preset flux1 (one Learn Concept step at FLUX.1 size)
#   learn-memory   benchmarks/learn_memory.py --device cuda (one FLUX.1 block of each kind: memory, time, FLOPs)
#   train-pretrain benchmarks/training.py    --mode full --stages pretrain
#   train-train    benchmarks/training.py    --mode full --stages train
# Tiny mode (--cpu-tiny or GPU_SH_TINY=1): the same parts with the tiny presets on the CPU, in
# about a minute; it checks the script, its numbers mean nothing.
#
# Every part runs under `timeout` (its own cap, never more than what is left of the budget), a
# failed or timed-out part is recorded and the next one runs. All results go into ONE markdown
# file, rewritten after every part (so a killed run still leaves what it measured): each part's
# command line, exit code, wall time, JSON result and output tail, plus nvidia-smi and the
# torch/CUDA versions. OUTFILE: the argument, else $OUT/gpu_results.md when OUT is set, else
# benchmarks/out/gpu_results.md.
#
# Environment: PYTHON (default: python, else python3), GPU_SH_TINY=1, GPU_SH_BUDGET_S (seconds for
# all parts; default 480 full, 150 tiny), GPU_SH_PARTS (comma-separated part names to run, default
# all), COMFYUI_PATH (adds mod-comfy: a ComfyUI checkout, the user's own or a tree from the cache
# that .ci/run reads). The training parts use the FLUX.1 tokenizer files shipped in world/flux.
# Exit status: 0 when every part that ran passed, 1 otherwise.

set -u -o pipefail

tiny="${GPU_SH_TINY:-0}"
budget=""
outfile=""
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu-tiny|--tiny) tiny=1 ;;
        --budget) shift; budget="${1:?--budget needs seconds}" ;;
        --budget=*) budget="${1#--budget=}" ;;
        -h|--help) sed -n '2,28p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "gpu.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) [ -z "$outfile" ] || { echo "gpu.sh: one OUTFILE only" >&2; exit 2; }; outfile="$1" ;;
    esac
    shift
done
[ "$tiny" = 1 ] || tiny=0

# The output path is taken relative to where the script was called from, then we move to the repo root.
if [ -z "$outfile" ]; then
    if [ -n "${OUT:-}" ]; then outfile="$OUT/gpu_results.md"; fi
fi
case "$outfile" in
    "") ;;
    /*) ;;
    *) outfile="$PWD/$outfile" ;;
esac
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
[ -n "$outfile" ] || outfile="$REPO/benchmarks/out/gpu_results.md"
mkdir -p "$(dirname "$outfile")" || exit 2

if [ -z "${PYTHON:-}" ]; then
    if command -v python >/dev/null 2>&1; then PYTHON=python; else PYTHON=python3; fi
fi
if [ -z "$budget" ]; then
    if [ "$tiny" = 1 ]; then budget="${GPU_SH_BUDGET_S:-150}"; else budget="${GPU_SH_BUDGET_S:-480}"; fi
fi
export PYTHONUNBUFFERED=1
mode_name=$([ "$tiny" = 1 ] && echo "cpu-tiny" || echo "full (GPU)")

WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_sh.XXXXXX")" || exit 2
trap 'rm -rf "$WORK"' EXIT
: >"$WORK/summary.md"
: >"$WORK/sections.md"
: >"$WORK/setup.md"

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
script_start=$(now)

# ---------------------------------------------------------------------------------------------------
# Setup: the `mod_adapter` package and the tokenizer files, wherever this copy of the repo lives.
# ---------------------------------------------------------------------------------------------------
{
    echo "- python: \`$PYTHON\` ($(command -v "$PYTHON" 2>/dev/null || echo 'not found'))"
    if timeout 120 "$PYTHON" -c "import mod_adapter.modules" >/dev/null 2>&1; then
        echo "- mod_adapter: importable as installed ($(timeout 120 "$PYTHON" -c 'import mod_adapter, os; print(os.path.dirname(mod_adapter.__file__))' 2>/dev/null))"
    else
        # Not installed (e.g. a bare GPU machine): the repository root is the package, so a link named
        # mod_adapter on PYTHONPATH makes it importable without installing anything.
        mkdir -p "$WORK/pkgroot" && ln -s "$REPO" "$WORK/pkgroot/mod_adapter"
        export PYTHONPATH="$WORK/pkgroot${PYTHONPATH:+:$PYTHONPATH}"
        if timeout 120 "$PYTHON" -c "import mod_adapter.modules" >/dev/null 2>&1; then
            echo "- mod_adapter: not installed; imported from this checkout through a link on PYTHONPATH"
        else
            echo "- mod_adapter: NOT importable (the parts will fail): $(timeout 120 "$PYTHON" -c 'import mod_adapter.modules' 2>&1 | tail -1)"
        fi
    fi
    echo "- COMFYUI_PATH: ${COMFYUI_PATH:-unset (the comfy host is not run)}"
} >>"$WORK/setup.md"

# ---------------------------------------------------------------------------------------------------
# Environment: nvidia-smi, torch/CUDA and library versions.
# ---------------------------------------------------------------------------------------------------
{
    echo '```'
    if command -v nvidia-smi >/dev/null 2>&1; then
        timeout 30 nvidia-smi 2>&1
        echo
        timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem,power.limit \
            --format=csv 2>&1
    else
        echo "nvidia-smi: not found"
    fi
    echo '```'
    echo
    echo '```'
    timeout 120 "$PYTHON" - <<'PY' 2>&1
import importlib, os, platform
import torch
print(f"python {platform.python_version()} ({platform.machine()}), cpu cores {os.cpu_count()}, "
      f"load average {os.getloadavg() if hasattr(os, 'getloadavg') else None}")
print(f"torch {torch.__version__}, built for CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"threads {torch.get_num_threads()}")
print(f"cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"  cuda:{i} {p.name}, capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB, "
              f"{p.multi_processor_count} SMs")
    print(f"  flash SDP {torch.backends.cuda.flash_sdp_enabled()}, mem-efficient SDP "
          f"{torch.backends.cuda.mem_efficient_sdp_enabled()}, TF32 matmul {torch.backends.cuda.matmul.allow_tf32}")
for name in ("diffusers", "transformers", "open_clip", "webdataset", "safetensors", "tokenizers", "sentencepiece",
             "PIL", "numpy", "einops", "mod_adapter"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')}")
    except Exception as error:  # a missing package fails the parts that need it; say so up front
        print(f"{name}: NOT importable ({type(error).__name__}: {error})")
PY
    echo "(exit $?)"
    echo '```'
    if [ -n "${COMFYUI_PATH:-}" ]; then
        echo
        echo "ComfyUI at \`$COMFYUI_PATH\`: $(cat "$COMFYUI_PATH/comfyui_version.py" 2>/dev/null | grep -o '"[^"]*"' | head -1 || echo 'version unknown')"
    fi
    if git rev-parse HEAD >/dev/null 2>&1; then
        echo
        echo "git: $(git rev-parse HEAD), $(git status --porcelain 2>/dev/null | wc -l | tr -d ' ') changed/untracked paths"
    fi
} >"$WORK/env.md" 2>&1

render() {
    local tmp="$outfile.tmp.$$"
    {
        echo "# benchmarks/gpu.sh results"
        echo
        echo "- mode: $mode_name"
        echo "- started: $(date -d "@${script_start%.*}" -Is 2>/dev/null || date -Is), host $(hostname 2>/dev/null || echo '?')"
        echo "- budget for all parts: ${budget} s; elapsed so far: $(secs "$script_start" "$(now)") s"
        echo "- command: \`bash benchmarks/gpu.sh$([ "$tiny" = 1 ] && echo ' --cpu-tiny') $outfile\`"
        cat "$WORK/setup.md"
        echo
        echo "## Summary"
        echo
        echo "| part | status | exit | wall s | timeout s | command |"
        echo "| --- | --- | --- | --- | --- | --- |"
        cat "$WORK/summary.md"
        echo
        echo "## Environment"
        echo
        cat "$WORK/env.md"
        echo
        cat "$WORK/sections.md"
    } >"$tmp" && mv -f "$tmp" "$outfile"
}
render

# ---------------------------------------------------------------------------------------------------
# Parts
# ---------------------------------------------------------------------------------------------------
cuda_ok=1
if [ "$tiny" = 0 ] && ! timeout 120 "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    cuda_ok=0
fi
failures=0
tail_lines=$([ "$tiny" = 1 ] && echo 40 || echo 80)
min_start=$([ "$tiny" = 1 ] && echo 10 || echo 45)

# run_part NAME CAP_SECONDS JSON_FILE_OR_- COMMAND...
run_part() {
    local name="$1" cap="$2" json="$3"
    shift 3
    local cmdline="$*"
    if [ -n "${GPU_SH_PARTS:-}" ] && [[ ",$GPU_SH_PARTS," != *",$name,"* ]]; then
        return 0
    fi
    local elapsed left limit
    elapsed=$(secs "$script_start" "$(now)")
    left=$(awk -v b="$budget" -v e="$elapsed" 'BEGIN { printf "%d", b - e }')
    limit=$(( cap < left ? cap : left ))
    if [ "$cuda_ok" = 0 ]; then
        skip_part "$name" "$cmdline" "skipped: no CUDA device visible to torch"
        return 0
    fi
    if [ "$limit" -lt "$min_start" ]; then
        skip_part "$name" "$cmdline" "skipped: ${left} s of the ${budget} s budget left"
        return 0
    fi
    echo "[gpu.sh] $name (timeout ${limit} s): $cmdline" >&2
    local log="$WORK/$name.log" start end rc wall status
    start=$(now)
    timeout -k 15 "$limit" "$@" >"$log" 2>&1
    rc=$?
    end=$(now)
    wall=$(secs "$start" "$end")
    case "$rc" in
        0) status="ok" ;;
        124|137) status="TIMEOUT"; failures=$((failures + 1)) ;;
        *) status="FAILED"; failures=$((failures + 1)) ;;
    esac
    echo "[gpu.sh] $name: $status (exit $rc) in ${wall} s" >&2
    echo "| $name | $status | $rc | $wall | $limit | \`$cmdline\` |" >>"$WORK/summary.md"
    {
        echo "## $name"
        echo
        echo "- command: \`$cmdline\`"
        echo "- status: $status, exit code $rc, wall time ${wall} s (timeout ${limit} s)"
        echo
        if [ "$json" != "-" ] && [ -s "$json" ]; then
            echo "JSON result:"
            echo
            echo '```json'
            cat "$json"
            echo
            echo '```'
            echo
        fi
        local total
        total=$(wc -l <"$log" | tr -d ' ')
        echo "Output (stdout + stderr), last $(( total < tail_lines ? total : tail_lines )) of $total lines:"
        echo
        echo '```'
        tail -n "$tail_lines" "$log" | cut -c1-2000
        echo '```'
        echo
    } >>"$WORK/sections.md"
    render
}

skip_part() {
    local name="$1" cmdline="$2" why="$3"
    echo "[gpu.sh] $name: $why" >&2
    failures=$((failures + 1))  # a row left unmeasured
    echo "| $name | $why | - | - | - | \`$cmdline\` |" >>"$WORK/summary.md"
    printf '## %s\n\n- command: `%s`\n- %s\n\n' "$name" "$cmdline" "$why" >>"$WORK/sections.md"
    render
}

P="$PYTHON"
if [ "$tiny" = 1 ]; then
    # One thread: on a small shared CPU, OpenMP threads waiting for each other make runs 20-40x slower.
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    run_part adapter 40 "$WORK/adapter.json" \
        "$P" benchmarks/adapter.py --preset tiny --device cpu --dtype float32 --repeats 3 --warmup 1 --json "$WORK/adapter.json"
    run_part mod-diffusers 40 "$WORK/mod-diffusers.json" \
        "$P" benchmarks/modulation.py --host diffusers --preset tiny --device cpu --steps 2 --repeats 2 --concepts 1,3,8 \
        --threads 1 --no-memory --json "$WORK/mod-diffusers.json"
    if [ -n "${COMFYUI_PATH:-}" ]; then
        run_part mod-comfy 50 "$WORK/mod-comfy.json" \
            "$P" benchmarks/modulation.py --host comfy --comfyui "$COMFYUI_PATH" --preset tiny --device cpu --steps 2 \
            --repeats 2 --concepts 1,3,8 --threads 1 --no-memory --json "$WORK/mod-comfy.json"
    fi
    run_part learn 40 "$WORK/learn.json" \
        "$P" benchmarks/learn.py --preset tiny --device cpu --resolution 128 --steps 3 --warmup 1 --threads 1 --json "$WORK/learn.json"
    run_part learn-memory 40 "$WORK/learn-memory.json" \
        "$P" benchmarks/learn_memory.py --quick --device cpu --threads 1 --out "$WORK/learn-memory.json"
    run_part train-pretrain 50 "$WORK/train-pretrain.json" \
        "$P" benchmarks/training.py --mode tiny --device cpu --steps 3 --stages pretrain --json-out "$WORK/train-pretrain.json"
    run_part train-train 50 "$WORK/train-train.json" \
        "$P" benchmarks/training.py --mode tiny --device cpu --steps 3 --stages train --json-out "$WORK/train-train.json"
else
    # Cheapest and surest first, training last: a part that overruns only costs the ones after it.
    run_part adapter 150 "$WORK/adapter.json" \
        "$P" benchmarks/adapter.py --preset paper --device cuda --dtype bfloat16 --repeats 20 --json "$WORK/adapter.json"
    run_part mod-diffusers 180 "$WORK/mod-diffusers.json" \
        "$P" benchmarks/modulation.py --host diffusers --preset flux1-full --device cuda --dtype bfloat16 --resolution 1024 \
        --concepts 1,3,8 --json "$WORK/mod-diffusers.json"
    run_part learn 150 "$WORK/learn.json" \
        "$P" benchmarks/learn.py --preset flux1 --json "$WORK/learn.json"
    run_part learn-memory 120 "$WORK/learn-memory.json" \
        "$P" benchmarks/learn_memory.py --device cuda --out "$WORK/learn-memory.json"
    if [ -n "${COMFYUI_PATH:-}" ]; then
        run_part mod-comfy 180 "$WORK/mod-comfy.json" \
            "$P" benchmarks/modulation.py --host comfy --comfyui "$COMFYUI_PATH" --preset flux1-full --device cuda \
            --dtype bfloat16 --resolution 1024 --concepts 1,3,8 --json "$WORK/mod-comfy.json"
    fi
    run_part train-pretrain 180 "$WORK/train-pretrain.json" \
        "$P" benchmarks/training.py --mode full --device cuda --steps 6 --stages pretrain --json-out "$WORK/train-pretrain.json"
    run_part train-train 240 "$WORK/train-train.json" \
        "$P" benchmarks/training.py --mode full --device cuda --steps 6 --stages train --json-out "$WORK/train-train.json"
fi

render
echo "[gpu.sh] done in $(secs "$script_start" "$(now)") s, $failures part(s) failed or not run; results: $outfile" >&2
[ "$failures" = 0 ]
