#!/usr/bin/env bash
# What is left to measure on one H100 / H200, each benchmark under a time cap, at most 570 s together (plus the
# wheel install) once the machine is up:
#   bash benchmarks/gpu/run_all.sh OUT_DIR
# Writes OUT_DIR/{fk,reno,reno_compiled,grpo_sd35m_compiled}.json and one log of them all, OUT_DIR/logs.txt: five
# files, within the eight the device tool brings back. Each script writes its JSON as results arrive, so a capped one
# keeps what it measured. Missing packages (diffusers, open_clip) are installed from wheels in .whl/ when that folder
# exists (see benchmarks/README.md). Already measured and left out (benchmarks/results/h200-2026-12-04/): eager
# SD3.5-M with checkpointing off and on, FLUX.1-dev, FK from step 0. Attention is PyTorch SDPA only: xformers is
# measured by `grpo_step.py --attention both` in a call of its own, where an xformers wheel was carried.
set -uo pipefail
out=$(realpath -m "${1:?usage: run_all.sh OUT_DIR}")
mkdir -p "$out"
log="$out/logs.txt"
repo=$(cd "$(dirname "$0")/../.." && pwd)
if [ -d "$repo/.whl" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$repo"/.whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
cd "$repo/benchmarks/gpu"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$log"

run() {  # NAME SECONDS SCRIPT ARGS...: one benchmark within SECONDS, its output appended to the log; a failure or
         # a timeout does not stop the others
    local name=$1 seconds=$2
    shift 2
    echo "=== $name: $*" | tee -a "$log"
    timeout "$seconds" python3 "$@" --out "$out/$name.json" 2>&1 | tee -a "$log"
    echo "=== $name: exit ${PIPESTATUS[0]}" | tee -a "$log"
}
# FK with fk_steering's default window (x̂0 scored at steps 5, 10, 15, 20 and 27 of 28)
run fk 110 fk_vs_batch.py --particles 4 --steps 28 --interval 5 --cudnn-benchmark --profile 12
run reno 90 reno_step.py --iterations 20 --cudnn-benchmark --profile 12
run reno_compiled 150 reno_step.py --iterations 20 --cudnn-benchmark --compile
run grpo_sd35m_compiled 220 grpo_step.py --arch sd35-medium --group 24 --micro-batch 8 --checkpointing off \
    --compile --profile 15
