"""Caption fidelity for the toy world: does a (generated) image show what its caption says?

    caption_match(image, "a red circle and a blue striped square on a white background")
    -> {"background": True, "colours": True, "shapes": True, "count": True, "all": True,
        "patterns": False, "detected": CaptionSpec(...)}
    caption_accuracy(images, captions) -> {"background": 0.99, ..., "all": 0.97, "patterns": 0.6}

`all` = background and count and colours and shapes. Patterns are reported on their own and left out
of `all`: stripes and dots are the 2-pixel detail that blur (and few-step sampling) wipes out, so a
checker that read them could not also be robust to blur. Pure numpy; no learned parts, so a score
means the same thing in every run. The approach, in the order `describe` runs it:

1. background = the palette colour most border pixels are nearest to (objects keep off the border);
   a global colour shift is undone by moving the border's median onto that palette colour;
2. foreground = pixels whose nearest palette colour is not the background, dilated by one pixel so
   the bands of a striped object (or a blur-cracked rim) stay one connected component;
3. components (union-find over row runs) smaller than MIN_AREA are dropped as noise; the rest,
   ordered left to right by bounding-box centre, are matched to the caption's objects in order;
4. colour = the palette colour C whose mixing segment [background, C] lies closest to the
   component's pixels: every object pixel is a mix of the object colour and the background
   (anti-aliasing, blur, pattern holes), so a blurred red-on-yellow stripe reads red, not orange;
5. shape, from the object's alpha (its mix fraction towards the object colour) smoothed 3x3 and
   cut at 0.5, filled as an orthogonal hull so pattern holes do not count: a triangle's bottom half
   is much fuller than its top; a square's corners reach |u| + |v| = 2 across the box, a circle's
   sqrt(2);
6. pattern = the hole signal (1 - alpha) inside the hull at the world's pattern frequency: ~0 for
   solid, along y only for stripes, along x and y for dots.

Nothing assumes a square image: MIN_AREA is a fraction of H*W, the border is read all round, the
shape is judged inside each object's own bounding box, and the pattern period scales with the
reference side sqrt(H*W), as the world draws it, so the toy's 80x48 and 48x80 buckets read like 64x64.

Measures the accuracy table of docs/toy-world.md (clean and degraded images, wrong captions):

    python -m ladd.toy.fidelity --n 2000
    python -m ladd.toy.fidelity --n 2000 --size 80x48      # a non-square bucket
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from ladd.toy.world import (
    BACKGROUNDS,
    OBJECT_COLOURS,
    PALETTE,
    PATTERN_PERIOD_PX,
    PATTERNS,
    SHAPES,
    CaptionSpec,
    caption as caption_of,
    make_batch,
    parse_caption,
)

_NAMES = BACKGROUNDS  # palette index -> name; object colours are the first six
_PAL = np.array([PALETTE[n] for n in _NAMES], np.float32)
_PAL_SQ = (_PAL**2).sum(1)
_N_OBJECT_COLOURS = len(OBJECT_COLOURS)
assert BACKGROUNDS[:_N_OBJECT_COLOURS] == OBJECT_COLOURS  # _segment_fit relies on this order
MIN_AREA = 0.008  # of the image; the smallest object (a 12.8 px triangle) covers ~0.02
BORDER = 2  # pixels of border read for the background
# Pattern thresholds, from 1500 single-object scenes (diameters 9.6-25.6 px) per condition (clean,
# 3x3 blur, noise, combo): amp_y + amp_x <= 0.047 for solid objects, >= 0.055 for dotted ones;
# amp_y / amp_x >= 7 for stripes, <= 1.7 for dots.
_PATTERN_MIN_AMPLITUDE = 0.051
_STRIPE_RATIO = 3.0


def _nearest(pixels: np.ndarray) -> np.ndarray:
    """Index of the nearest palette colour for each (..., 3) float pixel."""
    d = _PAL_SQ - 2 * pixels @ _PAL.T  # |p|^2 is the same for every colour, so left out
    return d.argmin(-1)


def _dilate(mask: np.ndarray) -> np.ndarray:
    """3x3 binary dilation."""
    m = mask.copy()
    m[1:] |= mask[:-1]
    m[:-1] |= mask[1:]
    out = m.copy()
    out[:, 1:] |= m[:, :-1]
    out[:, :-1] |= m[:, 1:]
    return out


def _box3(x: np.ndarray) -> np.ndarray:
    """3x3 mean with zero padding."""
    h, w = x.shape
    p = np.zeros((h + 2, w + 2), x.dtype)  # np.pad costs more than the whole filter here
    p[1:-1, 1:-1] = x
    return sum(p[i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9.0


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    """3x3 binary erosion, `steps` times; outside the array counts as off."""
    padded = np.zeros((mask.shape[0] + 2 * steps, mask.shape[1] + 2 * steps), bool)
    padded[steps:-steps, steps:-steps] = mask
    for _ in range(steps):
        padded = ~_dilate(~padded)
    return padded[steps:-steps, steps:-steps]


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a bool (H, W) mask: (labels int32 with 0 = off, count).

    Works on horizontal runs, not pixels: find the runs of each row, link runs that overlap a run in
    the row above, and merge the links with a vectorised union-find (hook to the smaller index,
    then pointer-jump). A 64x64 mask has a few hundred runs, so this costs ~100 us.
    """
    h, w = mask.shape
    padded = np.zeros((h, w + 2), np.int8)  # a zero column each side: runs never wrap rows
    padded[:, 1:-1] = mask
    step = np.diff(padded.ravel())
    starts, ends = np.flatnonzero(step == 1) + 1, np.flatnonzero(step == -1) + 1  # ends exclusive
    n_runs = len(starts)
    if n_runs == 0:
        return np.zeros((h, w), np.int32), 0
    # Runs in the row above that overlap run j: a contiguous range [lo, hi) of the sorted runs.
    lo = np.searchsorted(ends, starts - (w + 2), side="right")
    hi = np.searchsorted(starts, ends - (w + 2), side="left")
    counts = np.maximum(hi - lo, 0)
    a = np.repeat(np.arange(n_runs), counts)
    b = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts) + np.repeat(lo, counts)
    parent = np.arange(n_runs)
    while len(a):
        ra, rb = parent[a], parent[b]
        if np.array_equal(ra, rb):
            break
        low = np.minimum(ra, rb)
        np.minimum.at(parent, ra, low)  # hook both roots onto the smaller one
        np.minimum.at(parent, rb, low)
        while not np.array_equal(parent, parent[parent]):  # pointer jumping until all point to roots
            parent = parent[parent]
    _, comp = np.unique(parent, return_inverse=True)
    delta = np.zeros(h * (w + 2) + 1, np.int32)  # paint runs: +id at the start, -id past the end
    delta[starts] = comp + 1
    delta[ends] = -(comp + 1)
    labels = np.cumsum(delta[:-1]).reshape(h, w + 2)[:, 1:-1]
    return labels.astype(np.int32), int(comp.max()) + 1


