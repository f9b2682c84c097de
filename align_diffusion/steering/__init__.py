"""Inference-time alignment: best-of-N, Feynman–Kac steering, TTSnap noise-aware pruning and ReNO noise
optimization, behind one budgeted `steer` call and the `align-diffusion steer` command."""

from align_diffusion.steering.best_of_n import best_of_n
from align_diffusion.steering.candidates import Budget, SteeringResult
from align_diffusion.steering.fk import fk_steering
from align_diffusion.steering.reno import reno
from align_diffusion.steering.steer import compile_models, steer, steer_to_folder
from align_diffusion.steering.ttsnap import ttsnap

__all__ = ["Budget", "SteeringResult", "best_of_n", "compile_models", "fk_steering", "reno", "steer",
           "steer_to_folder", "ttsnap"]
