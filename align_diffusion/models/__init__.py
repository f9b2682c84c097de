"""Model adapters, chosen by pipeline class: `load_adapter("id or path")` or `adapter_for(pipe)`."""

from __future__ import annotations

from pathlib import Path

import diffusers
import torch
from diffusers import DiffusionPipeline

from align_diffusion.files import home_expanded
from align_diffusion.models.base import (
    PipelineAdapter, PromptEmbeds, Schedule, check_model_options, torch_dtype, unusable_device,
)
from align_diffusion.models.flux import FluxAdapter
from align_diffusion.models.sd3 import SD3Adapter
from align_diffusion.models.stable_diffusion import StableDiffusionAdapter, StableDiffusionXLAdapter

# Exact classes, not isinstance: img2img or inpainting subclasses have other call contracts.
ADAPTERS: dict[type, type[PipelineAdapter]] = {
    adapter.pipeline_class: adapter
    for adapter in (SD3Adapter, FluxAdapter, StableDiffusionAdapter, StableDiffusionXLAdapter)
}


def adapter_for(pipe, max_sequence_length: int | None = None, clip_skip: int | None = None,
                guidance_rescale: float | None = None, true_cfg_scale: float | None = None) -> PipelineAdapter:
    """The adapter for a loaded pipeline; a clear error for pipelines this package does not support.

    Options, as the stock pipelines take them (None: their default): `max_sequence_length`, T5 tokens per prompt
    (SD3, FLUX; 256 / 512); `clip_skip`, CLIP layers skipped from the end when encoding prompts (SD 1.5, SDXL, SD3);
    `guidance_rescale`, φ in [0, 1] of the rescaled classifier-free guidance (SD 1.5 / 2.x, SDXL; 0: off);
    `true_cfg_scale`, the weight of FLUX's true classifier-free guidance away from a negative prompt (1: off).
    """
    adapter = ADAPTERS.get(type(pipe))
    if adapter is None:
        supported = ", ".join(sorted(cls.__name__ for cls in ADAPTERS))
        raise ValueError(f"unsupported pipeline {type(pipe).__name__}; supported pipeline classes: {supported}")
    return adapter(pipe, max_sequence_length, clip_skip, guidance_rescale, true_cfg_scale)


def adapter_class(model: str) -> type[PipelineAdapter] | None:
    """The adapter class for a pipeline folder or cached hub id, read from its model_index.json without loading it;
    None when that cannot be read (a hub id not downloaded); ValueError for a pipeline this package does not
    support."""
    try:
        class_name = DiffusionPipeline.load_config(home_expanded(model))["_class_name"]
    except (OSError, KeyError, ValueError):
        return None
    adapters = {cls.__name__: adapter for cls, adapter in ADAPTERS.items()}
    if class_name not in adapters:
        raise ValueError(f"unsupported pipeline {class_name}; supported: {', '.join(sorted(adapters))}")
    return adapters[class_name]


def size_problem(model: str, sides: dict[str, int | None]) -> tuple[str, str] | None:
    """The first of `sides` (name → pixels of a height or width, None for the model's default) that `model` cannot
    sample, and why, read from its configs without loading it (`PipelineAdapter.side_problem`); None when each side
    given fits, or when the configs cannot be read (a hub id not downloaded: the adapter checks once loaded)."""
    given = {name: pixels for name, pixels in sides.items() if pixels is not None}
    if not given or (family := adapter_class(model)) is None:
        return None
    path = home_expanded(model)
    try:
        components = DiffusionPipeline.load_config(path)
        denoiser = "transformer" if "transformer" in components else "unet"  # as PipelineAdapter.denoiser
        configs = {name: getattr(diffusers, components[name][1]).load_config(path, subfolder=name)
                   for name in ("vae", denoiser)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # a folder of another layout: loading tells
        return None
    vae_scale_factor = 2 ** (len(configs["vae"]["block_out_channels"]) - 1)  # as the stock pipelines compute it
    for name, pixels in given.items():
        if problem := family.side_problem(pixels, vae_scale_factor, configs[denoiser]):
            return name, problem
    return None


def missing_local_model(model: str, holds: str = "model_index.json") -> str | None:
    """Why `model`, written as a path (absolute, starting with . or ~, or with more than one '/'), names no folder;
    None when it does or when it reads as a hub id (`org/name`), which from_pretrained resolves. `holds`: the file
    a local folder of this kind has."""
    path = Path(home_expanded(model))
    if (path.is_absolute() or model.startswith((".", "~")) or model.count("/") > 1) and not path.is_dir():
        return f"{model} is no folder (a local model is a folder with {holds})"
    return None


def load_adapter(model: str, dtype: torch.dtype | str = torch.float32, device: str | None = None,
                 max_sequence_length: int | None = None, clip_skip: int | None = None,
                 guidance_rescale: float | None = None, true_cfg_scale: float | None = None) -> PipelineAdapter:
    """`DiffusionPipeline.from_pretrained(model)` (hub id or local folder) in `dtype` (or its name, "bfloat16"),
    in eval mode, wrapped in its adapter (the options as for `adapter_for`)."""
    if reason := missing_local_model(model):
        raise FileNotFoundError(f"model: {reason}")
    dtype = torch_dtype(dtype)
    options = {"max_sequence_length": max_sequence_length, "clip_skip": clip_skip,
               "guidance_rescale": guidance_rescale, "true_cfg_scale": true_cfg_scale}
    check_model_options(adapter_class(model), **options)  # before the weights load; the adapter checks them again
    if device is not None and (reason := unusable_device(str(device))):
        raise ValueError(f"device: {reason}")
    pipe = DiffusionPipeline.from_pretrained(home_expanded(model), dtype=dtype)
    adapter = adapter_for(pipe, **options)
    if device is not None:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return adapter


__all__ = ["ADAPTERS", "PipelineAdapter", "PromptEmbeds", "Schedule", "adapter_class", "adapter_for", "load_adapter",
           "missing_local_model"]
