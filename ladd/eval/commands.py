"""`ladd eval`, `ladd generate`, `ladd export`.

    ladd precompute --pipeline toy --prompts eval-prompts.txt --out runs/eval --decode-first 1000
    ladd eval --data runs/eval --run runs/toy --ema --seeds 1 2 3 --out runs/toy/eval.json
    ladd eval --data runs/eval --untrained --teacher            # the baseline and the noise floor only
    ladd eval --data runs/eval --exported runs/toy-4step --features random-conv --subset-size 8
    ladd generate --run runs/toy --prompt "a red circle on a white background" --seeds 0 1 2 --out gen --grid
    ladd export runs/toy --out runs/toy-4step --ema

Every `ladd eval` prints the untrained baseline (teacher weights sampled like the student: its steps,
guidance 0) beside the result. The baseline and the teacher row are cached in EVAL_DIR/.ladd-cache/,
keyed by everything that decides them, so they are computed once. See docs/evaluation.md.

    from ladd.eval.commands import EvalConfig, evaluate
    result = evaluate(EvalConfig(data="runs/eval", source="run", path="runs/toy", features="random-conv"))
    result["rows"][0]["kid"]            # {"mean", "std", "n", ...}; also "caption_accuracy", "latent_mse"
    result["untrained"]["kid"]["mean"]
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ladd import files

SEED_STRIDE = 1_000_000  # eval seed s draws noise seed (reference seed + s · SEED_STRIDE)


@dataclass(kw_only=True)
class EvalConfig:
    data: str  # a `ladd precompute` folder of held-out prompts (the references)
    source: str | None = None  # "run" | "checkpoint" | "exported" | None: baseline (and teacher) only
    path: str | None = None  # the run / checkpoint / exported folder
    ema: bool = False
    steps: int = 4
    teacher: bool = False  # also the teacher at its own steps (the noise floor)
    features: str = "inception"
    subsets: int = 50
    subset_size: int = 100
    # Eval seeds: s >= 1 fresh noise (reference seed + s·1e6), as a user's own seeds; the teacher row shares
    # it. 0 = the references' own noise (paired): it credits a student for reproducing the teacher's image
    # of each noise, which the reseeded teacher row cannot, so its KID is not comparable with that row.
    seeds: tuple[int, ...] = (1,)
    fid: bool = True
    limit: int | None = None  # evaluate the first N prompts only
    batch_size: int = 8
    device: str | None = None
    dtype: str = "auto"
    pipeline: str | None = None  # the teacher pipeline; default: the run's, else the data's
    out: str | None = None
    compile: bool = False  # compiled transformer blocks (same images within float tolerance)

    def __post_init__(self):
        self.seeds = tuple(int(s) for s in self.seeds)
        if self.source not in (None, "run", "checkpoint", "exported"):
            raise ValueError(f"unknown source {self.source!r}")
        if self.source and not self.path:
            raise ValueError(f"--{self.source} needs a folder")
        if not self.seeds or min(self.seeds) < 0 or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds must be distinct non-negative integers, got {list(self.seeds)}")
        if self.steps < 1 or self.subsets < 1 or self.subset_size < 2:
            raise ValueError("--steps and --subsets must be >= 1 and --subset-size >= 2")


def _teacher_dir(cfg: EvalConfig, manifest: dict) -> Path:
    from ladd.eval.samplers import EXPORT_INFO, run_teacher_dir
    from ladd.models.loading import resolve_pipeline

    if cfg.pipeline:
        return resolve_pipeline(cfg.pipeline)
    if cfg.source in ("run", "checkpoint"):
        return run_teacher_dir(cfg.path)
    info = Path(cfg.path or "") / EXPORT_INFO
    if cfg.source == "exported" and info.is_file():
        return resolve_pipeline(json.loads(info.read_text())["teacher"])
    return resolve_pipeline(manifest["teacher"]["pipeline"])


def score(sampler, refs, real, extractor, cfg: EvalConfig, seed_offset: int = 0, captions=None) -> dict:
    """One result row: generate the eval prompts at each eval seed, then KID/FID/latent MSE, and caption
    scores when the teacher's world has a scorer (`captions`, ladd/eval/captions.py). Each bucket is
    sampled at its own size; KID over all images, and with several buckets also per bucket (`buckets`)."""
    import torch

    from ladd.eval.features import extract_features
    from ladd.eval.kid import fid_score, kid_score, summarize
    from ladd.flow import latent_mse

    t0, per_seed = time.perf_counter(), []
    per_bucket: dict[str, list[dict]] = {g.bucket.name: [] for g in refs.groups}
    several = len(refs.groups) > 1
    # Latent MSE needs the references' own noise; without eval seed 0 among them, a few-step sampler's
    # first seed also makes its latents there (no images), the teacher's none (it would reproduce them).
    paired_pass = sampler.kind != "teacher" and all(s + seed_offset != 0 for s in cfg.seeds)
    for s in cfg.seeds:
        offset = s + seed_offset
        fakes, parts = [], []
        for g, real_g in zip(refs.groups, real):
            prompts = [refs.prompts[i] for i in g.indices]
            seeds = [refs.seeds[i] + offset * SEED_STRIDE for i in g.indices]
            latents = sampler.latents(prompts, seeds, g.bucket.size, cfg.batch_size)
            images = sampler.images(latents, cfg.batch_size)
            fake = extract_features(extractor, images, cfg.batch_size)
            fakes.append(fake)
            paired = latents if offset == 0 else None
            if paired_pass and s == cfg.seeds[0]:
                paired = sampler.latents(prompts, [refs.seeds[i] for i in g.indices], g.bucket.size, cfg.batch_size)
            part = {"seed": s, "n": len(prompts),
                    "latent_mse": latent_mse(paired, g.latents) if paired is not None else None,
                    "caption_accuracy": captions(images, prompts) if captions else None}
            if several and len(prompts) >= 2:
                part["kid"] = kid_score(real_g, fake, cfg.subsets, cfg.subset_size, seed=s)
            per_bucket[g.bucket.name].append(part)
            parts.append(part)
        per_seed.append({
            "seed": s,
            "kid": kid_score(torch.cat(real), torch.cat(fakes), cfg.subsets, cfg.subset_size, seed=s),
            "fid": fid_score(torch.cat(real), torch.cat(fakes)) if cfg.fid else None,
            "latent_mse": _weighted([p["latent_mse"] for p in parts], [p["n"] for p in parts]),
            "caption_accuracy": _weighted([p["caption_accuracy"] for p in parts], [p["n"] for p in parts]),
        })
    row = {"label": sampler.label, "kind": sampler.kind, "steps": sampler.steps, "guidance": sampler.guidance,
           **summarize(per_seed), "noise_seed_offset": seed_offset, "num_images": len(refs.prompts),
           "info": sampler.info, "seconds": round(time.perf_counter() - t0, 2)}
    if several:
        row["buckets"] = {name: _bucket_summary(parts) for name, parts in per_bucket.items()}
    return row


def _weighted(values: list, counts: list[int]):
    """The count-weighted mean of numbers or of dicts of numbers (one value: itself); None stays None."""
    if values[0] is None:
        return None
    if len(values) == 1:
        return values[0]
    total = sum(counts)
    if isinstance(values[0], dict):
        return {k: sum(v[k] * n for v, n in zip(values, counts)) / total for k in values[0]}
    return sum(v * n for v, n in zip(values, counts)) / total


def _bucket_summary(parts: list[dict]) -> dict:
    """One bucket's metrics over the eval seeds (KID needs at least 2 images of the bucket)."""
    import numpy as np

    from ladd.eval.kid import summarize

    if "kid" in parts[0]:
        out = summarize(parts)
    else:
        paired = [p["latent_mse"] for p in parts if p["latent_mse"] is not None]
        caps = [p["caption_accuracy"] for p in parts if p["caption_accuracy"] is not None]
        out = {"kid": None, "latent_mse": paired[0] if paired else None,
               "caption_accuracy": {k: float(np.mean([c[k] for c in caps])) for k in caps[0]} if caps else None}
    return {"num_images": parts[0]["n"], **out}


