"""The adapter against the real client: ZImageTransformer2DModel and ZImagePipeline themselves."""

import pytest
import torch
from diffusers import ZImageTransformer2DModel

from ladd.flow import image_seq_len, teacher_sigmas
from ladd.models.text import encode_prompts
from ladd.models.zimage import ZImageAdapter
from ladd.sampling import euler_sample, initial_noise
from tests.conftest import PROMPTS


@pytest.fixture(scope="module")
def caps(tiny_pipe):
    return encode_prompts(tiny_pipe, PROMPTS)


def _model_velocity(transformer, x, sigma, caps):
    """What ZImagePipeline does around the transformer: t_model = 1 − σ in, negate x0 − ε out."""
    out = transformer(list(x.unsqueeze(2).unbind(0)), 1 - sigma, caps, return_dict=False)[0]
    return -torch.stack(out).squeeze(2)


def test_velocity_equals_transformer_forward_bitwise(tiny_pipe, caps):
    adapter = ZImageAdapter(tiny_pipe.transformer)
    x, sigma = torch.randn(2, 16, 16, 16), torch.tensor([0.3, 0.9])
    with torch.no_grad():
        assert torch.equal(adapter(x, sigma, caps).velocity, _model_velocity(tiny_pipe.transformer, x, sigma, caps))


def test_convention_is_ladds_not_zimages(tiny_pipe, caps):
    """Regression (inverted convention): σ = 1 is noise in, v = ε − x0 out."""
    adapter = ZImageAdapter(tiny_pipe.transformer)
    x = torch.randn(2, 16, 16, 16)
    with torch.no_grad():
        v = adapter(x, torch.tensor([0.2, 0.2]), caps).velocity
        raw = tiny_pipe.transformer(list(x.unsqueeze(2).unbind(0)), torch.tensor([0.8, 0.8]), caps)[0]
        wrong_t = adapter(x, torch.tensor([0.8, 0.8]), caps).velocity
    torch.testing.assert_close(v, -torch.stack(raw).squeeze(2), rtol=0, atol=0)
    assert (v - wrong_t).abs().max() > 1e-3  # the timestep really is flipped, not ignored


@pytest.mark.slow
@pytest.mark.parametrize("guidance,steps", [(0.0, 8), (5.0, 50)])
def test_euler_sampling_reproduces_pipeline(tiny_pipe, caps, guidance, steps):
    """Adapter + our Euler loop == ZImagePipeline(..., output_type="latent"), ≤ 1e-5 in float32."""
    seeds = [11, 12]
    ref = tiny_pipe(
        list(PROMPTS), height=32, width=32, num_inference_steps=steps, guidance_scale=guidance,
        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], output_type="latent",
    ).images
    noise = initial_noise(tiny_pipe, seeds, 32)
    sigmas = teacher_sigmas(tiny_pipe.scheduler, steps, image_seq_len(16, 16))
    neg = encode_prompts(tiny_pipe, ["", ""])
    ours = euler_sample(ZImageAdapter(tiny_pipe.transformer), noise, sigmas, caps, neg, guidance=guidance)
    assert ours.dtype == torch.float32
    assert (ours - ref).abs().max().item() <= 1e-5


def test_euler_sampling_records_the_pipelines_own_path(tiny_pipe, caps):
    """record=σ: the states of ZImagePipeline's own Euler path there — at a schedule point its latents
    after that step (callback_on_step_end), between two the straight line that step takes — and the
    final latents unchanged (what `ladd precompute --trajectory` stores beside each latent)."""
    steps, seeds = 8, [11, 12]
    seen = []

    def grab(_pipe, _i, _t, kwargs):
        seen.append(kwargs["latents"].clone())
        return kwargs

    tiny_pipe(list(PROMPTS), height=32, width=32, num_inference_steps=steps, guidance_scale=5.0,
              generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], output_type="latent",
              callback_on_step_end=grab)
    noise = initial_noise(tiny_pipe, seeds, 32)
    sigmas = teacher_sigmas(tiny_pipe.scheduler, steps, image_seq_len(16, 16))
    neg, adapter = encode_prompts(tiny_pipe, ["", ""]), ZImageAdapter(tiny_pipe.transformer)
    at, between = sigmas[3].item(), 0.3 * sigmas[5].item() + 0.7 * sigmas[6].item()
    x, states = euler_sample(adapter, noise, sigmas, caps, neg, 5.0, record=(at, between))
    assert states.shape == (2, 2, 16, 16, 16)
    assert torch.equal(x, euler_sample(adapter, noise, sigmas, caps, neg, 5.0))
    assert (states[:, 0] - seen[2]).abs().max().item() <= 1e-5  # seen[i]: after step i, at σ_{i+1}
    frac = (between - sigmas[5].item()) / (sigmas[6].item() - sigmas[5].item())
    assert (states[:, 1] - (seen[4] + frac * (seen[5] - seen[4]))).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match=r"within the schedule's \[0, 1\]"):
        euler_sample(adapter, noise, sigmas, caps, neg, 5.0, record=(1.5,))


