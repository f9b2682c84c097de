"""Shared by the trainer tests: the overrides of a tiny run, and reading its metrics."""

import json
from pathlib import Path


def tiny_overrides(model, prompt_file, output_dir, **extra):
    """A run small enough for a test: 2 prompts × 4 images, 3 SDE steps, JPEG reward, no eval or trackers."""
    values = {
        "model": model, "output_dir": output_dir, "prompts": prompt_file, "eval.prompts": prompt_file,
        "reward": "jpeg", "max_steps": 2, "grpo.group_size": 4, "grpo.batch_size": 8, "grpo.train_batch_size": 4,
        "sampling.num_steps": 3, "sampling.guidance_scale": 2.0, "sampling.batch_size": 8, "eval.every": 0,
        "log_with": "[]", "lora.rank": 4, "lora.alpha": 8, "optim.lr": 1e-2, "async_rewards": "false",
        "checkpoint_every": 1, "device": "cpu",
    }
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]


def metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
