"""`ladd precompute`: the teacher's 50-step CFG latents and their conditioning, sharded and resumable.

Teacher data is the most expensive artefact of LADD, so it is exact (each latent equals what
`ZImagePipeline(prompt, ..., generator=Generator("cpu").manual_seed(seed + i), output_type="latent")`
gives, pinned by a test), never silently wrong (a manifest with the teacher's fingerprint, sha256 per
shard) and never recomputed (a killed run resumes at the first missing shard; a finished one says so).

CPU example (seconds, on the tiny random-weight pipeline):
    ladd toy tiny --out runs/tiny
    printf 'a red circle\\na blue square\\n' > runs/prompts.txt
    ladd precompute --pipeline runs/tiny --prompts runs/prompts.txt --out runs/teacher --steps 50
    ladd data check runs/teacher
Aspect-ratio buckets (ladd/data/buckets.py): each prompt gets its size from the prompt file's
"width"/"height", else from a seeded draw over the buckets; each shard holds one bucket:
    ladd precompute --pipeline Z-Image --prompts p.jsonl --out teacher --buckets zimage-1024
Many GPUs (shards are dealt to ranks; the output is byte-identical whatever the number of processes):
    torchrun --nproc_per_node 8 -m ladd precompute --pipeline Z-Image --prompts p.jsonl --out teacher --dtype bf16

Faster than calling the pipeline, with the same latents: the negative prompt is encoded once; inside a
shard, prompts are sorted by token length before batching (less padding in the text encoder and in
the transformer's joint sequence) and the results are scattered back to sample order; each batch's
prompts are tokenised to their longest, not to 512; no decode.
"""

from __future__ import annotations

import hashlib
import json
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ladd import distributed
from ladd.data import buckets as bk
from ladd.data import shards as fmt
from ladd.data.prompts import PromptFile, PromptFileError, read_prompts
from ladd.models.loading import resolve_pipeline, vae_factor
from ladd.models.text import token_lengths

MAX_SEQUENCE_LENGTH = 512  # ZImagePipeline's default: longer prompts are truncated to it
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class PrecomputeError(ValueError):
    """A job that cannot run as asked; the message is one line."""


class OtherJob(PrecomputeError):
    """--out holds a job made with other arguments (the message names the first that differs)."""


