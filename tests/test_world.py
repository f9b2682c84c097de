"""The shapes world: renderer properties from the spec, prompt grammar and splits, and ShapesEval."""

import itertools
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from align_diffusion.world.encoders import wrong_answer
from align_diffusion.world.evaluate import detect, score_image, shapes_eval
from align_diffusion.world.prompts import all_prompts, is_held_out, split_prompts, splits
from align_diffusion.world.generators import GENERATOR_LAYOUT
from align_diffusion.world.render import Layout, Placed, render, render_prompt, sample_scene
from align_diffusion.world.spec import (BACKGROUND, CANVAS, COLORS, MAX_SIDE, MIN_SIDE, SHAPES, Requirement, Wanted,
                                        parse_prompt)


@pytest.mark.parametrize("layout", [Layout(), GENERATOR_LAYOUT], ids=["spec", "generators"])
def test_renders_use_only_the_palette_and_respect_the_layout_rules(layout):
    allowed = {BACKGROUND, *COLORS.values()}
    rng = random.Random(0)
    prompts = [p for ps in all_prompts().values() for p in ps]
    sides = set()
    for k in range(300):
        prompt = rng.choice(prompts)
        objects = sample_scene(parse_prompt(prompt), random.Random(k), layout=layout)
        image = render(objects)
        assert image.shape == (CANVAS, CANVAS, 3) and image.dtype == np.uint8
        assert {tuple(p) for p in image.reshape(-1, 3)} <= allowed
        assert score_image(prompt, image).strict
        for obj in objects:
            assert layout.min_side <= obj.side <= layout.max_side
            assert obj.x % layout.grid == 0 and obj.y % layout.grid == 0
            sides.add(obj.side)
            assert 0 <= obj.x and obj.x + obj.side <= CANVAS and 0 <= obj.y and obj.y + obj.side <= CANVAS
        for a, b in itertools.combinations(objects, 2):  # boxes at least 2 px apart on some axis
            assert (a.x + a.side + 2 <= b.x or b.x + b.side + 2 <= a.x
                    or a.y + a.side + 2 <= b.y or b.y + b.side + 2 <= a.y)
    assert sides == set(range(layout.min_side, layout.max_side + 1))


@pytest.mark.parametrize("fields", [dict(min_side=MIN_SIDE - 1), dict(max_side=MAX_SIDE + 1),
                                    dict(min_side=18, max_side=14), dict(grid=0)])
def test_layouts_outside_the_spec_are_refused(fields):
    with pytest.raises(ValueError, match="Layout"):
        Layout(**fields)


def test_triangle_points_up_with_a_flat_base():
    image = render_prompt("a red triangle", seed=3)
    ys, xs = np.nonzero((image == COLORS["red"]).all(-1))
    top_row, bottom_row = xs[ys == ys.min()], xs[ys == ys.max()]
    assert len(top_row) <= 2 and len(bottom_row) >= MIN_SIDE - 1
    assert abs(np.ptp(ys) - np.ptp(xs)) <= 1  # width = height


def test_position_renders_satisfy_the_relation_on_centroids():
    image = render_prompt("a red square left of a blue circle", seed=1)
    red_x = np.nonzero((image == COLORS["red"]).all(-1))[1].mean()
    blue_x = np.nonzero((image == COLORS["blue"]).all(-1))[1].mean()
    assert blue_x - red_x >= 8


def test_render_is_deterministic_in_the_seed():
    assert np.array_equal(render_prompt("three circles", 5), render_prompt("three circles", 5))
    assert not np.array_equal(render_prompt("three circles", 5), render_prompt("three circles", 6))


def test_grammar_parses_every_prompt_and_rejects_others():
    prompts = all_prompts()
    assert len(prompts["colors"]) == 18 and len(prompts["counting"]) == 9 and len(prompts["two_object"]) == 6
    for category, items in prompts.items():
        for prompt in items:
            assert parse_prompt(prompt).category == category
    for bad in ["a circle and a circle", "a red circle and a red square", "five circles", "A red circle", "a cat",
                "a red circle above a red circle"]:
        with pytest.raises(ValueError, match="not a shapes-world prompt"):
            parse_prompt(bad)


