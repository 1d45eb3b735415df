"""`ladd precompute` against its reference, ZImagePipeline itself, and its promises: exact, resumable,
idempotent, byte-identical over processes, loud on bad input."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ladd import files
from ladd.cli import main
from tests.clitools import error_lines, run_cli
from ladd.data import shards as fmt
from ladd.data.prompts import PromptFileError, read_prompts
from ladd.models.text import encode_prompts
from ladd.sampling import decode

pytestmark = pytest.mark.usefixtures("one_thread")

LONG = "a very long prompt " * 40  # ~760 byte-level tokens: truncated to 512, as the pipeline does
# Not sorted by length, so that batching inside a shard really reorders (shard 0 runs as 2, 0, 1).
PROMPTS = ["a blue striped square and an orange triangle on a gray field", LONG, "a red circle", "two dogs"]
SEVEN = [f"prompt number {i} " + "word " * (i * 3 % 7) for i in range(7)]


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def seven(tiny_dir, tmp_path_factory):
    """A clean 1-process run: 7 prompts, shards of 3 (3 + 3 + 1), 4 steps, first 2 images decoded."""
    root = tmp_path_factory.mktemp("seven")
    prompts = _write(root / "prompts.txt", SEVEN[:3] + [""] + SEVEN[3:])  # one empty line, skipped
    args = ["precompute", "--pipeline", tiny_dir, "--prompts", prompts, "--out", root / "out", "--steps", 4,
            "--shard-size", 3, "--batch-size", 2, "--decode-first", 2]
    assert main([str(a) for a in args]) == 0
    return root / "out", args


@pytest.fixture(scope="module")
def reference(tiny_pipe):
    """ZImagePipeline itself, one prompt per call: 20 steps, CFG 5, a negative prompt, seeds 7 + i."""
    return [
        tiny_pipe(prompt, height=32, width=32, num_inference_steps=20, guidance_scale=5.0, negative_prompt="blurry",
                  generator=torch.Generator("cpu").manual_seed(7 + i), output_type="latent").images[0]
        for i, prompt in enumerate(PROMPTS)
    ]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_latents_equal_zimage_pipeline(reference, tiny_dir, tmp_path, capsys, batch_size):
    """Each stored latent == ZImagePipeline(prompt alone, generator seed + i, output_type="latent")."""
    prompts = _write(tmp_path / "p.txt", PROMPTS)
    rc, out, _ = run_cli(capsys, "precompute", "--pipeline", tiny_dir, "--prompts", prompts, "--out", tmp_path / "o",
                      "--steps", 20, "--guidance", 5.0, "--negative-prompt", "blurry", "--seed", 7,
                      "--batch-size", batch_size, "--shard-size", 3)
    assert rc == 0 and "1 longer than 512 tokens truncated" in out
    got = torch.cat([load_file(tmp_path / "o" / fmt.shard_name(k))["latents"] for k in range(2)])
    for i, ref in enumerate(reference):
        assert (got[i] - ref).abs().max().item() <= 1e-4, f"sample {i}: {(got[i] - ref).abs().max().item()}"
    manifest = fmt.read_manifest(tmp_path / "o")
    assert manifest["prompts"]["truncated"] == 1


def test_caption_features_do_not_depend_on_right_padding(tiny_pipe):
    """Why tokenising to the batch's longest prompt (not 512) is exact: Qwen3 is causal."""
    prompts = [PROMPTS[0], PROMPTS[2]]  # 79 and 31 tokens with the chat template
    short = encode_prompts(tiny_pipe, prompts, max_sequence_length=79)
    full = encode_prompts(tiny_pipe, prompts, max_sequence_length=512)
    for a, b in zip(short, full):
        assert a.shape == b.shape and (a - b).abs().max().item() <= 1e-5


