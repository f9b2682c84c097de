"""Stateless sampler steps (steps.py), the sampling loop (loop.py) and sampling to a folder (folder.py)."""
