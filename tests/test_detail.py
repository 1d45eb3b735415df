"""The detail-energy term (ladd/detail.py, method.detail_weight): band powers by hand, and in the LADD
step a gradient equal to the one written out on the tiny pipeline."""

import copy
import math

import pytest
import torch

from ladd.config import ConfigError, MethodConfig
from ladd.detail import DETAIL_BANDS, band_energy, detail_loss, radius
from ladd.train.step import draw_noise, generator_step, trainable, trajectory_window
from tests.steptools import assert_grads_equal, ladd_setup, recorded_grads
from tests.test_trajectory_step import TS, seed_drawing, trajectory_data


def wave(h: int, w: int, ky: int, kx: int) -> torch.Tensor:
    """cos(2π(ky·i/h + kx·j/w)) on an (h, w) grid."""
    i, j = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    return torch.cos(2 * math.pi * (ky * i / h + kx * j / w))


@pytest.mark.parametrize("ky, kx, band", [(0, 3, 0), (2, 3, 0), (0, 5, 1), (4, 4, 1), (7, 0, 2), (1, 8, 2)])
def test_a_single_wave_puts_all_its_energy_in_its_band(ky, kx, band):
    """A cosine with k cycles along a 16-pixel side sits at radius k/8 of Nyquist (√(ky² + kx²)/8):
    its whole power Σx² (Parseval, orthonormal FFT) lands in that band; channels add."""
    x = torch.stack([wave(16, 16, ky, kx), 3 * wave(16, 16, ky, kx)])[None].float()  # (1, 2, 16, 16)
    e = band_energy(x)
    want = torch.zeros(1, len(DETAIL_BANDS))
    want[0, band] = x.double().square().sum().item()
    torch.testing.assert_close(e, want, rtol=1e-5, atol=1e-3)


def test_waves_outside_the_bands_count_nowhere():
    """Layout-scale waves (r < 0.25) and the corners past r = 1.01 are left out."""
    x = torch.stack([wave(16, 16, 1, 1), wave(16, 16, 1, 0), wave(16, 16, 8, 8), wave(16, 16, 6, 7)])[None].float()
    assert band_energy(x).abs().max() < 1e-3
    assert radius(16, 16)[1, 8] == pytest.approx(math.sqrt(65) / 8)  # admitted (< 1.01)


def test_detail_loss_by_hand():
    """Σ_b (log E_b(x) − log E_b(ref))²: zero for the same latent or a phase shift of it (a roll), and
    (log s²)² per band for x scaled by s within every band."""
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(3, 4, 16, 16, generator=g)
    torch.testing.assert_close(detail_loss(ref, ref), torch.zeros(3))
    torch.testing.assert_close(detail_loss(torch.roll(ref, (3, 5), (-2, -1)), ref), torch.zeros(3), atol=1e-8, rtol=0)
    want = torch.full((3,), len(DETAIL_BANDS) * math.log(0.5 ** 2) ** 2)
    torch.testing.assert_close(detail_loss(0.5 * ref, ref), want)
    assert torch.isfinite(detail_loss(torch.zeros(1, 4, 16, 16), ref[:1])).all()  # no detail: large, finite


def test_descending_the_detail_loss_restores_a_blurred_latents_energy():
    """A 3×3-box-blurred latent has less energy in each band than its original; gradient steps on the
    loss give it back in each band (phase-free: it need not become the original)."""
    ref = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    blur = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(ref, (1, 1, 1, 1), mode="circular"), 3, 1)
    assert (band_energy(blur) < 0.8 * band_energy(ref)).all()
    x = blur.clone().requires_grad_()
    opt = torch.optim.Adam([x], lr=0.02)
    for _ in range(200):
        opt.zero_grad()
        detail_loss(x, ref).sum().backward()
        opt.step()
    torch.testing.assert_close(band_energy(x.detach()), band_energy(ref), rtol=0.02, atol=0)


def test_the_detail_term_in_the_step_trains_the_last_steps_rows_by_hand():
    """method.detail_weight w: the G-step's student gradient is that of λ·mse + w·mean(last·L(x̂0, x0)),
    the paired pass's x̂0 on the teacher's path (a row at 0.9, one at the last timestep), and its
    detail_loss metric is that mean; the term needs the paired term."""
    models, batch, opt_g, _ = ladd_setup()
    data, pair_eps, states, _ = trajectory_data(batch)
    cfg = MethodConfig(distill_weight=2.0, detail_weight=3.0, adversarial_weight=0.0, paired_target="trajectory",
                       student_timesteps=TS, student_timestep_probs=(0, 0.5, 0, 0.5), grad_clip_g=0)
    seed = seed_drawing(data, cfg, [0.5, 0.9])
    t = draw_noise(data, 0, cfg, torch.Generator().manual_seed(seed))[0]
    x_t, target = trajectory_window(data, t, pair_eps, TS)
    ref = copy.deepcopy(models.student)
    x0_hat = x_t - t.view(-1, 1, 1, 1) * ref(x_t, t, batch.cap_feats).velocity
    last = (t == 0.5).float()
    detail = (detail_loss(x0_hat, batch.x0) * last).mean()
    assert detail.item() > 0 and last.sum() == 1
    (2.0 * (x0_hat - target).square().mean() + 3.0 * detail).backward()
    want = [p.grad for p in trainable(ref)]
    with recorded_grads(opt_g, models.student) as got:
        metrics, _ = generator_step(models, opt_g, [data], 0, cfg, torch.Generator().manual_seed(seed))
    assert metrics["detail_loss"] == pytest.approx(detail.item(), rel=1e-5)
    assert_grads_equal(got, want)
    with pytest.raises(ConfigError, match="detail_weight > 0 compares .* needs the paired term"):
        MethodConfig(detail_weight=1.0)
    with pytest.raises(ConfigError, match="detail_weight must be >= 0"):
        MethodConfig(detail_weight=-1.0, distill_weight=1.0)