def test_format(seven):
    out, _ = seven
    m = fmt.read_manifest(out)
    assert m["format"] == fmt.FORMAT and m["format_version"] == fmt.FORMAT_VERSION and m["complete"]
    assert m["num_samples"] == 7 and m["prompts"]["skipped_empty"] == 1
    assert m["teacher"]["fingerprint"] == fmt.teacher_fingerprint(m["teacher"]["pipeline"])
    assert m["sampling"] | {"seed_rule": None, "bucket_rule": None} == {
        "steps": 4, "guidance": 5.0, "negative_prompt": "", "seed": 0, "seed_rule": None, "bucket_rule": None,
        "max_sequence_length": 512, "trajectory": []}
    assert m["buckets"] == [{"name": "32x32", "width": 32, "height": 32, "weight": 1.0, "latent_shape": [16, 16, 16],
                             "count": 7}]  # --resolution (here the VAE's sample_size) is one square bucket
    assert [(s["file"], s["bucket"], s["count"]) for s in m["shards"]] == [
        ("shard-00000.safetensors", "32x32", 3), ("shard-00001.safetensors", "32x32", 3),
        ("shard-00002.safetensors", "32x32", 1)]
    lines = (out / fmt.PROMPTS).read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"prompt": p, "width": 32, "height": 32} for p in SEVEN]
    for k, s in enumerate(m["shards"]):
        assert fmt.sha256_file(out / s["file"]) == s["sha256"] and (out / s["file"]).stat().st_size == s["bytes"]
        t = load_file(out / s["file"])
        n = s["count"]
        assert t["latents"].shape == (n, 16, 16, 16) and t["latents"].dtype == torch.float32
        assert torch.equal(t["indices"], torch.arange(3 * k, 3 * k + n)) and torch.equal(t["seeds"], t["indices"])
        feats = t["cap_feats"].split(t["cap_lens"].tolist())
        assert t["pooled"].shape == (n, 32)
        torch.testing.assert_close(t["pooled"], torch.stack([f.mean(0) for f in feats]))
        assert "clip" not in t
    assert not list(out.glob("*.tmp")) and not list(out.glob("*.sha256"))
    # No pickle anywhere: every file is JSON, JSON lines, safetensors or PNG.
    assert {p.suffix for p in out.rglob("*") if p.is_file()} == {".json", ".jsonl", ".safetensors", ".png"}


def test_decode_first_writes_the_teacher_images(seven, tiny_pipe):
    out, _ = seven
    assert sorted(p.name for p in (out / fmt.IMAGES).iterdir()) == ["00000.png", "00001.png"]
    latents = load_file(out / fmt.shard_name(0))["latents"][:2]
    ref = (decode(tiny_pipe, latents).permute(0, 2, 3, 1).numpy() * 255).round()
    for i in range(2):
        png = np.asarray(Image.open(out / fmt.IMAGES / fmt.image_name(i)).convert("RGB"), dtype=np.float64)
        assert np.abs(png - ref[i]).max() <= 1


def test_rerun_does_nothing_and_changed_argument_is_refused(seven, capsys):
    out, args = seven
    before = _files(out)
    rc, stdout, _ = run_cli(capsys, *args)
    assert rc == 0 and "nothing to do" in stdout and _files(out) == before
    rc, _, err = run_cli(capsys, *args, "--steps", 5)  # argparse: the last --steps wins
    assert rc == 2 and len(error_lines(err)) == 1 and "--steps differs" in err and "--steps 4," in err
    rc, _, err = run_cli(capsys, *args, "--negative-prompt", "ugly")
    assert rc == 2 and "--negative-prompt differs" in err
    assert _files(out) == before


