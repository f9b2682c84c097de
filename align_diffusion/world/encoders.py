"""The world's encoders: a word-level tokenizer, a small CLIP trained contrastively on render–prompt pairs, and a
small ViT in `Dinov2Model` format trained to read the world's objects (the backbone of the adversarial reward).

Both save and load with transformers' own `from_pretrained`, like the real models they stand in for.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model, PreTrainedTokenizerFast

from align_diffusion.world.data import SPECIAL_TOKENS, WORDS, balanced_prompts, render_batch, to_tensor
from align_diffusion.world.fit import fit
from align_diffusion.world.prompts import splits
from align_diffusion.world.evaluate import score_image
from align_diffusion.world.render import render, render_prompt, sample_scene
from align_diffusion.world.spec import COLORS, SHAPES, parse_prompt

MAX_TOKENS = 16  # the longest prompt has 9 words, plus start and end


def world_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the world's vocabulary, with CLIP's start / end / padding conventions. Like CLIP's
    it lowercases, and it drops punctuation, which the world's prompts hold none of: "A red circle." reads as
    "a red circle", not as two unknown words around it. (ShapesEval, the `shapes` reward and the splits keep the
    grammar's own lowercase prompts: they refuse "A red circle.".)"""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(Regex(r"[^\w\s]"), " ")])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", vocab["<|startoftext|>"]), ("<|endoftext|>", vocab["<|endoftext|>"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|unk|>",
        model_max_length=MAX_TOKENS,
    )


def clip_config(tokenizer) -> CLIPConfig:
    text = dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                num_attention_heads=4, max_position_embeddings=MAX_TOKENS, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(image_size=64, patch_size=8, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                  num_attention_heads=4)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=128)


def train_clip(
    steps: int, batch_size: int = 128, seed: int = 0, log=print
) -> tuple[CLIPModel, PreTrainedTokenizerFast]:
    """Contrastive training on fresh renders of the train split's prompts and the test split's, half a batch each:
    as a reward model it must also know the held-out combinations the generators are tested on."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = world_tokenizer()
    model = CLIPModel(clip_config(tokenizer))

    def batch_loss():
        prompts = balanced_prompts("train", batch_size // 2, rng) + balanced_prompts("test", batch_size // 2, rng)
        images = render_batch(prompts, rng)
        tokens = tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, return_tensors="pt")
        out = model(input_ids=tokens.input_ids, pixel_values=images)
        # Identical prompts in a batch are all positives for each other's images.
        same = torch.tensor([[a == b for b in prompts] for a in prompts], dtype=torch.float32)
        target = same / same.sum(1, keepdim=True)
        return (F.cross_entropy(out.logits_per_image, target) + F.cross_entropy(out.logits_per_text, target)) / 2

    fit("clip", model.parameters(), steps, 1e-3, batch_loss, log)
    return model.eval(), tokenizer


def dino_config() -> Dinov2Config:
    return Dinov2Config(image_size=64, patch_size=8, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                        num_attention_heads=4)


OBJECT_KINDS = [(c, s) for c in COLORS for s in SHAPES]


def _object_counts(prompts_objects) -> torch.Tensor:
    return torch.tensor([[sum(o == kind for o in objects) for kind in OBJECT_KINDS] for objects in prompts_objects],
                        dtype=torch.float32)


def train_dino(steps: int, batch_size: int = 128, seed: int = 0, log=print) -> Dinov2Model:
    """Supervised on the world: from the CLS token and mean patch token, regress how many objects of each
    (color, shape) kind an image holds, and from each patch token, which kind (or background) covers it.
    Images enter scaled to [-1, 1], as the renders come (the saved image processor does the same)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = Dinov2Model(dino_config())
    hidden = model.config.hidden_size
    count_head = torch.nn.Linear(2 * hidden, len(OBJECT_KINDS))
    patch_head = torch.nn.Linear(hidden, len(OBJECT_KINDS) + 1)

    def batch_loss():
        prompts = balanced_prompts("train", batch_size, rng)
        scenes = [sample_scene(parse_prompt(p), random.Random(rng.getrandbits(32))) for p in prompts]
        images = to_tensor([render(scene) for scene in scenes])
        counts = _object_counts([[(o.color, o.shape) for o in s] for s in scenes])
        patch_labels = torch.full((batch_size, 8, 8), len(OBJECT_KINDS), dtype=torch.long)
        for b, scene in enumerate(scenes):
            for obj in scene:
                covered = torch.from_numpy(obj.mask()).float().reshape(8, 8, 8, 8).mean((1, 3)) > 0.3
                patch_labels[b][covered] = OBJECT_KINDS.index((obj.color, obj.shape))
        tokens = model(pixel_values=images).last_hidden_state
        cls, patches = tokens[:, 0], tokens[:, 1:]
        count_loss = F.mse_loss(count_head(torch.cat([cls, patches.mean(1)], -1)), counts)
        patch_logits = patch_head(patches).reshape(-1, len(OBJECT_KINDS) + 1)
        return count_loss + F.cross_entropy(patch_logits, patch_labels.reshape(-1))

    params = [*model.parameters(), *count_head.parameters(), *patch_head.parameters()]
    fit("dino", params, steps, 1e-3, batch_loss, log)
    return model.eval()


@torch.no_grad()
def clip_prompt_accuracy(model: CLIPModel, tokenizer, split: str = "test", images_per_prompt: int = 4,
                         seed: int = 1) -> float:
    """How often the CLIP ranks an image's own prompt first among 6 candidates, one per category (the others
    drawn from the same split, among those ShapesEval finds none of the prompt's images to fit: "a square" also
    describes an image of "a green square", and is no wrong answer)."""
    rng = random.Random(seed)
    by_category = splits()[split]
    correct = total = 0
    for category, prompts in by_category.items():
        for prompt in prompts:
            renders = [render_prompt(prompt, rng.getrandbits(32)) for _ in range(images_per_prompt)]
            others = [wrong_answer(by_category[c], renders, rng) for c in by_category if c != category]
            tokens = tokenizer([prompt, *others], padding="max_length", max_length=MAX_TOKENS, return_tensors="pt")
            logits = model(input_ids=tokens.input_ids, pixel_values=to_tensor(renders)).logits_per_image
            correct += (logits.argmax(1) == 0).sum().item()
            total += images_per_prompt
    return correct / total


def wrong_answer(prompts: list[str], renders: list, rng: random.Random) -> str:
    """One of `prompts`, drawn at random among those that fit none of `renders`."""
    for prompt in rng.sample(prompts, len(prompts)):
        if not any(score_image(prompt, render).strict for render in renders):
            return prompt
    raise ValueError(f"every prompt of {prompts[:3]}… fits one of the renders: no wrong answer to draw")
