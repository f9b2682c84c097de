"""One Flow-GRPO step of the shipped GPU preset on a full-size random-weight architecture: rollouts, then training.

The trainer is ours (`GRPOTrainer` with the preset's config), given the architecture built in memory instead of
loading weights. For each attention backend and gradient-checkpointing setting it reports rollout images per second
(the preset's SDE steps with CFG, decoding and the JPEG reward included), training seconds per image (the log-prob
recompute forward and backward at every stochastic step, the reference forward for the KL, the optimizer step),
peak allocated and reserved memory of each phase (each measured from an emptied allocator cache), and the train
step's model FLOPs utilization: the update's FLOPs as torch counts them, over its time, against the device's dense
bf16 peak. The FLOPs are counted once, before the timed settings, with PyTorch SDPA and checkpointing off (so no
recomputation is counted), on one trained timestep: every trained timestep runs the same passes; a count that fails
(out of memory without checkpointing, say) is reported as `update_flops_error`, and the settings are still measured,
with no MFU. A setting's
`gradient_checkpointing` is the denoiser's state while it was timed (`trainer_config` keeps the preset's value).
With `--compile` the preset runs with `optim.compile=true` (regional torch.compile); the FLOPs are still counted
eager, and each setting's first step, which compiles, is timed apart. With `--profile TOP` it also profiles one
trained timestep's update: the device's busy fraction of it and the TOP ops and kernels by device time, to show
where a low MFU goes.
A setting, or the FLOP count, that fails other than by running out of memory (a kernel's or the compiler's error)
is recorded with its error, its traceback logged, and the script ends with exit status 1 once the rest is measured;
xformers that cannot run here (not installed, no CUDA) is its setting's result, found before the build.
`--sdpa-backends` limits the attention backends PyTorch may choose (FLUX's update needed cuDNN's off on torch
2.11 and an H200: it crashed with an illegal memory access).

    python benchmarks/gpu/grpo_step.py --arch sd35-medium --out results/grpo_sd35m.json
    python benchmarks/gpu/grpo_step.py --arch flux-dev --group 2 --micro-batch 1 --checkpointing on \\
        --out results/grpo_flux.json          # does a micro-batch fit, and at what peak memory
    python benchmarks/gpu/grpo_step.py --arch sd35-medium --profile 15 --out results/grpo_sd35m.json  # and why
    python benchmarks/gpu/grpo_step.py --toy --device cpu --resolution 32 --out /tmp/grpo_toy.json  # CPU, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import os
import statistics
import sys
import tempfile
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded; config validation must not try

import torch  # noqa: E402

from architectures import ARCHITECTURES, parameter_count  # noqa: E402
from measure import (  # noqa: E402
    bf16_peak, counted_flops, default_device, device_name, measured, profiled, write_report,
)

from align_diffusion.training.config import ConfigError, load_config, to_dict  # noqa: E402
from align_diffusion.training.grpo import GRPOTrainer  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
PRESETS = {"sd35-medium": "configs/sd35m_grpo_geneval.yaml", "flux-dev": "configs/flux_dev_grpo_pickscore.yaml"}
FIT_GIB = 79.0  # what an 80 GB card leaves to one process, roughly, after the CUDA context

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--arch", choices=sorted(PRESETS), default="sd35-medium")
parser.add_argument("--toy", action="store_true", help="the same blocks at toy width (CPU smoke runs)")
parser.add_argument("--device", default=default_device())
parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on GPU, float32 on CPU")
parser.add_argument("--group", type=int, default=24, help="images of the step: one group")
parser.add_argument("--micro-batch", type=int, default=8, help="images per forward/backward pass")
parser.add_argument("--rollout-batch", type=int, default=None, help="images per sampling call (default: --group)")
parser.add_argument("--resolution", type=int, default=512)
parser.add_argument("--checkpointing", choices=("off", "on", "both"), default="both")
parser.add_argument("--attention", choices=("sdpa", "xformers", "both"), default="sdpa")
parser.add_argument("--repeats", type=int, default=1, help="timed steps per setting (median reported)")
parser.add_argument("--compile", action="store_true",
                    help="the preset with optim.compile=true; each setting's first step (compiling) is timed apart")
parser.add_argument("--sdpa-backends", default="cudnn,flash,efficient,math",
                    help="comma-separated SDPA backends PyTorch may choose from on CUDA")
parser.add_argument("--profile", type=int, default=0, metavar="TOP",
                    help="also profile one trained timestep (checkpointing off): TOP ops and kernels by device time")
parser.add_argument("--peak-tflops", type=float, default=None, help="the device's bf16 peak (default: known table)")
parser.add_argument("--out", required=True, help="JSON report")
args = parser.parse_args()

SDPA_BACKENDS = {"cudnn": torch.backends.cuda.enable_cudnn_sdp, "flash": torch.backends.cuda.enable_flash_sdp,
                 "efficient": torch.backends.cuda.enable_mem_efficient_sdp, "math": torch.backends.cuda.enable_math_sdp}
allowed_backends = args.sdpa_backends.split(",")
if not set(allowed_backends) <= set(SDPA_BACKENDS):
    parser.error(f"--sdpa-backends takes names from {sorted(SDPA_BACKENDS)}, got {args.sdpa_backends}")
for name, enable in SDPA_BACKENDS.items():
    enable(name in allowed_backends)
dtype = DTYPES[args.dtype or ("float32" if args.device == "cpu" else "bfloat16")]
precision = "bf16" if dtype == torch.bfloat16 else "'no'"  # quoted: YAML reads a bare no as false
run_dir = tempfile.TemporaryDirectory(prefix="grpo_bench_")  # the trainer's own outputs, removed at exit
overrides = [
    f"model={args.arch} (random weights)", "prompts=shapes:train", "eval.prompts=shapes:test", "eval.every=0",
    "reward=jpeg", f"grpo.group_size={args.group}", f"grpo.batch_size={args.group}",
    f"grpo.train_batch_size={args.micro_batch}", f"sampling.batch_size={args.rollout_batch or args.group}",
    f"sampling.height={args.resolution}", f"sampling.width={args.resolution}", f"device={args.device}",
    f"output_dir={run_dir.name}", "log_with=[]",
    f"dtype={'float32' if dtype == torch.float32 else 'bfloat16'}",
    f"optim.mixed_precision={precision}", f"optim.compile={str(args.compile).lower()}",
]
try:  # checked before the architecture is built, which takes minutes at full size
    load_config(REPO / PRESETS[args.arch], overrides)
except ConfigError as error:
    parser.error(f"bad config: {error}")
# Why xformers cannot run here (its setting's result), found before the build; and which xformers ran, where it did:
# without its own compiled kernels it runs PyTorch's
xformers_problem, xformers_found = None, None
if args.attention != "sdpa":
    try:
        import xformers
        import xformers.ops  # noqa: F401
    except ImportError as error:
        xformers_problem = f"{type(error).__name__}: {error}"
    else:
        xformers_found = {"version": xformers.__version__, "cpp_library": getattr(xformers, "_has_cpp_library", None)}
        if not args.device.startswith("cuda"):
            xformers_problem = f"xformers' kernels need a CUDA device, not {args.device}"
failed = []  # what failed other than by running out of memory: recorded, with its traceback logged, and the exit status
adapter = ARCHITECTURES[args.arch](args.device, dtype, toy=args.toy)
# The architecture's stock T5 length, which the published numbers were measured at (the SD3.5-M preset trains at
# Flow-GRPO's 128).
if adapter.max_sequence_length:
    overrides.append(f"max_sequence_length={adapter.max_sequence_length}")
config = load_config(REPO / PRESETS[args.arch], overrides)
trainer = GRPOTrainer(config, adapter=adapter)
denoiser = adapter.denoiser
step_numbers = itertools.count()


def one_step() -> tuple[dict, dict, dict]:
    """Rollouts and the update of one training step, each measured; also the update's statistics."""
    step = next(step_numbers)
    with measured(args.device) as rollout:
        rollouts = trainer.rollout(step)
    advantages, _ = trainer.advantages(rollouts)
    with measured(args.device) as update:
        stats = trainer.update(rollouts, advantages, step)
    return rollout, update, stats