def _hull(mask: np.ndarray) -> np.ndarray:
    """Orthogonal hull: fill each column between its extreme pixels, then each row likewise."""
    def fill(m: np.ndarray) -> np.ndarray:  # fill along axis 0
        n = m.shape[0]
        any_ = m.any(0)
        top = m.argmax(0)
        bottom = n - 1 - m[::-1].argmax(0)
        idx = np.arange(n)[:, None]
        return (idx >= top) & (idx <= bottom) & any_

    return fill(fill(mask).T).T


def _segment_fit(pixels: np.ndarray, bg: np.ndarray) -> int:
    """Object colour whose mixing segment [bg, C] lies closest (mean squared) to the pixels."""
    rel = pixels - bg  # (N, 3)
    dirs = _PAL[:_N_OBJECT_COLOURS] - bg  # (6, 3)
    norm2 = (dirs**2).sum(1)
    dots = rel @ dirs.T  # (N, 6)
    alpha = np.clip(dots / np.maximum(norm2, 1e-6), 0.0, 1.0)
    # |rel - alpha d|^2 = |rel|^2 - 2 alpha rel.d + alpha^2 |d|^2; |rel|^2 is common to all colours
    cost = (alpha * (alpha * norm2 - 2 * dots)).mean(0)
    cost[norm2 < 1e-6] = np.inf  # the background's own colour is not a candidate
    return int(cost.argmin())


