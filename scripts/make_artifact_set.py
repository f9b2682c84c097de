"""Curates the shapes world's artifact set: clean renders versus images with typical generator artifacts.

    python scripts/make_artifact_set.py --out data/artifact-world --generator assets/world/sd3
    align-diffusion train-reward artifact --data data/artifact-world --out assets/world/artifact \\
        --backbone assets/world/dino --unseen data/artifact-world/unseen

`clean/` holds renders of train-split prompts and the base generator's samples in which ShapesEval finds only world
shapes in palette colors (so the head learns artifacts, not "generated" against "rendered"); `artifact/` holds
renders corrupted by the trained kinds and the generator's failures (samples with a region that is no world shape
or no palette color). `unseen/` holds renders corrupted by the held-out kinds only, to check the reward on
artifacts it never saw.
"""

import argparse
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from align_diffusion.models import load_adapter
from align_diffusion.rewards.artifact import CORRUPTIONS, corrupt
from align_diffusion.sampling.loop import sample
from align_diffusion.world.evaluate import detect
from align_diffusion.world.prompts import split_prompts
from align_diffusion.world.render import render_prompt

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--out", type=Path, required=True)
parser.add_argument("--generator", default="assets/world/sd3",
                    help="base model whose failures join artifact/ and whose clean samples join clean/")
parser.add_argument("--count", type=int, default=1800, help="clean renders; as many corrupted ones")
parser.add_argument("--samples", type=int, default=800, help="base-model samples, sorted into clean/ and artifact/")
parser.add_argument("--held-out-kinds", nargs="+", default=["smear", "grid"], choices=CORRUPTIONS)
parser.add_argument("--steps", type=int, default=20, help="the base model's sampling steps (those the reward's "
                    "users sample with: the world presets' eval)")
parser.add_argument("--guidance", type=float, default=2.0, help="the base model's guidance scale")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--overwrite", action="store_true", help="replace a set already in --out")
args = parser.parse_args()
if min(args.count, args.samples, args.steps) < 1:
    parser.error(f"--count, --samples and --steps must be at least 1, got {args.count}, {args.samples}, {args.steps}")
SUBSETS = ("clean", "artifact", "unseen")
held = [name for name in SUBSETS if (args.out / name).is_dir() and any((args.out / name).iterdir())]
if held and not args.overwrite:  # a smaller or other set written over it would leave the earlier one's files mixed in
    parser.error(f"--out: {args.out} already holds a set ({', '.join(name + '/' for name in held)}); pass --overwrite "
                 "to replace it")

trained_kinds = [kind for kind in CORRUPTIONS if kind not in args.held_out_kinds]
if not trained_kinds:
    parser.error("--held-out-kinds: holding out every corruption leaves none to train on")
rng = np.random.default_rng(args.seed)
prompts = split_prompts("train")
for name in SUBSETS:
    shutil.rmtree(args.out / name, ignore_errors=True)
    (args.out / name).mkdir(parents=True)


def pick_prompt():
    return prompts[int(rng.integers(len(prompts)))]


for k in range(args.count):
    Image.fromarray(render_prompt(pick_prompt(), args.seed * 100_000 + k)).save(args.out / "clean" / f"{k:05d}.png")
    render = render_prompt(pick_prompt(), args.seed * 100_000 + args.count + k)
    kind = trained_kinds[k % len(trained_kinds)]
    Image.fromarray(corrupt(render, kind, rng)).save(args.out / "artifact" / f"{kind}-{k:05d}.png")
    render = render_prompt(pick_prompt(), args.seed * 100_000 + 2 * args.count + k)
    kind = args.held_out_kinds[k % len(args.held_out_kinds)]
    Image.fromarray(corrupt(render, kind, rng)).save(args.out / "unseen" / f"{kind}-{k:05d}.png")

adapter = load_adapter(args.generator)
sample_prompts = [pick_prompt() for _ in range(args.samples)]
failures = passes = 0
for start in tqdm(range(0, args.samples, 32), desc="base-model samples"):
    batch = sample_prompts[start : start + 32]
    generators = [torch.Generator().manual_seed(args.seed * 100_000 + start + k) for k in range(len(batch))]
    result = sample(adapter, batch, num_inference_steps=args.steps, guidance_scale=args.guidance, generators=generators)
    for image in adapter.to_pil(result.images):
        if any(obj.shape is None or obj.color is None for obj in detect(np.asarray(image))):
            image.save(args.out / "artifact" / f"generated-{failures:05d}.png")
            failures += 1
        else:
            image.save(args.out / "clean" / f"generated-{passes:05d}.png")
            passes += 1
used = trained_kinds[: args.count], args.held_out_kinds[: args.count]  # kind k % n of image k: the first ones
print(f"wrote {args.count} renders and {passes} clean samples to clean/, {args.count} corrupted renders "
      f"({', '.join(used[0])}) and {failures} failed samples to artifact/, in {args.out}; {args.count} "
      f"unseen-kind images ({', '.join(used[1])}) in unseen/")
