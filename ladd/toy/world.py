"""The toy world: procedural captioned images for training a tiny text-to-image model on CPU.

A scene is a background colour and 1..3 flat objects (colour, shape, pattern, size, position). The
world is small enough that a tiny diffusion model learns it in minutes, and its striped and dotted
patterns are fine (2-pixel) structure that few-step sampling tends to lose. Everything is seeded:

    rng = np.random.default_rng(0)
    scene = sample_scene(rng)
    image = render(scene)                      # (64, 64, 3) uint8
    wide = render(sample_scene(rng, aspect=80 / 48), width=80, height=48)  # (48, 80, 3): a toy bucket
    text = caption(scene)                      # "an orange striped circle on a gray background"
    parse_caption(text) == spec_of(scene)      # True: the grammar round-trips
    images, captions = make_batch(256, seed=1) # training captions only (split="train")
    eval_prompts = prompts(64, "eval")         # captions that never occur in the train split

Non-square frames (the aspect-ratio buckets of `ladd.data.buckets`, toy: 64x64, 80x48, 48x80) keep
the geometry in pixels: sizes, margins and gaps are fractions of the reference side sqrt(W*H) (~64 px
for every toy bucket), positions fractions of the width and height, so an object looks the same in
every bucket and only the frame changes. Captions and their grammar do not depend on the frame, nor
does the train/eval split (a hash of the caption): every bucket draws from one caption set. At
aspect 1 the scenes and pixels are exactly those of the square-only world.

Writes the sample grid of docs/toy-world.md and prints the rendering speed:

    python -m ladd.toy.world --grid docs/img/toy-world-samples.png
"""

from __future__ import annotations

import argparse
import math
import re
import time
import zlib
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

