"""LoRA on the denoiser through peft, and its export in diffusers format.

The exported folder holds `pytorch_lora_weights.safetensors` with the adapter's metadata (rank, alpha, targets):
without it an adapter whose alpha differs from its rank reloads at the wrong scale, so the stock pipeline's
`load_lora_weights(folder)` would not reproduce the trained model. The metadata holds only the fields diffusers
would infer from the weights: diffusers builds a `LoraConfig` from all of it, and peft's full config names fields an
older peft (one diffusers still accepts) refuses.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict

from align_diffusion.models.base import PipelineAdapter

ADAPTER_NAME = "default"
# Modules peft can wrap with a LoRA layer; a name matching any other (a block, a ModuleList) fails inside peft.
LORA_LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Embedding)
EXPORTED_METADATA = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_dora", "lora_bias")


def add_lora(adapter: PipelineAdapter, rank: int, alpha: float, target_modules: list[str]) -> list[torch.nn.Parameter]:
    """Attaches a fresh LoRA (B = 0, so the model is unchanged) and returns its trainable parameters, float32."""
    denoiser = adapter.denoiser
    for target in target_modules:
        matches = [(n, m) for n, m in denoiser.named_modules() if n == target or n.endswith("." + target)]
        if not matches:
            raise ValueError(f"lora.target_modules: {target!r} matches no module of {type(denoiser).__name__}")
        if wrong := next(((n, m) for n, m in matches if not isinstance(m, LORA_LAYERS)), None):
            raise ValueError(f"lora.target_modules: {target!r} matches {wrong[0]}, a {type(wrong[1]).__name__}; "
                             "LoRA wraps linear, convolution and embedding layers (name one inside it)")
    denoiser.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules)
    denoiser.add_adapter(config, adapter_name=ADAPTER_NAME)
    params = [p for name, p in denoiser.named_parameters() if "lora_" in name]
    for param in params:
        param.data = param.data.float()
        param.requires_grad_(True)
    return params


def export_lora(adapter: PipelineAdapter, folder: str | Path):
    """Writes the denoiser's LoRA as a diffusers LoRA folder."""
    denoiser = adapter.denoiser
    layers = get_peft_model_state_dict(denoiser, adapter_name=ADAPTER_NAME)
    layers = {key: value.detach().to(torch.float32).cpu().contiguous() for key, value in layers.items()}
    config = denoiser.peft_config[ADAPTER_NAME].to_dict()
    metadata = {key: config[key] for key in EXPORTED_METADATA if key in config}
    prefix = adapter.denoiser_name
    type(adapter.pipe).save_lora_weights(
        str(folder), **{f"{prefix}_lora_layers": layers, f"{prefix}_lora_adapter_metadata": metadata}
    )
