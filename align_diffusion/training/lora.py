"""LoRA on the denoiser through peft, and its export in diffusers format.

The exported folder holds `pytorch_lora_weights.safetensors` with the adapter's metadata (rank, alpha, targets):
without it an adapter whose alpha differs from its rank reloads at the wrong scale, so the stock pipeline's
`load_lora_weights(folder)` would not reproduce the trained model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict

from align_diffusion.models.base import PipelineAdapter

ADAPTER_NAME = "default"


def add_lora(adapter: PipelineAdapter, rank: int, alpha: float, target_modules: list[str]) -> list[torch.nn.Parameter]:
    """Attaches a fresh LoRA (B = 0, so the model is unchanged) and returns its trainable parameters, float32."""
    denoiser = adapter.denoiser
    names = [name for name, _ in denoiser.named_modules()]
    missing = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ValueError(f"lora.target_modules: {missing} match no module of {type(denoiser).__name__}")
    denoiser.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules)
    denoiser.add_adapter(config, adapter_name=ADAPTER_NAME)
    params = [p for name, p in denoiser.named_parameters() if "lora_" in name]
    for param in params:
        param.data = param.data.float()
        param.requires_grad_(True)
    return params


def export_lora(adapter: PipelineAdapter, folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None):
    """Writes the denoiser's LoRA (or `state_dict`, peft-format keys) as a diffusers LoRA folder."""
    denoiser = adapter.denoiser
    layers = state_dict if state_dict is not None else get_peft_model_state_dict(denoiser, adapter_name=ADAPTER_NAME)
    layers = {key: value.detach().to(torch.float32).cpu().contiguous() for key, value in layers.items()}
    metadata = denoiser.peft_config[ADAPTER_NAME].to_dict()
    prefix = "transformer" if hasattr(adapter.pipe, "transformer") else "unet"
    type(adapter.pipe).save_lora_weights(
        str(folder), **{f"{prefix}_lora_layers": layers, f"{prefix}_lora_adapter_metadata": metadata}
    )