def seen_noise_warning(config: dict, ref_seeds, eval_seeds) -> str | None:
    """One line when a paired-distillation student is scored on noise it was trained from.

    With `method.distill_weight` > 0 the student learned each training latent from its own teacher noise
    (the training data's seeds); the same noise at eval, even with another prompt, flatters its KID.
    """
    from ladd.data.shards import DataError, read_manifest

    if not config.get("method", {}).get("distill_weight", 0) > 0:
        return None
    try:
        manifest = read_manifest(config["data"]["path"])
    except (DataError, OSError, KeyError):
        return None  # the training data moved: nothing to compare with
    lo = manifest["sampling"]["seed"]
    hi = lo + manifest["num_samples"]
    seen = sum(lo <= r + s * SEED_STRIDE < hi for s in eval_seeds for r in ref_seeds)
    if not seen:
        return None
    return (f"warning: {seen} eval noises were training noises of this student (method.distill_weight > 0 "
            f"learns each training latent from its teacher noise, seeds {lo}..{hi - 1}), so its KID is "
            f"optimistic; precompute the training data with a --seed whose range misses the eval's")


def _cached_row(path: Path, make) -> dict:
    if path.is_file():
        row = json.loads(path.read_text())
        row["cached"] = True
        return row
    row = make()
    files.write_text(path, json.dumps(row, indent=1) + "\n")  # atomic: parallel sweep trials may race here
    return {**row, "cached": False}


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _world_text(path: Path) -> str:
    """The world declaration as part of the cache keys: another scorer is another row."""
    return path.read_text() if path.is_file() else ""


