"""The teacher-data format from the reading side: `ladd data check` and the training reader."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ladd.cli import main
from ladd.data import shards as fmt
from ladd.data.shards import DataError, ShardDataset, teacher_fingerprint

PROMPTS = [f"a shape number {i} " + "and more " * (i % 4) for i in range(7)]


@pytest.fixture(scope="module")
def data(tiny_pipe, tmp_path_factory):
    """(pipeline folder, dataset folder): 7 samples in shards of 3 + 3 + 1, 2 teacher steps."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: one thread is faster than two waiting
    try:
        root = tmp_path_factory.mktemp("shards")
        tiny_pipe.save_pretrained(root / "tiny", safe_serialization=True)
        (root / "p.txt").write_text("\n".join(PROMPTS) + "\n")
        common = ["precompute", "--pipeline", root / "tiny", "--prompts", root / "p.txt", "--steps", 2,
                  "--shard-size", 3]
        assert main([str(a) for a in common + ["--out", root / "data"]]) == 0
        assert main([str(a) for a in common + ["--out", root / "bf16", "--dtype", "bf16"]]) == 0
    finally:
        torch.set_num_threads(before)
    return root / "tiny", root / "data"


def _check(capsys, path) -> tuple[int, list[str], str]:
    rc = main(["data", "check", str(path)])
    captured = capsys.readouterr()
    return rc, captured.err.strip().splitlines(), captured.out


def test_check_passes_on_whole_data(data, capsys):
    rc, err, out = _check(capsys, data[1])
    assert rc == 0 and err == [] and out.startswith("ok: 7 samples in 3 shards")


