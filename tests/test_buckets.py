"""Aspect-ratio buckets: the specification, precompute at every bucket shape against ZImagePipeline,
the format (one shape per shard, format 1 still read), the bucketed reader and the bad-input lines."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ladd.cli import main
from tests.clitools import error_lines, run_cli
from ladd.data import buckets as bk
from ladd.data import shards as fmt
from ladd.data.shards import ShardDataset

pytestmark = pytest.mark.usefixtures("one_thread")

# The tiny pipeline's VAE factor is 2, so sides are multiples of 4 (its sample_size is 32).
SPEC = "32x32,40x24,24x40"
PROMPTS = [f"prompt {i} " + "word " * (i % 5) for i in range(11)]
# Prompt 1 asks for 24x40 and prompt 4 for 40x24 in the file; the others are drawn from the seed.
SIZES = {1: (24, 40), 4: (40, 24)}


def _jsonl(path: Path, prompts, sizes) -> Path:
    lines = []
    for i, p in enumerate(prompts):
        obj = {"prompt": p}
        if i in sizes:
            obj["width"], obj["height"] = sizes[i]
        lines.append(json.dumps(obj))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def bucketed(tiny_dir, tmp_path_factory):
    """11 prompts over three buckets, 6 teacher steps with CFG, shards of 2, batches of 3."""
    root = tmp_path_factory.mktemp("bucketed")
    prompts = _jsonl(root / "p.jsonl", PROMPTS, SIZES)
    args = ["precompute", "--pipeline", tiny_dir, "--prompts", prompts, "--out", root / "out", "--steps", 6,
            "--guidance", 4.0, "--buckets", SPEC, "--seed", 3, "--shard-size", 2, "--batch-size", 3,
            "--decode-first", 5]
    assert main([str(a) for a in args]) == 0
    return root / "out", args


# ------------------------------------------------------------------------------------ specification


def test_named_sets_are_multiples_of_their_factor_and_near_constant_area():
    for name, factor, area in (("zimage-1024", 16, 1024**2), ("zimage-512", 16, 512**2), ("toy", 8, 64**2)):
        buckets = bk.parse_buckets(name, factor)
        assert buckets[0].size == (int(area**0.5),) * 2  # square first
        assert all(b.width % factor == 0 and b.height % factor == 0 for b in buckets)
        assert all(abs(b.width * b.height / area - 1) < 0.07 for b in buckets)
        assert {(b.width, b.height) for b in buckets} == {(b.height, b.width) for b in buckets}  # both orientations
    assert bk.parse_buckets("zimage-1024", 16)[4].latent_shape(16, 8) == (16, 152, 104)  # 832 wide, 1216 tall
    assert bk.Bucket(1216, 832).tokens(8) == 76 * 52  # 1216 / 8 / 2 by 832 / 8 / 2 patches


def test_explicit_lists_weights_and_refusals():
    got = bk.parse_buckets(" 64x64, 80x48:2.5 ", 8)
    assert [(b.name, b.weight) for b in got] == [("64x64", 1.0), ("80x48", 2.5)]
    for spec, message in (("", "--buckets is empty"), ("64x60", "60 is not a positive multiple of 8"),
                          ("64x64,64x64", "listed twice"), ("64by64", "neither a named set"),
                          ("64x64:0", "weights must be positive")):
        with pytest.raises(bk.BucketError, match=message):
            bk.parse_buckets(spec, 8)
    with pytest.raises(bk.BucketError, match="nearest: 64x64"):
        bk.parse_buckets("66x62", 8)


def test_the_draw_is_seeded_prefix_stable_and_weighted():
    buckets = bk.parse_buckets("8x8:1,16x8:3", 8)
    draw = bk.assign(buckets, 20_000, seed=7)
    assert np.array_equal(draw[:100], bk.assign(buckets, 100, seed=7))  # more prompts never move earlier ones
    assert not np.array_equal(draw, bk.assign(buckets, 20_000, seed=8))
    assert abs(draw.mean() - 0.75) < 0.015  # bucket 1 has 3/4 of the weight
    assert not bk.assign(bk.square(64), 5, 0).any()


# ------------------------------------------------------------------------------------ precompute


def test_every_bucket_equals_zimage_pipeline_at_its_shape(bucketed, tiny_pipe):
    """Sample i == ZImagePipeline(prompt_i, height=H_i, width=W_i, generator seed + i), batches of 3."""
    out, _ = bucketed
    ds = ShardDataset(out)
    shapes = set()
    for i, prompt in enumerate(PROMPTS):
        b = ds.bucket_of(i)
        if i in SIZES:
            assert b.size == SIZES[i]
        ref = tiny_pipe(prompt, height=b.height, width=b.width, num_inference_steps=6, guidance_scale=4.0,
                        generator=torch.Generator("cpu").manual_seed(3 + i), output_type="latent").images[0]
        got = ds[i]["latents"]
        assert got.shape == ref.shape == (16, b.height // 2, b.width // 2)
        assert (got - ref).abs().max().item() <= 1e-4, f"sample {i} at {b.name}"
        shapes.add(b.name)
    assert shapes == set(SPEC.split(","))  # the test covers every bucket


def test_shards_hold_one_bucket_and_the_manifest_counts_them(bucketed, capsys):
    out, _ = bucketed
    m = fmt.read_manifest(out)
    names = [b["name"] for b in m["buckets"]]
    assert names == SPEC.split(",")
    lines = [json.loads(line) for line in (out / fmt.PROMPTS).read_text().splitlines()]
    sizes = [(o["width"], o["height"]) for o in lines]
    drawn = bk.assign(bk.parse_buckets(SPEC, 4), len(PROMPTS), seed=3)
    for i, size in enumerate(sizes):
        assert size == SIZES.get(i, bk.parse_buckets(SPEC, 4)[drawn[i]].size)
    assert [b["count"] for b in m["buckets"]] == [sizes.count(bk.Bucket(*map(int, n.split("x"))).size) for n in names]
    seen = []
    for entry in m["shards"]:
        t = load_file(out / entry["file"])
        w, h = map(int, entry["bucket"].split("x"))
        assert t["latents"].shape[1:] == (16, h // 2, w // 2) and entry["count"] <= 2
        idx = t["indices"].tolist()
        assert idx == sorted(idx) and all(sizes[i] == (w, h) for i in idx)
        assert torch.equal(t["seeds"], t["indices"] + 3)
        seen += idx
    assert sorted(seen) == list(range(len(PROMPTS)))
    assert sorted(p.name for p in (out / fmt.IMAGES).iterdir()) == [fmt.image_name(i) for i in range(5)]
    rc, stdout, err = run_cli(capsys, "data", "check", out)
    assert rc == 0 and err == "" and "buckets 32x32 ×" in stdout


def test_data_check_names_a_shard_of_the_wrong_shape(bucketed, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(bucketed[0], bad)
    manifest = json.loads((bad / fmt.MANIFEST).read_text())
    entry = next(e for e in manifest["shards"] if e["bucket"] == "40x24")
    t = load_file(bad / entry["file"])
    t["latents"] = t["latents"].transpose(-1, -2).contiguous()  # 24x40 latents in a 40x24 shard
    save_file(t, bad / entry["file"])
    entry |= {"sha256": fmt.sha256_file(bad / entry["file"]), "bytes": (bad / entry["file"]).stat().st_size}
    (bad / fmt.MANIFEST).write_text(json.dumps(manifest))
    rc, _, err = run_cli(capsys, "data", "check", bad)
    assert rc == 1 and err.strip() == (f"ladd data check: {entry['file']}: latents has shape "
                                       f"{tuple(t['latents'].shape)}, expected {(entry['count'], 16, 12, 20)}")


def test_a_rerun_with_other_buckets_is_refused(bucketed, capsys):
    out, args = bucketed
    rc, stdout, _ = run_cli(capsys, *args)
    assert rc == 0 and "nothing to do" in stdout
    rc, _, err = run_cli(capsys, *args, "--buckets", "32x32,40x24,24x40:2")
    assert rc == 2 and len(error_lines(err)) == 1 and "--buckets differs" in err


def test_bad_bucket_input_is_one_line_and_writes_nothing(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    txt = tmp_path / "p.txt"
    txt.write_text("a\nb\n")
    sized = _jsonl(tmp_path / "s.jsonl", ["a", "b", "c"], {0: (32, 32), 2: (36, 24)})
    partial = _jsonl(tmp_path / "partial.jsonl", ["a", "b"], {0: (32, 32)})
    odd = _jsonl(tmp_path / "odd.jsonl", ["a", "b"], {0: (32, 32), 1: (30, 32)})
    (tmp_path / "half.jsonl").write_text('{"prompt": "a", "width": 32}\n')
    cases = [
        (["--prompts", txt, "--buckets", "32x30"], "bucket 32x30: 30 is not a positive multiple of 4"),
        (["--prompts", txt, "--buckets", ","], "neither a named set"),
        (["--prompts", txt, "--buckets", " "], "--buckets is empty"),
        (["--prompts", txt, "--buckets", "32x32", "--resolution", 32], "--resolution 32 and --buckets '32x32' both given"),
        (["--prompts", sized, "--buckets", "32x32,40x24"], "s.jsonl:3: size 36x24 is not one of the buckets (32x32, 40x24)"),
        (["--prompts", sized, "--resolution", 32], "s.jsonl:1: the prompt file gives sizes (width/height) and --resolution"),
        (["--prompts", partial], "partial.jsonl:2: no width/height, and no --buckets"),
        (["--prompts", odd], "odd.jsonl:2: bucket 30x32: 30 is not a positive multiple of 4"),
        (["--prompts", tmp_path / "half.jsonl", "--buckets", "32x32"], 'half.jsonl:1: "width" without "height"'),
    ]
    for args, message in cases:
        rc, _, err = run_cli(capsys, "precompute", "--pipeline", tiny_dir, "--out", out, *args)
        lines = error_lines(err)
        assert rc == 2 and len(lines) == 1 and message in lines[0], (args, err)
        assert not out.exists()


def test_sizes_from_the_file_alone_make_the_buckets(tiny_dir, tmp_path, capsys):
    prompts = _jsonl(tmp_path / "p.jsonl", ["a", "b", "c"], {0: (24, 40), 1: (32, 32), 2: (24, 40)})
    rc, _, err = run_cli(capsys, "precompute", "--pipeline", tiny_dir, "--prompts", prompts, "--out", tmp_path / "o",
                      "--steps", 1)
    assert rc == 0, err
    m = fmt.read_manifest(tmp_path / "o")
    assert [(b["name"], b["count"]) for b in m["buckets"]] == [("24x40", 2), ("32x32", 1)]


# ------------------------------------------------------------------------------------ the reader


def test_every_micro_batch_has_one_shape_and_ranks_agree_on_the_bucket(bucketed):
    out, _ = bucketed
    for world, batch in ((1, 1), (1, 2), (2, 1)):
        ranks = [ShardDataset(out, rank=r, world_size=world, seed=9, batch_size=batch) for r in range(world)]
        counts = ranks[0].bucket_counts
        want = sum(n // (world * batch) for n in counts) * batch  # per rank, each bucket's remainder dropped
        for epoch in (0, 1):
            per_rank = [ds.epoch_batches(epoch) for ds in ranks]
            flat = torch.cat([p.flatten() for p in per_rank]).tolist()
            assert len(flat) == len(set(flat)) == world * want  # no overlap, equal work
            for step in range(len(per_rank[0])):
                names = {ranks[0].bucket_of(i).name for p in per_rank for i in p[step].tolist()}
                assert len(names) == 1  # one shape per micro-batch, the same on every rank
        ds = ranks[0]
        for _ in range(ds.batches_per_epoch):
            b = ds.next_batch()
            assert b.latents.shape[0] == batch and len({tuple(s.shape) for s in b.latents}) == 1


def test_buckets_interleave_in_proportion_and_resume_mid_epoch(tiny_dir, tmp_path):
    """400 samples over 3 buckets (2:1:1): each epoch's steps mix them (not bucket after bucket), in
    proportion, and a reader loaded from a mid-epoch state continues with exactly the same batches."""
    root = tmp_path
    # Build a layout directly (no teacher needed for the order): a manifest + prompts.jsonl only.
    buckets = bk.parse_buckets("32x32:2,40x24,24x40", 4)
    assignment = bk.assign(buckets, 400, seed=1)
    sizes = [buckets[k].size for k in assignment.tolist()]
    (root / fmt.PROMPTS).write_bytes(fmt.prompts_jsonl([f"p{i}" for i in range(400)], sizes))
    plan = fmt.shard_plan(assignment, 3, 50)
    counts = np.bincount(assignment, minlength=3).tolist()
    manifest = {
        "format": fmt.FORMAT, "format_version": 2, "complete": True, "num_samples": 400, "decode_first": 0,
        "teacher": {"pipeline": "x", "fingerprint": "sha256:0"}, "sampling": {"seed": 0},
        "storage": {"shard_size": 50},
        "buckets": [{**e, "latent_shape": [16, *b.latent_hw(2)], "count": c}
                    for b, e, c in zip(buckets, bk.to_json(buckets), counts)],
        "shards": [{"file": fmt.shard_name(k), "bucket": buckets[b].name, "count": len(ix), "bytes": None,
                    "sha256": None} for k, (b, ix) in enumerate(plan)],
    }
    (root / fmt.MANIFEST).write_text(json.dumps(manifest))
    ds = ShardDataset(root, rank=1, world_size=2, seed=4, batch_size=4, verify=False)
    steps = [ds.bucket_of(int(b[0])).name for b in ds.epoch_batches(0)]
    share = steps.count("32x32") / len(steps)
    assert abs(share - counts[0] / 400) < 0.06 and 0.3 < share < 0.7
    runs = sum(a != b for a, b in zip(steps, steps[1:]))
    assert runs > len(steps) / 4  # interleaved: many bucket changes, not three blocks
    ds.position = 7
    state = ds.state_dict()
    expected = [ds._advance().tolist() for _ in range(len(steps))]  # the rest of epoch 0 and into epoch 1
    again = ShardDataset(root, rank=1, world_size=2, seed=0, batch_size=4, verify=False)
    again.load_state_dict(state)
    assert [again._advance().tolist() for _ in range(len(steps))] == expected


def test_format_1_data_is_still_read(bucketed, tiny_dir, tmp_path, capsys):
    """Data written before buckets (format 1: sampling.resolution, storage.latent_shape, shards with
    "first", prompts without sizes, shards without indices) reads as one square bucket."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS[:5]) + "\n")
    new = tmp_path / "new"
    assert main(["precompute", "--pipeline", str(tiny_dir), "--prompts", str(prompts), "--out", str(new),
                 "--steps", "1", "--shard-size", "2"]) == 0
    capsys.readouterr()
    old = tmp_path / "old"
    shutil.copytree(new, old)
    m = json.loads((old / fmt.MANIFEST).read_text())
    (old / fmt.PROMPTS).write_bytes(fmt.prompts_jsonl(PROMPTS[:5]))
    for k, e in enumerate(m["shards"]):
        t = load_file(old / e["file"])
        del t["indices"]
        save_file(t, old / e["file"])
        e |= {"first": 2 * k, "sha256": fmt.sha256_file(old / e["file"]), "bytes": (old / e["file"]).stat().st_size}
        del e["bucket"]
    m["format_version"] = 1
    m["sampling"]["resolution"] = 32
    m["storage"]["latent_shape"] = m.pop("buckets")[0]["latent_shape"]
    m["prompts"]["sha256"] = fmt.sha256_file(old / fmt.PROMPTS)
    (old / fmt.MANIFEST).write_text(json.dumps(m))
    rc, stdout, err = run_cli(capsys, "data", "check", old)
    assert rc == 0 and err == "" and "32x32 ×5" in stdout
    a, b = ShardDataset(old, batch_size=2, seed=1), ShardDataset(new, batch_size=2, seed=1)
    assert [x.name for x in a.buckets] == ["32x32"]
    assert torch.equal(a.epoch_batches(0), b.epoch_batches(0))
    for i in range(5):
        assert torch.equal(a[i]["latents"], b[i]["latents"]) and a[i]["seed"] == b[i]["seed"]
    rc, _, err = run_cli(capsys, "precompute", "--pipeline", tiny_dir, "--prompts", prompts, "--out", old, "--steps", 1,
                      "--shard-size", 2)
    assert rc == 2 and "holds format-1 data" in err


def test_training_refuses_a_bucket_that_never_fills_a_step():
    """One bucket too small for a step of micro-batch × ranks would never be trained: one line."""
    from types import SimpleNamespace

    from ladd.config import Config
    from ladd.train.loop import check_buckets

    cfg = Config()
    cfg.data.path = "data/x"
    small = bk.Bucket(40, 24)
    data = SimpleNamespace(buckets=[bk.Bucket(32, 32), small], never_visited=[(small, 3)], world_size=2, batch_size=2)
    with pytest.raises(fmt.DataError, match=r"data/x: bucket 40x24 has 3 samples, fewer than one step's 4 "
                                            r"\(2 per rank × 2 rank\(s\)\), so it would never be trained"):
        check_buckets(cfg, data, 4)
    data.never_visited = []
    check_buckets(cfg, data, 4)  # no data.buckets: the data's own are accepted
    cfg.data.buckets = "32x32,40x24"
    check_buckets(cfg, data, 4)
    cfg.data.buckets = "32x32,40x26"
    with pytest.raises(ValueError, match="data.buckets: bucket 40x26: 26 is not a positive multiple of 4"):
        check_buckets(cfg, data, 4)
