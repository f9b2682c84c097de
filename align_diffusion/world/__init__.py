"""The shapes world: a procedural text-to-image world small enough to train and align on a CPU."""
