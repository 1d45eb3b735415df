"""Toy world: seeded sampling, the caption grammar, prompt splits, and the caption-fidelity checker.

The fidelity checks run on rendered scenes, clean and degraded the way a decoded generation might
be. Measured with `python -m ladd.toy.fidelity --n 2000` (docs/toy-world.md), `all` was
>= 99.6 % in every condition (clean, blur3, blur5, noise, shift, combo) and every wrong caption
(changed background, object colour or shape) was rejected; the tests below use 300 scenes and
the 98 % bar of the spec.
"""

import re
from collections import deque

import numpy as np
import pytest

from ladd.toy import fidelity, world
from ladd.toy.world import CaptionSpec, caption, parse_caption, sample_scene, spec_of


def test_make_batch_is_deterministic_per_seed():
    a_images, a_captions = world.make_batch(16, seed=3)
    b_images, b_captions = world.make_batch(16, seed=3)
    c_images, c_captions = world.make_batch(16, seed=4)
    assert a_images.dtype == np.uint8 and a_images.shape == (16, 64, 64, 3)
    np.testing.assert_array_equal(a_images, b_images)
    assert a_captions == b_captions
    assert a_captions != c_captions


def test_render_size_and_antialiasing():
    scene = sample_scene(np.random.default_rng(0), max_objects=1, patterns=False)
    for size in (32, 64, 128):
        assert world.render(scene, size=size).shape == (size, size, 3)
    image = world.render(scene).reshape(-1, 3).astype(int)
    # edge pixels are blends, so there are more distinct colours than background + object
    assert len(np.unique(image, axis=0)) > 2


def test_scene_invariants():
    rng = np.random.default_rng(1)
    for _ in range(500):
        scene = sample_scene(rng)
        assert 1 <= len(scene.objects) <= 3
        kinds = [(o.colour, o.shape) for o in scene.objects]
        assert len(set(kinds)) == len(kinds), "objects must be distinguishable"
        assert [o.x for o in scene.objects] == sorted(o.x for o in scene.objects)
        for o in scene.objects:
            assert o.colour != scene.background
            assert o.diameter / 2 < o.x < 1 - o.diameter / 2 and o.diameter / 2 < o.y < 1 - o.diameter / 2


def test_caption_examples_and_articles():
    spec = CaptionSpec("gray", (("orange", "solid", "triangle"),))
    assert caption(spec) == "an orange triangle on a gray background"
    spec = CaptionSpec("orange", (("red", "solid", "circle"),))
    assert caption(spec) == "a red circle on an orange background"
    spec = CaptionSpec("gray", (("blue", "striped", "square"), ("orange", "solid", "triangle")))
    assert caption(spec) == "a blue striped square and an orange triangle on a gray background"
    text = "a green circle, a red dotted square and a yellow triangle on a black background"
    assert caption(parse_caption(text)) == text
    assert parse_caption(text).objects[1] == ("red", "dotted", "square")


def test_caption_round_trip_left_to_right():
    rng = np.random.default_rng(2)
    for _ in range(500):
        scene = sample_scene(rng)
        text = caption(scene)
        assert parse_caption(text) == spec_of(scene)
        # "an" exactly before vowels, everywhere in the caption
        for article, word in re.findall(r"\b(a|an) (\w+)", text):
            assert article == ("an" if word[0] in "aeiou" else "a"), text


def test_single_object_solid_captions_with_defaults():
    texts = world.prompts(300, "train", seed=5)
    assert any(re.fullmatch(r"an? \w+ (circle|square|triangle) on an? \w+ background", t) for t in texts)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "a red circle",
        "a orange circle on a white background",  # wrong article
        "an red circle on a white background",
        "a red circle on a orange background",
        "a red hexagon on a white background",  # unknown shape
        "a red spotted circle on a white background",  # unknown pattern
        "a pink circle on a white background",  # unknown colour
        "a red circle, a blue square, and a green triangle on a black background",  # Oxford comma
        "a red circle and a blue square and a green triangle on a black background",
        "A red circle on a white background",
    ],
)
def test_parse_rejects_text_outside_grammar(bad):
    with pytest.raises(ValueError):
        parse_caption(bad)


def test_prompt_splits_are_disjoint_and_deterministic():
    train = world.prompts(2000, "train", seed=0)
    evals = world.prompts(150, "eval", seed=0)
    assert not set(train) & set(evals)
    assert world.prompts(150, "eval", seed=0) == evals
    assert all(world.split_of(t) == "eval" for t in evals)
    _, batch_captions = world.make_batch(64, seed=0)
    assert all(world.split_of(t) == "train" for t in batch_captions)
    # ~10 % of distinct captions go to eval
    rng = np.random.default_rng(1)
    distinct = {caption(sample_scene(rng)) for _ in range(3000)}
    share = np.mean([world.split_of(t) == "eval" for t in distinct])
    assert 0.07 < share < 0.13, share
    with pytest.raises(ValueError):
        world.prompts(1, "test")


def _bfs_labels(mask):
    """Reference: 4-connected components by breadth-first search, numbered in scan order."""
    labels = np.zeros(mask.shape, int)
    n = 0
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        n += 1
        labels[start] = n
        queue = deque([start])
        while queue:
            y, x = queue.popleft()
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = n
                    queue.append((ny, nx))
    return labels, n


@pytest.mark.parametrize("density", [0.2, 0.45, 0.6])
def test_label_components_matches_bfs(density):
    rng = np.random.default_rng(int(density * 100))
    for _ in range(20):
        mask = rng.random((23, 31)) < density
        labels, n = fidelity.label_components(mask)
        ref, n_ref = _bfs_labels(mask)
        assert n == n_ref
        # same partition: a one-to-one map between the two labelings on the mask
        pairs = set(zip(labels[mask].tolist(), ref[mask].tolist()))
        assert len(pairs) == n and len({a for a, _ in pairs}) == n
        assert (labels[~mask] == 0).all()


@pytest.fixture(scope="module")
def rendered():
    return world.make_batch(300, seed=11, split=None)


@pytest.mark.parametrize("kind", fidelity.DEGRADATIONS)
def test_fidelity_accepts_true_captions(rendered, kind):
    images, captions = rendered
    degraded = fidelity.degrade(images, kind, np.random.default_rng(0))
    acc = fidelity.caption_accuracy(degraded, captions)
    assert acc["all"] >= 0.98, acc
    if kind in ("clean", "blur3", "noise", "shift", "combo"):  # patterns survive all but blur5
        assert acc["patterns"] >= 0.95, acc


@pytest.mark.parametrize("kind", ["clean", "blur5", "combo"])
def test_fidelity_rejects_wrong_captions(rendered, kind):
    images, captions = rendered
    rng = np.random.default_rng(1)
    degraded = fidelity.degrade(images, kind, rng)
    for what in ("background", "colour", "shape"):
        wrong = [fidelity.perturb_caption(c, what, rng) for c in captions]
        assert all(w != c for w, c in zip(wrong, captions))
        rejected = np.mean([not fidelity.caption_match(im, w)["all"] for im, w in zip(degraded, wrong)])
        assert rejected >= 0.98, (what, rejected)


def test_fidelity_reports_what_it_sees():
    images, captions = world.make_batch(1, seed=0, split=None)
    match = fidelity.caption_match(images[0], captions[0])
    assert match["all"] and match["detected"] == parse_caption(captions[0])
    blank = np.full((64, 64, 3), world.PALETTE["white"], np.uint8)
    match = fidelity.caption_match(blank, "a red circle on a white background")
    assert match["background"] and not match["count"] and not match["all"]
