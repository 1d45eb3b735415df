"""The LADD discriminator on a tiny teacher width (CPU), plus a meta-device size check at 6B width."""

import pytest
import torch
from torch.nn.utils import parametrize

from ladd.models.discriminator import Discriminator, timestep_embedding

D, TEXT, B, H, W = 16, 8, 2, 4, 4
LAYERS = [1, 3]


def make_disc(layers=LAYERS, **kw) -> Discriminator:
    torch.manual_seed(0)
    args = dict(feature_dim=D, layers=layers, text_dim=TEXT, hidden=32, cond_dim=16)
    return Discriminator(**(args | kw))


def make_inputs(layers=LAYERS, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    feats = {k: torch.randn(B, D, H, W, generator=g) for k in layers}
    return feats, torch.rand(B, generator=g), torch.randn(B, TEXT, generator=g)


def test_output_shape_and_head_keys():
    disc = make_disc(layers=[0, 2, 5])
    feats, t_hat, text = make_inputs([0, 2, 5])
    out = disc(feats, t_hat, text)
    assert out.shape == (B, 3)
    assert torch.isfinite(out).all()
    assert list(disc.heads.keys()) == ["0", "2", "5"]


def test_columns_follow_layer_order():
    # Layers deliberately unsorted: column 0 must be layer 3's head and react only to feats[3].
    disc = make_disc(layers=[3, 1])
    feats, t_hat, text = make_inputs([3, 1])
    base = disc(feats, t_hat, text)
    out = disc({3: feats[3] + 1.0, 1: feats[1]}, t_hat, text)
    assert not torch.allclose(out[:, 0], base[:, 0])
    torch.testing.assert_close(out[:, 1], base[:, 1], rtol=0, atol=0)


def test_film_is_identity_at_init():
    # FiLM's last Linear is zero, so scale = shift = 0 exactly: t_hat and text cannot matter yet.
    disc = make_disc()
    feats, t_hat, text = make_inputs()
    base = disc(feats, t_hat, text)
    torch.testing.assert_close(disc(feats, t_hat, text * 3 + 1), base, rtol=0, atol=0)
    torch.testing.assert_close(disc(feats, 1 - t_hat, text), base, rtol=0, atol=0)


def test_conditioning_matters_once_film_is_trained():
    disc = make_disc()
    with torch.no_grad():
        for head in disc.heads.values():
            head.film[-1].weight.normal_(std=0.1)
    feats, t_hat, text = make_inputs()
    base = disc(feats, t_hat, text)
    assert not torch.allclose(disc(feats, t_hat, text * 3 + 1), base)
    assert not torch.allclose(disc(feats, 1 - t_hat, text), base)


def test_projection_conditions_on_text_from_init():
    # The projection term is <mean features, W·text> / sqrt(hidden/2): the caption matters at once
    # (FiLM still the identity), t_hat still not, and it is exactly the logit's text-dependent part.
    plain, proj = make_disc(), make_disc(projection=True)
    feats, t_hat, text = make_inputs()
    base = proj(feats, t_hat, text)
    assert not torch.allclose(proj(feats, t_hat, text * 3 + 1), base)
    torch.testing.assert_close(proj(feats, 1 - t_hat, text), base, rtol=0, atol=0)
    head = proj.heads["1"]
    with torch.no_grad():
        x = head.proj(feats[1].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = torch.nn.functional.silu(head.norm2(head.conv2(torch.nn.functional.silu(head.norm1(head.conv1(x))))))
        by_hand = head.out(x).mean(dim=(1, 2, 3)) + (x.mean(dim=(2, 3)) * head.embed(proj.text_proj(text))).sum(-1) / 4
    torch.testing.assert_close(base[:, 0], by_hand)
    assert sum(p.numel() for p in proj.parameters()) - sum(p.numel() for p in plain.parameters()) == 2 * 16 * 16


def test_gradient_reaches_features_through_frozen_disc():
    # LADD's generator loss flows through a frozen discriminator into the teacher features.
    disc = make_disc()
    disc.requires_grad_(False)
    feats, t_hat, text = make_inputs()
    for f in feats.values():
        f.requires_grad_(True)
    disc(feats, t_hat, text).sum().backward()
    for k, f in feats.items():
        assert f.grad is not None, k
        assert torch.isfinite(f.grad).all(), k
        assert f.grad.abs().sum() > 0, k
    assert all(p.grad is None for p in disc.parameters())


def test_spectral_norm_builds_and_runs():
    disc = make_disc(spectral_norm=True)
    head = disc.heads["1"]
    assert all(parametrize.is_parametrized(m, "weight") for m in (head.conv1, head.conv2, head.out))
    assert not parametrize.is_parametrized(head.proj)
    feats, t_hat, text = make_inputs()
    for f in feats.values():
        f.requires_grad_(True)
    out = disc(feats, t_hat, text)
    assert out.shape == (B, 2) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0 for f in feats.values())


def test_bf16_features_are_accepted():
    # The teacher may run in bf16 while the heads stay fp32.
    disc = make_disc()
    feats, t_hat, text = make_inputs()
    out = disc({k: f.bfloat16() for k, f in feats.items()}, t_hat, text.bfloat16())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_timestep_embedding_shape_and_range():
    emb = timestep_embedding(torch.tensor([0.0, 0.5, 1.0]), 16)
    assert emb.shape == (3, 16)
    # t = 0 -> cos(0) = 1 in the first half, sin(0) = 0 in the second.
    torch.testing.assert_close(emb[0], torch.cat([torch.ones(8), torch.zeros(8)]))
    assert not torch.allclose(emb[1], emb[2])


def test_out_of_range_layer_names_layer_and_range():
    with pytest.raises(ValueError) as err:
        make_disc(layers=[5, 30], num_teacher_layers=30)
    msg = str(err.value)
    assert "disc layer 30" in msg and "valid 0..29" in msg and "model.disc_layers" in msg
    assert "\n" not in msg
    make_disc(layers=[0, 29], num_teacher_layers=30)  # both ends are valid


def test_bad_layer_lists_raise():
    with pytest.raises(ValueError, match="at least one"):
        make_disc(layers=[])
    with pytest.raises(ValueError, match=r"\[3\] are listed more than once"):
        make_disc(layers=[3, 1, 3])
    with pytest.raises(ValueError, match="negative"):
        make_disc(layers=[-1])


def test_bad_widths_raise():
    with pytest.raises(ValueError, match="GroupNorm"):
        make_disc(hidden=48)  # 48 channels do not split into 32 groups
    with pytest.raises(ValueError, match="even"):
        make_disc(cond_dim=15)


def test_missing_layer_and_wrong_shapes_raise():
    disc = make_disc()
    feats, t_hat, text = make_inputs()
    with pytest.raises(ValueError, match=r"needs teacher layers \[3\]"):
        disc({1: feats[1]}, t_hat, text)
    with pytest.raises(ValueError, match=r"feats\[3\] must have shape"):
        disc({1: feats[1], 3: feats[3][:, :8]}, t_hat, text)
    with pytest.raises(ValueError, match="text_cond"):
        disc(feats, t_hat, text[:, :4])
    with pytest.raises(ValueError, match="t_hat"):
        disc(feats, t_hat[:, None], text)


def test_size_at_6b_width_on_meta_device():
    # Z-Image 6B: width 3840, pooled text 2560; meta tensors make this free to build.
    with torch.device("meta"):
        disc = Discriminator(
            feature_dim=3840, layers=[5, 10, 15, 20, 25, 29], text_dim=2560, hidden=256,
            num_teacher_layers=30,
        )
    n = disc.num_parameters()
    assert 12e6 < n < 16e6
    # Per head: proj 3840*256+256, FiLM (512*256+256)+(256*512+512), conv3x3 256->256 and ->128,
    # two GroupNorms, conv1x1 128->1; shared: text projection 2560*256+256.
    head = (3840 * 256 + 256) + (512 * 256 + 256) + (256 * 512 + 512) \
        + (256 * 256 * 9 + 256) + 2 * 256 + (256 * 128 * 9 + 128) + 2 * 128 + (128 + 1)
    assert n == 6 * head + 2560 * 256 + 256
    assert disc.describe() == (
        "discriminator: 6 heads on layers [5, 10, 15, 20, 25, 29], hidden 256, 13.4M parameters"
    )
