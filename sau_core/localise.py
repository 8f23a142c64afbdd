"""Localisation: where (latent grid), in which layers and at which timesteps a trigger acts.

For every probe prompt and seed, the model samples (DDIM, classifier-free guidance) twice from the same
noise, once with the trigger and once without. Along the way we record the trigger tokens' cross-attention
maps in every attn2 layer and step (``attention.instrument``), and the difference between the triggered and
the clean run's guided noise predictions. The spatial mask is the product of the max-normalised prediction
difference and the (upsampled, layer- and step-averaged) trigger attention raised to ``attn_power``,
lightly blurred and normalised to [0, 1]. The per-layer score is the trigger tokens' mean attention mass
inside the mask, normalised so the strongest layer scores 1.

Probe prompts must come from training templates: held-out prompts and seeds are for measurement only.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .attention import AttentionController, instrument, one_hot_select
from .errors import UnsupportedModelError
from .trigger import Trigger, escape, tokenize

DEFAULT_STEPS = 10
DEFAULT_GUIDANCE = 5.0


@dataclass
class Localisation:
    trigger: str
    mask: torch.Tensor  # (h, w) latent grid, values in [0, 1]
    layer_scores: dict[str, float]  # attn2 module path -> score in [0, 1]
    timesteps: list[int]  # the DDIM timesteps, in sampling order
    step_attention: list[float]  # per step: trigger tokens' mean attention mass (all layers, probes)
    step_difference: list[float]  # per step: mean |eps_trig - eps_clean|
    maps: dict[str, torch.Tensor]  # layer -> (steps, h_l, w_l) trigger attention, averaged over probes
    difference: torch.Tensor  # (h, w) prediction difference, normalised to [0, 1]
    attention: torch.Tensor  # (h, w) trigger attention on the latent grid, normalised to [0, 1]
    prompts: list[str] = field(default_factory=list)  # clean probe prompts
    seeds: list[int] = field(default_factory=list)
    clean_latents: torch.Tensor | None = None  # (N, C, h, w) final latents of the clean runs
    settings: dict = field(default_factory=dict)

    def top_layers(self, threshold: float = 0.25) -> list[str]:
        return [k for k, v in self.layer_scores.items() if v >= threshold]

    def summary(self) -> dict:
        h, w = self.mask.shape
        peak = int(self.mask.flatten().argmax())
        return {"trigger": escape(self.trigger), "grid": [h, w],
                "mask_peak": [peak // w, peak % w], "mask_mean": round(float(self.mask.mean()), 4),
                "layer_scores": {k: round(v, 4) for k, v in self.layer_scores.items()},
                "timesteps": self.timesteps, "step_attention": [round(x, 5) for x in self.step_attention],
                "step_difference": [round(x, 5) for x in self.step_difference], "settings": self.settings}

    def save_heatmaps(self, folder: str | Path, scale: int = 16) -> list[Path]:
        """mask.png, difference.png, attention.png and one layer_<i>.png per attn2 layer (step-averaged);
        plus localisation.json. Upscaled ``scale`` times with nearest neighbour (one latent cell = a block)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for name, img in (("mask", self.mask), ("difference", self.difference), ("attention", self.attention)):
            written.append(save_heatmap(img, folder / f"{name}.png", scale))
        for i, (layer, m) in enumerate(self.maps.items()):
            mm = m.mean(0)
            written.append(save_heatmap(mm / mm.max().clamp_min(1e-12), folder / f"layer_{i}.png",
                                        scale * self.mask.shape[0] // mm.shape[0]))
        (folder / "localisation.json").write_text(
            json.dumps({**self.summary(), "layer_files": {f"layer_{i}.png": k for i, k in enumerate(self.maps)}},
                       indent=2))
        return written


_ANCHORS = torch.tensor([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]],
                        dtype=torch.float32)  # inferno-like


def save_heatmap(values: torch.Tensor, path: Path, scale: int = 16) -> Path:
    """A [0, 1] (h, w) tensor as a colour PNG, each cell a scale x scale block."""
    from PIL import Image

    v = values.detach().float().clamp(0, 1)
    x = v * (len(_ANCHORS) - 1)
    lo = x.floor().long().clamp(max=len(_ANCHORS) - 2)
    frac = (x - lo).unsqueeze(-1)
    rgb = _ANCHORS[lo] * (1 - frac) + _ANCHORS[lo + 1] * frac
    rgb = rgb.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    Image.fromarray(rgb.round().to(torch.uint8).numpy()).save(path)
    return Path(path)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.max().clamp_min(1e-12)


@torch.no_grad()
def encode(handle, prompts: list[str]) -> torch.Tensor:
    """Encoder hidden states exactly as StableDiffusionPipeline.encode_prompt builds them (SD1/SD2)."""
    if handle.is_xl:
        raise UnsupportedModelError("localisation of SDXL models is not implemented yet")
    ids = tokenize(handle.tokenizer, prompts).to(handle.text_encoder.device)
    return handle.text_encoder(ids)[0]


def _sampler(handle, steps: int):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(handle.scheduler.config)
    sched.set_timesteps(steps)
    return sched


def localise(handle, trigger: Trigger, prompts: list[str], seeds: list[int] = (0,), steps: int = DEFAULT_STEPS,
             guidance: float = DEFAULT_GUIDANCE, attn_power: float = 0.5, blur: bool = True) -> Localisation:
    """Localise ``trigger`` on clean probe ``prompts`` x ``seeds`` (see module doc). Deterministic."""
    unet, tok = handle.unet, handle.tokenizer
    L = tokenize(tok, [""]).shape[1]
    pairs = [(p, s) for p in prompts for s in seeds]
    clean_p = [p for p, _ in pairs]
    trig_p = [trigger.insert(p) for p in clean_p]
    pos = [trigger.positions(tok, q) for q in trig_p]
    n = len(pairs)
    enc = encode(handle, [""] + clean_p + trig_p)
    unc, e_clean, e_trig = enc[:1].expand(n, -1, -1), enc[1 : n + 1], enc[n + 1 :]
    cond = torch.cat([unc, e_clean, unc, e_trig])
    # Record the trigger rows only (cond branch of the triggered run); every other row selects nothing.
    sel = torch.zeros(4 * n, 1, L)
    sel[3 * n :] = one_hot_select(pos, L, combine=True)
    sched = _sampler(handle, steps)
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    noise = torch.cat([torch.randn(1, cfg.in_channels, size, size, generator=torch.Generator().manual_seed(s))
                       for _, s in pairs]).to(unet.device, unet.dtype) * sched.init_noise_sigma
    lat_c, lat_t = noise.clone(), noise.clone()
    diffs, masses = [], []
    dev = unet.device
    with torch.no_grad(), instrument(unet, AttentionController(select=sel.to(dev))) as ctl:
        for i, t in enumerate(sched.timesteps):
            ctl.tag = i
            x = torch.cat([lat_c, lat_c, lat_t, lat_t])
            x = sched.scale_model_input(x, t)
            eps = unet(x, t, encoder_hidden_states=cond).sample
            eu_c, ec_c, eu_t, ec_t = eps.chunk(4)
            g_c = eu_c + guidance * (ec_c - eu_c)
            g_t = eu_t + guidance * (ec_t - eu_t)
            diffs.append((g_t - g_c).abs().mean(1).mean(0))  # (h, w)
            lat_c = sched.step(g_c, t, lat_c).prev_sample
            # Fresh scheduler state is not needed: DDIM's step is stateless apart from the timestep table.
            lat_t = sched.step(g_t, t, lat_t).prev_sample
        records = ctl.by_layer()
    grid = diffs[0].shape
    maps: dict[str, torch.Tensor] = {}
    up = torch.zeros(grid)
    for layer, recs in records.items():
        m = torch.stack([r.maps[3 * n :, 0].mean(0) for r in recs]).float().cpu()  # (steps, h_l, w_l)
        maps[layer] = m
        up += F.interpolate(m.mean(0)[None, None], size=grid, mode="bilinear", align_corners=False)[0, 0]
    for i in range(len(sched.timesteps)):
        masses.append(float(torch.stack([maps[k][i].mean() for k in maps]).mean()))
    difference = _normalise(torch.stack(diffs).sum(0).float().cpu())
    attention = _normalise(up)
    mask = difference * attention.clamp_min(0) ** attn_power
    if blur:
        mask = F.avg_pool2d(mask[None, None], 3, stride=1, padding=1, count_include_pad=False)[0, 0]
    mask = _normalise(mask)
    scores = {}
    for layer, m in maps.items():
        ml = F.interpolate(mask[None, None], size=m.shape[-2:], mode="area")[0, 0]
        scores[layer] = float((m.mean(0) * ml).sum() / ml.sum().clamp_min(1e-12))
    top = max(scores.values()) or 1.0
    scores = {k: v / top for k, v in scores.items()}
    return Localisation(
        trigger=trigger.text, mask=mask, layer_scores=scores, timesteps=[int(t) for t in sched.timesteps],
        step_attention=masses, step_difference=[float(d.mean()) for d in diffs], maps=maps,
        difference=difference, attention=attention, prompts=list(prompts), seeds=list(seeds),
        clean_latents=lat_c.detach().float().cpu(),
        settings={"steps": steps, "guidance": guidance, "attn_power": attn_power, "blur": blur,
                  "n_probes": n})


def organism_probe_prompts(n: int | None = None) -> list[str]:
    """Clean probe prompts from the organism's *training* templates (never the held-out ones)."""
    from .organism import world as W

    out = [c.caption(t) for t in W.TRAIN_TEMPLATES for c in W.all_contents()]
    if n is None:
        return out
    import random

    return random.Random(0).sample(out, min(n, len(out)))
