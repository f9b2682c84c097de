"""Overhead of our sampling loop over the stock diffusers pipeline at equal steps, in one process.

Builds a mid-size random-weight SD3 (speed does not depend on weight values), then alternates stock
`pipe(...)` calls and our `sample(...)` calls with the ODE sampler and CFG, and reports the median time of each
and their ratio. Run it on the device you care about:

    python benchmarks/sampling_overhead.py [--device cuda] [--layers 6] [--steps 20] [--repeats 7]
"""

import argparse
import statistics
import time

import torch

from align_diffusion.models import adapter_for
from align_diffusion.models.tiny import tiny_pipeline
from align_diffusion.sampling.loop import sample

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--layers", type=int, default=6)
parser.add_argument("--heads", type=int, default=8)
parser.add_argument("--size", type=int, default=256, help="image side in pixels")
parser.add_argument("--batch", type=int, default=2)
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--repeats", type=int, default=7)
args = parser.parse_args()

pipe = tiny_pipeline(
    "sd3", num_layers=args.layers, num_heads=args.heads, head_dim=64, patch_size=2, sample_size=args.size // 8,
    latent_channels=16, vae_channels=(32, 32, 32, 32),
).to(args.device)
adapter = adapter_for(pipe)
prompts = ["a red circle left of a blue square"] * args.batch
common = dict(num_inference_steps=args.steps, guidance_scale=7.0, height=args.size, width=args.size)


def synchronize():
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


def stock():
    generators = [torch.Generator().manual_seed(k) for k in range(args.batch)]
    return pipe(prompts, generator=generators, output_type="pt", **common).images


def ours():
    return sample(adapter, prompts, seed=0, **common).images


def timed(fn):
    synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        images = fn()
    synchronize()
    return time.perf_counter() - start, images


timed(stock), timed(ours)  # warm-up
stock_times, our_times = [], []
for _ in range(args.repeats):
    seconds, stock_images = timed(stock)
    stock_times.append(seconds)
    seconds, our_images = timed(ours)
    our_times.append(seconds)

print(f"device {args.device}, {args.layers} layers × {args.heads} heads, {args.size}px, batch {args.batch}, "
      f"{args.steps} steps, CFG, {args.repeats} repeats")
print(f"max |ours - stock| = {(our_images.cpu() - stock_images.cpu()).abs().max().item():.2e}")
print(f"stock median {statistics.median(stock_times):.3f} s, ours median {statistics.median(our_times):.3f} s, "
      f"ratio {statistics.median(our_times) / statistics.median(stock_times):.3f}")
