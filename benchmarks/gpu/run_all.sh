#!/usr/bin/env bash
# Every GPU benchmark in one call, at most 9.5 minutes (each benchmark has a time limit) on one H100 / H200 once the machine is up:
#   bash benchmarks/gpu/run_all.sh OUT_DIR
# Writes OUT_DIR/{grpo_sd35m,grpo_flux,reno,fk}.json and each one's log. Missing packages (diffusers, open_clip)
# are installed from wheels in .whl/ when that folder exists (see benchmarks/README.md).
set -uo pipefail
out=$(realpath -m "${1:?usage: run_all.sh OUT_DIR}")
mkdir -p "$out"
repo=$(cd "$(dirname "$0")/../.." && pwd)
if [ -d "$repo/.whl" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$repo"/.whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
cd "$repo/benchmarks/gpu"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv

run() {  # NAME SECONDS SCRIPT ARGS...: one benchmark within SECONDS, its log beside its JSON; a failure or a
         # timeout does not stop the others (together they fit the device tool's 10-minute call)
    local name=$1 seconds=$2
    shift 2
    timeout "$seconds" python3 "$@" --out "$out/$name.json" >"$out/$name.log" 2>&1
    echo "$name: exit $? $(tail -c 1500 "$out/$name.log")"
}
run grpo_sd35m 210 grpo_step.py --arch sd35-medium --group 24 --micro-batch 8 --checkpointing both
run grpo_flux 120 grpo_step.py --arch flux-dev --group 2 --micro-batch 1 --rollout-batch 2 --checkpointing on
run reno 90 reno_step.py --iterations 20
run fk 140 fk_vs_batch.py --particles 4 --steps 28 --interval 5
