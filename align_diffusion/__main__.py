"""`python -m align_diffusion …` (and `accelerate launch -m align_diffusion …`) runs the console script."""

from align_diffusion.cli import main

main()
