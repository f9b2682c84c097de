#!/usr/bin/env bash
# Every GPU benchmark in one call, each under a time cap, at most 530 s together (plus the wheel install) on one
# H100 / H200 once the machine is up:
#   bash benchmarks/gpu/run_all.sh OUT_DIR
# Writes OUT_DIR/{grpo_sd35m,grpo_flux,reno,fk}.json and one log of them all, OUT_DIR/logs.txt: five files, within
# the eight the device tool brings back. Each script writes its JSON as results arrive, so a capped one keeps what it
# measured. Missing packages (diffusers, open_clip) are installed from wheels in .whl/ when that folder exists (see
# benchmarks/README.md). Attention is PyTorch SDPA only: xformers is measured by `grpo_step.py --attention both`
# in a call of its own, where an xformers wheel was carried.
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
run grpo_sd35m 220 grpo_step.py --arch sd35-medium --group 24 --micro-batch 8 --checkpointing both --compile \
    --profile 15
# With cuDNN's SDPA allowed, FLUX's update crashed with an illegal memory access (torch 2.11, H200): the others
run grpo_flux 100 grpo_step.py --arch flux-dev --group 2 --micro-batch 1 --rollout-batch 2 --checkpointing on \
    --sdpa-backends flash,efficient,math
run reno 90 reno_step.py --iterations 20 --cudnn-benchmark --profile 12
run fk 120 fk_vs_batch.py --particles 4 --steps 28 --interval 5 --cudnn-benchmark --profile 12