def test_test_split_holds_combinations_never_named_in_training():
    parts = splits(seed=0)
    train = {p for ps in parts["train"].values() for p in ps}
    for category, prompts in parts["test"].items():
        assert prompts, category
        if category != "single_object":
            assert all(is_held_out(p) and p not in train for p in prompts)
    assert not any(is_held_out(p) for c, ps in parts["train"].items() if c != "single_object" for p in ps)
    assert split_prompts("test", seed=0) == split_prompts("test", seed=0)
    with pytest.raises(ValueError, match="split"):
        split_prompts("dev")


@pytest.fixture(scope="module")
def test_renders():
    prompts = split_prompts("test") * 4
    return prompts, [render_prompt(p, 100 + k) for k, p in enumerate(prompts)]


def test_shapes_eval_scores_clean_test_renders(test_renders):
    prompts, images = test_renders
    result = shapes_eval(prompts, images)
    assert result["overall_strict"] >= 0.99 and result["graded"] >= 0.99
    assert set(result["per_category_strict"]) == {"single_object", "colors", "counting", "two_object",
                                                   "color_attr", "position"}


def test_an_empty_evaluation_is_refused_by_name():
    with pytest.raises(ValueError, match="shapes_eval needs at least one image"):
        shapes_eval([], [])


def test_the_clip_metric_draws_only_wrong_answers():
    """"a square" describes an image of "a green square": ranking it first is no mistake of the CLIP's."""
    renders = [render_prompt("a green square", seed) for seed in range(4)]
    fitting = ["a square", "a green square"]
    assert all(score_image(prompt, render).strict for prompt in fitting for render in renders)
    rng = random.Random(0)
    drawn = {wrong_answer([*fitting, "a circle", "a red square"], renders, rng) for _ in range(50)}
    assert drawn == {"a circle", "a red square"}
    with pytest.raises(ValueError, match="no wrong answer to draw"):
        wrong_answer(fitting, renders, rng)


def test_shapes_eval_standard_errors_hand_worked():
    blank = render([])
    prompts = ["a circle"] * 4 + ["a red square"] * 2
    images = [render_prompt("a circle", 0), render_prompt("a circle", 1), render_prompt("a circle", 2), blank,
              render_prompt("a red square", 3), blank]
    result = shapes_eval(prompts, images)
    assert result["per_category_strict"] == {"single_object": 0.75, "colors": 0.5}
    # √(0.75 · 0.25 / 4) and √(0.5 · 0.5 / 2); overall: the mean of the two, so √(se₁² + se₂²) / 2.
    assert result["per_category_strict_se"]["single_object"] == pytest.approx(0.2165064, abs=1e-6)
    assert result["per_category_strict_se"]["colors"] == pytest.approx(0.3535534, abs=1e-6)
    assert result["overall_strict"] == pytest.approx(0.625)
    assert result["overall_strict_se"] == pytest.approx(0.2072890, abs=1e-6)


def test_pass_at_k_hand_worked():
    blank = render([])
    # "a circle": 1 of 4 correct; "a square": 3 of 4; "a red square": 0 of 4 (colors).
    prompts = ["a circle"] * 4 + ["a square"] * 4 + ["a red square"] * 4
    images = [render_prompt("a circle", 0), blank, blank, blank,
              render_prompt("a square", 1), render_prompt("a square", 2), render_prompt("a square", 3), blank,
              blank, blank, blank, blank]
    result = shapes_eval(prompts, images)["pass_at_k"]
    assert list(result) == ["1", "2", "4"]
    # pass@2 of one prompt: 1 − C(n − c, 2) / C(4, 2) = 1 − 3/6 for c = 1, 1 − 0/6 for c = 3.
    assert result["1"]["per_category"] == {"single_object": pytest.approx(0.5), "colors": 0.0}
    assert result["2"]["per_category"] == {"single_object": pytest.approx(0.75), "colors": 0.0}
    assert result["4"]["per_category"] == {"single_object": pytest.approx(1.0), "colors": 0.0}
    assert result["2"]["overall"] == pytest.approx(0.375)
    # The fewest images of any prompt bound k.
    assert list(shapes_eval(prompts[:7], images[:7])["pass_at_k"]) == ["1", "2"]


def test_shapes_eval_survives_mild_blur_and_noise(test_renders):
    prompts, images = test_renders
    rng = np.random.default_rng(0)
    degraded = [
        np.clip(np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(0.8)), np.float32)
                + rng.normal(0, 10, im.shape), 0, 255).round().astype(np.uint8)
        for im in images
    ]
    assert shapes_eval(prompts, degraded)["overall_strict"] >= 0.95