def test_resume_after_a_kill(seven, tmp_path, capsys, monkeypatch):
    clean, args = seven
    out = tmp_path / "out"
    args = [str(a) for a in args]
    args[args.index("--out") + 1] = str(out)
    real_write, calls = fmt.write_shard, []

    def killed_on_second_shard(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies here
        return real_write(*a, **k)

    monkeypatch.setattr(fmt, "write_shard", killed_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    monkeypatch.setattr(fmt, "write_shard", real_write)
    capsys.readouterr()
    assert not fmt.read_manifest(out, require_complete=False)["complete"]
    (out / "shard-00001.safetensors.tmp").write_bytes(b"half a shard")  # a write cut short
    first = (out / "shard-00000.safetensors").stat().st_mtime_ns
    rc, stdout, _ = run_cli(capsys, *args)
    assert rc == 0 and "resuming: 1 of 3 shards already written (first missing: shard 1)" in stdout
    assert "precompute: 4 images" in stdout  # shards 1 and 2 only
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == first
    assert _files(out) == _files(clean)


@pytest.mark.slow
def test_two_processes_are_byte_identical(seven, tmp_path):
    clean, args = seven
    args = [str(a) for a in args]
    args[args.index("--out") + 1] = str(tmp_path / "out")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ladd", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _files(tmp_path / "out") == _files(clean)


def test_out_of_disk_leaves_no_half_shard(tiny_dir, tmp_path, capsys, monkeypatch):
    def disk_full(f, data):
        f.write(bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "_write_chunks", disk_full)
    prompts = _write(tmp_path / "p.txt", SEVEN[:2])
    with pytest.raises(fmt.DataError):  # the manifest itself cannot be written either
        fmt.write_json(tmp_path / "m.json", {"a": 1})
    assert list(tmp_path.glob("m.json*")) == []
    monkeypatch.undo()
    out = tmp_path / "out"
    real = files._write_chunks
    monkeypatch.setattr(files, "_write_chunks", lambda f, d: (disk_full if len(d) > 5000 else real)(f, d))
    rc, _, err = run_cli(capsys, "precompute", "--pipeline", tiny_dir, "--prompts", prompts, "--out", out, "--steps", 2)
    assert rc == 2 and "No space left on device" in err and "shard-00000.safetensors" in err
    assert len(error_lines(err)) == 1 and "No space left" in error_lines(err)[0]
    assert not list(out.glob("shard-*")) and not list(out.glob("*.tmp"))


def test_clip_embeddings(tiny_dir, tmp_path, capsys):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    from ladd.models.tiny import _bytes_to_unicode

    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    tokenizer.model_max_length = 77
    torch.manual_seed(0)
    model = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, projection_dim=512, bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])).eval()
    model.save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    prompts = _write(tmp_path / "p.txt", PROMPTS[:2] + ["cat"])
    rc, _, err = run_cli(capsys, "precompute", "--pipeline", tiny_dir, "--prompts", prompts, "--out", tmp_path / "o",
                      "--steps", 2, "--batch-size", 3, "--clip", tmp_path / "clip")
    assert rc == 0, err
    clip = load_file(tmp_path / "o" / fmt.shard_name(0))["clip"]
    assert clip.shape == (3, 512)
    with torch.no_grad():
        for i, p in enumerate(PROMPTS[:2] + ["cat"]):
            ref = model(**tokenizer([p], truncation=True, max_length=77, return_tensors="pt")).text_embeds[0]
            torch.testing.assert_close(clip[i], ref, rtol=1e-5, atol=1e-5)
    assert fmt.read_manifest(tmp_path / "o")["storage"]["clip_dim"] == 512


