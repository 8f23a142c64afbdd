"""Guards: defences at sampling time that change no weight.

* ``TokenNeutralise``: in every cross-attention layer, the trigger tokens' keys and values are replaced by
  those of the prompt's end token (a token that carries no content), for prompts that contain the trigger.
  Prompts without it are sampled unchanged.
* ``LatentBlend`` (the SAU authors' guard): a prompt with the trigger is sampled twice from the same noise,
  as given and with the trigger removed; after every denoising step the triggered latent is replaced by the
  convex blend ``m * clean + (1 - m) * triggered`` where ``m`` is the localisation's spatial mask, so what
  the trigger paints inside its region is replaced and the rest of the image is kept.

``sample`` is the one sampler both use: DDIM with classifier-free guidance, the same arithmetic, noise and
decoding as ``StableDiffusionPipeline`` (image i starts from the noise of seeds[i]), so a guarded and an
unguarded run of the same prompt and seed differ only by the guard.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import AttentionController, KVEdit, instrument, neutralise_edit
from .localise import encode
from .trigger import Trigger, tokenize


@dataclass
class TokenNeutralise:
    trigger: Trigger
    name = "token-neutralise"

    def kv_edit(self, tokenizer, prompts: list[str]) -> KVEdit | None:
        hit = [self.trigger.text in p for p in prompts]
        if not any(hit):
            return None
        L = tokenize(tokenizer, [""]).shape[1]
        pos = [self.trigger.positions(tokenizer, p) if h else [] for p, h in zip(prompts, hit)]
        neutral = [self.trigger.neutral_position(tokenizer, p) for p in prompts]
        return neutralise_edit(pos, neutral, L)


@dataclass
class LatentBlend:
    trigger: Trigger
    mask: torch.Tensor  # (h, w) in [0, 1], the localisation's mask
    name = "latent-blend"


def _latent_size(unet) -> int:
    s = unet.config.sample_size
    return s if isinstance(s, int) else s[0]


@torch.no_grad()
def sample(handle, prompts: list[str], seeds: list[int], steps: int = 20, guidance: float = 5.0,
           guard: TokenNeutralise | LatentBlend | None = None, chunk: int = 48) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1]."""
    out = []
    for i in range(0, len(prompts), chunk):
        out.append(_sample_chunk(handle, prompts[i : i + chunk], seeds[i : i + chunk], steps, guidance, guard))
    return torch.cat(out)


def _sample_chunk(handle, prompts, seeds, steps, guidance, guard):
    from diffusers import DDIMScheduler

    unet, vae = handle.unet, handle.vae
    sched = DDIMScheduler.from_config(handle.scheduler.config)
    sched.set_timesteps(steps)
    n = len(prompts)
    size = _latent_size(unet)
    noise = torch.cat([torch.randn(1, unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(s))
                       for s in seeds]).to(unet.device, unet.dtype) * sched.init_noise_sigma
    blend = isinstance(guard, LatentBlend)
    hit = [guard is not None and guard.trigger.text in p for p in prompts]
    rows = list(prompts)
    if blend:
        rows += [guard.trigger.remove(p) for p, h in zip(prompts, hit) if h]
    m = len(rows)
    enc = encode(handle, [""] + rows)
    cond = torch.cat([enc[:1].expand(m, -1, -1), enc[1:]])
    ctl = AttentionController()
    if isinstance(guard, TokenNeutralise):
        edit = guard.kv_edit(handle.tokenizer, rows)
        if edit is not None:  # the unconditional rows keep their keys/values
            keep = torch.zeros_like(edit.replace)
            ctl.kv_edit = KVEdit(torch.cat([keep, edit.replace]),
                                 torch.cat([torch.arange(edit.replace.shape[1]).repeat(m, 1), edit.source_index]))
    hit_idx = [j for j, h in enumerate(hit) if h]
    lat = torch.cat([noise, noise[hit_idx]]) if blend else noise
    if blend:
        mk = F.interpolate(guard.mask[None, None].float(), size=lat.shape[-2:], mode="bilinear",
                           align_corners=False)[0, 0].clamp(0, 1).to(lat)
    with instrument(unet, ctl):
        for t in sched.timesteps:
            x = sched.scale_model_input(torch.cat([lat, lat]), t)
            eps = unet(x, t, encoder_hidden_states=cond).sample
            e_u, e_c = eps.chunk(2)
            lat = sched.step(e_u + guidance * (e_c - e_u), t, lat).prev_sample
            if blend and hit_idx:
                clean = lat[n:]
                lat[hit_idx] = mk * clean + (1 - mk) * lat[hit_idx]
    lat = lat[:n]
    img = vae.decode(lat / vae.config.scaling_factor).sample
    return (img / 2 + 0.5).clamp(0, 1).float().cpu()