@pytest.mark.parametrize("radius", [0, 0.8, 1.0, 1.2])
def test_every_legal_side_of_every_shape_is_read_through_mild_blur(radius):
    # Blur shaves a small triangle's apex, which lifts its fill into the circle band; the apex-up profile decides.
    colors = list(COLORS)
    for shape in SHAPES:
        for side in range(MIN_SIDE, MAX_SIDE + 1):
            color = colors[side % len(colors)]
            image = Image.fromarray(render([Placed(shape, color, 20, 20, side)]))
            blurred = image.filter(ImageFilter.GaussianBlur(radius)) if radius else image
            assert [(d.shape, d.color) for d in detect(blurred)] == [(shape, color)], (shape, side)


def test_shapes_eval_is_near_zero_for_shuffled_prompts(test_renders):
    prompts, images = test_renders
    shuffled = prompts[:]
    random.Random(0).shuffle(shuffled)
    assert shapes_eval(shuffled, images)["overall_strict"] <= 0.15


def draw(shapes):
    """Shapes drawn with PIL's own primitives, independent of our renderer."""
    image = Image.new("RGB", (CANVAS, CANVAS), BACKGROUND)
    pen = ImageDraw.Draw(image)
    for shape, color, (x, y, side) in shapes:
        box = (x, y, x + side - 1, y + side - 1)
        if shape == "circle":
            pen.ellipse(box, fill=COLORS[color])
        elif shape == "square":
            pen.rectangle(box, fill=COLORS[color])
        else:
            pen.polygon([(x + side / 2, y), (x, y + side - 1), (x + side - 1, y + side - 1)], fill=COLORS[color])
    return image


def test_detects_shapes_drawn_by_pil():
    image = draw([("circle", "red", (4, 4, 16)), ("square", "blue", (30, 6, 14)), ("triangle", "yellow", (8, 40, 18))])
    found = sorted((d.shape, d.color) for d in detect(image))
    assert found == [("circle", "red"), ("square", "blue"), ("triangle", "yellow")]
    assert score_image("a red circle above a yellow triangle", image).strict is False  # a blue square extra
    two = draw([("circle", "red", (4, 4, 16)), ("triangle", "yellow", (8, 40, 18))])
    assert score_image("a red circle above a yellow triangle", two).strict
    assert not score_image("a red circle below a yellow triangle", two).strict


def test_graded_scores_by_hand():
    image = draw([("circle", "red", (10, 10, 16))])
    assert score_image("a red circle", image).graded == 1.0
    assert score_image("a blue circle", image).graded == 0.5  # right shape, wrong color
    assert score_image("a square", image).graded == 0.0
    assert score_image("two circles", image).graded == 0.5  # one of two found
    pair = draw([("circle", "red", (4, 20, 16)), ("square", "blue", (40, 20, 16))])
    assert score_image("a red circle left of a blue square", pair).graded == 1.0
    assert score_image("a red circle right of a blue square", pair).graded == 0.5  # relation wrong
    assert score_image("a red circle", pair).graded == 0.5  # one extra object halves the credit
    blob = Image.new("RGB", (CANVAS, CANVAS), BACKGROUND)
    ImageDraw.Draw(blob).rectangle((10, 10, 40, 14), fill=COLORS["red"])  # a bar: no world shape
    assert score_image("a red square", blob).graded == 0.5 and not score_image("a red square", blob).strict


def test_graded_score_searches_the_assignment_that_satisfies_the_relation():
    # A small red circle left of a blue square, and a larger red circle right of it (detections are tried largest
    # first). Circle 1 + square: both objects right (2 of 2), relation holds (× 1), one extra object (/ 2): 0.5.
    scene = [Placed("circle", "red", 2, 20, 14), Placed("square", "blue", 22, 20, 16),
             Placed("circle", "red", 42, 20, 20)]
    judgement = score_image("a red circle left of a blue square", render(scene))
    assert judgement.graded == 0.5 and not judgement.strict  # the extra circle still fails the strict verdict
    alone = score_image("a red circle left of a blue square", render(scene[:2]))
    assert alone.graded == 1.0 and alone.strict


