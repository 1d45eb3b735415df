"""The Z-Image adapter: one module, shared by teacher and student, that speaks LADD's convention.

LADD (and every formula in `ladd.flow`) uses the rectified-flow convention

    x_σ = (1 − σ)·x0 + σ·ε        σ = 1 is pure noise,  σ = 0 is clean
    v   = ε − x0                  the velocity, d x_σ / dσ

Z-Image's transformer uses the opposite one: it takes t_model = 1 − σ (1 = clean) and returns
x0 − ε (ZImagePipeline negates it before the Euler step). This module is the *only* place where the
two meet; nothing else in `ladd` ever sees t_model or x0 − ε. (The public LADD-for-Z-Image code got
this wrong in its training loop.)

The adapter also returns the hidden states after chosen main transformer blocks — the "taps" the
discriminator heads read — as image-token grids (B, D, h, w). In Z-Image's joint sequence the image
tokens come first ([image | caption], each padded to a multiple of 32), so the grid is the first
h·w tokens. Taps are captured outside the (optionally checkpointed) block call, so recomputation in
backward never records them twice. A teacher asked only for taps (`velocity=False`) stops after the
deepest tapped block.

    adapter = ZImageAdapter(pipe.transformer)
    out = adapter(x_sigma, sigma, cap_feats, taps=(5, 10))
    out.velocity   # (B, C, H, W) float32, ε − x0
    out.feats[5]   # (B, D, H/2, W/2)

`ZImageAdapter(transformer, compile=True)` compiles the transformer's blocks (ladd/models/compile.py);
everything in this file still runs eagerly around them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from diffusers import ZImageTransformer2DModel
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ladd.models.compile import compile_blocks, is_compiled, mark_dynamic


@dataclass
class AdapterOutput:
    velocity: Tensor | None  # (B, C, H, W) float32, v = ε − x0; None when only taps were asked for
    feats: dict[int, Tensor] = field(default_factory=dict)  # main-block index -> (B, D, h, w)


class ZImageAdapter(nn.Module):
    """Wraps a `ZImageTransformer2DModel`; batched latents and LADD's σ in, velocity and taps out.

    It is an `nn.Module` holding the transformer so that distribution code can shard the transformer's
    blocks and then this module as the root unit (our forward calls the blocks directly).
    """

    def __init__(self, transformer: ZImageTransformer2DModel, patch_size: int = 2, f_patch_size: int = 1,
                 compile: bool = False):
        super().__init__()
        self.transformer = transformer
        self.patch_size = patch_size
        self.f_patch_size = f_patch_size
        self.gradient_checkpointing = False
        if compile:
            compile_blocks(transformer)

    @property
    def num_layers(self) -> int:
        return len(self.transformer.layers)

    @property
    def dim(self) -> int:
        return self.transformer.config.dim

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.x_pad_token.dtype

    def check_taps(self, taps: Sequence[int]) -> None:
        bad = [k for k in taps if not 0 <= k < self.num_layers]
        if bad:
            raise ValueError(
                f"layer tap {bad[0]} is out of range: the transformer has {self.num_layers} main layers "
                f"(valid 0..{self.num_layers - 1})"
            )

    def _block(self, block: nn.Module, *args: Tensor | None) -> Tensor:
        # Non-reentrant checkpointing works with frozen weights and inputs that need grad (the
        # teacher on the fake path) and composes with FSDP2's unshard hooks.
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._run_block, block, *args, use_reentrant=False)
        return self._run_block(block, *args)

    def _run_block(self, block: nn.Module, *args: Tensor | None) -> Tensor:
        """One block call; also what checkpointing recomputes in backward (a subclass's hook point)."""
        return block(*args)

    def _sequence(self, embedded: Tensor, lens: list[int], pos_ids, pad_mask, pad_token, device):
        """diffusers' padding of per-sample token runs into one batch: (tokens, rope freqs, mask)."""
        tokens, freqs, mask, _, _ = self.transformer._prepare_sequence(
            feats=list(embedded.split(lens, dim=0)), pos_ids=pos_ids, inner_pad_mask=pad_mask,
            pad_token=pad_token, noise_mask=None, device=device)
        return tokens, freqs, mask

    def forward(
        self,
        x: Tensor,
        sigma: Tensor | float,
        cap_feats: Sequence[Tensor],
        taps: Sequence[int] = (),
        velocity: bool = True,
    ) -> AdapterOutput:
        """x: (B, C, H, W) latents at noise level sigma ((B,) or scalar, LADD convention).
        cap_feats: B caption-feature tensors (L_i, cap_feat_dim) as `ZImagePipeline.encode_prompt` gives.
        """
        tr = self.transformer
        taps = sorted(set(int(k) for k in taps))
        self.check_taps(taps)
        if not velocity and not taps:
            raise ValueError("nothing to compute: velocity=False and no taps requested")
        B, _, H, W = x.shape
        if len(cap_feats) != B:
            raise ValueError(f"got {len(cap_feats)} caption-feature tensors for a batch of {B} latents")
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(B)
        t_model = 1.0 - sigma  # Z-Image's timestep: 1 = clean. The one conversion, in.

        # From here to the final layer this mirrors ZImageTransformer2DModel.forward (basic mode) step
        # by step, so outputs are bit-identical to calling the model (tests pin it).
        device = x.device
        images = list(x.to(self.dtype).unsqueeze(2).unbind(dim=0))  # B × (C, F=1, H, W)
        adaln = tr.t_embedder(t_model * tr.t_scale).type_as(images[0])
        key = f"{self.patch_size}-{self.f_patch_size}"
        img, caps, img_size, img_pos, cap_pos, img_pad, cap_pad = tr.patchify_and_embed(
            images, list(cap_feats), self.patch_size, self.f_patch_size
        )

        img_lens = [len(t) for t in img]
        h, img_freqs, img_mask = self._sequence(tr.all_x_embedder[key](torch.cat(img, dim=0)), img_lens,
                                                img_pos, img_pad, tr.x_pad_token, device)
        # Compiled blocks: batch and caption-dependent lengths vary, so one graph must serve them all.
        dynamic = is_compiled(tr)
        if dynamic:
            mark_dynamic([h, img_freqs, img_mask, adaln], 0)
        for block in tr.noise_refiner:
            h = self._block(block, h, img_mask, img_freqs, adaln)

        cap_lens = [len(t) for t in caps]
        c, cap_freqs, cap_mask = self._sequence(tr.cap_embedder(torch.cat(caps, dim=0)), cap_lens,
                                                cap_pos, cap_pad, tr.cap_pad_token, device)
        if dynamic:
            mark_dynamic([c, cap_freqs, cap_mask], (0, 1))
        for block in tr.context_refiner:
            c = self._block(block, c, cap_mask, cap_freqs)

        # Private diffusers methods, called by keyword: a reordered parameter is harmless, a renamed one
        # fails loudly (tests/test_package.py pins the parameter names; pyproject.toml caps diffusers).
        u, u_freqs, u_mask, _ = tr._build_unified_sequence(
            x=h,
            x_freqs=img_freqs,
            x_seqlens=img_lens,
            x_noise_mask=None,
            cap=c,
            cap_freqs=cap_freqs,
            cap_seqlens=cap_lens,
            cap_noise_mask=None,
            siglip=None,
            siglip_freqs=None,
            siglip_seqlens=None,
            siglip_noise_mask=None,
            omni_mode=False,
            device=device,
        )
        if dynamic:
            mark_dynamic([u, u_freqs, u_mask], (0, 1))

        grid_h, grid_w = H // self.patch_size, W // self.patch_size
        feats: dict[int, Tensor] = {}
        last = self.num_layers if velocity else taps[-1] + 1  # taps-only: skip the deeper blocks
        for i in range(last):
            u = self._block(tr.layers[i], u, u_mask, u_freqs, adaln)
            if i in taps:
                # Image tokens lead the joint sequence; the first h·w are the real (unpadded) ones.
                feats[i] = u[:, : grid_h * grid_w].unflatten(1, (grid_h, grid_w)).permute(0, 3, 1, 2)

        if not velocity:
            return AdapterOutput(velocity=None, feats=feats)
        u = tr.all_final_layer[key](u, c=adaln)
        out = tr.unpatchify(list(u.unbind(dim=0)), img_size, self.patch_size, self.f_patch_size)
        x0_minus_eps = torch.stack(out, dim=0).squeeze(2).float()
        return AdapterOutput(velocity=-x0_minus_eps, feats=feats)  # the one conversion, out: v = ε − x0