def evaluate(cfg: EvalConfig) -> dict:
    """Rows for the model (if any), the untrained baseline (cached) and the teacher (if asked, cached)."""
    import torch

    from ladd.data.shards import read_manifest, teacher_fingerprint
    from ladd.eval import samplers
    from ladd.eval.features import build_extractor
    from ladd.eval.captions import WORLD_FILE, scorer_for
    from ladd.eval.kid import cache_dir, load_references, reference_features
    from ladd.models.loading import load_pipeline

    manifest = read_manifest(cfg.data)
    teacher_dir = _teacher_dir(cfg, manifest)
    fingerprint = teacher_fingerprint(teacher_dir)
    if fingerprint != manifest["teacher"]["fingerprint"]:
        raise ValueError(f"{cfg.data} was made by another teacher than {teacher_dir} (fingerprints differ): "
                         "KID against it would measure the teachers' difference")
    device = torch.device(cfg.device) if cfg.device else samplers.default_device()
    pipe = load_pipeline(teacher_dir, device, samplers.dtype_for(cfg.dtype, device))
    refs = load_references(cfg.data, pipe, cfg.limit)
    if cfg.subset_size > len(refs.prompts):
        print(f"note: --subset-size {cfg.subset_size} > {len(refs.prompts)} eval images; using "
              f"{len(refs.prompts)} (every subset is then the whole set: subset std 0)")
    extractor = build_extractor(cfg.features, device)
    real = reference_features(refs, extractor, cfg.batch_size)
    captions = scorer_for(teacher_dir)

    model = None
    if cfg.source:
        model = samplers.load_sampler("exported" if cfg.source == "exported" else "run", cfg.path, ema=cfg.ema,
                                    steps=cfg.steps, device=device, dtype=cfg.dtype, pipe=pipe, compile=cfg.compile)
        if cfg.source == "exported" and model.info.get("teacher_fingerprint", fingerprint) != fingerprint:
            raise ValueError(f"{cfg.path} was distilled from another teacher than the one of {cfg.data}")
        if cfg.source != "exported":
            from ladd.train.checkpoint import read_config

            warning = seen_noise_warning(read_config(samplers.find_checkpoint(cfg.path)), refs.seeds, cfg.seeds)
            if warning:
                print(warning)
    timesteps = model.info["timesteps"] if model else None
    common = [fingerprint, refs.images_hash(), extractor.name, cfg.subsets, cfg.subset_size,
              list(cfg.seeds), cfg.fid, str(samplers.dtype_for(cfg.dtype, device)),
              _world_text(teacher_dir / WORLD_FILE)]
    untrained = samplers.untrained_sampler(pipe, cfg.steps, timesteps, compile=cfg.compile)
    cache = cache_dir(cfg.data)
    base = _cached_row(cache / f"untrained-{_key('untrained', *common, untrained.info['timesteps'])}.json",
                       lambda: score(untrained, refs, real, extractor, cfg, captions=captions))
    rows = [base]
    if model is not None:
        rows.insert(0, score(model, refs, real, extractor, cfg, captions=captions))
    if cfg.teacher:
        s = manifest["sampling"]
        teacher = samplers.teacher_sampler(pipe, s["steps"], s["guidance"], s["negative_prompt"], compile=cfg.compile)
        # Fresh noise: at the references' own seeds the teacher would reproduce them, KID 0. With eval
        # seeds >= 1 it shares the other rows' noise (the rows then differ by the model alone), else s + 1.
        # The offset follows from the seeds, but is in the cache key: rows cached before 37a918a had s + 1.
        offset = 1 if 0 in cfg.seeds else 0
        rows.append(_cached_row(cache / f"teacher-{_key('teacher', *common, s['steps'], s['guidance'], offset)}.json",
                                lambda: score(teacher, refs, real, extractor, cfg, seed_offset=offset, captions=captions)))
    result = {
        "data": str(cfg.data), "num_images": len(refs.prompts), "features": extractor.name,
        "config": asdict(cfg), "reference": {"caption_accuracy": _reference_captions(refs, captions)},
        "rows": rows, "untrained": base, "teacher": rows[-1] if cfg.teacher else None,
    }
    print(format_table(result))
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {cfg.out}")
    return result