def test_reads_uint8_arrays_pil_images_and_unit_float_tensors_and_refuses_the_rest():
    image = render_prompt("a green square", seed=0)
    tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    for accepted in (image, Image.fromarray(image), tensor, tensor.half(), tensor * 1.0005):  # rounding noise passes
        assert score_image("a green square", accepted).strict
    assert detect(torch.full((3, CANVAS, CANVAS), float("nan"))) == []  # a diverged sample shows nothing
    refused = {
        "float64 and shape": image / 255,  # diffusers' output_type="np"
        "float32 and shape": image.astype(np.float32),
        "uint8 and shape .3, 64, 64": torch.from_numpy(image).permute(2, 0, 1),
        "tensor with values from -0.8118 to 0.4902": tensor * 2 - 1,  # [-1, 1]
        "tensor with values from 24 to 190": tensor * 255,
        "shape .64, 64, 3.": tensor.permute(1, 2, 0),
        "uint8 and shape .32, 32, 3.": np.zeros((32, 32, 3), np.uint8),
        "got a list": image.tolist(),
        "got a 128×64 PIL image": Image.new("RGB", (128, 64)),  # not "an ndarray": the caller gave no array
    }
    for got, wrong in refused.items():
        with pytest.raises(ValueError, match=f"ShapesEval takes a uint8 .64, 64, 3. array.*{got}"):
            score_image("a green square", wrong)
    with pytest.raises(ValueError, match="prompts"):
        shapes_eval(["a green square"], [])


@pytest.mark.parametrize("prompt, requirement", [
    ("a circle", Requirement("single_object", (Wanted("circle"),))),
    ("a purple triangle", Requirement("colors", (Wanted("triangle", "purple"),))),
    ("two squares", Requirement("counting", (Wanted("square"),) * 2)),
    ("three triangles", Requirement("counting", (Wanted("triangle"),) * 3)),
    ("four circles", Requirement("counting", (Wanted("circle"),) * 4)),
    ("a square and a triangle", Requirement("two_object", (Wanted("square"), Wanted("triangle")))),
    ("a red square and a blue circle",
     Requirement("color_attr", (Wanted("square", "red"), Wanted("circle", "blue")))),
    *[(f"a white circle {relation} a green square",
       Requirement("position", (Wanted("circle", "white"), Wanted("square", "green")), relation))
      for relation in ("left of", "right of", "above", "below")],
])
def test_parse_prompt_gives_the_exact_requirement(prompt, requirement):
    assert parse_prompt(prompt) == requirement


# Hand-built images: shapes drawn pixel by pixel here, not by the renderer, so the expected verdicts do not lean on
# the code under test. A box is [x, x + width) × [y, y + height).
def rect(x, y, width, height=None):
    mask = np.zeros((CANVAS, CANVAS), bool)
    mask[y:y + (height or width), x:x + width] = True
    return mask


def disc(x, y, side):
    """Pixels whose centers lie within side / 2 of the box's center."""
    ys, xs = np.mgrid[0:CANVAS, 0:CANVAS] + 0.5
    return (xs - x - side / 2) ** 2 + (ys - y - side / 2) ** 2 <= (side / 2) ** 2


def triangle(x, y, side, apex_up=True):
    """Row r from the apex is r + 1 pixels wide, centered: a base of `side` pixels, `side` rows high."""
    mask = np.zeros((CANVAS, CANVAS), bool)
    for r in range(side):
        row = y + r if apex_up else y + side - 1 - r
        left = x + (side - r - 1) // 2
        mask[row, left:left + r + 1] = True
    return mask


def blend(color, alpha):
    """The pixel `alpha` of the way from the background to a palette color."""
    return tuple(round(b + alpha * (c - b)) for b, c in zip(BACKGROUND, COLORS[color]))


def hand_built(marks):
    image = np.full((CANVAS, CANVAS, 3), BACKGROUND, np.uint8)
    for mask, color in marks:
        image[mask] = COLORS.get(color, color)
    return image


ORANGE = (255, 140, 0)  # no blend of the background and one palette color comes within MAX_RESIDUAL of it
FOUR_SQUARES = [(rect(4, 4, 14), "red"), (rect(40, 4, 14), "blue"), (rect(4, 40, 14), "white"),
                (rect(40, 40, 14), "green")]