@contextlib.contextmanager
def one_timestep_update():
    """Fresh rollouts and the trainer set to train exactly one of their timesteps, checkpointing off; yields the
    rollouts and a function that runs that update."""
    step = next(step_numbers)
    rollouts = trainer.rollout(step)
    advantages, _ = trainer.advantages(rollouts)
    fraction = config.grpo.timestep_fraction
    config.grpo.timestep_fraction = 1e-9  # trains exactly one timestep
    denoiser.disable_gradient_checkpointing()
    try:
        yield rollouts, lambda: trainer.update(rollouts, advantages, step)
    finally:
        config.grpo.timestep_fraction = fraction


class CountedShort(RuntimeError):
    """The counted update left images out (a group's rewards tied), so it counted less than a full one."""


def update_flops() -> tuple[float, dict]:
    """Model FLOPs of one update, in all and by op: one trained timestep counted (checkpointing off), times the
    timesteps trained. CountedShort when that update left images out."""
    with one_timestep_update() as (rollouts, update):
        with counted_flops() as counted, torch.compiler.set_stance("force_eager"):  # counted as written, not fused
            stats = update()
    if not args.toy and stats["trained_fraction"] < 1:
        raise CountedShort("the counted update trained on fewer than all images (a group's rewards did not vary)")
    timesteps = len(trainer.train_timesteps(0, rollouts.trajectory.stochastic_steps))
    return counted["flops"] * timesteps, {op: n * timesteps for op, n in counted["flops_by_op"].items()}