def test_check_names_a_corrupt_byte_and_a_truncated_shard(data, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(data[1], bad)
    shard = bad / "shard-00001.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one flipped bit in the latents
    shard.write_bytes(bytes(raw))
    rc, err, _ = _check(capsys, bad)
    assert rc != 0 and err == ["ladd data check: shard-00001.safetensors: checksum mismatch (corrupt)"]

    shutil.copy(data[1] / "shard-00001.safetensors", shard)
    last = bad / "shard-00002.safetensors"
    last.write_bytes(last.read_bytes()[:-100])
    rc, err, _ = _check(capsys, bad)
    assert rc != 0 and len(err) == 1 and err[0].startswith("ladd data check: shard-00002.safetensors: truncated")


def test_check_finds_non_finite_values_and_unfinished_jobs(data, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(data[1], bad)
    shard = bad / "shard-00000.safetensors"
    t = load_file(shard)
    t["latents"][1, 0, 0, 0] = float("nan")
    save_file(t, shard)  # a consistent checksum, so only the values are wrong
    manifest = json.loads((bad / fmt.MANIFEST).read_text())
    manifest["shards"][0] |= {"sha256": fmt.sha256_file(shard), "bytes": shard.stat().st_size}
    (bad / fmt.MANIFEST).write_text(json.dumps(manifest))
    rc, err, _ = _check(capsys, bad)
    assert rc != 0 and err == ["ladd data check: shard-00000.safetensors: latents has non-finite values"]

    manifest["complete"] = False
    (bad / fmt.MANIFEST).write_text(json.dumps(manifest))
    rc, err, _ = _check(capsys, bad)
    assert rc != 0 and len(err) == 1 and "has not finished" in err[0]
    with pytest.raises(DataError, match="has not finished"):
        ShardDataset(bad)


def test_bf16_storage_is_the_float32_latents_rounded(data):
    fp32 = load_file(data[1] / "shard-00000.safetensors")
    bf16 = load_file(data[1].parent / "bf16" / "shard-00000.safetensors")
    assert bf16["latents"].dtype == torch.bfloat16 and bf16["cap_feats"].dtype == torch.bfloat16
    assert torch.equal(bf16["latents"], fp32["latents"].to(torch.bfloat16))
    assert torch.equal(bf16["pooled"], fp32["pooled"])  # conditioning vectors stay float32
    sample = ShardDataset(data[1].parent / "bf16")[0]
    assert sample["latents"].dtype == torch.float32


def test_random_access_reads_the_shards(data):
    ds = ShardDataset(data[1])
    assert len(ds) == 7
    t = load_file(data[1] / "shard-00001.safetensors")
    feats = t["cap_feats"].split(t["cap_lens"].tolist())
    for j in range(3):
        s = ds[3 + j]
        assert s["index"] == 3 + j and s["seed"] == 3 + j and s["clip"] is None
        assert torch.equal(s["latents"], t["latents"][j])
        assert torch.equal(s["cap_feats"], feats[j]) and torch.equal(s["pooled"], t["pooled"][j])
    with pytest.raises(IndexError):
        ds[7]


def test_shuffle_is_deterministic_and_ranks_are_disjoint(data):
    a, b = ShardDataset(data[1], seed=3), ShardDataset(data[1], seed=3)
    assert torch.equal(a.epoch_indices(0), b.epoch_indices(0))
    assert not torch.equal(a.epoch_indices(0), a.epoch_indices(1))
    assert not torch.equal(a.epoch_indices(0), ShardDataset(data[1], seed=4).epoch_indices(0))
    assert sorted(a.epoch_indices(0).tolist()) == list(range(7))
    for world in (2, 3):
        ranks = [ShardDataset(data[1], rank=r, world_size=world, seed=3) for r in range(world)]
        parts = [ds.epoch_indices(0).tolist() for ds in ranks]
        assert all(len(p) == 7 // world for p in parts)  # equal counts: the remainder is dropped
        flat = [i for p in parts for i in p]
        assert len(set(flat)) == len(flat) == world * (7 // world)  # no overlap between ranks


def test_one_bucket_visits_the_strided_slices_of_the_epoch_permutation(data):
    """With one bucket, rank r's micro-batches are perm[r::w] in runs of B (perm: numpy PCG64 seeded
    with (seed, epoch)); the remainder of w·B is dropped."""
    import numpy as np

    for world, batch in ((1, 2), (2, 2), (3, 1)):
        for rank in range(world):
            ds = ShardDataset(data[1], rank=rank, world_size=world, seed=5, batch_size=batch)
            perm = np.random.default_rng([5, 1]).permutation(7)
            usable = 7 // (world * batch) * world * batch
            want = perm[:usable][rank::world].reshape(-1, batch)
            assert ds.epoch_batches(1).tolist() == want.tolist()


def test_state_dict_resumes_exactly(data):
    ds = ShardDataset(data[1], rank=1, world_size=2, seed=5, batch_size=1)
    ds.next_batch()
    state = ds.state_dict()
    assert state == {"epoch": 0, "position": 1, "seed": 5, "batch_size": 1}
    assert ds.batches_per_epoch == 3  # 7 samples over 2 ranks, the remainder dropped
    expected = [ds.next_batch() for _ in range(5)]  # crosses two epoch boundaries
    resumed = ShardDataset(data[1], rank=1, world_size=2, seed=0, batch_size=1)
    resumed.load_state_dict(state)
    for want in expected:
        got = resumed.next_batch()
        assert torch.equal(got.indices, want.indices) and torch.equal(got.latents, want.latents)
        assert all(torch.equal(x, y) for x, y in zip(got.cap_feats, want.cap_feats))
    assert got.latents.shape == (1, 16, 16, 16) and got.latents.dtype == torch.float32
    assert got.pooled.shape == (1, 32) and got.clip is None
    assert resumed.state_dict() == ds.state_dict()
    with pytest.raises(ValueError, match="same data.batch_per_rank"):
        ShardDataset(data[1], batch_size=3).load_state_dict(state)


def test_a_state_saved_before_buckets_counts_samples(data):
    """Checkpoints written before buckets saved the position in samples: it is read as micro-batches."""
    ds = ShardDataset(data[1], seed=2, batch_size=2)
    ds.load_state_dict({"epoch": 1, "position": 4, "seed": 2})
    assert ds.state_dict() == {"epoch": 1, "position": 2, "seed": 2, "batch_size": 2}


def test_iteration_is_the_rest_of_the_epoch(data):
    ds = ShardDataset(data[1], seed=1, batch_size=3)
    order = ds.epoch_indices(0).tolist()
    ds.next_batch()
    assert [s["index"] for s in ds] == order[3:] and len(order) == 6
    assert ds.state_dict() == {"epoch": 1, "position": 0, "seed": 1, "batch_size": 3}


def test_reader_refuses_another_teachers_data(data, tmp_path):
    tiny, path = data
    fingerprint = teacher_fingerprint(tiny)
    assert fingerprint.startswith("sha256:") and fingerprint == teacher_fingerprint(tiny)
    ShardDataset(path, expect_fingerprint=fingerprint)
    other = tmp_path / "other"
    shutil.copytree(tiny / "transformer", other / "transformer")
    weights = next((other / "transformer").glob("*.safetensors"))
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0x01  # a one-bit change anywhere in the weights is another teacher
    weights.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="made by a different teacher") as err:
        ShardDataset(path, expect_fingerprint=teacher_fingerprint(other))
    assert "\n" not in str(err.value)