@dataclass(kw_only=True, frozen=True)
class PrecomputeConfig:
    pipeline: str  # a diffusers ZImagePipeline folder, or "toy" (the embedded toy teacher)
    prompts: str  # .txt / .jsonl / .csv / .parquet
    out: str
    resolution: int | None = None  # one square bucket; None: 512, or the VAE's sample_size when that is smaller
    buckets: str | None = None  # a named set or WxH[:weight],... (ladd/data/buckets.py); excludes resolution
    steps: int = 50
    guidance: float = 5.0
    negative_prompt: str = ""
    seed: int = 0  # sample i uses seed + i
    batch_size: int = 8  # prompts per forward (2× that with CFG); never changes the output
    dtype: str = "fp32"  # storage dtype of latents and cap_feats; bf16 also runs the models in bf16 on GPU
    decode_first: int = 0
    clip: str | None = None  # a CLIPTextModelWithProjection + CLIPTokenizer folder
    shard_size: int = 1000
    compile: bool = False  # compiled transformer blocks: same latents within float tolerance, not bitwise
    # σ in (0, 1) at which each sample's state on the teacher's Euler path is stored too (`states`, one
    # latent per σ): method.paired_target = "trajectory" needs the student's timesteps after the first.
    trajectory: tuple[float, ...] = ()

    def __post_init__(self):
        for name in ("steps", "batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise PrecomputeError(f"--{name.replace('_', '-')} must be at least 1")
        if self.seed < 0 or self.decode_first < 0 or self.guidance < 0:
            raise PrecomputeError("--seed, --decode-first and --guidance must not be negative")
        if self.dtype not in DTYPES:
            raise PrecomputeError(f"--dtype must be one of {', '.join(DTYPES)}")
        object.__setattr__(self, "trajectory", tuple(float(r) for r in self.trajectory))
        if any(not 0 < r < 1 for r in self.trajectory) or list(self.trajectory) != sorted(set(self.trajectory), reverse=True):
            raise PrecomputeError(f"--trajectory {','.join(f'{r:g}' for r in self.trajectory)}: give distinct σ in "
                                  "(0, 1), decreasing (e.g. the student's timesteps after the first: 0.9,0.75,0.5)")
        if self.resolution is not None and self.buckets is not None:
            raise PrecomputeError(f"--resolution {self.resolution} and --buckets {self.buckets!r} both given: a "
                                  f"square resolution is the bucket {self.resolution}x{self.resolution}; pass one of them")


@dataclass(kw_only=True)
class PrecomputeSummary:
    images: int  # generated in this run, all ranks
    seconds: float
    bytes_written: int
    nothing_to_do: bool = False
    stopped: str | None = None  # the signal that stopped the job before it finished (SIGTERM, SIGUSR1)

    def line(self, out: str) -> str:
        rate = self.images / max(self.seconds, 1e-9)
        return (f"precompute: {self.images} images in {self.seconds:.1f} s ({rate:.2f} images/s), "
                f"{self.bytes_written:,} bytes written to {out}")


# --------------------------------------------------------------------------------------------------
# checks that run before any work


def resolve_resolution(pipeline: str, resolution: int | None) -> int:
    """The image side in pixels; a multiple of the VAE factor × 2 (the transformer's 2×2 patches)."""
    vae = json.loads((resolve_pipeline(pipeline) / "vae" / "config.json").read_text())
    factor = vae_factor(pipeline)[1]
    if resolution is None:
        resolution = min(512, vae.get("sample_size", 512))
    if resolution < factor or resolution % factor:
        raise PrecomputeError(f"--resolution {resolution} must be a positive multiple of {factor} (VAE factor × 2)")
    return resolution


def resolve_buckets(cfg: PrecomputeConfig, prompts: PromptFile) -> tuple[list[bk.Bucket], np.ndarray]:
    """The job's buckets and each prompt's bucket index: its own width/height when the file gives one,
    else the seeded draw (`buckets.assign` from --seed). Every refusal names the line to fix."""
    factor = vae_factor(cfg.pipeline)[1]
    where = (lambda i: f"{prompts.source}:{prompts.lines[i]}") if prompts.lines else (lambda i: prompts.source)
    sizes = prompts.sizes or [None] * len(prompts.prompts)
    given = [i for i, size in enumerate(sizes) if size is not None]
    if given and cfg.resolution is not None:
        raise PrecomputeError(f"{where(given[0])}: the prompt file gives sizes (width/height) and --resolution "
                              f"{cfg.resolution} was passed; drop --resolution (declare sizes with --buckets)")
    if cfg.buckets is not None:
        try:
            buckets = bk.parse_buckets(cfg.buckets, factor)
        except bk.BucketError as err:
            raise PrecomputeError(str(err)) from None
    elif given:  # the file's own sizes, in order of first appearance
        for i in given:
            try:
                bk.check_buckets([bk.Bucket(*sizes[i])], factor)
            except bk.BucketError as err:
                raise PrecomputeError(f"{where(i)}: {err}") from None
        buckets = [bk.Bucket(*size) for size in dict.fromkeys(sizes[i] for i in given)]
    else:
        buckets = bk.square(resolve_resolution(cfg.pipeline, cfg.resolution))
    if given and len(given) < len(sizes) and cfg.buckets is None:
        i = next(i for i, size in enumerate(sizes) if size is None)
        raise PrecomputeError(f"{where(i)}: no width/height, and no --buckets to draw its size from; give every "
                              "prompt a size, or pass --buckets")
    assignment = bk.assign(buckets, len(sizes), cfg.seed)
    for i in given:
        k = bk.index_of(buckets, *sizes[i])
        if k is None:
            raise PrecomputeError(f"{where(i)}: size {sizes[i][0]}x{sizes[i][1]} is not one of the buckets "
                                  f"({', '.join(b.name for b in buckets)}); add it to --buckets or fix the prompt")
        assignment[i] = k
    return buckets, assignment


def check_clip_folder(path: str) -> None:
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise PrecomputeError(f"--clip {path}: no config.json (expected a CLIPTextModelWithProjection folder)")
    if not any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
        raise PrecomputeError(f"--clip {path}: no CLIP tokenizer files next to the model")


# --------------------------------------------------------------------------------------------------
# the job's identity: the arguments that decide the bytes (not --batch-size, not the paths' spelling)


def describe_job(cfg: PrecomputeConfig, buckets: list[bk.Bucket], assignment: np.ndarray, prompts: PromptFile,
                 print0=print) -> dict:
    """The manifest of this job before any shard exists (rank 0): counts truncations with the pipeline's
    tokenizer and fingerprints the teacher (and CLIP)."""
    from transformers import AutoTokenizer

    folder = resolve_pipeline(cfg.pipeline)
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    truncated = sum(n > MAX_SEQUENCE_LENGTH for n in token_lengths(tokenizer, prompts.prompts))
    transformer = json.loads((folder / "transformer" / "config.json").read_text())
    scale = vae_factor(cfg.pipeline)[0]
    n = len(prompts.prompts)
    counts = np.bincount(assignment, minlength=len(buckets)).tolist()
    print0(f"precompute: {n} prompts from {cfg.prompts}"
           + (f", {prompts.skipped_empty} empty lines skipped" if prompts.skipped_empty else "")
           + (f", {truncated} longer than {MAX_SEQUENCE_LENGTH} tokens truncated (as ZImagePipeline does)"
              if truncated else "")
           + f"; {', '.join(f'{b.name} ×{c}' for b, c in zip(buckets, counts))}; {cfg.steps} steps, "
           f"guidance {cfg.guidance}; hashing the teacher's weights", flush=True)
    if empty := [b.name for b, c in zip(buckets, counts) if c == 0]:
        print0(f"note: bucket(s) {', '.join(empty)} got no prompts (too few prompts for the buckets' weights)")
    clip = None
    if cfg.clip:
        clip = {"path": cfg.clip, "fingerprint": fmt.fingerprint_folder(cfg.clip),
                "dim": json.loads((Path(cfg.clip) / "config.json").read_text()).get("projection_dim", 512)}
    sizes = [buckets[k].size for k in assignment.tolist()]
    plan = fmt.shard_plan(assignment, len(buckets), cfg.shard_size)
    return {
        "format": fmt.FORMAT,
        "format_version": fmt.FORMAT_VERSION,
        "complete": False,
        "teacher": {"pipeline": cfg.pipeline, "fingerprint": fmt.teacher_fingerprint(folder)},
        "sampling": {
            "steps": cfg.steps, "guidance": cfg.guidance, "negative_prompt": cfg.negative_prompt, "seed": cfg.seed,
            "seed_rule": "sample i: torch.randn((1, C, H, W) of its bucket, generator=torch.Generator('cpu')"
                         ".manual_seed(seed + i))",
            "bucket_rule": "the prompt's own width/height, else bucket k where u_i = numpy.random.default_rng("
                           "[seed, 0x6275636B]).random(N)[i] · Σ weights falls in k's share of the cumulative weights",
            "max_sequence_length": MAX_SEQUENCE_LENGTH,
            "trajectory": list(cfg.trajectory),
        },
        "buckets": [{**entry, "latent_shape": list(b.latent_shape(transformer["in_channels"], scale)), "count": c}
                    for b, entry, c in zip(buckets, bk.to_json(buckets), counts)],
        "storage": {"dtype": cfg.dtype, "cap_feat_dim": transformer["cap_feat_dim"], "clip": clip,
                    "clip_dim": clip and clip["dim"], "shard_size": cfg.shard_size},
        "prompts": {"file": fmt.PROMPTS, "source": cfg.prompts, "count": n, "skipped_empty": prompts.skipped_empty,
                    "truncated": truncated,
                    "sha256": hashlib.sha256(fmt.prompts_jsonl(prompts.prompts, sizes)).hexdigest()},
        "num_samples": n,
        "decode_first": min(cfg.decode_first, n),
        "shards": [{"file": fmt.shard_name(k), "bucket": buckets[b].name, "count": len(ix), "bytes": None,
                    "sha256": None} for k, (b, ix) in enumerate(plan)],
    }


def _identity(m: dict) -> dict[str, object]:
    """CLI flag -> the value it decided, for the refusal message when a rerun differs (the prompts last:
    their file's checksum also covers each prompt's drawn size, which other flags explain better)."""
    s, st = m["sampling"], m["storage"]
    return {
        "--pipeline": m["teacher"]["fingerprint"],
        "--buckets": [b["name"] + (f":{b['weight']:g}" if b.get("weight", 1) != 1 else "") for b in m["buckets"]],
        "--steps": s["steps"], "--guidance": s["guidance"],
        "--negative-prompt": s["negative_prompt"], "--seed": s["seed"], "--dtype": st["dtype"],
        "--trajectory": s.get("trajectory", []),
        "--shard-size": st["shard_size"], "--decode-first": m["decode_first"],
        "--clip": st["clip"] and st["clip"]["fingerprint"], "--prompts": m["prompts"]["sha256"],
    }


def prepare_out(out: Path, job: dict, prompts: list[str], sizes: list[tuple[int, int]]) -> bool:
    """Create or validate OUT; True when the job is already finished (every file present)."""
    if not (out / fmt.MANIFEST).is_file():
        out.mkdir(parents=True, exist_ok=True)
        fmt.write_atomic(out / fmt.PROMPTS, fmt.prompts_jsonl(prompts, sizes))
        fmt.write_json(out / fmt.MANIFEST, job)
        return False
    old, now = fmt.read_manifest(out, require_complete=False), _identity(job)
    if old["format_version"] < fmt.FORMAT_VERSION:
        raise PrecomputeError(f"--out {out} holds format-{old['format_version']} data (made before buckets); it "
                              "stays readable for training and eval, but this job cannot continue it: use another --out")
    for flag, was in _identity(old).items():
        if was == now[flag]:
            continue
        if flag in ("--pipeline", "--prompts", "--clip"):
            what = {"--pipeline": "teacher weights", "--prompts": "prompts", "--clip": "CLIP model"}[flag]
            detail = f"the {what} are not those of the existing job"
        else:
            detail = f"the existing job has {flag} {was!r}, this run asks for {now[flag]!r}"
        raise OtherJob(f"--out {out}: {flag} differs ({detail}); use another --out or the same arguments")
    images = [out / fmt.IMAGES / fmt.image_name(i) for i in range(old["decode_first"])]
    return old["complete"] and all((out / e["file"]).is_file() for e in old["shards"]) and all(
        p.is_file() for p in images)


# --------------------------------------------------------------------------------------------------
# processes: torchrun's environment, torch.distributed only when there are several


class _Ranks:
    """This job's view of the ranks (ladd.distributed does the talking). Ranks meet twice: when rank 0
    has validated the output folder, and when every shard is written (then rank 0 writes the manifest)."""

    def __init__(self):
        # Long timeout: between the two meetings a rank works through its shards (hours at scale).
        self.dist = distributed.init(timeout_hours=48)
        self.rank, self.world, self.device = self.dist.rank, self.dist.world_size, self.dist.device

    def broadcast0(self, value: int) -> int:
        return distributed.broadcast0(value, self.device)

    def sum(self, values: list[int]) -> list[int]:
        return distributed.sum_over_ranks(values, self.device)

    def stop(self) -> None:
        distributed.shutdown()

    def print0(self, *args, **kwargs) -> None:
        distributed.print0(*args, **kwargs)


class _StopRequests:
    """SIGTERM / SIGUSR1 (what SLURM sends before preemption; torchrun forwards SIGTERM and SIGKILLs 30 s
    later) become a flag that the job reads between batches. Installed for the job only: `close()`
    restores the previous handlers. Signal handlers can only be set from the main thread; elsewhere
    (a job started from a thread) signals keep their previous meaning."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signal: str | None = None
        main = threading.current_thread() is threading.main_thread()
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS} if main else {}

    def _handle(self, signum, frame) -> None:
        self.signal = self.signal or signal.Signals(signum).name  # only a flag: the batch in flight finishes

    def __call__(self) -> bool:
        return self.signal is not None

    def close(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class Refused(PrecomputeError):
    """On ranks other than 0 when rank 0 refused the job (rank 0 prints why)."""


# --------------------------------------------------------------------------------------------------
# the teacher: the pipeline's own models, sampled through the adapter


class Teacher:
    """ZImagePipeline's models on one device; `shard()` turns prompts and seeds into a shard's tensors."""

    def __init__(self, cfg: PrecomputeConfig, device: torch.device):
        from ladd.models.loading import load_pipeline
        from ladd.models.text import encode_prompts
        from ladd.models.zimage import ZImageAdapter

        # bf16 compute only on GPU; on CPU bf16 is a storage format (the math stays float32).
        compute = torch.bfloat16 if cfg.dtype == "bf16" and device.type == "cuda" else torch.float32
        self.pipe = load_pipeline(cfg.pipeline, device, compute)  # the pipeline's own modules, frozen
        self.cfg, self.device = cfg, device
        self.adapter = ZImageAdapter(self.pipe.transformer, compile=cfg.compile)
        # The negative prompt is the same for every sample: encoded once here, not twice per batch.
        self.neg = None
        if cfg.guidance > 0:
            self.neg = encode_prompts(self.pipe, [cfg.negative_prompt], MAX_SEQUENCE_LENGTH, device)[0]
            self.neg = self.neg.to(self.adapter.dtype)
        self.clip = _load_clip(cfg.clip, device) if cfg.clip else None

    def sigmas(self, bucket: bk.Bucket) -> torch.Tensor:
        """The pipeline's schedule at this size (its image-token count sets the shift when dynamic)."""
        from ladd.flow import image_seq_len, teacher_sigmas

        return teacher_sigmas(self.pipe.scheduler, self.cfg.steps,
                              image_seq_len(*bucket.latent_hw(self.pipe.vae_scale_factor)), device=self.device)

    @torch.no_grad()
    def shard(self, prompts: list[str], seeds: list[int], bucket: bk.Bucket, progress,
              stop=lambda: False) -> dict[str, torch.Tensor] | None:
        """The shard's tensors (one bucket); None when `stop()` turned true between batches (abandoned)."""
        from ladd.models.text import encode_prompts, pack, pooled
        from ladd.sampling import euler_sample, initial_noise

        n, bs = len(prompts), self.cfg.batch_size
        lengths = token_lengths(self.pipe.tokenizer, prompts)
        # Batch prompts of similar length together (less padding in the text encoder and in the joint
        # [image | caption] sequence), then scatter results back: sample i keeps seed + i and its place.
        order = sorted(range(n), key=lambda j: lengths[j])
        sigmas = self.sigmas(bucket)
        latents: list[torch.Tensor] = [None] * n
        states: list[torch.Tensor] = [None] * n
        caps: list[torch.Tensor] = [None] * n
        for b in range(0, n, bs):
            if stop():  # a preemption signal: the batch in flight has finished, start no other
                return None
            idx = order[b : b + bs]
            expect = [min(lengths[j], MAX_SEQUENCE_LENGTH) for j in idx]
            # Tokenising to the batch's longest prompt instead of 512 is exact: Qwen3 is causal, so
            # features of real tokens do not depend on right padding (a test pins the latents).
            feats = encode_prompts(self.pipe, [prompts[j] for j in idx], max(expect), self.device)
            if [len(f) for f in feats] != expect:
                raise RuntimeError(f"token counts {[len(f) for f in feats]} != {expect}: tokenisation drifted")
            noise = initial_noise(self.pipe, [seeds[j] for j in idx], bucket.size).to(self.device)
            model_caps = [f.to(self.adapter.dtype) for f in feats]
            neg = None if self.neg is None else [self.neg] * len(idx)
            x = euler_sample(self.adapter, noise, sigmas, model_caps, neg, self.cfg.guidance, self.cfg.trajectory)
            x, path = (x[0].cpu(), x[1].cpu()) if self.cfg.trajectory else (x.cpu(), None)
            for k, j in enumerate(idx):
                latents[j], caps[j] = x[k], feats[k].cpu()
                if path is not None:
                    states[j] = path[k]
            progress.update(len(idx))
        store = DTYPES[self.cfg.dtype]
        flat, lens = pack(caps)
        tensors = {
            "latents": torch.stack(latents).to(store),
            "seeds": torch.tensor(seeds, dtype=torch.int64),
            "cap_feats": flat.to(store),
            "cap_lens": lens,
            "pooled": pooled(caps),
        }
        if self.cfg.trajectory:
            tensors["states"] = torch.stack(states).to(store)
        if self.clip is not None:
            tensors["clip"] = self._clip_embeds(prompts)
        return tensors

    @torch.no_grad()
    def _clip_embeds(self, prompts: list[str]) -> torch.Tensor:
        tokenizer, model = self.clip
        out = []
        for b in range(0, len(prompts), self.cfg.batch_size):
            inputs = tokenizer(prompts[b : b + self.cfg.batch_size], padding=True, truncation=True,
                               max_length=tokenizer.model_max_length, return_tensors="pt").to(self.device)
            out.append(model(**inputs).text_embeds.float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def write_images(self, out: Path, latents: torch.Tensor, indices: np.ndarray, decode_first: int) -> int:
        """PNGs of the shard's samples below `decode_first` via the VAE with its scaling and shift; bytes written."""
        from ladd.images import png_bytes
        from ladd.sampling import decode

        written = 0
        for j in np.flatnonzero(indices < decode_first).tolist():
            path = out / fmt.IMAGES / fmt.image_name(int(indices[j]))
            if path.is_file():
                continue
            path.parent.mkdir(exist_ok=True)
            image = decode(self.pipe, latents[j : j + 1].float().to(self.device))[0]
            # As the pipeline's postprocess: [0, 1] -> round(255·x) as uint8.
            pixels = (image.permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
            data = png_bytes(pixels)
            fmt.write_atomic(path, data)
            written += len(data)
        return written


def _load_clip(path: str, device: torch.device):
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    return CLIPTokenizer.from_pretrained(path), CLIPTextModelWithProjection.from_pretrained(path).to(device).eval()


# --------------------------------------------------------------------------------------------------
# the job


def run_precompute(cfg: PrecomputeConfig) -> PrecomputeSummary:
    """Validate everything, then generate this rank's missing shards; rank 0 finalises the manifest."""
    t0 = time.perf_counter()
    out = Path(cfg.out)
    # Before any work: a wrong folder, size, bucket or prompt file is one line, not a traceback later.
    resolve_pipeline(cfg.pipeline)
    if cfg.clip:
        check_clip_folder(cfg.clip)
    try:
        prompts = read_prompts(cfg.prompts)
    except PromptFileError as err:
        raise PrecomputeError(str(err)) from None
    buckets, assignment = resolve_buckets(cfg, prompts)

    ranks, stop = _Ranks(), _StopRequests()
    try:
        return _run(cfg, out, buckets, assignment, prompts, ranks, stop, t0)
    finally:
        stop.close()
        ranks.stop()


def _run(cfg, out: Path, buckets: list[bk.Bucket], assignment: np.ndarray, prompts, ranks: _Ranks,
         stop: _StopRequests, t0: float) -> PrecomputeSummary:
    from tqdm import tqdm

    # Rank 0 alone creates or validates OUT; the others learn the verdict (0 run, 1 done, 2 refused).
    status, error = 0, None
    if ranks.rank == 0:
        try:
            job = describe_job(cfg, buckets, assignment, prompts, ranks.print0)
            sizes = [buckets[k].size for k in assignment.tolist()]
            status = int(prepare_out(out, job, prompts.prompts, sizes))
        except (PrecomputeError, fmt.DataError) as err:
            status, error = 2, err
    status = ranks.broadcast0(status)
    if status == 2:
        raise error if error is not None else Refused("rank 0 refused the job")
    manifest = fmt.read_manifest(out, require_complete=False)
    entries = manifest["shards"]
    where = fmt.layout(out, manifest)
    samples = where.shard_samples  # each shard's sample indices

    # Shards are dealt round-robin: shard k belongs to rank k % world, whatever was done before.
    mine = [k for k in range(len(entries)) if k % ranks.world == ranks.rank]
    for k in mine:  # a write that was killed half-way: never read, recomputed
        (out / (entries[k]["file"] + ".tmp")).unlink(missing_ok=True)
    present = [(out / e["file"]).is_file() for e in entries]
    # A shard that exists was written whole, but it may have been damaged since (the reader would then
    # refuse it): each rank checks its own written shards against their checksums before skipping them,
    # and rewrites the damaged ones. Cost: one read of the data, split over the ranks (~2 GB/s per core).
    if any(present):
        ranks.print0(f"verifying the checksums of {sum(present)} written shards (each process its own)")
    damaged = _damaged(out, entries, [k for k in mine if present[k]])
    n_damaged = ranks.sum([len(damaged)])[0]  # every rank takes the same branch below
    if n_damaged:
        ranks.print0(f"repairing: {n_damaged} damaged shard(s) will be rewritten")
    elif status == 1:
        ranks.print0(f"nothing to do: {out} already holds all {manifest['num_samples']} samples "
                     f"({len(entries)} shards, manifest complete, checksums verified)")
        return PrecomputeSummary(images=0, seconds=time.perf_counter() - t0, bytes_written=0, nothing_to_do=True)
    todo = [k for k in mine if not present[k] or k in damaged]
    images_todo = [k for k in mine if _missing_images(out, samples[k], manifest["decode_first"])]
    if any(present):
        first_missing = present.index(False) if not all(present) else len(entries)
        ranks.print0(f"resuming: {sum(present)} of {len(entries)} shards already written "
                     f"(first missing: shard {first_missing})")
    ranks.print0(f"precompute: {len(entries)} shards of up to {cfg.shard_size} samples over {ranks.world} "
                 f"process(es) on {ranks.device.type}, batch size {cfg.batch_size}")

    images = written = 0
    finished: set[int] = set()  # shards this run wrote
    stopped = False  # a signal stopped this rank before its work was done
    if todo or images_todo:
        teacher = Teacher(cfg, ranks.device)
        total = sum(entries[k]["count"] for k in todo)
        with tqdm(total=total, unit="img", desc=f"teacher (rank 0 of {ranks.world})", dynamic_ncols=True,
                  disable=ranks.rank != 0 or total == 0) as bar:
            for k in sorted(set(todo) | set(images_todo)):
                if stopped := stop():  # start no new shard
                    break
                e, path = entries[k], out / entries[k]["file"]
                if k in todo:
                    ids = samples[k].tolist()
                    bucket = where.buckets[where.shard_bucket[k]]
                    tensors = teacher.shard([prompts.prompts[i] for i in ids], [cfg.seed + i for i in ids], bucket,
                                            bar, stop)
                    if stopped := tensors is None:  # abandoned between batches: nothing of it was written
                        break
                    tensors["indices"] = torch.from_numpy(samples[k].copy())
                    sha, nbytes = fmt.write_shard(path, tensors, e["bucket"])
                    # A checksum beside the shard, so rank 0 need not re-read every shard to finalise.
                    fmt.write_atomic(out / (e["file"] + ".sha256"), f"{sha}  {e['file']}\n".encode())
                    images, written, latents = images + e["count"], written + nbytes, tensors["latents"]
                    finished.add(k)
                else:
                    from safetensors.torch import load_file

                    latents = load_file(path)["latents"]
                written += teacher.write_images(out, latents, samples[k], manifest["decode_first"])

    # Every rank meets here, stopped or not (a stopped rank must not leave the others waiting, nor
    # leave early): one all-reduce of the counts, the stop flags and which shards were written.
    done = sum(entries[k]["count"] for k in mine if (present[k] and k not in damaged) or k in finished)
    images, written, n_stopped, done, *wrote = ranks.sum(
        [images, written, int(stopped), done] + [int(k in finished) for k in range(len(entries))])
    seconds = time.perf_counter() - t0
    summary = PrecomputeSummary(images=images, seconds=seconds, bytes_written=written)
    if n_stopped:  # the manifest stays unfinished; the next run resumes at the first missing shard
        last = max((k for k, w in enumerate(wrote) if w), default=None)
        after = f"after shard {last}" if last is not None else "before finishing a shard"
        summary.stopped = stop.signal or "a signal on another rank"
        ranks.print0(f"precompute: stopped by {summary.stopped} {after} ({done} of {manifest['num_samples']} "
                     f"samples done); rerun the same command to continue")
        return summary
    if ranks.rank == 0:
        _finalise(out, manifest)
    ranks.print0(summary.line(str(out)))
    return summary


def _damaged(out: Path, entries: list[dict], written: list[int]) -> list[int]:
    """Of these written shards, those whose size or sha256 differs from what was recorded when they were
    written (the `.sha256` beside it during a run, the manifest after one)."""
    damaged = []
    for k in written:
        e, side = entries[k], out / (entries[k]["file"] + ".sha256")
        record = {**e, "sha256": side.read_text().split()[0]} if side.is_file() else e
        if why := fmt.shard_damage(out, record):
            print(f"{e['file']}: {why}; rewriting it", flush=True)  # on the rank that owns the shard
            damaged.append(k)
    return damaged


def _missing_images(out: Path, indices: np.ndarray, decode_first: int) -> bool:
    return any(not (out / fmt.IMAGES / fmt.image_name(i)).is_file() for i in indices[indices < decode_first].tolist())


def _finalise(out: Path, manifest: dict) -> None:
    """Rank 0, once every rank is done: checksums into the manifest, `complete: true`, atomically."""
    for e in manifest["shards"]:
        path, side = out / e["file"], out / (e["file"] + ".sha256")
        if not path.is_file():
            raise PrecomputeError(f"{e['file']} is missing after every rank finished (shared filesystem?)")
        if side.is_file():
            e["sha256"] = side.read_text().split()[0]
        elif e["sha256"] is None or e["bytes"] != path.stat().st_size:
            e["sha256"] = fmt.sha256_file(path)  # written by a run killed before its checksum file
        e["bytes"] = path.stat().st_size
    manifest["complete"] = True
    fmt.write_json(out / fmt.MANIFEST, manifest)
    for e in manifest["shards"]:
        (out / (e["file"] + ".sha256")).unlink(missing_ok=True)
