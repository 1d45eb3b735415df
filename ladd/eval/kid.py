"""KID (through torchmetrics) and FID against the teacher's reference images, plus the paired metrics.

The references are a `ladd precompute` folder made from held-out prompts: the teacher's 50-step CFG
latents for prompt i at seed `seed + i`, and (with `--decode-first K`, K ≥ N) their PNGs; without
the PNGs the stored latents are decoded once with the teacher's VAE and cached.

    refs = load_references("runs/eval-data", pipe)            # prompts, seeds; latents and images per bucket
    real = reference_features(refs, extractor)                 # per bucket, cached in EVAL_DIR/.ladd-cache/
    fake = extract_features(extractor, images)
    kid_score(real, fake, subsets=50, subset_size=100, seed=0) # {"mean", "std", "subsets", "subset_size"}

KID is torchmetrics' `KernelInceptionDistance` fed precomputed features (its `feature=` is an
identity module), so features are extracted once and the references' are cached. Its subsets are drawn
with `torch.randperm` from the global generator; we seed it (inside `fork_rng`, leaving the caller's
stream alone), so a score is reproducible and equals torchmetrics' own run under the same seed.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ladd import files
from ladd.data import shards as fmt
from ladd.data.buckets import Bucket
from ladd.eval.features import FeatureExtractor, extract_features
from ladd.images import to_uint8

CACHE = ".ladd-cache"


def cache_dir(data_dir: str | Path) -> Path:
    path = Path(data_dir) / CACHE
    path.mkdir(parents=True, exist_ok=True)
    return path


def images_hash(images: np.ndarray) -> str:
    h = hashlib.sha256(json.dumps(list(images.shape)).encode())
    h.update(np.ascontiguousarray(images).tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# the references


@dataclass
class ReferenceGroup:
    """The references of one bucket: images of one size, so they stack (and tile) together."""

    bucket: Bucket
    indices: list[int]  # sample indices in the data set, increasing
    latents: Tensor  # (n, C, h, w) float32 teacher latents
    images: np.ndarray  # (n, H, W, 3) uint8


@dataclass
class ReferenceSet:
    data_dir: Path
    manifest: dict
    prompts: list[str]  # every reference's prompt, in sample order
    seeds: list[int]  # the noise seed of each reference (seed + i)
    groups: list[ReferenceGroup]  # per bucket that has references, in the data's bucket order

    def __len__(self) -> int:
        return len(self.prompts)

    def images_hash(self) -> str:
        """One hash of every reference image (with one bucket: `images_hash` of its images)."""
        hashes = [images_hash(g.images) for g in self.groups]
        return hashes[0] if len(hashes) == 1 else hashlib.sha256("|".join(hashes).encode()).hexdigest()


def load_references(data_dir: str | Path, pipe=None, limit: int | None = None) -> ReferenceSet:
    """Prompts, seeds, latents and images of a precompute folder (`pipe` decodes when PNGs are missing),
    the first `limit` samples (default all), grouped by bucket."""
    data_dir = Path(data_dir)
    ds = fmt.ShardDataset(data_dir)
    n = min(len(ds), limit) if limit else len(ds)
    prompts = [json.loads(line)["prompt"] for line in (data_dir / fmt.PROMPTS).read_text().splitlines()][:n]
    samples = [ds[i] for i in range(n)]
    seeds = [s["seed"] for s in samples]
    groups = []
    for bucket, members in zip(ds.buckets, ds.bucket_members()):
        idx = [i for i in members if i < n]
        if not idx:
            continue
        latents = torch.stack([samples[i]["latents"] for i in idx])
        if ds.manifest["decode_first"] >= n:
            from PIL import Image

            images = np.stack([np.asarray(Image.open(data_dir / fmt.IMAGES / fmt.image_name(i)).convert("RGB"))
                               for i in idx])
        else:
            images = _decoded_references(data_dir, ds.manifest, latents, pipe, idx)
        groups.append(ReferenceGroup(bucket, idx, latents, images))
    return ReferenceSet(data_dir, ds.manifest, prompts, seeds, groups)


def _decoded_references(data_dir: Path, manifest: dict, latents: Tensor, pipe, indices: list[int]) -> np.ndarray:
    """The stored latents through the VAE, once: cached by (shard checksums, VAE weights, samples)."""
    if pipe is None:
        raise ValueError(f"{data_dir} has no PNG references (precompute --decode-first N): a pipeline is "
                         "needed to decode its latents")
    from ladd.data.shards import fingerprint_folder

    vae_dir = Path(pipe.name_or_path) / "vae" if getattr(pipe, "name_or_path", None) else None
    vae_id = fingerprint_folder(vae_dir) if vae_dir and vae_dir.is_dir() else "unknown-vae"
    # The sample count alone for contiguous samples 0..n-1 (the key before buckets); else the indices.
    which = len(latents) if indices == list(range(len(indices))) else indices
    key = hashlib.sha256(json.dumps([[s["sha256"] for s in manifest["shards"]], vae_id, which]).encode())
    path = cache_dir(data_dir) / f"references-{key.hexdigest()[:16]}.safetensors"
    if path.is_file() and vae_id != "unknown-vae":
        return load_file(str(path))["images"].numpy()
    from ladd.sampling import decode

    device = pipe.vae.device
    images = np.concatenate([to_uint8(decode(pipe, latents[i : i + 8].to(device))) for i in range(0, len(latents), 8)])
    if vae_id != "unknown-vae":
        with files.replacing(path) as tmp:
            save_file({"images": torch.from_numpy(images)}, str(tmp))
    return images


def reference_features(refs: ReferenceSet, extractor: FeatureExtractor, batch_size: int = 32) -> list[Tensor]:
    """The references' features per bucket group, each cached as safetensors keyed by a hash of the
    images and the extractor."""
    return [_group_features(refs.data_dir, g.images, extractor, batch_size) for g in refs.groups]


def _group_features(data_dir: Path, images: np.ndarray, extractor: FeatureExtractor, batch_size: int) -> Tensor:
    key = hashlib.sha256(f"{images_hash(images)}|{extractor.name}".encode()).hexdigest()[:16]
    path = cache_dir(data_dir) / f"features-{extractor.name}-{key}.safetensors"
    if path.is_file():
        return load_file(str(path))["features"]
    feats = extract_features(extractor, images, batch_size)
    with files.replacing(path) as tmp:  # parallel sweep trials may race here
        save_file({"features": feats.contiguous()}, str(tmp), metadata={"extractor": extractor.name,
                                                                       "images": str(len(images))})
    return feats


# --------------------------------------------------------------------------------------------------
# the metrics


class Precomputed(nn.Module):
    """Identity 'feature extractor': lets torchmetrics' metrics be fed features instead of images."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


