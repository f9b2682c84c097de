"""One entry point for every steering method, with budgets in denoiser evaluations per prompt, and the folder a
steering run leaves (the `sample` layout, each image with its reward, the winning candidate and the budget spent).

A budget B (model evaluations per prompt) sets each method's size: best-of-N and FK get B // steps candidates or
particles, TTSnap the most seeds whose pruned run fits in B, ReNO B // steps − 1 iterations (each iterate costs one
few-step sample). Passing the size itself (`num_candidates`, `num_particles`, `num_seeds`, `iterations`) instead
is fine; passing both is an error.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from align_diffusion.models.base import PipelineAdapter, missing_c_compiler
from align_diffusion.names import STEERING_METHODS
from align_diffusion.rewards.base import Reward, prompt_list
from align_diffusion.rewards.spec import WeightedRewards, score_terms
from align_diffusion.sampling.loop import check_count, checked_noise_level, checked_seed, sampler_problem
from align_diffusion.steering import ttsnap as ttsnap_module
from align_diffusion.steering.best_of_n import best_of_n, check_best_of_n_options
from align_diffusion.steering.candidates import SEED_STRIDE, SteeringResult
from align_diffusion.steering.fk import check_fk_options, default_fk_sampler, fk_steering
from align_diffusion.steering.reno import check_reno_options, reno, steps_per_iterate
from align_diffusion.steering.ttsnap import check_ttsnap_options

SIZE_OPTION = {"best-of-n": "num_candidates", "fk": "num_particles", "ttsnap": "num_seeds", "reno": "iterations"}
METHOD_FUNCTIONS = {"best-of-n": best_of_n, "fk": fk_steering, "reno": reno, "ttsnap": ttsnap_module.ttsnap}


def method_size(method: str, budget: int, steps: int, prune_steps=None, keep=None) -> int:
    """The candidates, particles, seeds or iterations a per-prompt `budget` of model evaluations buys, at `steps`
    denoising steps (ReNO: per iterate; TTSnap: pruned at `prune_steps`, keeping the fractions `keep`)."""
    if method == "ttsnap":
        size = ttsnap_module.seeds_for_budget(budget, list(prune_steps), list(keep), steps)
    elif method == "reno":
        size = budget // steps - 1
    else:
        size = budget // steps
    if size < (0 if method == "reno" else 1):
        raise ValueError(f"a budget of {budget} model evaluations is less than one {method} run of {steps} steps")
    return size


# Arguments of the method functions that a run supplies itself, not options a caller gives
RUN_ARGUMENTS = ("index", "first_index", "seed", "progress")


def check_steering(family: type[PipelineAdapter] | PipelineAdapter, prompts: list[str], reward: Reward | None,
                   method: str, *, budget: int | None = None, prune_reward: Reward | None = None, seed: int = 0,
                   **options) -> dict:
    """Refuses a steering run whose method, budget, options, prompts or seed do not fit, before any compute; returns
    `options`, with the size a budget buys. Candidate c of prompt j is seeded seed + j + c · SEED_STRIDE: every
    prompt's seeds are checked at once (a run failing at a later prompt would have replaced an earlier run).
    `family` is the adapter, or its class read without loading the model (`models.adapter_class`): the checks need
    only its default steps and guidance and whether it is a flow model, so a command makes them before it loads the
    model. With `reward` None (and no `prune_reward`) the rewards' checks are left out: a command makes the others
    before it loads a reward, and all of them once it has."""
    prompts = prompt_list(prompts)
    if method not in STEERING_METHODS:
        raise ValueError(f"method must be one of {STEERING_METHODS}, got {method!r}")
    if prune_reward is not None and method != "ttsnap":
        raise ValueError(f"prune_reward applies to ttsnap, not {method}")
    for name, scorer in (("reward", reward), ("prune_reward", prune_reward)):
        if scorer is not None and not isinstance(scorer, Reward):
            raise TypeError(f"{name} must be a Reward (load_reward(spec) makes one from a spec), got "
                            f"{type(scorer).__name__} {scorer!r}")
        if scorer is not None:
            scorer.check_prompts(prompts)
    parameters = inspect.signature(METHOD_FUNCTIONS[method]).parameters.values()
    run = {p.name: p.default for p in parameters if p.kind == p.KEYWORD_ONLY and p.name not in RUN_ARGUMENTS}
    if unknown := sorted(set(options) - set(run)):
        raise ValueError(f"{method} takes no option {', '.join(map(repr, unknown))}; its options are {sorted(run)}")
    run |= options
    if isinstance(family, PipelineAdapter):  # the size it samples; a command checks it before loading, by its flags
        image_size = family.image_size(run["height"], run["width"])
        family.check_size(*image_size)
        for scorer in (reward, prune_reward):
            if scorer is not None:
                scorer.check_size(*image_size)
    if method == "reno":
        steps = steps_per_iterate(run["num_inference_steps"])
    else:
        steps = family.default_steps if run["num_inference_steps"] is None else run["num_inference_steps"]
    check_count("num_inference_steps", steps)
    guidance = family.default_guidance if run["guidance_scale"] is None else run["guidance_scale"]
    size = SIZE_OPTION[method]
    if budget is not None:
        check_count("budget", budget)
        if size in options:
            raise ValueError(f"give either a budget or {size}, not both")
        run[size] = options[size] = method_size(method, budget, steps, run.get("prune_steps"), run.get("keep"))
    if method != "reno":  # ReNO samples with the ODE
        sampler = run["sampler"] if method != "fk" else run["sampler"] or default_fk_sampler(family.is_flow)
        if problem := sampler_problem(family.is_flow, sampler):
            raise ValueError(f"sampler {problem}")
        level = checked_noise_level(sampler, run["noise_level"], steps)
    if method == "best-of-n":
        check_best_of_n_options(run["num_candidates"], run["batch_size"])
    elif method == "reno":
        check_reno_options(reward, iterations=run["iterations"], lr=run["lr"], reg_weight=run["reg_weight"],
                           grad_clip=run["grad_clip"], momentum=run["momentum"])
    elif method == "ttsnap":
        check_ttsnap_options(steps, guidance, run["negative_prompt"], prune_reward or reward,
                             num_seeds=run["num_seeds"], prune_steps=run["prune_steps"], keep=run["keep"])
    else:
        check_fk_options(steps, level if isinstance(level, list) else [level] * steps, sampler=sampler,
                         **{name: run[name] for name in ("num_particles", "lam", "potential", "resampling",
                                                         "adaptive_threshold", "resample_start", "resample_interval",
                                                         "resample_end")})
    candidates = 1 if method == "reno" else run[size]  # ReNO's iterates reuse each prompt's one noise
    checked_seed(seed, len(prompts) + (candidates - 1) * SEED_STRIDE)
    return options


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
    start: int = 0,
    **options,
) -> Iterator[SteeringResult]:
    """Steers each prompt with `method` (prompt j's candidate 0 seeded `seed + j`); the returned iterator yields
    results in prompt order as they are done, from prompt `start` on (the ones before it are a resumed run's, done
    already). `options` are the method's keyword arguments (sampler, steps, guidance, potential, prune steps, …);
    TTSnap ranks with `prune_reward` (default: `reward` itself on x̂0). What can be told without compute is checked
    first (`check_steering`)."""
    prompts = prompt_list(prompts)
    if not 0 <= start <= len(prompts):
        raise ValueError(f"start must be between 0 and the {len(prompts)} prompts, got {start}")
    options = check_steering(adapter, prompts, reward, method, budget=budget, prune_reward=prune_reward, seed=seed,
                             **options)
    seed = int(seed)  # numpy's, checked whole: the results record it as JSON's
    check_count("reno_batch_size", reno_batch_size)
    return _run(adapter, prompts, reward, method, seed, prune_reward or reward, reno_batch_size, progress, start,
                options)


def _run(adapter, prompts, reward, method, seed, prune_reward, reno_batch_size, progress, start, options):
    with tqdm(total=len(prompts), initial=start, desc=method, disable=not progress) as bar:
        if method == "reno":
            for first in range(start, len(prompts), reno_batch_size):
                chunk = prompts[first : first + reno_batch_size]
                yield from reno(adapter, chunk, reward, seed=seed, first_index=first, progress=progress, **options)
                bar.update(len(chunk))
            return
        for index in range(start, len(prompts)):
            prompt = prompts[index]
            if method == "best-of-n":
                yield best_of_n(adapter, prompt, reward, index=index, seed=seed, **options)
            elif method == "fk":
                yield fk_steering(adapter, prompt, reward, index=index, seed=seed, **options)
            else:
                yield ttsnap_module.ttsnap(adapter, prompt, reward, prune_reward, index=index, seed=seed, **options)
            bar.update(1)


# Options a resumed run may give differently: they change its results only up to float rounding, or not at all, or
# (the seed) are checked record by record.
UNRECORDED_OPTIONS = ("progress", "reno_batch_size", "batch_size", "gradient_checkpointing", "seed")


def steer_to_folder(
    adapter: PipelineAdapter,
    prompts: list[str],
    reward: Reward,
    method: str,
    out_dir: str | Path,
    *,
    shapes_eval: bool = False,
    extra_metadata: dict | None = None,
    overwrite: bool = False,
    resume: bool = False,
    **steer_options,
) -> list[dict]:
    """Steers as `steer(adapter, prompts, reward, method, **steer_options)` and writes each result as it arrives
    (image, and a metadata line with its reward, winner, budget and the run's reward spec and options; with
    `shapes_eval`, ShapesEval's verdict), then the review page; returns the records.

    Results already in `out_dir` are replaced only with `overwrite`, and only once the first new one exists
    (`SampleFolder`), so a run that fails the checks its method makes as it starts leaves them as they were. With
    `resume`, an interrupted run goes on after its last prompt (`steered_already` checks it is this one)."""
    from align_diffusion.gallery import build_gallery
    from align_diffusion.sampling.folder import SampleFolder, adapter_record, check_out_dir

    prompts = prompt_list(prompts)
    if overwrite and resume:
        raise ValueError("overwrite and resume exclude each other")
    earlier = (Path(out_dir) / "metadata.jsonl").exists()
    if earlier and not (overwrite or resume):
        raise FileExistsError(f"{out_dir} already holds results; pass overwrite=True to replace them, or resume=True "
                              "to go on with them")
    check_out_dir(out_dir, overwrite)
    if shapes_eval:  # ShapesEval judges the world's grammar only: refused before any compute
        from align_diffusion.rewards.simple import ShapesReward

        ShapesReward().check_prompts(prompts)
        ShapesReward().check_size(*adapter.image_size(steer_options.get("height"), steer_options.get("width")))
    extra_metadata = {**adapter_record(adapter), **(extra_metadata or {})}  # the model, where the caller says nothing
    run = _run_record(reward, method, shapes_eval, extra_metadata, steer_options)
    done = steered_already(out_dir, prompts, reward, method, shapes_eval=shapes_eval, extra_metadata=extra_metadata,
                           **steer_options) if resume else 0
    results = steer(adapter, prompts, reward, method, start=done, **steer_options)
    with SampleFolder(out_dir) as folder:
        if resume and earlier:
            folder.continue_earlier_run()
        for result in results:
            image = result.image[None]
            rewards = {reward.name: result.reward}
            if isinstance(reward, WeightedRewards):  # each term too, under the names `sample` records them by
                rewards.update({name: float(s) for name, s in score_terms(reward, image, [result.prompt])[1].items()})
            record = {"prompt": result.prompt, "seed": result.seed, "rewards": rewards, "winner": result.winner,
                      "budget": result.budget.as_dict(), "details": result.details, **run}
            if shapes_eval:
                from align_diffusion.world.evaluate import shapes_eval as judge

                verdict = judge([result.prompt], PipelineAdapter.as_saved(image))["per_image"][0]
                record["shapes_strict"] = verdict["strict"]
                record["rewards"].setdefault("shapes", verdict["graded"])  # a `shapes` reward keeps its own score
            folder.add(PipelineAdapter.to_pil(image)[0], record)
    build_gallery(out_dir)
    return folder.records


def steered_already(out_dir: str | Path, prompts: list[str], reward: Reward, method: str, *,
                    shapes_eval: bool = False, extra_metadata: dict | None = None, **steer_options) -> int:
    """How many of `prompts` an interrupted steering run in `out_dir` finished (0 when it holds none); ValueError
    naming what differs when its records are not this run's first prompts under the same method, reward spec,
    options and `extra_metadata`. Needs no model, so a command can check before it loads one."""
    from align_diffusion.gallery.page import read_records
    from align_diffusion.sampling.folder import check_resumable, image_jobs

    if not (Path(out_dir) / "metadata.jsonl").exists():
        return 0
    seed = steer_options.get("seed", 0)
    jobs = image_jobs(prompt_list(prompts), 1, seed)
    terms = reward.keys if isinstance(reward, WeightedRewards) else []  # recorded as steer_to_folder records them
    reward_keys = list(dict.fromkeys([reward.name, *terms, *(["shapes"] if shapes_eval else [])]))
    run = _run_record(reward, method, shapes_eval, extra_metadata, steer_options)
    return check_resumable(read_records(out_dir), jobs, run, reward_keys)


def _run_record(reward: Reward, method: str, shapes_eval: bool, extra_metadata: dict | None,
                steer_options: dict) -> dict:
    """What each record of a steering run holds about the run as a whole."""
    from align_diffusion.sampling.folder import json_safe

    return json_safe({"method": method, "reward": reward.spec, "shapes_eval": shapes_eval,
                      "options": recorded_options(steer_options), **(extra_metadata or {})})


def recorded_options(steer_options: dict) -> dict:
    """The options of a steering run that its records keep, as JSON values (a reward by its spec, a dtype by its
    name): those that change its results. None, every option's way to ask for its default, is left out."""
    recorded = {}
    for key, value in steer_options.items():
        if key in UNRECORDED_OPTIONS or value is None:
            continue
        if isinstance(value, Reward):
            value = value.spec
        elif isinstance(value, torch.dtype):
            value = str(value).removeprefix("torch.")
        recorded[key] = value
    return recorded