def _block_outputs(transformer, fn):
    seen = {}

    def hook(i):
        def record(_module, _args, output):
            seen.setdefault(i, []).append(output.detach().clone())
        return record

    handles = [blk.register_forward_hook(hook(i)) for i, blk in enumerate(transformer.layers)]
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return seen


def test_taps_are_block_outputs_as_image_grids(tiny_pipe, caps):
    adapter = ZImageAdapter(tiny_pipe.transformer)
    x, sigma = torch.randn(2, 16, 16, 16), torch.tensor([0.5, 0.7])
    with torch.no_grad():
        seen = _block_outputs(tiny_pipe.transformer, lambda: tiny_pipe.transformer(
            list(x.unsqueeze(2).unbind(0)), 1 - sigma, caps))
        out = adapter(x, sigma, caps, taps=(0, 3, 5))
    assert sorted(out.feats) == [0, 3, 5]
    for k, grid in out.feats.items():
        assert grid.shape == (2, 64, 8, 8)  # (B, D, H/2, W/2)
        tokens = seen[k][0][:, :64]  # image tokens lead the joint sequence
        torch.testing.assert_close(grid, tokens.reshape(2, 8, 8, 64).permute(0, 3, 1, 2), rtol=0, atol=0)


def test_taps_only_skips_deeper_blocks(tiny_pipe, caps):
    adapter = ZImageAdapter(tiny_pipe.transformer)
    x = torch.randn(2, 16, 16, 16)
    with torch.no_grad():
        seen = _block_outputs(tiny_pipe.transformer, lambda: adapter(x, 0.5, caps, taps=(2,), velocity=False))
        full = adapter(x, 0.5, caps, taps=(2,))
    assert sorted(seen) == [0, 1, 2]
    torch.testing.assert_close(seen[2][0][:, :64].reshape(2, 8, 8, 64).permute(0, 3, 1, 2), full.feats[2])


def test_taps_under_gradient_checkpointing(tiny_pipe, caps):
    """Checkpointing really recomputes (blocks run twice), taps are captured once and equal."""
    plain = ZImageAdapter(tiny_pipe.transformer)
    ckpt = ZImageAdapter(tiny_pipe.transformer)
    ckpt.gradient_checkpointing = True
    x = torch.randn(2, 16, 16, 16)

    def run(adapter):
        xr = x.clone().requires_grad_(True)
        out = adapter(xr, 0.4, caps, taps=(1, 4))
        (out.velocity.square().mean() + sum(f.mean() for f in out.feats.values())).backward()
        return out, xr.grad

    calls = {}
    for name, adapter in (("plain", plain), ("ckpt", ckpt)):
        # A pre-hook counts block entries (recomputation may stop early, before forward hooks fire).
        entries = []
        handle = tiny_pipe.transformer.layers[1].register_forward_pre_hook(lambda *_: entries.append(1))
        try:
            calls[name] = (*run(adapter), len(entries))
        finally:
            handle.remove()
    (out_p, g_p, n_p), (out_c, g_c, n_c) = calls["plain"], calls["ckpt"]
    assert (n_p, n_c) == (1, 2)  # recomputed in backward: checkpointing is on
    assert sorted(out_c.feats) == [1, 4]
    for k in out_p.feats:
        torch.testing.assert_close(out_c.feats[k], out_p.feats[k])
    torch.testing.assert_close(g_c, g_p)


def test_bad_taps_and_batch(tiny_pipe, caps):
    adapter = ZImageAdapter(tiny_pipe.transformer)
    x = torch.randn(2, 16, 16, 16)
    with pytest.raises(ValueError, match=r"layer tap 6 is out of range.*valid 0\.\.5"):
        adapter(x, 0.5, caps, taps=(6,))
    with pytest.raises(ValueError, match="caption-feature tensors"):
        adapter(x, 0.5, caps[:1])


def test_real_zimage_config_on_meta_device():
    """The adapter accepts the 6B config (dim 3840, 30 layers, 30 heads) — built without memory."""
    with torch.device("meta"):
        transformer = ZImageTransformer2DModel()
    adapter = ZImageAdapter(transformer)
    assert (adapter.num_layers, adapter.dim) == (30, 3840)
    adapter.check_taps([5, 10, 15, 20, 25, 29])
    with pytest.raises(ValueError, match="valid 0..29"):
        adapter.check_taps([30])
