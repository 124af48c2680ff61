#!/usr/bin/env bash
# Every GPU check in one call, without Ray or DeepSpeed (a GPU node may lack both):
#   1. the Triton kernel's tests (tests/test_tree_crf_triton.py, the gpu-marked full-size ones included)
#   2. `distpose bench kernel`: the fused kernel against the PyTorch formulations and a conv2d baseline
#   3. `distpose bench train --plain-only`: bf16 hrnet_w32 at 256x192, the plain PyTorch loop on random data
# Writes <out>/gpu-checks-<device>.json (what ran, how long, each step's exit status) next to each
# benchmark's own JSON. Python packages the machine lacks are installed from wheels in $WHEELS, if set
# (e.g. `pip download --no-deps -d .wheels webdataset braceexpand simplejpeg pytest pluggy iniconfig pytest-timeout`).
#
#   benchmarks/gpu.sh [--dry-run] [OUT_DIR]      default OUT_DIR: benchmarks/results
#
# --dry-run runs the same steps at toy size on whatever device there is (a CPU will do), to test the script;
# its test step runs only the gpu-marked tests.
set -euo pipefail

dry_run=0
if [[ ${1:-} == --dry-run ]]; then
    dry_run=1
    shift
fi
out=$(realpath -m "${1:-benchmarks/results}")
python=${PYTHON:-python3}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [[ -n ${WHEELS:-} ]]; then
    "$python" -m pip install --quiet --no-index --no-deps "$WHEELS"/*.whl
fi

device=$("$python" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")')
slug=$(echo "$device" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-//; s/-$//')
if ((dry_run)); then
    slug="$slug-dry-run"
    test_args=(-m gpu)  # the suite runs the rest of the file; without CUDA these skip
    kernel_args=(--batch 2 --radius 2 --repeats 1 --no-full-window --impl shift unfold)
    train_args=(model.backbone=cnn_small "data.input_size=[64,48]" "data.heatmap_size=[16,12]" data.batch_size=4
                train.precision=fp32 train.use_gpu=false)
    train_steps=(--steps 2 --warmup 1)
else
    test_args=()
    kernel_args=(--batch 64 --radius 7 15 --repeats 5)
    train_args=(model.backbone=hrnet_w32 "data.input_size=[256,192]" "data.heatmap_size=[64,48]" data.batch_size=64
                train.precision=bf16 train.use_gpu=true train.cpus_per_worker=8)
    train_steps=(--steps 40 --warmup 10)
fi

steps_json=""
step() {  # step NAME SECONDS COMMAND...: run it within SECONDS, keep going on failure, record the outcome
    local name=$1 limit=$2 start status ms
    shift 2
    echo "[gpu.sh] $name (at most $limit s): $*" >&2
    start=$(date +%s%N)
    set +e
    timeout "$limit" "$@"
    status=$?
    set -e
    ms=$(( ($(date +%s%N) - start) / 1000000 ))
    steps_json+="${steps_json:+, }{\"step\": \"$name\", \"exit_status\": $status, \"seconds\": $((ms / 1000)).$(printf %03d $((ms % 1000)))}"
}

# The three limits add up to 8 minutes; a step past its limit exits 124 and the next one runs.
step tests 150 "$python" -m pytest -q -p no:cacheprovider tests/test_tree_crf_triton.py "${test_args[@]}" \
    --junitxml "$out/gpu-tests-$slug.xml"
step kernel 240 "$python" -m distpose bench kernel "${kernel_args[@]}" --out "$out/crf-kernel-$slug.json"
step train 90 "$python" -m distpose bench train "${train_args[@]}" train.mode=backbone train.workers=1 \
    data.source=random eval.every_epochs=0 "${train_steps[@]}" --plain-only --out "$out/train-plain-$slug.json"

summary="$out/gpu-checks-$slug.json"
printf '{"device": "%s", "dry_run": %s, "steps": [%s]}\n' "$device" "$([[ $dry_run == 1 ]] && echo true || echo false)" \
    "$steps_json" > "$summary.partial"
mv "$summary.partial" "$summary"
cat "$summary"
! grep -q '"exit_status": [1-9]' "$summary"
