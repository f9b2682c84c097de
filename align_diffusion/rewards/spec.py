"""Reward specs: the short strings that name rewards on the command line and in configs.

A spec is one or more comma-separated terms `NAME[:ARG][=WEIGHT]`, e.g. `shapes`, `clip:assets/world/clip`,
`pickscore`, `shapes=1.0,artifact:DIR=0.2`. The text after a term's last '=' is its weight when it is a number;
otherwise the '=' belongs to the argument (`remote:http://host/?a=b`). An argument that itself ends in `=NUMBER`
is read whole when it names an existing file or folder (`clip:runs/step=1000`) and its head does not; otherwise it
needs an explicit weight (`clip:runs/step=1000=1`). One unweighted term loads that reward; anything else loads a
`WeightedRewards` whose score is the weighted sum (transforms.py has the normalizing alternatives).
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from align_diffusion.files import home_expanded
from align_diffusion.rewards.base import Reward


@dataclass(frozen=True)
class RewardTerm:
    name: str
    arg: str | None
    weight: float

    @property
    def text(self) -> str:
        """The term as written, without its weight: `jpeg:50`."""
        return self.name if self.arg is None else f"{self.name}:{self.arg}"


# What the rewards that cannot load without an argument need; `parse_spec` refuses a term without one, so their
# loaders below can count on it.
ARGUMENT_NEEDED = {
    "clip": "a model id or path: clip:ID_OR_PATH",
    "hpsv2": "a weights file: hpsv2:WEIGHTS or hpsv2:ARCH:WEIGHTS",
    "aesthetic": "a head weights file: aesthetic:HEAD or aesthetic:CLIP_ID_OR_PATH:HEAD",
    "adv-dino": "a Dinov2 backbone: adv-dino:ID_OR_PATH",
    "artifact": "a trained folder: artifact:DIR",
    "remote": "a URL: remote:http://HOST:PORT",
}


# What a term without an argument means, where that is also a term with one: `shapes` is `shapes:graded`.
DEFAULT_ARGUMENT = {"shapes": "graded", "jpeg": "95"}


def _same_reward(term: RewardTerm) -> tuple[str, str | None]:
    """What two terms share when they load the same reward: `jpeg`, `jpeg:95` and `jpeg:095` do, and so do
    `pickscore` and `pickscore:yuvalkirstain/PickScore_v1`, `hpsv2:W` and `hpsv2:ViT-H-14:W`, and a local folder or
    file however its path is written (`clip:a`, `clip:./a`)."""
    arg = term.arg or DEFAULT_ARGUMENT.get(term.name)
    if term.name == "jpeg":
        try:
            arg = str(_jpeg_quality(arg))
        except ValueError:  # the loader says so
            pass
    if term.name in ("pickscore", "hpsv2", "aesthetic"):  # their models' defaults, where the argument omits them
        from align_diffusion.rewards.clip import AESTHETIC_CLIP, HPS_ARCH, PICKSCORE_MODEL

        if term.name == "pickscore":
            arg = arg or PICKSCORE_MODEL
        elif len(_split_pair(arg)) == 1:
            arg = f"{HPS_ARCH if term.name == 'hpsv2' else AESTHETIC_CLIP}:{arg}"
    if arg is not None and term.name != "remote":
        arg = ":".join(str(Path(home_expanded(part)).resolve()) if Path(home_expanded(part)).exists() else part
                       for part in _split_pair(arg))
    return term.name, arg


def _split_pair(arg: str) -> list[str]:
    """`A:B` → [A, B]; `B` → [B]. B, a file, is the longest tail after a ':' that exists (a path may hold one:
    `/runs/2024-01-01T10:00/hps.pt`), else what follows the last ':', since A may hold one (`hf-hub:org/model`)."""
    parts = arg.split(":")
    for start in range(len(parts)):
        tail = ":".join(parts[start:])
        if Path(home_expanded(tail)).exists():
            return [tail] if start == 0 else [":".join(parts[:start]), tail]
    return arg.rsplit(":", 1)


def _model(arg: str) -> str:
    """`arg`, a transformers model id or folder; FileNotFoundError when it is written as a path to no folder (hub
    loading would otherwise call it a malformed repo id)."""
    from align_diffusion.models import missing_local_model

    if reason := missing_local_model(arg, holds="config.json"):
        raise FileNotFoundError(f"reward model {reason}")
    return home_expanded(arg)


def _clip(arg, device, dtype):
    from align_diffusion.rewards.clip import ClipScore

    return ClipScore(_model(arg), device=device, dtype=dtype)


def _pickscore(arg, device, dtype):
    from align_diffusion.rewards.clip import PickScore

    return PickScore(_model(arg), device=device, dtype=dtype) if arg else PickScore(device=device, dtype=dtype)


def _hpsv2(arg, device, dtype):
    from align_diffusion.rewards.clip import HPSv2

    parts = _split_pair(arg)
    return HPSv2(home_expanded(parts[-1]), *parts[:-1], device=device, dtype=dtype)


def _aesthetic(arg, device, dtype):
    from align_diffusion.rewards.clip import Aesthetic

    parts = _split_pair(arg)
    return Aesthetic(home_expanded(parts[-1]), *map(_model, parts[:-1]), device=device, dtype=dtype)


def _jpeg_quality(arg: str | None) -> int:
    """The quality `jpeg:QUALITY` names: ASCII digits after an optional '+' (Python's int also reads `1_0` and other
    scripts' digits)."""
    arg = arg or DEFAULT_ARGUMENT["jpeg"]
    if not re.fullmatch(r"\+?[0-9]+", arg):
        raise ValueError(f"JPEG quality must be an integer from 1 to 95, got {arg!r}")
    return int(arg)


def _jpeg(arg, device, dtype):
    from align_diffusion.rewards.simple import JpegCompressibility

    return JpegCompressibility(_jpeg_quality(arg))


def _shapes(arg, device, dtype):
    from align_diffusion.rewards.simple import ShapesReward

    return ShapesReward(arg or DEFAULT_ARGUMENT["shapes"])


def _adv_dino(arg, device, dtype):
    from align_diffusion.rewards.adversarial import AdversarialDino

    return AdversarialDino(_model(arg), device=device, dtype=dtype)


def _artifact(arg, device, dtype):
    from align_diffusion.rewards.artifact import ArtifactReward

    return ArtifactReward(home_expanded(arg), device=device, dtype=dtype)


def _remote(arg, device, dtype):
    from align_diffusion.rewards.remote import RemoteReward

    return RemoteReward(arg)


LOADERS: dict[str, Callable[[str | None, torch.device | None, torch.dtype], Reward]] = {
    "clip": _clip,
    "pickscore": _pickscore,
    "hpsv2": _hpsv2,
    "aesthetic": _aesthetic,
    "jpeg": _jpeg,
    "shapes": _shapes,
    "adv-dino": _adv_dino,
    "artifact": _artifact,
    "remote": _remote,
}


def _number(text: str) -> float | None:
    """`text` as a weight, None when it is no number (Python's float reads 1_0 as 10: a typo, not a weight)."""
    try:
        return None if "_" in text else float(text)
    except ValueError:
        return None


def _names_path(term_text: str) -> bool:
    """Whether the argument of `NAME:ARG` (its file, for `ARCH:FILE` pairs) is an existing file or folder."""
    _, sep, arg = term_text.partition(":")
    return bool(sep and arg.strip()) and Path(home_expanded(_split_pair(arg.strip())[-1])).exists()


def _split_weight(text: str) -> tuple[str, float]:
    """`TERM=WEIGHT` → (TERM, WEIGHT); `TERM` → (TERM, 1.0), also when an argument holds the last '=' (see the
    module docstring)."""
    head, sep, tail = text.rpartition("=")
    if not sep:
        return text, 1.0
    head = head.rstrip()  # `shapes = 1`
    weight = _number(tail)
    if weight is None:
        if ":" in head:
            return text, 1.0
        raise ValueError(f"reward term {text!r}: weight {tail!r} is not a number")
    if ":" in head and _names_path(text):
        if _names_path(head):
            raise ValueError(f"reward term {text!r}: both {text.partition(':')[2]!r} and {head.partition(':')[2]!r} "
                             f"exist; is {tail!r} a weight? write one after the term: {text}=1")
        return text, 1.0
    if not math.isfinite(weight):
        raise ValueError(f"reward term {text!r}: weight {tail!r} is not finite")
    if weight == 0:  # 0 × NaN: the term would add nothing but its failures
        raise ValueError(f"reward term {text!r}: weight 0 adds nothing but the images it fails to score; leave the "
                         "term out (eval.rewards watches a reward without training on it)")
    query = head.rpartition("?")[2]
    if "?" in head and "=" not in query.rpartition("&")[2]:
        raise ValueError(f"reward term {text!r}: is {tail!r} a weight or the value of the URL's "
                         f"{query.rpartition('&')[2]!r}? write a weight after it: {text}=1")
    return head, weight


def _reads_back(text: str) -> bool:
    """Whether a term written without its weight parses back as itself (weight 1) wherever it is read: not when it
    ends in `=NUMBER`, which reads as a weight unless a path of that name exists there."""
    head, sep, tail = text.rpartition("=")
    return not sep or _number(tail) is None


def parse_spec(spec: str) -> list[RewardTerm]:
    """Terms of a spec; ValueError naming the bad term for unknown names, missing arguments, bad weights or
    repeated rewards."""
    if not spec or not spec.strip():
        raise ValueError("empty reward spec")
    terms = []
    for text in spec.split(","):
        text, weight = _split_weight(text.strip())
        name, colon, arg = (part.strip() for part in text.partition(":"))
        if name not in LOADERS:
            raise ValueError(f"reward term {text!r}: unknown reward {name!r}; choose from {sorted(LOADERS)}")
        if colon and not arg:
            raise ValueError(f"reward term {text!r}: nothing after ':'; give an argument or leave the ':' out")
        if name in ARGUMENT_NEEDED and not arg:
            raise ValueError(f"reward term {text!r}: needs {ARGUMENT_NEEDED[name]}")
        terms.append(RewardTerm(name, arg or None, weight))
    keys = [_same_reward(t) for t in terms]
    if len(set(keys)) != len(keys):
        raise ValueError(f"reward spec {spec!r} names the same reward twice")
    return terms


class WeightedRewards(Reward):
    """Several rewards scored together; `score` is their weighted sum, `score_each` gives each one under its key
    (by default the reward's name; `load_reward` keys rewards whose names collide by their term, `jpeg:50`). Its
    spec joins the rewards' specs with their weights: `load_reward` reads it back when each came from it."""

    def __init__(self, rewards: list[Reward], weights: list[float], keys: list[str] | None = None):
        keys = [r.name for r in rewards] if keys is None else list(keys)
        weights = list(weights)
        if not rewards or len(weights) != len(rewards) or len(keys) != len(rewards):
            raise ValueError(f"weighted rewards need one weight and key per reward, and a reward at least; got "
                             f"{len(rewards)} rewards, {len(weights)} weights and {len(keys)} keys")
        if not all(isinstance(w, numbers.Real) and math.isfinite(w) and w != 0 for w in weights):
            raise ValueError(f"weights must be finite numbers other than 0, got {weights}")
        if len(set(keys)) != len(keys):
            raise ValueError(f"weighted rewards need distinct keys, got {keys}")
        super().__init__(",".join(f"{key}={w:g}" for key, w in zip(keys, weights)))
        self.spec = ",".join(f"{reward.spec}={float(weight)!r}" for reward, weight in zip(rewards, weights))
        self.rewards = torch.nn.ModuleList(rewards)
        self.weights = weights
        self.keys = keys
        self.differentiable = all(r.differentiable for r in rewards)
        self.needs_reference = any(r.needs_reference for r in rewards)
        self.trainable = any(r.trainable for r in rewards)
        self.stateful = any(r.stateful for r in rewards)

    def score_each(self, images, prompts, metadata=None) -> dict[str, torch.Tensor]:
        return {key: r(images, prompts, metadata) for key, r in zip(self.keys, self.rewards)}

    def score(self, images, prompts, metadata):
        each = self.score_each(images, prompts, metadata)
        return sum(w * scores.to(images.device) for w, scores in zip(self.weights, each.values()))

    def check_prompt_list(self, prompts):
        for reward in self.rewards:
            reward.check_prompt_list(prompts)

    def check_size(self, height, width):
        for reward in self.rewards:
            reward.check_size(height, width)

    def image_networks(self):
        return [network for reward in self.rewards for network in reward.image_networks()]

    def reward_state(self) -> dict:
        return {str(k): r.reward_state() for k, r in enumerate(self.rewards) if r.stateful}

    def load_reward_state(self, state: dict) -> None:
        for key, term_state in state.items():
            self.rewards[int(key)].load_reward_state(term_state)


def _load_term(term: RewardTerm, device, dtype: torch.dtype) -> Reward:
    try:
        return LOADERS[term.name](term.arg, device, dtype)
    except ValueError as error:
        raise ValueError(f"reward term {term.text!r}: {error}") from error


def load_reward(spec: str, device=None, dtype: torch.dtype | str = torch.float32) -> Reward:
    """The reward a spec names (see the module docstring), its networks in `dtype` (or its name, "float16").
    Loading leaves torch's global RNG as it was (models draw init weights before their checkpoints overwrite them),
    so adding a reward never shifts a seeded run's noise."""
    from align_diffusion.models.base import torch_dtype

    dtype = torch_dtype(dtype)
    terms = parse_spec(spec)
    with torch.random.fork_rng(devices=[]):
        rewards = [_load_term(t, device, dtype) for t in terms]
    if len(terms) == 1 and terms[0].weight == 1.0:
        reward = rewards[0]
        reward.spec = terms[0].text if _reads_back(terms[0].text) else f"{terms[0].text}=1"
        return reward
    names = [r.name for r in rewards]
    keys = [r.name if names.count(r.name) == 1 else t.text for r, t in zip(rewards, terms)]
    for reward, term in zip(rewards, terms):
        reward.spec = term.text
    return WeightedRewards(rewards, [t.weight for t in terms], keys)


def score_terms(reward: Reward, images, prompts) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The combined reward and each term's scores (one term: the reward itself), on the CPU, without gradients."""
    with torch.no_grad():
        if isinstance(reward, WeightedRewards):
            each = {name: s.cpu() for name, s in reward.score_each(images, prompts).items()}
            total = sum(w * s for w, s in zip(reward.weights, each.values()))
            return total, each
        scores = reward(images, prompts).cpu()
        return scores, {reward.name: scores}