def profiled_update(top: int) -> dict:
    """One trained timestep's update (checkpointing off) under torch.profiler (`measure.profiled`)."""
    with one_timestep_update() as (_, update), profiled(args.device, top) as profile:
        update()
    return profile


def median(rows: list[dict], key: str) -> float | None:
    values = [row[key] for row in rows if key in row]
    return statistics.median(values) if values else None


def measure_setting(backend: str, checkpoint: bool) -> dict:
    """`--repeats` timed steps with this gradient-checkpointing setting; out of memory is a result too."""
    if checkpoint:
        denoiser.enable_gradient_checkpointing()
    else:
        denoiser.disable_gradient_checkpointing()
    setting = {"attention": backend, "gradient_checkpointing": denoiser.is_gradient_checkpointing}
    rollouts, updates, update_stats, failure = [], [], [], None
    try:
        if args.compile:  # the setting's first step compiles its graphs
            with measured(args.device) as compiling:
                one_step()
            setting["compiling_step_seconds"] = compiling["seconds"]
        for _ in range(args.repeats):
            rollout, update, stats = one_step()
            rollouts.append(rollout)
            updates.append(update)
            update_stats.append(stats)
    except torch.OutOfMemoryError as error:
        failure = f"out of memory: {str(error).splitlines()[0]}"
    except RuntimeError as error:  # a compiler's or a kernel's failure is this setting's result too
        traceback.print_exc()
        failure = f"{type(error).__name__}: {str(error).splitlines()[0]}"
        failed.append(f"{backend} attention, checkpointing {'on' if checkpoint else 'off'}")
    if failure:  # out of the except block: its traceback no longer holds the step's tensors, which can be freed
        gc.collect()
        torch.cuda.empty_cache()
        return {**setting, "error": failure}
    # A group whose rewards did not vary leaves its images out of the update, whose time is then no full one's (the
    # toy's random models tie often, and only run the code)
    if not args.toy and any(stats["trained_fraction"] < 1 for stats in update_stats):
        return {**setting, "error": "an update trained on fewer than all images (a group's rewards did not vary), "
                                    "so its time is no full update's"}
    rollout_seconds, update_seconds = median(rollouts, "seconds"), median(updates, "seconds")
    setting.update({
        "train_timesteps": update_stats[-1]["train_timesteps"],
        # On-policy health in this precision: rollouts and the update's first pass see the same weights.
        "first_ratio_max_deviation": max(stats["first_ratio_max_deviation"] for stats in update_stats),
        "rollout_seconds": rollout_seconds, "rollout_images_per_second": args.group / rollout_seconds,
        "update_seconds": update_seconds, "train_seconds_per_image": update_seconds / args.group,
        "update_tflops_per_second": flops / update_seconds / 1e12 if flops else None,
        "mfu": flops / update_seconds / (peak * 1e12) if flops and peak else None,
        "rollout_peak_allocated_gib": median(rollouts, "peak_allocated_gib"),
        "rollout_peak_reserved_gib": median(rollouts, "peak_reserved_gib"),
        "update_peak_allocated_gib": median(updates, "peak_allocated_gib"),
        "update_peak_reserved_gib": median(updates, "peak_reserved_gib"),
    })
    if args.device.startswith("cuda"):
        # Allocated: what the tensors need; reserved adds the caching allocator's fragmentation.
        for kind in ("allocated", "reserved"):
            most = max(setting[f"rollout_peak_{kind}_gib"], setting[f"update_peak_{kind}_gib"])
            setting[f"fits_80gb_{kind}"] = most <= FIT_GIB
    return setting


