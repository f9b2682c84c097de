"""Feynman–Kac steering with k particles against a plain batch of k samples, SD3.5-Medium-sized, random weights.

Both run the same Flow-SDE sampler with CFG for the same steps at the same size. The plain batch samples k images
and scores them once (what best-of-k costs); FK steering also decodes x̂0 and scores it every `--interval` steps,
then resamples the particles. The overhead is the ratio of the two times (target: within 1.15×). Each method runs
once untimed first. The report is written after the plain batch too, so a timeout during FK keeps it.

    python benchmarks/gpu/fk_vs_batch.py --out results/fk.json
    python benchmarks/gpu/fk_vs_batch.py --toy --device cpu --resolution 32 --out /tmp/fk_toy.json
"""

from __future__ import annotations

import argparse
import statistics

import torch

from architectures import add_steering_options, apply_steering_options, sd35_medium, vit_h14_reward
from measure import default_device, measured, profiled, write_report

from align_diffusion.sampling.loop import sample
from align_diffusion.steering.fk import fk_steering, resampling_steps

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--toy", action="store_true", help="toy-width transformer and reward (CPU smoke runs)")
parser.add_argument("--device", default=default_device())
parser.add_argument("--particles", type=int, default=4)
parser.add_argument("--steps", type=int, default=28)
parser.add_argument("--interval", type=int, default=5, help="FK scores x̂0 and resamples every this many steps")
parser.add_argument("--start", type=int, default=None,
                    help="first scored step (default: fk_steering's, 20 %% of the steps; 0 was the default until "
                         "2026-12-04)")
parser.add_argument("--guidance", type=float, default=4.5)
parser.add_argument("--resolution", type=int, default=1024)
parser.add_argument("--repeats", type=int, default=2, help="timed runs of each (median reported)")
add_steering_options(parser)
parser.add_argument("--profile", type=int, default=0, metavar="TOP",
                    help="also profile one FK run and report its TOP ops and kernels by device time")
parser.add_argument("--out", required=True, help="JSON report")
args = parser.parse_args()
for name in ("particles", "steps", "interval", "resolution", "repeats"):
    if getattr(args, name) < 1:
        parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
if args.start is not None and not 0 <= args.start < args.steps:
    parser.error(f"--start must lie in [0, --steps), got {args.start}")

dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
adapter = sd35_medium(args.device, dtype, toy=args.toy)
reward = vit_h14_reward(args.device, dtype, toy=args.toy)
model_options = apply_steering_options(args, adapter, reward)
prompt = "a photo of a red fox in the snow"
common = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, height=args.resolution,
              width=args.resolution)


def plain_batch():
    trajectory = sample(adapter, [prompt] * args.particles, sampler="flow-sde", **common)
    return reward(trajectory.images, [prompt] * args.particles)


def steered():
    return fk_steering(adapter, prompt, reward, num_particles=args.particles, resample_start=args.start,
                       resample_interval=args.interval, **common)


def timed(run) -> dict:
    with torch.no_grad():
        run()
        rows = []
        for _ in range(args.repeats):
            with measured(args.device) as row:
                run()
            rows.append(row)
    return {key: statistics.median(row[key] for row in rows) for key in rows[0]}


config = {"toy": args.toy, **model_options, "particles": args.particles, "start": args.start,
          "interval": args.interval, "repeats": args.repeats, **common}
results = {"fk_scored_steps": resampling_steps(args.steps, args.start, args.interval, None),
           "plain_batch": timed(plain_batch)}
write_report(args.out, "fk_vs_batch", args.device, config, results)
results["fk"] = timed(steered)
results["fk_over_plain"] = results["fk"]["seconds"] / results["plain_batch"]["seconds"]
write_report(args.out, "fk_vs_batch", args.device, config, results)
if args.profile:
    with torch.no_grad(), profiled(args.device, args.profile) as profile:
        steered()
    results["fk_profile"] = profile
    write_report(args.out, "fk_vs_batch", args.device, config, results)
