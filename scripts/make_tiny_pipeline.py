"""Saves a random-weight tiny pipeline of one family as a diffusers folder (offline; deterministic in --seed).

    python scripts/make_tiny_pipeline.py --family sd3 --out tiny-sd3
"""

import argparse
from pathlib import Path

from align_diffusion.files import give_usual_permissions
from align_diffusion.models.tiny import FAMILIES, tiny_pipeline

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--family", choices=FAMILIES, required=True)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", required=True)
args = parser.parse_args()
tiny_pipeline(args.family, seed=args.seed).save_pretrained(args.out)
give_usual_permissions(Path(args.out))  # safetensors writes 0600
print(f"saved a tiny {args.family} pipeline to {args.out}")