def _shape(hull: np.ndarray) -> str:
    """Triangle if the bottom half is much fuller than the top, else square if the corners reach out.

    asymmetry = fill of the bottom half - fill of the top half: 0.5 for a triangle, 0 otherwise.
    reach = in each quadrant the largest |u| + |v| of the hull, (u, v) scaled to [-1, 1] across the
    bounding box, averaged: 2 for a square's sharp corners, sqrt(2) for a circle; blur rounds the
    corners but moves this far less than it moves an area count. Over 1200 single-object scenes per
    condition (clean, 5x5 blur, 5x5 blur + noise, noise 16, combo) asymmetry was >= 0.31 for
    triangles and <= 0.22 otherwise, reach <= 1.60 for circles and >= 1.60 (>= 1.68 for 99%) for
    squares; the thresholds sit between.
    """
    h, w = hull.shape
    half = h / 2
    # the middle row of an odd height counts half to each half
    bottom_share = np.clip(np.arange(h) + 1 - half, 0, 1)
    row_fill = hull.mean(1)
    top = (row_fill * (1 - bottom_share)).sum() / half
    bottom = (row_fill * bottom_share).sum() / half
    if bottom - top > 0.27:
        return "triangle"
    ys, xs = np.nonzero(hull)
    u = (xs - (w - 1) / 2) / max((w - 1) / 2, 0.5)
    v = (ys - (h - 1) / 2) / max((h - 1) / 2, 0.5)
    l1 = np.abs(u) + np.abs(v)
    quadrants = [l1[(u * su > 0) & (v * sv > 0)].max(initial=0.0) for su in (-1, 1) for sv in (-1, 1)]
    return "square" if np.mean(quadrants) > 1.64 else "circle"


def _pattern(hull: np.ndarray, alpha: np.ndarray, period: float) -> str:
    """Read the holes two pixels inside the hull (past the rim) at the world's pattern frequency.

    hole = 1 - alpha, mean removed, projected on exp(-2 pi i y / period) and on the same along x.
    Both are ~0 for solid objects whatever the colour bias or the noise; stripes light up y only,
    dots both. Box blur as wide as the period (5x5 at 64 px) cancels this frequency exactly, so a
    blurred pattern reads as solid: the detail is gone, which is what the key should report.
    """
    ys, xs = np.nonzero(_erode(hull, 2))
    if len(ys) < 16:
        return "solid"
    holes = 1.0 - alpha[ys, xs]
    # Remove each column's mean before reading along y, each row's before reading along x: stripes
    # are constant along a row, so they leave nothing along x however the row widths vary.
    by_col = holes - (np.bincount(xs, holes) / np.maximum(np.bincount(xs), 1))[xs]
    by_row = holes - (np.bincount(ys, holes) / np.maximum(np.bincount(ys), 1))[ys]
    amp_y = abs((by_col * np.exp(-2j * np.pi * ys / period)).sum()) / len(ys)
    amp_x = abs((by_row * np.exp(-2j * np.pi * xs / period)).sum()) / len(ys)
    if amp_y + amp_x < _PATTERN_MIN_AMPLITUDE:
        return "solid"
    return "striped" if amp_y > _STRIPE_RATIO * amp_x else "dotted"