# Palette: RGB values spread so that the closest pair (yellow/orange) is still ~90 RGB units apart,
# far beyond the jitter (+-4) and the noise a decoded image carries (sigma ~8 per channel).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 30),
    "green": (30, 165, 60),
    "blue": (35, 80, 225),
    "yellow": (245, 220, 40),
    "purple": (150, 50, 200),
    "orange": (250, 130, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
OBJECT_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
BACKGROUNDS = OBJECT_COLOURS + ("white", "black", "gray")
SHAPES = ("circle", "square", "triangle")
PATTERNS = ("solid", "striped", "dotted")  # "solid" is never written in captions
# Every token a caption can contain (the comma separates the first objects of a three-object list).
CAPTION_WORDS = ("a", "an", "on", "and", "background", ",") + BACKGROUNDS + SHAPES + PATTERNS[1:]

# Geometry as fractions of the reference side sqrt(W*H) (the image side of a square), so a scene
# renders at any size and a non-square frame holds objects of the same pixel size. Pixels at 64 px.
DIAMETER_RANGE = (0.2, 0.4)  # bounding-box side of an object: 12.8 .. 25.6 px
PATTERN_MIN_DIAMETER = 0.28  # striped/dotted objects are >= 18 px, so they show >= 3 bands or dots
EDGE_MARGIN = 0.05  # objects stay >= 3.2 px from the border, which fidelity reads as background
MIN_GAP = 0.08  # >= 5 px between bounding circles, so blurred objects never merge into one blob
MIN_DX = 0.06  # >= 4 px between centres in x, so "left to right" is unambiguous
# Patterns, in pixels at 64 px (scaled with sqrt(W*H) / 64). They are holes of background colour cut
# into the object, kept inside a solid rim so the object stays one connected, legible shape.
# Stripes and dots share one period: fidelity.py reads patterns at exactly that frequency.
RIM_PX = 1.5
PATTERN_PERIOD_PX = 5.0
STRIPE_GAP_PX = 2.0  # horizontal bands: 3 px ink, 2 px gap
DOT_RADIUS_PX = 1.25  # a square lattice of 2.5 px holes
EVAL_PERCENT = 10  # share of the caption space held out for evaluation prompts


@dataclass(frozen=True, slots=True)
class SceneObject:
    colour: str
    shape: str
    pattern: str
    x: float  # centre, fraction of the image width
    y: float  # centre, fraction of the image height
    diameter: float  # bounding-box side, fraction of the reference side sqrt(W*H)
    rgb: tuple[int, int, int]  # palette colour plus this object's jitter


@dataclass(frozen=True, slots=True)
class Scene:
    background: str
    bg_rgb: tuple[int, int, int]
    objects: tuple[SceneObject, ...]  # sorted left to right by x, the caption's order
    aspect: float = 1.0  # width / height of the frame the objects were placed in


class CaptionSpec(NamedTuple):
    """What a caption pins down: the background and (colour, pattern, shape) left to right."""

    background: str
    objects: tuple[tuple[str, str, str], ...]


# ----------------------------------------------------------------------------- sampling


def _bounding_radius(shape: str, diameter: float) -> float:
    # circumscribed circle around the bounding-box centre: squares and triangles reach the corners
    return diameter / 2 * (1.0 if shape == "circle" else math.sqrt(2))


def _jitter(rng: np.random.Generator, name: str, jitter: int) -> tuple[int, int, int]:
    offsets = rng.integers(-jitter, jitter + 1, size=3)
    return tuple(min(max(c + int(o), 0), 255) for c, o in zip(PALETTE[name], offsets))


def _frame(aspect: float) -> tuple[float, float]:
    """Width and height of a frame of this aspect, in units of its reference side sqrt(W*H)."""
    return math.sqrt(aspect), 1 / math.sqrt(aspect)  # exactly (1.0, 1.0) for a square


def max_diameter(aspect: float = 1.0) -> float:
    """The largest object diameter (reference units) a frame of this aspect holds inside its margins."""
    return min(_frame(aspect)) - 2 * EDGE_MARGIN


def _place(rng, shapes, diameter_ranges, frame=(1.0, 1.0), tries=64):
    """Rejection-sample (x, y, diameter) per object; None when the objects do not fit.

    Works in reference units (the frame is `frame` wide and high) so that gaps are the same in x
    and y; returns x and y as fractions of the width and height. All `tries` candidates for an
    object are drawn at once and the first that keeps its distance from the objects already placed
    wins: vectorised, because sampling must keep up with rendering.
    """
    fw, fh = frame
    placed: list[tuple[float, float, float, float]] = []  # x, y (reference units), diameter, bounding radius
    for shape, (lo, hi) in zip(shapes, diameter_ranges):
        d = rng.uniform(lo, hi, size=tries)
        half = d / 2 + EDGE_MARGIN
        u = rng.random((2, tries))
        x, y = half + (fw - 2 * half) * u[0], half + (fh - 2 * half) * u[1]
        rho = _bounding_radius(shape, d)
        ok = np.ones(tries, bool)
        for px, py, _, prho in placed:
            ok &= (np.hypot(x - px, y - py) >= rho + prho + MIN_GAP) & (np.abs(x - px) >= MIN_DX)
        if not ok.any():
            return None
        i = int(ok.argmax())
        placed.append((float(x[i]), float(y[i]), float(d[i]), float(rho[i])))
    return [(x / fw, y / fh, d) for x, y, d, _ in placed]


def sample_scene(
    rng: np.random.Generator,
    max_objects: int = 3,
    patterns: bool = True,
    *,
    min_objects: int = 1,
    pattern_prob: float = 0.4,
    diameter_range: tuple[float, float] = DIAMETER_RANGE,
    jitter: int = 4,
    aspect: float = 1.0,
) -> Scene:
    """One random scene. Knobs make the world easier: fewer objects, no patterns, bigger objects.

    `aspect` = width / height of the frame (80 / 48 for the toy's landscape bucket). Only placement
    sees the frame: its rejections, and so the draws after them, depend on it (one-object scenes
    never fail a placement, so their whole stream is the same at every aspect).

    The object count is uniform in [min_objects, max_objects]; each object is patterned with
    probability `pattern_prob` (striped or dotted, equally likely) when `patterns` is True. Object
    colours differ from the background, and no two objects share both colour and shape, so every
    object the caption names is a distinct thing in the image.
    """
    if not 1 <= min_objects <= max_objects <= 5 * len(SHAPES):  # 5 colours x 3 shapes are distinct
        raise ValueError(f"need 1 <= min_objects <= max_objects <= 15, got {min_objects}, {max_objects}")
    if not aspect > 0:
        raise ValueError(f"aspect (width / height) must be positive, got {aspect}")
    frame, fit = _frame(aspect), max_diameter(aspect)
    if not 0 < diameter_range[0] <= diameter_range[1] <= fit:
        raise ValueError(f"diameter_range must satisfy 0 < lo <= hi <= {fit:.3g} at aspect {aspect:.3g}, "
                         f"got {diameter_range}")
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    n = int(rng.integers(min_objects, max_objects + 1))
    colours = [c for c in OBJECT_COLOURS if c != background]
    kinds: list[tuple[str, str, str]] = []
    while len(kinds) < n:
        colour, shape = colours[rng.integers(len(colours))], SHAPES[rng.integers(len(SHAPES))]
        if any((colour, shape) == (c, s) for c, _, s in kinds):
            continue
        pattern = "solid"
        if patterns and rng.random() < pattern_prob:
            pattern = PATTERNS[1 + rng.integers(2)]
        kinds.append((colour, pattern, shape))
    # Patterned objects never go below PATTERN_MIN_DIAMETER, so even a small one shows a few stripes
    # or dots. Three big objects may not fit: after every 4 failed placements shrink the sizes by
    # 10%, patterned ones no further than that floor (three of those always fit).
    lo, hi = diameter_range
    floors = [0.0 if p == "solid" else min(PATTERN_MIN_DIAMETER, hi) for _, p, _ in kinds]
    ranges = [(max(lo, f), hi) for f in floors]
    attempt = 0
    while (placed := _place(rng, [s for _, _, s in kinds], ranges, frame)) is None:
        attempt += 1
        if attempt > 400:  # reachable only with 5 or more objects (the floors no longer fit)
            raise RuntimeError(f"cannot place {len(kinds)} objects without overlap; lower max_objects")
        if attempt % 4 == 0:
            ranges = [(max(a * 0.9, f), max(b * 0.9, f)) for (a, b), f in zip(ranges, floors)]
    objects = [
        SceneObject(c, s, p, x, y, d, _jitter(rng, c, jitter)) for (c, p, s), (x, y, d) in zip(kinds, placed)
    ]
    objects.sort(key=lambda o: o.x)
    return Scene(background, _jitter(rng, background, jitter), tuple(objects), aspect)


# ----------------------------------------------------------------------------- rendering


def _sdf(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Distance inside the shape's edge (> 0 inside), in pixels; (u, v) relative to the bbox centre."""
    if shape == "circle":
        return r - np.sqrt(u * u + v * v)
    if shape == "square":
        return r - np.maximum(np.abs(u), np.abs(v))
    # Apex at the top (v = -r), base at the bottom (v = +r): |u| <= (v + r) / 2 inside.
    return np.minimum(r - v, (v + r - 2 * np.abs(u)) / math.sqrt(5))


def _holes(pattern: str, shape: str, u, v, r, sdf, scale) -> np.ndarray:
    """Where the pattern cuts background-coloured holes; never in the solid rim."""
    rim = RIM_PX * scale
    if pattern == "striped":
        period, gap = PATTERN_PERIOD_PX * scale, STRIPE_GAP_PX * scale
        # bands anchored at the object's top so the top edge always starts with ink
        return ((v + r) % period >= period - gap) & (sdf > rim)
    period, radius = PATTERN_PERIOD_PX * scale, DOT_RADIUS_PX * scale
    lu, lv = period * np.round(u / period), period * np.round(v / period)
    near = (u - lu) ** 2 + (v - lv) ** 2 < radius * radius
    # a dot is cut only where it fits whole inside the rim, so the outline stays clean
    return near & (_sdf(shape, lu, lv, r) > radius + rim)


def render(
    scene: Scene, size: int = 64, supersample: int = 4, *, width: int | None = None, height: int | None = None
) -> np.ndarray:
    """Rasterise a scene to (height, width, 3) uint8 (default size x size), anti-aliased by
    `supersample`^2 samples a pixel.

    The frame must have the aspect the scene was sampled for (else its objects would not fit, or
    would keep different gaps): a ValueError otherwise; any size of that aspect works. Each object's
    coverage is computed on a supersampled grid over its bounding box only and box-filtered down to
    an alpha map, then blended over the background: the same result as rendering the whole image at
    4x and downsampling, at a fraction of the cost.
    """
    width, height = width or size, height or size
    if not math.isclose(width / height, scene.aspect, rel_tol=1e-3):
        raise ValueError(f"scene sampled for aspect {scene.aspect:.4g} cannot render at {width}x{height} "
                         f"(aspect {width / height:.4g}): sample it with aspect=width / height")
    img = np.empty((height, width, 3), np.float32)
    img[:] = scene.bg_rgb
    ref = math.sqrt(width * height)  # the reference side; exactly `size` for a square
    scale = ref / 64
    sub = (np.arange(supersample, dtype=np.float32) + 0.5) / supersample  # sample offsets in a pixel
    for obj in scene.objects:
        cx, cy, r = obj.x * width, obj.y * height, obj.diameter * ref / 2
        x0, x1 = max(int(cx - r) - 1, 0), min(int(math.ceil(cx + r)) + 1, width)
        y0, y1 = max(int(cy - r) - 1, 0), min(int(math.ceil(cy + r)) + 1, height)
        u = (np.arange(x0, x1, dtype=np.float32)[:, None] + sub).reshape(1, -1) - cx
        v = (np.arange(y0, y1, dtype=np.float32)[:, None] + sub).reshape(-1, 1) - cy
        sdf = _sdf(obj.shape, u, v, r)
        inside = sdf >= 0
        if obj.pattern != "solid":
            inside &= ~_holes(obj.pattern, obj.shape, u, v, r, sdf, scale)
        alpha = inside.reshape(y1 - y0, supersample, x1 - x0, supersample).mean(axis=(1, 3), dtype=np.float32)
        patch = img[y0:y1, x0:x1]
        patch += alpha[:, :, None] * (np.asarray(obj.rgb, np.float32) - patch)
    return (img + 0.5).astype(np.uint8)


# ----------------------------------------------------------------------------- captions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(colour: str, pattern: str, shape: str) -> str:
    words = [colour] + ([pattern] if pattern != "solid" else []) + [shape]
    return f"{_article(colour)} {' '.join(words)}"


def spec_of(scene: Scene) -> CaptionSpec:
    """The part of a scene a caption describes, objects ordered left to right."""
    objects = sorted(scene.objects, key=lambda o: o.x)
    return CaptionSpec(scene.background, tuple((o.colour, o.pattern, o.shape) for o in objects))


def caption(scene: Scene | CaptionSpec) -> str:
    """'a red circle, a blue dotted square and an orange triangle on a gray background'."""
    spec = spec_of(scene) if isinstance(scene, Scene) else scene
    phrases = [_phrase(*o) for o in spec.objects]
    listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{listed} on {_article(spec.background)} {spec.background} background"


_OBJECT_RE = re.compile(
    rf"(a|an) ({'|'.join(OBJECT_COLOURS)})(?: (striped|dotted))? ({'|'.join(SHAPES)})"
)
_CAPTION_RE = re.compile(rf"(.+) on (a|an) ({'|'.join(BACKGROUNDS)}) background")


def parse_caption(text: str) -> CaptionSpec:
    """Invert `caption`; raise ValueError for anything outside the grammar, articles included."""
    m = _CAPTION_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"not a toy-world caption (want '<objects> on a/an <colour> background'): {text!r}")
    listed, article, background = m.groups()
    if article != _article(background):
        raise ValueError(f"wrong article {article!r} before {background!r} in {text!r}")
    head, _, last = listed.rpartition(" and ")
    phrases = (head.split(", ") if head else []) + [last]
    objects = []
    for phrase in phrases:
        om = _OBJECT_RE.fullmatch(phrase)
        if om is None:
            raise ValueError(
                f"object phrase {phrase!r} is outside the grammar 'a/an <colour> [striped|dotted] <shape>' "
                f"(colours {OBJECT_COLOURS}, shapes {SHAPES}) in {text!r}"
            )
        art, colour, pattern, shape = om.groups()
        if art != _article(colour):
            raise ValueError(f"wrong article {art!r} before {colour!r} in {text!r}")
        objects.append((colour, pattern or "solid", shape))
    spec = CaptionSpec(background, tuple(objects))
    if caption(spec) != text:  # e.g. an Oxford comma, or "x and y and z"
        raise ValueError(f"caption {text!r} is not in canonical form {caption(spec)!r}")
    return spec


# ----------------------------------------------------------------------------- splits and batches


def split_of(text: str) -> str:
    """'eval' for ~10% of captions, chosen by a stable hash of the caption string, else 'train'."""
    return "eval" if zlib.crc32(text.encode()) % 100 < EVAL_PERCENT else "train"


def _sample_split(rng, split: str | None, **scene_kw) -> tuple[Scene, str]:
    if split not in ("train", "eval", None):
        raise ValueError(f"split must be 'train', 'eval' or None, got {split!r}")
    while True:
        scene = sample_scene(rng, **scene_kw)
        text = caption(scene)
        if split is None or split_of(text) == split:
            return scene, text


def prompts(n: int, split: str = "train", seed: int = 0, **scene_kw) -> list[str]:
    """n captions of one split, drawn like training scenes; repeats allowed (common ones recur)."""
    rng = np.random.default_rng(seed)
    return [_sample_split(rng, split, **scene_kw)[1] for _ in range(n)]


def make_batch(
    n: int, seed, size: int = 64, max_objects: int = 3, *, split: str | None = "train",
    width: int | None = None, height: int | None = None, **scene_kw
) -> tuple[np.ndarray, list[str]]:
    """(images (n, height, width, 3) uint8, captions), deterministic per seed (an int, or a list of
    ints as numpy's default_rng takes). width and height default to size; scenes are sampled for
    their aspect.

    Only train-split captions by default, so eval prompts stay unseen by every model; split="eval"
    gives reference images for the eval prompts, split=None the whole world.
    """
    width, height = width or size, height or size
    rng = np.random.default_rng(seed)
    images = np.empty((n, height, width, 3), np.uint8)
    captions = []
    for i in range(n):
        scene, text = _sample_split(rng, split, max_objects=max_objects, aspect=width / height, **scene_kw)
        images[i] = render(scene, width=width, height=height)
        captions.append(text)
    return images, captions


def _main() -> None:
    ap = argparse.ArgumentParser(description="Toy-world sample grid and rendering speed.")
    ap.add_argument("--grid", default="docs/img/toy-world-samples.png")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from ladd.images import tile, write_png

    images, captions = make_batch(64, args.seed, split=None)
    write_png(tile(images, upscale=2), args.grid)
    print(f"wrote {args.grid}; first captions:", *captions[:8], sep="\n  ")
    rng = np.random.default_rng(1)
    scenes = [sample_scene(rng) for _ in range(2000)]
    t0 = time.perf_counter()
    for s in scenes:
        render(s)
    t1 = time.perf_counter()
    make_batch(2000, seed=2)
    t2 = time.perf_counter()
    print(f"render: {len(scenes) / (t1 - t0):.0f} images/s at 64x64; make_batch: {2000 / (t2 - t1):.0f} images/s")


if __name__ == "__main__":
    _main()