def _reference_captions(refs, captions) -> dict | None:
    """The scorer on the teacher's own reference images (the ceiling a student is compared with)."""
    if not captions:
        return None
    return _weighted([captions(g.images, [refs.prompts[i] for i in g.indices]) for g in refs.groups],
                     [len(g.indices) for g in refs.groups])


def format_table(result: dict) -> str:
    """A plain table: one line per row, KID ×1e3 as mean ± std (n), the difference to the baseline."""
    base = result["untrained"]["kid"]["mean"]
    head = f"{'model':<40} {'steps':>5}  {'KID x1e3':>22}  {'vs untrained':>12}  {'FID':>8}  {'latent MSE':>10}  " \
           "caption acc"
    lines = [f"{result['num_images']} eval images from {result['data']}, features {result['features']}", head,
             "-" * len(head)]
    for r in result["rows"]:
        k = r["kid"]
        kid = f"{1e3 * k['mean']:.3f} ± {1e3 * k['std']:.3f} (n={k['n']}{'' if k['std_over'] == 'seeds' else ' sub'})"
        diff = "—" if r["kind"] == "untrained" else f"{1e3 * (k['mean'] - base):+.3f}"
        fid = f"{r['fid']['mean']:.2f}" if r.get("fid") else "—"
        mse = f"{r['latent_mse']:.4g}" if r.get("latent_mse") is not None else "—"
        cap = f"{r['caption_accuracy']['all']:.3f}" if r.get("caption_accuracy") else "—"
        label = r["label"] + (" [cached]" if r.get("cached") else "")
        lines.append(f"{label:<40} {r['steps']:>5}  {kid:>22}  {diff:>12}  {fid:>8}  {mse:>10}  {cap}")
        for name, b in r.get("buckets", {}).items():  # several buckets: each at its own size
            base_b = result["untrained"].get("buckets", {}).get(name, {}).get("kid")
            k = b["kid"]
            kid = f"{1e3 * k['mean']:.3f} ± {1e3 * k['std']:.3f}" if k else "— (1 image)"
            diff = "—" if r["kind"] == "untrained" or not (k and base_b) else f"{1e3 * (k['mean'] - base_b['mean']):+.3f}"
            mse = f"{b['latent_mse']:.4g}" if b.get("latent_mse") is not None else "—"
            cap = f"{b['caption_accuracy']['all']:.3f}" if b.get("caption_accuracy") else "—"
            at = f"  at {name} ({b['num_images']} images)"
            lines.append(f"{at:<40} {'':>5}  {kid:>22}  {diff:>12}  {'':>8}  {mse:>10}  {cap}")
    ref = result["reference"]["caption_accuracy"]
    if ref:
        lines.append(f"{'reference (teacher images)':<40} {'':>5}  {'':>22}  {'':>12}  {'':>8}  {'':>10}  "
                     f"{ref['all']:.3f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# generate


def generate(source: str, path: str, prompts: list[str], seeds: list[int], out: str | Path, *, ema: bool = False,
             steps: int = 4, guidance: float = 0.0, size: int | tuple[int, int] | None = None, grid: bool = False,
             device=None, dtype: str = "auto", batch_size: int = 8, compile: bool = False):
    """Few-step images (PNG) and their latents (latents.safetensors) for prompts and seeds, at `size` =
    (width, height) pixels or one square side (default: as precompute's default resolution)."""
    import torch
    from safetensors.torch import save_file

    from ladd.data.precompute import resolve_resolution
    from ladd.eval import samplers
    from ladd.images import tile, write_png

    if len(seeds) == 1 and len(prompts) > 1:
        seeds = [seeds[0] + i for i in range(len(prompts))]  # as precompute: prompt i gets seed + i
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts: give one seed, or one per prompt")
    s = samplers.load_sampler(source, path, ema=ema, steps=steps, device=device, dtype=dtype, compile=compile)
    s.guidance = guidance
    from ladd.models.loading import resolve_pipeline

    folder = resolve_pipeline(path) if source in ("exported", "untrained") else samplers.run_teacher_dir(path)
    size = size or resolve_resolution(str(folder), None)
    latents = s.latents(prompts, seeds, size, batch_size)
    images = s.images(latents, batch_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for i, (image, seed) in enumerate(zip(images, seeds)):
        write_png(image, out / f"{i:05d}-seed{seed}.png")
    save_file({"latents": latents.contiguous(), "seeds": torch.tensor(seeds)}, str(out / "latents.safetensors"))
    (out / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p, "seed": sd}) + "\n"
                                               for p, sd in zip(prompts, seeds)))
    if grid:
        write_png(tile(images), out / "grid.png")
    print(f"wrote {len(images)} images ({s.label}, guidance {guidance:g}) to {out}")
    return latents