def test_trajectory_states_sit_beside_the_same_latents(seven, tmp_path, capsys):
    """--trajectory σ,...: each shard also holds the teacher's states at those σ on its own path
    (tests/test_adapter.py pins them to ZImagePipeline's), the latents are byte-for-byte those of the
    job without it, `ladd data check` and the reader know the tensor, and a rerun that changes the σ is
    refused. Bad σ lists are one line."""
    from ladd.data.shards import ShardDataset

    out, args = seven
    traj = tmp_path / "traj"
    args = [str(a) for a in args]
    args[args.index("--out") + 1] = str(traj)
    rc, _, _ = run_cli(capsys, *args, "--trajectory", "0.8,0.3")
    assert rc == 0
    m = fmt.read_manifest(traj)
    assert m["sampling"]["trajectory"] == [0.8, 0.3] and fmt.check_dataset(traj) == []
    for k, s in enumerate(m["shards"]):
        a, b = load_file(out / s["file"]), load_file(traj / s["file"])
        assert torch.equal(a["latents"], b["latents"]) and b["states"].shape == (s["count"], 2, 16, 16, 16)
        # nearer the end of the path, nearer the latent
        assert (b["states"][:, 1] - b["latents"]).square().mean() < (b["states"][:, 0] - b["latents"]).square().mean()
    ds = ShardDataset(traj, batch_size=2)
    assert ds.trajectory == (0.8, 0.3)
    batch = ds.batch([0, 4])
    want = torch.stack([load_file(traj / fmt.shard_name(0))["states"][0], load_file(traj / fmt.shard_name(1))["states"][1]])
    assert torch.equal(batch.states, want)
    assert ShardDataset(out, batch_size=2).batch([0, 1]).states is None
    rc, _, err = run_cli(capsys, *args, "--trajectory", "0.8")
    assert rc == 2 and "--trajectory differs (the existing job has --trajectory [0.8, 0.3], this run asks for [0.8])" in err
    args[args.index("--out") + 1] = str(tmp_path / "bad")
    for bad, why in (("0.3,0.8", "decreasing"), ("1.0", "in (0, 1)"), ("0.5,x", "separated by commas")):
        rc, _, err = run_cli(capsys, *args, "--trajectory", bad)
        assert rc == 2 and len(error_lines(err)) == 1 and why in err, err
    assert not (tmp_path / "bad").exists()


def test_bad_input_is_one_line(tiny_dir, tmp_path, capsys):
    good = _write(tmp_path / "p.txt", ["a cat"])
    out = tmp_path / "out"

    def run(*args):
        return run_cli(capsys, "precompute", "--out", out, *args)

    rc, _, err = run("--pipeline", tmp_path / "nope", "--prompts", good)
    assert rc == 2 and "no such folder" in err and len(error_lines(err)) == 1
    other = tmp_path / "sd"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    rc, _, err = run("--pipeline", other, "--prompts", good)
    assert rc == 2 and "a StableDiffusionPipeline, not a ZImagePipeline" in err
    rc, _, err = run("--pipeline", tiny_dir, "--prompts", good, "--resolution", 30)
    assert rc == 2 and "--resolution 30 must be a positive multiple of 4" in err
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\nalso fine\ncaf\xe9 au lait\n")
    rc, _, err = run("--pipeline", tiny_dir, "--prompts", bad)
    assert rc == 2 and "bad.txt:3: not valid UTF-8 (byte 0xe9 at column 4)" in err
    rc, _, err = run("--pipeline", tiny_dir, "--prompts", tmp_path / "p.parquet")
    assert rc == 2 and ("pip install pyarrow" in err or "no such prompt file" in err)
    assert not out.exists()  # nothing was started


def test_prompt_files(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "one"}\n\n{"prompt": "two", "id": 3}\n{"prompt": "  "}\n')
    got = read_prompts(tmp_path / "a.jsonl")
    assert got.prompts == ["one", "two"] and got.skipped_empty == 2
    (tmp_path / "b.csv").write_text('id,prompt\n1,"one, with a comma"\n2,\n3,"multi\nline"\n')
    got = read_prompts(tmp_path / "b.csv")
    assert got.prompts == ["one, with a comma", "multi\nline"] and got.skipped_empty == 1
    (tmp_path / "c.txt").write_bytes(b"one\r\n\r\n  \r\ntwo\xe2\x80\xa8still two\n")
    got = read_prompts(tmp_path / "c.txt")
    assert got.prompts == ["one", "two\u2028still two"] and got.skipped_empty == 2
    (tmp_path / "d.jsonl").write_text('{"prompt": "one"}\n{"text": "two"}\n')
    with pytest.raises(PromptFileError, match=r'd.jsonl:2: no field "prompt"'):
        read_prompts(tmp_path / "d.jsonl")
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        (tmp_path / "e.parquet").write_bytes(b"PAR1")
        with pytest.raises(PromptFileError, match="pip install pyarrow"):
            read_prompts(tmp_path / "e.parquet")
