"""Shared by the trainer and reward tests: the overrides of a tiny run, reading its metrics, SD 1.5's clip-skipped
prompt embeddings computed by hand, and a safetensors save interrupted halfway through its file."""

import json
from pathlib import Path


def tiny_overrides(model, prompt_file, output_dir, **extra):
    """A run small enough for a test: 2 prompts × 4 images, 3 SDE steps, JPEG reward, no eval or trackers (GDRO's
    sizes are its gdro.* settings: none of grpo's are set for algorithm=gdro)."""
    values = {
        "model": model, "output_dir": output_dir, "prompts": prompt_file, "eval.prompts": prompt_file,
        "reward": "jpeg", "max_steps": 2, "grpo.group_size": 4, "grpo.batch_size": 8, "grpo.train_batch_size": 4,
        "sampling.num_steps": 3, "sampling.guidance_scale": 2.0, "sampling.batch_size": 8, "eval.every": 0,
        "log_with": "[]", "lora.rank": 4, "lora.alpha": 8, "optim.lr": 1e-2, "async_rewards": "false",
        "checkpoint_every": 1, "device": "cpu",
    }
    if extra.get("algorithm") == "gdro":
        values = {key: value for key, value in values.items() if not key.startswith("grpo.")}
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]


def metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def skipped_clip_embeds(pipe, prompts, clip_skip):
    """SD 1.5's prompt embeddings with `clip_skip` layers skipped, as diffusers documents them: the hidden state
    clip_skip layers before the last, through the final layer norm. (The stock pipeline's own clip_skip branch
    fails under transformers >= 5.6: diffusers issue #14124.)"""
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids
    encoder = pipe.text_encoder
    hidden = encoder(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
    return getattr(encoder, "text_model", encoder).final_layer_norm(hidden)


def interrupted_halfway(save_file):
    """`save_file` (safetensors' signature) that leaves its file cut short and raises KeyboardInterrupt, as Ctrl-C
    or a kill midway through writing it would."""

    def save(tensors, filename, metadata=None):
        save_file(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(Path(filename).read_bytes()[:100])
        raise KeyboardInterrupt

    return save