def describe(image: np.ndarray) -> CaptionSpec:
    """What the image shows, as a CaptionSpec (objects left to right, patterns best-effort)."""
    img = np.asarray(image, np.float32)
    h, w, _ = img.shape
    b = BORDER
    border = np.concatenate([img[:b].reshape(-1, 3), img[-b:].reshape(-1, 3),
                             img[b:-b, :b].reshape(-1, 3), img[b:-b, -b:].reshape(-1, 3)])
    border_cls = _nearest(border)
    bg = int(np.bincount(border_cls, minlength=len(_NAMES)).argmax())
    # Undo a global colour shift: whatever moved the background moved the objects alike.
    img = img - (np.median(border[border_cls == bg], axis=0) - _PAL[bg])
    fg = _nearest(img) != bg
    labels, n = label_components(_dilate(fg))
    areas = np.bincount(labels[fg], minlength=n + 1)
    objects = []
    for k in np.flatnonzero(areas >= MIN_AREA * h * w):
        if k == 0:
            continue
        comp = (labels == k) & fg
        ys, xs = np.nonzero(comp)
        centre_x = (xs.min() + xs.max() + 1) / 2
        colour = _segment_fit(img[comp], _PAL[bg])
        # alpha = each pixel's mix fraction from the background towards the object colour, over
        # the bounding box grown by one pixel so the dilated component and the smoothing fit in
        y0, y1 = max(ys.min() - 1, 0), min(ys.max() + 2, h)
        x0, x1 = max(xs.min() - 1, 0), min(xs.max() + 2, w)
        direction = _PAL[colour] - _PAL[bg]
        alpha = (img[y0:y1, x0:x1] - _PAL[bg]) @ direction / float(direction @ direction)
        own = labels[y0:y1, x0:x1] == k
        # Shape from the 3x3-smoothed alpha: averaging nine pixels cuts noise threefold, so the
        # outline (and the hull spanned by its extreme pixels) is not dragged out by noisy pixels.
        body = (_box3(np.where(own, alpha, 0.0)) > 0.5) & own
        if not body.any():
            continue
        by, bx = np.nonzero(body)
        crop = np.s_[by.min() : by.max() + 1, bx.min() : bx.max() + 1]
        hull = _hull(body[crop])
        # the world's pattern period scales with the reference side sqrt(H*W) (= W for a square)
        pattern = _pattern(hull, alpha[crop], PATTERN_PERIOD_PX * math.sqrt(h * w) / 64)
        objects.append((centre_x, (_NAMES[colour], pattern, _shape(hull))))
    objects.sort(key=lambda o: o[0])
    return CaptionSpec(_NAMES[bg], tuple(o for _, o in objects))


def caption_match(image: np.ndarray, caption: str) -> dict:
    """Check one (H, W, 3) uint8 image against its caption; see the module docstring for keys."""
    want, got = parse_caption(caption), describe(image)
    count = len(got.objects) == len(want.objects)
    # Objects are compared in left-to-right order; with the wrong count nothing can be matched.
    pairs = list(zip(got.objects, want.objects)) if count else []
    colours = count and all(g[0] == t[0] for g, t in pairs)
    shapes = count and all(g[2] == t[2] for g, t in pairs)
    patterns = count and all(g[1] == t[1] for g, t in pairs)
    background = got.background == want.background
    return {"background": background, "colours": colours, "shapes": shapes, "count": count,
            "all": background and count and colours and shapes, "patterns": patterns, "detected": got}


def score_captions(images: np.ndarray, prompts: list[str]) -> dict[str, float] | None:
    """The toy world's caption scorer (ladd/eval/captions.py): caption accuracy when every prompt is a
    toy-world caption; None otherwise."""
    try:
        for p in prompts:
            parse_caption(p)
    except ValueError:
        return None
    return caption_accuracy(images, prompts)


def caption_accuracy(images, captions) -> dict[str, float]:
    """Fraction of images for which each boolean key of `caption_match` holds."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    keys = ("background", "colours", "shapes", "count", "all", "patterns")
    totals = dict.fromkeys(keys, 0)
    for image, text in zip(images, captions):
        m = caption_match(image, text)
        for k in keys:
            totals[k] += m[k]
    return {k: v / max(len(captions), 1) for k, v in totals.items()}


# ----------------------------------------------------------------------------- validation helpers

DEGRADATIONS = ("clean", "blur3", "blur5", "noise", "shift", "combo")


def _box_blur(images: np.ndarray, k: int) -> np.ndarray:
    p = k // 2
    padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)), mode="edge")
    h, w = images.shape[1:3]
    return sum(padded[:, i : i + h, j : j + w] for i in range(k) for j in range(k)) / (k * k)


def degrade(images: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Corrupt (n, H, W, 3) uint8 images the way a decoded generation might be off.

    blur3 / blur5: k x k box blur; noise: Gaussian, sigma 8 per channel; shift: a uniform +-12
    offset per image and channel; combo: blur3, then shift, then noise.
    """
    x = images.astype(np.float32)
    if kind in ("blur3", "combo"):
        x = _box_blur(x, 3)
    if kind == "blur5":
        x = _box_blur(x, 5)
    if kind in ("shift", "combo"):
        x = x + rng.uniform(-12, 12, size=(len(x), 1, 1, 3)).astype(np.float32)
    if kind in ("noise", "combo"):
        x = x + rng.normal(0, 8, size=x.shape).astype(np.float32)
    if kind not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {kind!r}, expected one of {DEGRADATIONS}")
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


