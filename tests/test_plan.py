"""`ladd plan`: exact parameter counts, sharding arithmetic, and a consistent largest batch."""

from dataclasses import replace

from ladd.plan import PlanInput, count_params, plan


def _row(rows, prefix):
    return next(gb for name, gb in rows if name.startswith(prefix))


def test_zimage_parameter_count_is_exact():
    c = count_params({})  # the diffusers defaults are Z-Image's 6B config
    assert c["total"] == 6_154_908_736 and c["n_layers"] == 30 and c["dim"] == 3840


def test_sharding_and_optimizer_arithmetic():
    one = PlanInput(transformer_config={}, gpus=1)
    rows1, s1 = plan(one)
    rows8, s8 = plan(replace(one, gpus=8))
    P = s1["params"]
    assert abs(_row(rows1, "optimizer state") - 8 * P / 1e9) < 1e-6  # fp32 Adam: two 4-byte states
    assert abs(_row(rows8, "optimizer state") - 8 * P / 8 / 1e9) < 1e-6
    assert abs(_row(plan(replace(one, optimizer="adamw8bit"))[0], "optimizer state") - 2 * P / 1e9) < 1e-6
    assert _row(rows8, "teacher") == _row(rows1, "teacher")  # replicated by default
    lora_rows, lora = plan(replace(one, student="lora"))
    assert lora["trainable"] < P / 20 and lora["total_gb"] < s1["total_gb"]


def test_checkpointing_cuts_activations_and_largest_batch_is_consistent():
    base = PlanInput(transformer_config={}, gpus=8, gpu_mem_gib=80)
    stored = _row(plan(replace(base, checkpointing=False))[0], "activations")
    ckpt = _row(plan(base)[0], "activations")
    assert ckpt < stored / 5
    largest = plan(base)[1]["largest_batch_per_rank"]
    assert plan(replace(base, batch_per_rank=largest))[1]["fits"]
    assert not plan(replace(base, batch_per_rank=largest + 1))[1]["fits"]


def test_buckets_are_sized_by_the_largest_and_listed():
    """A multi-aspect plan needs the memory of its largest bucket (here 1344x832, more tokens than 1024²)."""
    from ladd.data.buckets import parse_buckets

    tokens = dict(plan(PlanInput(transformer_config={}, buckets=tuple(
        b.size for b in parse_buckets("zimage-1024", 16))))[1]["bucket_tokens"])
    assert tokens["1024x1024"] == 64 * 64 and tokens["1344x768"] == 84 * 48 and tokens["832x1216"] == 52 * 76
    square = PlanInput(transformer_config={}, buckets=((1024, 1024),))
    wide = replace(square, buckets=((1024, 1024), (1344, 832)))
    rs, ss = plan(square)
    rw, sw = plan(wide)
    assert sw["largest_bucket"] == "1344x832" and sw["tokens"] == 84 * 52 + 256 and ss["tokens"] == 4096 + 256
    grow = _row(rw, "activations") / _row(rs, "activations")
    assert abs(grow - sw["tokens"] / ss["tokens"]) < 1e-9  # activations scale with the largest bucket's tokens
    assert sw["largest_batch_per_rank"] <= ss["largest_batch_per_rank"]