SIDE_BY_SIDE = [(rect(6, 24, 14), "red"), (disc(40, 24, 14), "blue")]  # centroids 34 px apart in x
STACKED = [(triangle(24, 4, 16), "green"), (rect(24, 40, 14), "yellow")]
CIRCLE = (disc(10, 10, 16), "red")
HAND_BUILT_CASES = {  # id: (prompt, marks, strict, graded)
    "single object": ("a circle", [(disc(10, 10, 16), "purple")], True, 1.0),
    "single object, wrong shape": ("a circle", [(rect(10, 10, 16), "purple")], False, 0.0),
    "colors": ("a blue square", [(rect(20, 20, 14), "blue")], True, 1.0),
    "colors, wrong color": ("a red square", [(rect(20, 20, 14), "blue")], False, 0.5),
    "two": ("two circles", [(disc(4, 4, 14), "white"), (disc(40, 40, 14), "green")], True, 1.0),
    "three": ("three triangles", [(triangle(4, 4, 14), "red"), (triangle(40, 4, 14), "red"),
                                  (triangle(4, 40, 14), "blue")], True, 1.0),
    "four": ("four squares", FOUR_SQUARES, True, 1.0),
    "three, one too many": ("three squares", FOUR_SQUARES, False, 0.5),  # all found, one extra halves it
    "two, one too many": ("two squares", FOUR_SQUARES[:3], False, 0.5),
    "four, one too few": ("four squares", FOUR_SQUARES[:3], False, 0.75),
    "three, one too few": ("three squares", FOUR_SQUARES[:2], False, 2 / 3),
    "two objects": ("a circle and a triangle", [(disc(6, 20, 16), "red"), (triangle(40, 20, 16), "yellow")],
                    True, 1.0),
    "two objects, one wrong": ("a circle and a square", [(disc(6, 20, 16), "red"), (triangle(40, 20, 16), "yellow")],
                               False, 0.5),
    "color attr": ("a red square and a blue circle", SIDE_BY_SIDE, True, 1.0),
    "color attr, colors swapped": ("a blue square and a red circle", SIDE_BY_SIDE, False, 0.5),
    "left of": ("a red square left of a blue circle", SIDE_BY_SIDE, True, 1.0),
    "right of": ("a blue circle right of a red square", SIDE_BY_SIDE, True, 1.0),
    "right of, wrong side": ("a red square right of a blue circle", SIDE_BY_SIDE, False, 0.5),
    "left of, wrong side": ("a blue circle left of a red square", SIDE_BY_SIDE, False, 0.5),
    "above": ("a green triangle above a yellow square", STACKED, True, 1.0),
    "below": ("a yellow square below a green triangle", STACKED, True, 1.0),
    "below, wrong side": ("a green triangle below a yellow square", STACKED, False, 0.5),
    "above, wrong side": ("a yellow square above a green triangle", STACKED, False, 0.5),
    "centroids 8 px apart": ("a red square left of a blue square", [(rect(10, 4, 14), "red"),
                                                                    (rect(18, 40, 14), "blue")], True, 1.0),
    "centroids 7 px apart": ("a red square left of a blue square", [(rect(10, 4, 14), "red"),
                                                                    (rect(17, 40, 14), "blue")], False, 0.5),
    "upside-down triangle": ("a triangle", [(triangle(20, 20, 16, apex_up=False), "white")], False, 0.0),
    "wrong aspect ratio": ("a red square", [(rect(10, 20, 16, 10), "red")], False, 0.5),  # a 16×10 bar
    "19 px speck, ignored": ("a red circle", [CIRCLE, (rect(50, 50, 4, 5) & ~rect(50, 50, 1), "red")], True, 1.0),
    "20 px blob, an extra object": ("a red circle", [CIRCLE, (rect(50, 50, 4, 5), "red")], False, 0.5),
    "off-palette, unlabeled": ("a yellow square", [(rect(20, 20, 14), ORANGE)], False, 0.0),
    "off-palette blob, an extra object": ("a red circle", [CIRCLE, (rect(44, 44, 8), ORANGE)], False, 0.5),
    "blend 0.55, the color": ("a red square", [(rect(20, 20, 14), blend("red", 0.55))], True, 1.0),
    "blend 0.45, background": ("a red square", [(rect(20, 20, 14), blend("red", 0.45))], False, 0.0),
}


@pytest.mark.parametrize("prompt, marks, strict, graded", HAND_BUILT_CASES.values(), ids=HAND_BUILT_CASES.keys())
def test_judges_hand_built_images(prompt, marks, strict, graded):
    judgement = score_image(prompt, hand_built(marks))
    assert (judgement.strict, judgement.graded) == (strict, pytest.approx(graded))
