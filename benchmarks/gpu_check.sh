#!/usr/bin/env bash
# `make gpu-check`: the whole bench (`fusion-seg bench --device cuda`, every section) and the demo
# pipeline on CUDA, on a lent GPU machine, in under 8 minutes.
#
# That machine (x86-64, CPython 3.12 with torch, torchvision, timm, numpy, ...) has no package
# registry and lacks zarr, numcodecs and dask: run `make gpu-wheels` on a machine with a registry
# first, and carry .whl/ along. They are installed with --no-deps into $GPU_CHECK_SITE (default
# /tmp/site); torch and the rest of the image are never touched. fusion-seg runs from the
# repository as `python3 -m fusion_seg`.
#
# Results: when $OUT is set, $OUT/bench-cuda.json, $OUT/BENCHMARKS.md (its cuda block
# updated), $OUT/demo-metrics.json and $OUT/gpu-check.log; else benchmarks/bench-cuda.json
# and BENCHMARKS.md here.
#
# Dry run on a CPU machine with the project's virtualenv (a few minutes; BENCHMARKS.md is not
# touched, a copy in $OUT or a temporary folder is):
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_TINY=1 PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh
#
# Settings (environment): GPU_CHECK_DEVICE (cuda), GPU_CHECK_TINY (0), PYTHON (set: use that
# interpreter and its packages, install nothing), GPU_CHECK_BUDGET_S (450: every part's time
# limit is cut to what is left of it), GPU_CHECK_DEMO_S (120: kept back from the bench for the
# demo), GPU_CHECK_VIEWS, GPU_CHECK_REPEATS, GPU_CHECK_SIZE, GPU_CHECK_SCALING_SIZES,
# GPU_CHECK_FORWARD_SIZES, GPU_CHECK_SECTIONS, GPU_CHECK_CAMVID, GPU_CHECK_DEMO_EPOCH_SCALE,
# GPU_CHECK_SITE, GPU_CHECK_KEEP (1: keep the scratch folder).
set -euo pipefail
if [[ -n ${OUT:-} ]]; then mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd); fi  # before the cd below
cd "$(dirname "$0")/.."

DEVICE=${GPU_CHECK_DEVICE:-cuda}
TINY=${GPU_CHECK_TINY:-0}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
DEMO_RESERVE=${GPU_CHECK_DEMO_S:-120}
SITE=${GPU_CHECK_SITE:-/tmp/site}
# No CamVid on the GPU machine: synthetic images, as in the dry run, unless a CamVid root is given.
CAMVID=${GPU_CHECK_CAMVID:-/nonexistent/camvid}
if [[ $TINY == 1 ]]; then
    SIZE=${GPU_CHECK_SIZE:-64x96}
    VIEWS=${GPU_CHECK_VIEWS:-4}
    REPEATS=${GPU_CHECK_REPEATS:-1}
    SCALING=${GPU_CHECK_SCALING_SIZES:-64x96}
    FORWARD=${GPU_CHECK_FORWARD_SIZES:-64x96,128x256}
    DEMO_SCALE=${GPU_CHECK_DEMO_EPOCH_SCALE:-0.03}  # 1 of the demo's 30 epochs
else
    SIZE=${GPU_CHECK_SIZE:-360x480}
    VIEWS=${GPU_CHECK_VIEWS:-64}
    REPEATS=${GPU_CHECK_REPEATS:-10}
    SCALING=${GPU_CHECK_SCALING_SIZES:-360x480,1024x2048}  # each size: 4 fresh processes (about 10 s each)
    FORWARD=${GPU_CHECK_FORWARD_SIZES:-360x480,512x1024}
    DEMO_SCALE=${GPU_CHECK_DEMO_EPOCH_SCALE:-1}
fi
SECTIONS=${GPU_CHECK_SECTIONS:-extraction,format,training,scaling,inference}
OUT=${OUT:-}
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=${TQDM_MININTERVAL:-20} PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
stamp() { while IFS= read -r line; do printf '[%(%T)T] %s\n' -1 "$line"; done; }

T0=$(now)
FAILED=()
TIMES=()

