"""One entry point for every steering method, with budgets in denoiser evaluations per prompt, and the folder a
steering run leaves (the `sample` layout, each image with its reward, the winning candidate and the budget spent).

A budget B (model evaluations per prompt) sets each method's size: best-of-N and FK get B // steps candidates or
particles, TTSnap the most seeds whose pruned run fits in B, ReNO B // steps − 1 iterations (each iterate costs one
few-step sample). Passing the size itself (`num_candidates`, `num_particles`, `num_seeds`, `iterations`) instead
is fine; passing both is an error.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from tqdm.auto import tqdm

from align_diffusion.models.base import PipelineAdapter, missing_c_compiler
from align_diffusion.rewards.base import Reward
from align_diffusion.sampling.loop import prompt_list, resolve_settings
from align_diffusion.steering import ttsnap as ttsnap_module
from align_diffusion.steering.best_of_n import best_of_n
from align_diffusion.steering.candidates import SteeringResult
from align_diffusion.steering.fk import fk_steering
from align_diffusion.steering.reno import DEFAULT_STEPS as RENO_STEPS
from align_diffusion.steering.reno import reno

METHODS = ("best-of-n", "fk", "reno", "ttsnap")
SIZE_OPTION = {"best-of-n": "num_candidates", "fk": "num_particles", "ttsnap": "num_seeds", "reno": "iterations"}


def method_size(adapter: PipelineAdapter, method: str, budget: int, options: dict) -> int:
    """The candidates, particles, seeds or iterations a per-prompt `budget` of model evaluations buys."""
    default_steps = RENO_STEPS if method == "reno" else None
    steps = resolve_settings(adapter, "ode", options.get("num_inference_steps", default_steps)).num_inference_steps
    if method == "ttsnap":
        size = ttsnap_module.seeds_for_budget(budget, list(options.get("prune_steps", ttsnap_module.PRUNE_STEPS)),
                                              list(options.get("keep", ttsnap_module.KEEP)), steps)
    elif method == "reno":
        size = budget // steps - 1
    else:
        size = budget // steps
    if size < (0 if method == "reno" else 1):
        raise ValueError(f"a budget of {budget} model evaluations is less than one {method} run of {steps} steps")
    return size


def compile_models(adapter: PipelineAdapter, *rewards: Reward, mode: str = "default") -> list[str]:
    """Compiles in place, with `torch.compile`, what steering runs again and again at one size: the whole denoiser,
    the VAE's decoder and the rewards' image networks. Each compiles at its first call per grad mode and shape
    (minutes at full size); after that it runs fewer, fused kernels, so a GPU gets fewer launches per step
    (benchmarks/README.md says what that is worth where measured). `mode` is torch.compile's
    ("reduce-overhead" also replays CUDA graphs on a GPU). Returns the compiled modules' class names."""
    if error := missing_c_compiler("compile_models"):
        raise RuntimeError(error)
    modules = [adapter.denoiser, adapter.decoding_vae().decoder]
    modules += [network for reward in rewards for network in reward.image_networks()]
    for module in modules:
        module.compile(mode=mode)
    return [type(module).__name__ for module in modules]


def steer(
    adapter: PipelineAdapter,
    prompts: list[str],
    reward: Reward,
    method: str,
    *,
    budget: int | None = None,
    seed: int = 0,
    prune_reward: Reward | None = None,
    reno_batch_size: int = 16,
    progress: bool = True,
    **options,
) -> Iterator[SteeringResult]:
    """Steers each prompt with `method` (prompt j's candidate 0 seeded `seed + j`); the returned iterator yields
    results in prompt order as they are done. `options` are the method's keyword arguments (sampler, steps,
    guidance, potential, prune steps, …); TTSnap ranks with `prune_reward` (default: `reward` itself on x̂0).
    The method and the budget are checked here, before any compute."""
    prompts = prompt_list(prompts)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    size = SIZE_OPTION[method]
    if budget is not None:
        if size in options:
            raise ValueError(f"give either a budget or {size}, not both")
        options[size] = method_size(adapter, method, budget, options)
    return _run(adapter, prompts, reward, method, seed, prune_reward or reward, reno_batch_size, progress, options)


def _run(adapter, prompts, reward, method, seed, prune_reward, reno_batch_size, progress, options):
    with tqdm(total=len(prompts), desc=method, disable=not progress) as bar:
        if method == "reno":
            for start in range(0, len(prompts), reno_batch_size):
                chunk = prompts[start : start + reno_batch_size]
                yield from reno(adapter, chunk, reward, seed=seed, first_index=start, progress=progress, **options)
                bar.update(len(chunk))
            return
        for index, prompt in enumerate(prompts):
            if method == "best-of-n":
                yield best_of_n(adapter, prompt, reward, index=index, seed=seed, **options)
            elif method == "fk":
                yield fk_steering(adapter, prompt, reward, index=index, seed=seed, **options)
            else:
                yield ttsnap_module.ttsnap(adapter, prompt, reward, prune_reward, index=index, seed=seed, **options)
            bar.update(1)


def steer_to_folder(results: Iterator[SteeringResult], out_dir: str | Path, *, reward_name: str,
                    shapes_eval: bool = False, extra_metadata: dict | None = None) -> list[dict]:
    """Writes each result as it arrives (image, and a metadata line with its reward, winner and budget; with
    `shapes_eval`, ShapesEval's verdict), then the review page; returns the records. The folder's earlier results
    are replaced only once the first new one exists (`SampleFolder`), so a run that fails the checks its method
    makes as it starts leaves them as they were."""
    from align_diffusion.gallery import build_gallery
    from align_diffusion.sampling.folder import SampleFolder

    with SampleFolder(out_dir) as folder:
        for result in results:
            record = {"prompt": result.prompt, "seed": result.seed, "method": result.method,
                      "rewards": {reward_name: result.reward}, "winner": result.winner,
                      "budget": result.budget.as_dict(), "details": result.details, **(extra_metadata or {})}
            image = result.image[None]
            if shapes_eval:
                from align_diffusion.world.evaluate import shapes_eval as judge

                verdict = judge([result.prompt], PipelineAdapter.as_saved(image))["per_image"][0]
                record["shapes_strict"] = verdict["strict"]
                record["rewards"]["shapes"] = verdict["graded"]
            folder.add(PipelineAdapter.to_pil(image)[0], record)
    build_gallery(out_dir)
    return folder.records
