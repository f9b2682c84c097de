#!/usr/bin/env bash
# What is left to measure on one H100 / H200, each benchmark under a time cap, once the machine is up:
#   bash benchmarks/gpu/run_all.sh OUT_DIR [NAME ...]
# Without NAMEs it runs fk, reno, reno_compiled and grpo_sd35m_compiled (at most 570 s together, plus the wheel
# install); reno_cudagraphs, grpo_sd35m_compiled_mb12 and grpo_sd35m_xformers run when named, in later calls. Writes
# OUT_DIR/NAME.json for each and one log of them all, OUT_DIR/logs.txt (appended to): within the eight files the
# device tool brings back. Each script writes its JSON as results arrive, so a capped one keeps what it measured.
# Missing packages (diffusers, open_clip; xformers only for grpo_sd35m_xformers) are installed from wheels in .whl/
# when that folder exists (see benchmarks/README.md). Already measured and left out
# (benchmarks/results/h200-2026-12-04/): eager SD3.5-M with checkpointing off and on, FLUX.1-dev with the preset's
# earlier LoRA (r32, attention only), FK from step 0.
set -uo pipefail
out=$(realpath -m "${1:?usage: run_all.sh OUT_DIR}")
mkdir -p "$out"
log="$out/logs.txt"
repo=$(cd "$(dirname "$0")/../.." && pwd)
spec() {  # NAME: sets its time cap (seconds) and its command line (args), or fails for an unknown name
    case $1 in
        # FK with fk_steering's default window (x̂0 scored at steps 5, 10, 15, 20 and 27 of 28)
        fk) cap=110 args=(fk_vs_batch.py --particles 4 --steps 28 --interval 5 --cudnn-benchmark --profile 12) ;;
        reno) cap=90 args=(reno_step.py --iterations 20 --cudnn-benchmark --profile 12) ;;
        reno_compiled) cap=150 args=(reno_step.py --iterations 20 --cudnn-benchmark --compile) ;;
        reno_cudagraphs) cap=150 args=(reno_step.py --iterations 20 --cudnn-benchmark --compile reduce-overhead) ;;
        grpo_sd35m_compiled) cap=220 args=(grpo_step.py --arch sd35-medium --group 24 --micro-batch 8
                                          --checkpointing off --compile --profile 15) ;;
        # the preset's own micro-batch of 12: fewer launches per image (compiled, 8 peaked at 31.5 GiB)
        grpo_sd35m_compiled_mb12) cap=220 args=(grpo_step.py --arch sd35-medium --group 24 --micro-batch 12
                                               --checkpointing off --compile) ;;
        grpo_sd35m_xformers) cap=150 args=(grpo_step.py --arch sd35-medium --group 24 --micro-batch 8
                                          --checkpointing off --attention both) ;;
        *) return 1 ;;
    esac
}
names=("${@:2}")
[ ${#names[@]} -gt 0 ] || names=(fk reno reno_compiled grpo_sd35m_compiled)
for name in "${names[@]}"; do
    spec "$name" || { echo "unknown benchmark: $name" >&2; exit 2; }
done

if [ -d "$repo/.whl" ]; then
    wheels=("$repo"/.whl/*.whl)
    # xformers only for the benchmark that compares it: diffusers imports it wherever it is installed
    [[ " ${names[*]} " == *_xformers\ * ]] || mapfile -t wheels < <(printf '%s\n' "${wheels[@]}" | grep -v '/xformers-')
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "${wheels[@]}" || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
cd "$repo/benchmarks/gpu"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$log"
# Each benchmark within its cap, its output appended to the log; a failure or a timeout does not stop the others.
for name in "${names[@]}"; do
    spec "$name"
    echo "=== $name: ${args[*]}" | tee -a "$log"
    rm -f "$out/$name.json"  # an earlier run's report is no result of this one
    timeout "$cap" python3 "${args[@]}" --out "$out/$name.json" 2>&1 | tee -a "$log"
    echo "=== $name: exit ${PIPESTATUS[0]}" | tee -a "$log"
done