# part NAME LIMIT_S CMD...: run CMD under `timeout`, its limit cut to what is left of the budget.
part() {
    local name=$1 limit=$2 rc=0 t left
    shift 2
    left=$(awk -v t0="$T0" -v now="$(now)" -v b="$BUDGET" 'BEGIN { printf "%d", b - (now - t0) }')
    if ((limit > left)); then limit=$left; fi
    if (( limit < 20 )); then
        echo "== $name: skipped, ${left}s left of the ${BUDGET}s budget"
        FAILED+=("$name (skipped)"); TIMES+=("$name: skipped")
        return 0
    fi
    echo "== $name (time limit ${limit}s)"
    t=$(now)
    timeout --kill-after=10 "$limit" "$@" 2>&1 | stamp || rc=$?
    local took note=""
    took=$(since "$t")
    if ((rc == 124 || rc == 137)); then note=" (time limit)"; fi
    echo "== $name: $took s, exit $rc$note"
    TIMES+=("$name: $took s, exit $rc$note")
    if ((rc != 0)); then FAILED+=("$name (exit $rc$note)"); fi
}

main() {
    local tiny=""
    if [[ $TINY == 1 ]]; then tiny=", tiny sizes (dry run)"; fi
    echo "gpu-check: device $DEVICE$tiny, budget ${BUDGET}s, $(date -u +%FT%TZ)"

    # ---------------------------------------------------------------- wheels
    local listed=0 missing=()
    while IFS= read -r req; do
        req=${req%%#*}; req=${req//[[:space:]]/}
        [[ -z $req ]] && continue
        listed=$((listed + 1))
        local name=${req%%==*} version=${req#*==}
        name=$(tr 'A-Z.-' 'a-z__' <<<"$name")
        local found=(.whl/"${name}-${version}"-*.whl)
        [[ -f ${found[0]} ]] || missing+=("$req")
    done < benchmarks/gpu-wheels.txt
    if [[ ! -d .whl ]]; then
        echo "gpu-check: no .whl/ here; run \`make gpu-wheels\` first (where a package registry is reachable) and carry .whl/ along." >&2
        return 2
    elif ((${#missing[@]})); then
        echo "gpu-check: .whl/ lacks ${missing[*]}; run \`make gpu-wheels\` first (where a package registry is reachable)." >&2
        return 2
    fi
    if [[ -n ${PYTHON:-} ]]; then
        echo "== wheels: ${listed} present in .whl/ ($(du -sh .whl | cut -f1)); PYTHON=$PYTHON given, so not installed"
        export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    else
        PYTHON=python3
        local t; t=$(now)
        if "$PYTHON" -m pip --version >/dev/null 2>&1; then
            timeout 120 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target "$SITE" .whl/*.whl
        else  # no pip: a wheel is a zip of what goes into site-packages
            "$PYTHON" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' \
                "$SITE" .whl/*.whl
        fi
        export PYTHONPATH=$SITE:$PWD
        TIMES+=("wheels: $(since "$t") s")
        echo "== wheels: ${listed} installed into $SITE in $(since "$t") s"
    fi

    # ---------------------------------------------------------------- environment
    echo "== environment"
    if command -v nvidia-smi >/dev/null; then nvidia-smi -L || true; else echo "nvidia-smi: not found"; fi
    local t; t=$(now)
    GPU_CHECK_DEVICE=$DEVICE timeout 120 "$PYTHON" - <<'EOF'
import importlib.metadata as md
import os
import platform
import sys

import torch

print(f"python {platform.python_version()} ({sys.executable}), torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"cuda available: {torch.cuda.is_available()}" + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
for name in ("timm", "torchvision", "zarr", "numcodecs", "dask", "numpy", "fusion_seg"):
    mod = __import__(name)
    print(f"  {name} {getattr(mod, '__version__', '')} from {os.path.dirname(mod.__file__)}")
# What the wheels, installed without their dependencies, need from the image.
from packaging.requirements import Requirement

for dist in ("zarr", "numcodecs", "dask", "donfig", "partd"):
    for line in md.requires(dist) or []:
        req = Requirement(line)
        if req.marker and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            print(f"  WARNING: {dist} needs {req}, which is not installed")
            continue
        if not req.specifier.contains(have, prereleases=True):
            print(f"  WARNING: {dist} needs {req}, {req.name} {have} is installed")
if os.environ["GPU_CHECK_DEVICE"].startswith("cuda") and not torch.cuda.is_available():
    sys.exit("gpu-check: CUDA is not available here; nothing to check (GPU_CHECK_DEVICE=cpu for a dry run).")
EOF
    TIMES+=("environment: $(since "$t") s")

    # ---------------------------------------------------------------- bench
    local work json md
    work=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
    if [[ ${GPU_CHECK_KEEP:-0} == 1 ]]; then echo "scratch: $work"; else trap "rm -rf '$work'" EXIT; fi
    if [[ -n $OUT ]]; then json=$OUT/bench-$DEVICE.json; elif [[ $TINY == 1 ]]; then json=$work/bench-$DEVICE.json
    else json=benchmarks/bench-$DEVICE.json; fi
    md=BENCHMARKS.md
    if [[ $TINY == 1 ]]; then  # a dry run's figures never go into the real BENCHMARKS.md
        md=${OUT:-$work}/BENCHMARKS.md
        cp BENCHMARKS.md "$md"
    fi
    local left
    left=$(awk -v t0="$T0" -v now="$(now)" -v b="$BUDGET" 'BEGIN { printf "%d", b - (now - t0) }')
    part bench $((left - DEMO_RESERVE)) "$PYTHON" -m fusion_seg bench --device "$DEVICE" --sections "$SECTIONS" \
        --camvid "$CAMVID" --size "$SIZE" --views "$VIEWS" --repeats "$REPEATS" --scaling-sizes "$SCALING" \
        --forward-sizes "$FORWARD" --json "$json" --update "$md"
    if [[ -n $OUT && $md != "$OUT/BENCHMARKS.md" ]]; then cp "$md" "$OUT/BENCHMARKS.md"; fi

    # ---------------------------------------------------------------- demo pipeline
    # pipelines/demo.toml with `device = "$DEVICE"` in every stage, its outputs in the scratch folder.
    "$PYTHON" - "$DEVICE" pipelines/demo.toml "$work/demo.toml" <<'EOF'
import re
import sys
import tomllib

device, src, dst = sys.argv[1:]
text = re.sub(r'(?m)^(kind = "\w+"\n)', lambda m: f'{m.group(1)}device = "{device}"\n', open(src).read())
stages = tomllib.loads(text)["stage"]
assert stages and all(s.get("device") == device for s in stages), "demo.toml: a stage without kind = ... on a line"
open(dst, "w").write(text)
EOF
    local t_demo; t_demo=$(now)
    part demo 600 "$PYTHON" -m fusion_seg run "$work/demo.toml" --set "cache=$work/demo/cache" \
        --set "runs=$work/demo/runs" --set "images=pipelines/demo-images" --epoch-scale "$DEMO_SCALE"
    local metrics=$work/demo/runs/demo/eval-val/metrics.json
    if [[ -f $metrics ]]; then
        "$PYTHON" - "$metrics" "$DEVICE" "$DEMO_SCALE" "$(since "$t_demo")" <<'EOF'
import json
import sys

path, device, scale, wall = sys.argv[1:]
m = json.load(open(path))
print(f"demo ({device}, epoch scale {scale}): val mIoU {m['miou']:.4f}, pixel accuracy {m['pixel_acc']:.4f}; wall {wall} s")
EOF
        if [[ -n $OUT ]]; then cp "$metrics" "$OUT/demo-metrics.json"; fi
    else
        echo "demo: no $metrics"
    fi

    # ---------------------------------------------------------------- summary
    echo "== times"
    printf '  %s\n' "${TIMES[@]}"
    echo "  total: $(since "$T0") s (budget ${BUDGET}s)"
    echo "bench JSON: $json; tables: $md"
    if ((${#FAILED[@]})); then
        echo "gpu-check: FAILED: ${FAILED[*]}"
        return 1
    fi
    echo "gpu-check: OK"
}

if [[ -n $OUT ]]; then
    main 2>&1 | tee "$OUT/gpu-check.log"
else
    main
fi