def kid_score(real: Tensor, fake: Tensor, subsets: int = 50, subset_size: int = 100, seed: int = 0) -> dict:
    """KID of fake vs real features: mean and (population) std over `subsets` random subsets.

    Computed in float64 by torchmetrics' `KernelInceptionDistance` (polynomial kernel, degree 3,
    gamma 1/D, coef 1, unbiased MMD²); the subsets come from torch's global generator seeded with `seed`.
    A subset size larger than either set is lowered to fit (reported in the result).
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size, len(real), len(fake))
    if size < 2:
        raise ValueError(f"KID needs at least 2 images per side, got {len(real)} references and {len(fake)} images")
    with warnings.catch_warnings():  # "will save all extracted features in buffer": that is the point
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=Precomputed(real.shape[1]), subsets=subsets, subset_size=size)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return {"mean": float(mean), "std": float(std), "subsets": subsets, "subset_size": size}


def fid_score(real: Tensor, fake: Tensor) -> float:
    """FID, ‖μ_r − μ_f‖² + tr Σ_r + tr Σ_f − 2·tr √(Σ_r Σ_f), in float64: torchmetrics'
    FrechetInceptionDistance's number (tests/test_eval.py), without its general eigendecomposition of
    the D×D product (seconds per row at D = 2048 on a CPU; `python bench/fid_speed.py`). With the
    centred features X (Σ = XᵀX, rows over √(n − 1)), the eigenvalues of Σ_r·Σ_f are the squared singular
    values of X_r·X_fᵀ, so while a side has at most D images the trace term is the nuclear norm of that
    small matrix; above D on both sides it comes from symmetric eigendecompositions. Biased for small N
    — with N < D the covariances are rank-deficient — so compare FIDs only at equal N; KID is the number
    to trust on small eval sets."""
    if min(len(real), len(fake)) < 2:
        raise ValueError(f"FID needs at least 2 images a side, got {len(real)} and {len(fake)}")
    real, fake = real.double(), fake.double()
    xr, xf = ((x - x.mean(0)) / (len(x) - 1) ** 0.5 for x in (real, fake))
    if min(len(xr), len(xf)) <= real.shape[1]:
        cross = torch.linalg.svdvals(xr @ xf.T).sum()
    else:  # Σ_r = R·Rᵀ; the eigenvalues of Σ_r·Σ_f are those of Rᵀ·Σ_f·R (symmetric, full rank here)
        w, v = torch.linalg.eigh(xr.T @ xr)
        fr = xf @ (v * w.clamp(min=0).sqrt())
        cross = torch.linalg.eigvalsh(fr.T @ fr).clamp(min=0).sqrt().sum()
    mean = (real.mean(0) - fake.mean(0)).square().sum()
    return float(mean + xr.square().sum() + xf.square().sum() - 2 * cross)


def summarize(per_seed: list[dict]) -> dict:
    """One result row's metrics from per-eval-seed scores (see docs/evaluation.md for the meaning).

    kid.mean is the mean over eval seeds of each seed's subset-mean KID. With ≥ 2 seeds kid.std is the
    std over seeds (ddof 1) and n the number of seeds ("std_over": "seeds"); with one seed it is the
    subset std and n the number of subsets ("std_over": "subsets"). `subset_std` is always the mean
    subset std. latent_mse is from the paired seed (eval seed 0 = the references' own noise) only.
    """
    kids = np.array([s["kid"]["mean"] for s in per_seed])
    subset_std = float(np.mean([s["kid"]["std"] for s in per_seed]))
    if len(kids) >= 2:
        kid = {"mean": float(kids.mean()), "std": float(kids.std(ddof=1)), "n": len(kids), "std_over": "seeds"}
    else:
        kid = {"mean": float(kids[0]), "std": subset_std, "n": per_seed[0]["kid"]["subsets"], "std_over": "subsets"}
    kid.update(subset_std=subset_std, subset_size=per_seed[0]["kid"]["subset_size"],
               subsets=per_seed[0]["kid"]["subsets"], per_seed=[float(k) for k in kids])
    fids = np.array([s["fid"] for s in per_seed if s.get("fid") is not None])
    fid = None
    if len(fids):
        fid = {"mean": float(fids.mean()), "std": float(fids.std(ddof=1)) if len(fids) > 1 else 0.0, "n": len(fids)}
    paired = [s["latent_mse"] for s in per_seed if s.get("latent_mse") is not None]
    caps = [s["caption_accuracy"] for s in per_seed if s.get("caption_accuracy") is not None]
    caption = {k: float(np.mean([c[k] for c in caps])) for k in caps[0]} if caps else None
    return {"kid": kid, "fid": fid, "latent_mse": paired[0] if paired else None, "caption_accuracy": caption,
            "seeds": [s["seed"] for s in per_seed]}
