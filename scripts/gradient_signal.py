"""How much of a GRPO step's policy gradient is signal: the cosine between the gradients of independent batches.

    python scripts/gradient_signal.py configs/shapes_grpo.yaml prompts=PROMPTS.txt --batches 6

Runs the trainer's own rollout, advantage and backward passes `--batches` times from the same weights (the
learning rate is set to 0, so no step moves them) and compares the gradients pairwise. Each batch's gradient is
g = μ + noise with μ the expected gradient; for independent batches E[cos(g_i, g_j)] ≈ |μ|² / E|g|², the share of
the gradient's power that is signal. That share grows with the batch (≈ n·s / (1 + n·s) for n images with
per-image share s), which is what `--batches` at two `grpo.batch_size` values measures. Overrides are the train
command's dotted key=value pairs.
"""

from __future__ import annotations

import argparse
import itertools
import math
from pathlib import Path

import torch

from align_diffusion.cli import parse_with_overrides
from align_diffusion.training.config import ConfigError, load_config
from align_diffusion.training.grpo import GRPOTrainer


def measure(config_path: str | None, overrides: list[str], batches: int) -> tuple[GRPOTrainer, list[torch.Tensor]]:
    """The trainer (its weights never moved) and the flattened policy gradient of each of `batches` batches."""
    config = load_config(config_path, [*overrides, "optim.lr=0", "eval.every=0", "log_with=[]"])
    trainer = GRPOTrainer(config)
    gradients = []
    trainer.optimizer.optimizer.register_step_pre_hook(
        lambda optimizer, *_: gradients.append(torch.cat([p.grad.flatten().double() for p in trainer.params]))
    )
    for step in range(batches):
        rollouts = trainer.rollout(step)
        advantages, stats = trainer.advantages(rollouts)
        trainer.update(rollouts, advantages, step)
        print(f"batch {step + 1}/{batches}: reward mean {stats['reward_mean']:.3f}, "
              f"zero-spread groups {stats['zero_std_fraction']:.2f}", flush=True)
    return trainer, gradients


def pairwise_cosines(vectors) -> list[float]:
    """The cosine of every pair of `vectors`."""
    return [float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for a, b in itertools.combinations(vectors, 2)]


def cosines_by_module(trainer: GRPOTrainer, gradients: list[torch.Tensor]) -> dict[str, tuple[float, float]]:
    """{LoRA target module: (mean pairwise cosine of the gradients restricted to its parameters, its mean share of
    the gradient's squared norm)}."""
    targets = trainer.config.lora.target_modules
    columns: dict[str, list[int]] = {target: [] for target in targets}
    offset = 0
    for name, param in zip(trainer.trained_names(), trainer.params):
        target = next(t for t in targets if f".{t}.lora_" in f".{name}")
        columns[target].extend(range(offset, offset + param.numel()))
        offset += param.numel()
    stacked = torch.stack(gradients)
    squared_norms = stacked.square().sum(1)
    result = {}
    for target, indices in columns.items():
        restricted = stacked[:, indices]
        cosines = pairwise_cosines(restricted)
        result[target] = (sum(cosines) / len(cosines), float((restricted.square().sum(1) / squared_norms).mean()))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, as for align-diffusion train")
    parser.add_argument("--batches", type=int, default=6,
                        help="independent batches (at least 3: the error needs two or more pairs)")
    parser.add_argument("--by-module", action="store_true", help="also the cosine within each LoRA target module")
    args = parse_with_overrides(parser, None)
    if args.batches < 3:
        parser.error("--batches must be at least 3 (two batches make one pair, whose spread is undefined)")
    if not Path(args.config).is_file():
        parser.error(f"no such config file {args.config}")
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as error:
        parser.error(f"bad config: {error}")
    if args.by_module and not config.lora.enabled:
        parser.error("--by-module needs a LoRA (lora.enabled: true)")
    if config.grpo.updates_per_step != 1:  # each update's gradient would be one of a part of a batch
        parser.error(f"grpo.updates_per_step is {config.grpo.updates_per_step}: one gradient a batch needs 1")
    trainer, gradients = measure(args.config, args.overrides, args.batches)
    if len(gradients) < 3:  # a batch whose groups all scored alike trains nothing, so it gives no gradient
        raise SystemExit(f"only {len(gradients)} of {args.batches} batches gave a gradient (the others' groups did "
                         "not vary); at least 3 are needed: raise --batches or the group size")
    cosines = torch.tensor(pairwise_cosines(gradients))
    # Pairs share batches, so their spread understates the error; the count of gradients is the honest n.
    standard_error = float(cosines.std()) / math.sqrt(len(gradients))
    pairwise = ", ".join(f"{c:.3f}" for c in cosines.tolist())
    print(f"{trainer.config.grpo.batch_size} images a batch, {len(cosines)} pairs: mean cosine "
          f"{float(cosines.mean()):.4f} ± {standard_error:.4f}; pairwise {pairwise}")
    if args.by_module:
        for target, (cosine, share) in cosines_by_module(trainer, gradients).items():
            print(f"  {target:12s} mean cosine {cosine:+.4f}, share of the squared norm {share:.3f}")


if __name__ == "__main__":
    main()