# --------------------------------------------------------------------------------------------------
# command line


def _source(args) -> tuple[str | None, str | None]:
    for name in ("run", "checkpoint", "exported"):
        if getattr(args, name, None):
            return name, getattr(args, name)
    return None, None


def add_parser(sub) -> None:
    from dataclasses import fields

    d = {f.name: f.default for f in fields(EvalConfig)}  # `ladd eval`'s defaults are EvalConfig's
    p = sub.add_parser("eval", help="KID/FID, latent MSE and caption accuracy against teacher references")
    p.add_argument("--data", required=True, help="a `ladd precompute` folder of held-out prompts")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--run", help="a run folder (its latest checkpoint)")
    which.add_argument("--checkpoint", help="one checkpoint folder (checkpoints/step-XXXXXXXX)")
    which.add_argument("--exported", help="a `ladd export` folder")
    which.add_argument("--untrained", action="store_true", help="only the untrained baseline (always printed)")
    p.add_argument("--teacher", action="store_true", default=d["teacher"],
                   help="also the teacher at its own steps (noise floor)")
    p.add_argument("--ema", action="store_true", default=d["ema"], help="the EMA weights of the run / checkpoint")
    p.add_argument("--steps", type=int, default=d["steps"], help="student sampling steps (default %(default)s)")
    p.add_argument("--subsets", type=int, default=d["subsets"], help="KID subsets (default %(default)s)")
    p.add_argument("--subset-size", type=int, default=d["subset_size"],
                   help="images per KID subset (default %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=list(d["seeds"]),
                   help="eval seeds (>= 1 fresh noise; 0 = the references' own noise, paired; default %(default)s)")
    p.add_argument("--features", default=d["features"],
                   help="inception | random-conv | torchmetrics-inception (default %(default)s)")
    p.add_argument("--no-fid", action="store_false", dest="fid", default=d["fid"], help="skip FID")
    p.add_argument("--limit", type=int, default=d["limit"], help="only the first N eval prompts")
    p.add_argument("--pipeline", default=d["pipeline"],
                   help="the teacher pipeline (default: the run's or the data's)")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="default %(default)s")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default=d["dtype"],
                   help="auto: bf16 on GPU, else fp32")
    p.add_argument("--device", default=d["device"], help="default: cuda if available, else cpu")
    p.add_argument("--out", default=d["out"], help="write the results as JSON here")
    p.add_argument("--compile", action="store_true", default=d["compile"],
                   help="torch.compile the transformer blocks (faster sampling on GPU after a compile)")
    p.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="few-step images from a run or an exported student")
    which = g.add_mutually_exclusive_group(required=True)
    which.add_argument("--run")
    which.add_argument("--checkpoint")
    which.add_argument("--exported")
    which.add_argument("--untrained", metavar="PIPELINE", help="the teacher's weights at the student's steps")
    g.add_argument("--prompt", action="append", default=[], help="repeatable")
    g.add_argument("--prompts", default=None, help=".txt / .jsonl / .csv / .parquet prompt file")
    g.add_argument("--seeds", type=int, nargs="+", default=[0], help="one per prompt, or one base seed (seed + i)")
    g.add_argument("--steps", type=int, default=4)
    g.add_argument("--guidance", type=float, default=0.0)
    g.add_argument("--ema", action="store_true")
    g.add_argument("--resolution", type=int, default=None, help="an N×N square (default: 512, or the VAE's size)")
    g.add_argument("--width", type=int, default=None, help="image width in pixels (with --height): any trained bucket")
    g.add_argument("--height", type=int, default=None, help="image height in pixels (with --width)")
    g.add_argument("--grid", action="store_true", help="also grid.png")
    g.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto", help="auto: bf16 on GPU, else fp32")
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--out", required=True)
    g.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("export", help="a diffusers ZImagePipeline folder with the student")
    e.add_argument("run", help="a run folder (latest checkpoint) or a checkpoint folder")
    e.add_argument("--out", required=True)
    e.add_argument("--ema", action="store_true", help="export the EMA weights (default: raw)")
    e.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    e.add_argument("--lora", action="store_true", help="a LoRA file instead (LoRA students only)")
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(func=cmd_export)