# (table entry, TFLOP/s), or None: the table holds bf16 peaks, no measure of another dtype's MFU
matched = bf16_peak(device_name(args.device)) if dtype == torch.bfloat16 else None
peak = args.peak_tflops or (matched[1] if matched else None)
run = {"arch": args.arch, "toy": args.toy, "group": args.group, "micro_batch": args.micro_batch,
       "resolution": args.resolution, "dtype": str(dtype), "peak_tflops": peak,
       "peak_table_match": list(matched) if matched else None, "repeats": args.repeats,
       "compile": args.compile, "sdpa_backends": allowed_backends, "xformers": xformers_found,
       "preset": PRESETS[args.arch], "trainer_config": to_dict(config)}
results = {"parameters": parameter_count(denoiser), "trained_parameters": sum(p.numel() for p in trainer.params),
           "settings": []}
write_report(args.out, "grpo_step", args.device, run, results)  # then after each step: a timeout keeps them
try:  # its rollout and update also warm up kernels and the allocator
    flops, flops_by_op = update_flops()
    results.update(update_flops=flops, update_flops_by_op=flops_by_op)
except RuntimeError as error:  # out of memory without checkpointing, say: the settings are measured all the same
    flops = None
    if not isinstance(error, (torch.OutOfMemoryError, CountedShort)):  # results of the count, not failures
        traceback.print_exc()
        failed.append("the FLOP count")
    results["update_flops_error"] = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
    gc.collect()
    torch.cuda.empty_cache()
write_report(args.out, "grpo_step", args.device, run, results)
sdpa_processors = denoiser.attn_processors  # what xformers replaces; its disable call does not bring them back
for backend in ["sdpa", "xformers"] if args.attention == "both" else [args.attention]:
    if backend == "xformers":
        problem = xformers_problem
        if problem is None:
            try:
                denoiser.enable_xformers_memory_efficient_attention()
            except (ImportError, ValueError) as error:
                problem = f"{type(error).__name__}: {error}"
        if problem:
            results["settings"].append({"attention": backend, "error": problem})
            write_report(args.out, "grpo_step", args.device, run, results)
            continue
    for checkpoint in {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]:
        results["settings"].append(measure_setting(backend, checkpoint))
        write_report(args.out, "grpo_step", args.device, run, results)
if args.profile:
    if args.attention != "sdpa":  # the profile explains the SDPA FLOP count's MFU
        denoiser.set_attn_processor(sdpa_processors)
        denoiser.reset_attention_backend()  # FLUX's processors keep theirs in a flag
    results["profile"] = profiled_update(args.profile)
    write_report(args.out, "grpo_step", args.device, run, results)
if failed:
    sys.exit(f"grpo_step: failed (tracebacks above): {'; '.join(failed)}; {args.out} holds what was measured")