PERTURBATIONS = ("background", "colour", "shape", "pattern")


def perturb_caption(text: str, what: str, rng: np.random.Generator) -> str:
    """A wrong but in-world caption: another background, or one object's colour, shape or pattern.

    The change keeps the caption inside the world (object colours differ from the background, no two
    objects share colour and shape), so only the image can tell that it is wrong.
    """
    if what not in PERTURBATIONS:
        raise ValueError(f"what must be one of {PERTURBATIONS}, got {what!r}")
    spec = parse_caption(text)
    if what == "background":
        used = {c for c, _, _ in spec.objects}
        options = [b for b in BACKGROUNDS if b != spec.background and b not in used]
        return caption_of(CaptionSpec(options[rng.integers(len(options))], spec.objects))
    # Every (object index, replacement) that stays in the world; pick one uniformly. A scene of
    # three same-coloured objects has no in-world shape change, so there duplicates are allowed.
    for distinct in (True, False):
        changes = []
        for i, (colour, pattern, shape) in enumerate(spec.objects):
            taken = {(c, s) for j, (c, _, s) in enumerate(spec.objects) if j != i and distinct}
            if what == "colour":
                changes += [(i, (c, pattern, shape)) for c in OBJECT_COLOURS
                            if c not in (colour, spec.background) and (c, shape) not in taken]
            elif what == "shape":
                changes += [(i, (colour, pattern, s)) for s in SHAPES if s != shape and (colour, s) not in taken]
            else:
                changes += [(i, (colour, p, shape)) for p in PATTERNS if p != pattern]
        if changes:
            break
    i, new = changes[rng.integers(len(changes))]
    objects = list(spec.objects)
    objects[i] = new
    return caption_of(CaptionSpec(spec.background, tuple(objects)))


def validate(n: int = 2000, seed: int = 0, width: int = 64, height: int = 64) -> dict[str, dict[str, float]]:
    """Accuracy on n true captions and rejection of wrong ones, per degradation.

    Rows are degradations; "acc_*" are caption_accuracy fractions on the true captions, "reject_*"
    the fraction of perturbed captions judged wrong: by `all` for background, colour and shape, by
    `patterns` for a changed pattern.
    """
    images, captions = make_batch(n, seed, split=None, width=width, height=height)
    table = {}
    for kind in DEGRADATIONS:
        rng = np.random.default_rng(seed + 1)
        x = degrade(images, kind, rng)
        t0 = time.perf_counter()
        row = {f"acc_{k}": v for k, v in caption_accuracy(x, captions).items()}
        row["images_per_s"] = n / (time.perf_counter() - t0)
        for what in PERTURBATIONS:
            key = "patterns" if what == "pattern" else "all"
            wrong = [perturb_caption(c, what, rng) for c in captions]
            row[f"reject_{what}"] = float(np.mean([not caption_match(im, c)[key] for im, c in zip(x, wrong)]))
        table[kind] = row
    return table


def _main() -> None:
    ap = argparse.ArgumentParser(description="Caption-fidelity accuracy on rendered toy-world scenes.")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", default="64x64", help="image size WxH, e.g. 80x48")
    args = ap.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    table = validate(args.n, args.seed, width, height)
    cols = list(next(iter(table.values())))
    print("| condition | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for kind, row in table.items():
        cells = [f"{row[c]:.0f}" if c == "images_per_s" else f"{100 * row[c]:.1f}" for c in cols]
        print(f"| {kind} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    _main()
