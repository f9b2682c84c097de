"""align_diffusion: align text-to-image diffusion and flow-matching models with rewards."""

__version__ = "0.1.0"