def cmd_eval(args) -> int:
    source, path = _source(args)
    cfg = EvalConfig(data=args.data, source=source, path=path, ema=args.ema, steps=args.steps, teacher=args.teacher,
                     features=args.features, subsets=args.subsets, subset_size=args.subset_size,
                     seeds=tuple(args.seeds), fid=args.fid, limit=args.limit, batch_size=args.batch_size,
                     dtype=args.dtype, device=args.device, pipeline=args.pipeline, out=args.out, compile=args.compile)
    evaluate(cfg)
    return 0


def cmd_generate(args) -> int:
    from ladd.data.prompts import read_prompts

    source, path = _source(args)
    if source is None:
        source, path = "untrained", args.untrained
    prompts = list(args.prompt) + (read_prompts(args.prompts).prompts if args.prompts else [])
    if not prompts:
        raise ValueError("no prompts: give --prompt TEXT (repeatable) or --prompts FILE")
    if (args.width is None) != (args.height is None):
        raise ValueError("--width and --height go together (or --resolution N for an N×N square)")
    if args.width is not None and args.resolution is not None:
        raise ValueError(f"--resolution {args.resolution} and --width/--height both given: pass one of them")
    size = (args.width, args.height) if args.width is not None else args.resolution
    generate(source, path, prompts, args.seeds, args.out, ema=args.ema, steps=args.steps, guidance=args.guidance,
             size=size, grid=args.grid, dtype=args.dtype, device=args.device, compile=args.compile)
    return 0


def cmd_export(args) -> int:
    from ladd.eval.export import export_student

    export_student(args.run, args.out, ema=args.ema, dtype=args.dtype, lora=args.lora, overwrite=args.overwrite)
    return 0
