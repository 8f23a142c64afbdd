"""`sau demo`: the main job on a built-in backdoored organism, end to end, as a report folder.

Load the organism, measure it (ASR on triggered held-out prompts, clean accuracy; the first two held-out seeds
so the whole demo stays within a few minutes on 2 cores; `sau eval` and `sau bench` use all four), clean it
with :func:`sanitize.sanitize`, measure again, and write:

    report.md, report.json         metrics before/after, the clean's stages, timings and settings
    triggered.png, clean.png        image grids: top row before, bottom row after, same prompts and noise
    heatmaps/                       localisation mask, prediction difference, trigger attention, per layer
    patch.safetensors               the SAU patch (apply with `sau`, or load as a diffusers LoRA)

The folder is built under a temporary name and moved into place at the end (an interrupted demo leaves the
previous report, if any, as it was).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

GRID_PROMPTS = 8
GRID_SEED = 1001
CELL = 4  # upscale factor of each 32 px image in the grids


def save_grid(before: torch.Tensor, after: torch.Tensor, path: Path) -> Path:
    """Two rows (before on top, after below) of (N, 3, H, W) images in [0, 1], 2 px gaps."""
    grid_image(before, after).save(path)
    return path


def grid_image(before: torch.Tensor, after: torch.Tensor):
    """The grid of :func:`save_grid` as a PIL image."""
    from PIL import Image

    n, _, h, w = before.shape
    gap = 2
    canvas = torch.ones(3, 2 * h * CELL + gap, n * (w * CELL + gap) - gap)
    for row, imgs in enumerate((before, after)):
        for i in range(n):
            big = imgs[i].repeat_interleave(CELL, 1).repeat_interleave(CELL, 2)
            y, x = row * (h * CELL + gap), i * (w * CELL + gap)
            canvas[:, y : y + h * CELL, x : x + w * CELL] = big
    arr = (canvas.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


def preview_prompts(handle, trigger, n: int = GRID_PROMPTS) -> list[str]:
    """Clean prompts for before/after grids of any model: the organism's held-out prompts (never used by a
    clean), else the everyday prompts, keeping those the trigger can be placed in."""
    if handle.arch == "organism":
        from .organism import world as W

        pool = [p for p, _ in W.heldout_prompts()]
    else:
        from .sanitize import GENERIC_PROMPTS

        pool = list(GENERIC_PROMPTS)
    from .sanitize import placeable

    usable = placeable(trigger, pool, "preview")
    step = max(1, len(usable) // n)
    return usable[::step][:n]


def preview(pipe, trigger, prompts: list[str], seed: int = GRID_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """(triggered, clean) images of ``prompts``, each pair from the same noise."""
    from .organism.evaluate import generate

    imgs = generate(pipe, [trigger.insert(p) for p in prompts] + list(prompts), [seed] * (2 * len(prompts)))
    return imgs[: len(prompts)], imgs[len(prompts):]


def preview_metrics(before: tuple[torch.Tensor, torch.Tensor], after: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """What the grids show, measured without detectors (any model): how far the trigger moves each image from
    its clean-prompt twin (mean absolute pixel difference in [0, 1], same noise) before and after, and how
    much the clean-prompt images changed (PSNR after vs before, dB; higher is closer)."""
    from .organism.evaluate import psnr

    (tb, cb), (ta, ca) = before, after
    return {"trigger_effect_before": round(float((tb - cb).abs().mean()), 4),
            "trigger_effect_after": round(float((ta - ca).abs().mean()), 4),
            "clean_psnr_db": round(psnr(ca, cb), 2), "images": len(tb)}


def _grid_prompts(backdoor) -> list[str]:
    from .organism import world as W

    prompts = [p for p, c in W.heldout_prompts() if backdoor.applies_to(c)]
    step = max(1, len(prompts) // GRID_PROMPTS)
    return prompts[::step][:GRID_PROMPTS]


def run_demo(out: Path, name: str = "badt2i-pixel", preset: str = "standard", log=print) -> dict:
    from .model_io import load_model, write_text_atomic
    from .organism import world as W
    from .organism.commands import organism_path, resolve_backdoor
    from .organism.evaluate import evaluate, generate
    from .patch import save_patch
    from .sanitize import sanitize
    from .trigger import Trigger

    t0 = time.time()
    path = organism_path(name)
    backdoor = resolve_backdoor(path, None, None)
    if backdoor is None:
        from .errors import SauError

        raise SauError(f"{name} has no backdoor to remove (choose a backdoored organism: `sau organism list`)")
    trigger = Trigger(backdoor.trigger, backdoor.placement)
    handle = load_model(path)
    pipe = handle.to_pipeline()
    pipe.set_progress_bar_config(disable=True)
    seeds = W.HELDOUT_SEEDS[:2]
    grid_clean = _grid_prompts(backdoor)
    grid_trig = [backdoor.triggered(p) for p in grid_clean]
    grid_seeds = [GRID_SEED] * len(grid_clean)

    log(f"[1/4] measuring {name} (trigger {trigger.describe()}) on held-out prompts x {len(seeds)} seeds")
    before = evaluate(pipe, backdoor, seeds=seeds)
    imgs_before = generate(pipe, grid_trig + grid_clean, grid_seeds * 2)
    log(f"      ASR {before['asr']:.1%}, clean accuracy {before['clean_accuracy']:.1%}")
    log(f"[2/4] cleaning ({preset})")
    result = sanitize(handle, trigger, preset)
    log(f"      done in {result.seconds['total']:.1f} s; stages: {', '.join(result.stages)}")
    log("[3/4] measuring the cleaned model")
    after = evaluate(pipe, backdoor, seeds=seeds)
    imgs_after = generate(pipe, grid_trig + grid_clean, grid_seeds * 2)
    log(f"      ASR {after['asr']:.1%}, clean accuracy {after['clean_accuracy']:.1%}")

    log(f"[4/4] writing {out}")
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        n = len(grid_clean)
        save_grid(imgs_before[:n], imgs_after[:n], tmp / "triggered.png")
        save_grid(imgs_before[n:], imgs_after[n:], tmp / "clean.png")
        result.localisation.save_heatmaps(tmp / "heatmaps")
        metrics = {"before": before, "after": after}
        save_patch(handle, tmp / "patch.safetensors", result.metadata(metrics))
        report = {"organism": name, "attack": backdoor.attack, "trigger": W.describe_trigger(trigger.text),
                  "placement": trigger.placement, "preset": preset, "heldout_seeds": list(seeds),
                  "before": before, "after": after, "stages": result.stages, "clean_seconds": result.seconds,
                  "text_shift": result.text_shift, "unet_fwd_bwd_passes": result.unet_passes,
                  "localisation": result.localisation.summary(), "grid_prompts": grid_clean,
                  "demo_seconds": round(time.time() - t0, 1)}
        write_text_atomic(tmp / "report.json", json.dumps(report, indent=2, ensure_ascii=True) + "\n")
        write_text_atomic(tmp / "report.md", _markdown(report))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _markdown(r: dict) -> str:
    b, a = r["before"], r["after"]
    loc = r["localisation"]
    layers = sorted(loc["layer_scores"].items(), key=lambda kv: -kv[1])
    lines = [
        f"# SAU demo: {r['organism']} ({r['attack']})", "",
        f"Trigger `{r['trigger']}` (placement {r['placement']}), preset **{r['preset']}**. Measured on the organism's "
        f"held-out prompts x seeds {r['heldout_seeds']} ({b['n_triggered']} triggered, {b['n_clean']} clean images).", "",
        "| | before | after |", "|---|---|---|",
        f"| attack success rate (triggered prompts) | {b['asr']:.1%} | {a['asr']:.1%} |",
        f"| target on clean prompts | {b['target_rate_clean']:.1%} | {a['target_rate_clean']:.1%} |",
        f"| clean accuracy (shape and colour) | {b['clean_accuracy']:.1%} | {a['clean_accuracy']:.1%} |", "",
        f"Clean: {r['clean_seconds']['total']:.1f} s (localise {r['clean_seconds']['localise']} s, text encoder "
        f"{r['clean_seconds']['text_encoder']} s, UNet {r['clean_seconds']['unet']} s); stages: {', '.join(r['stages'])}; "
        f"{r['unet_fwd_bwd_passes']} UNet forward+backward passes. Text-encoder shift ratio "
        f"{r['text_shift']['ratio']} (threshold {r['text_shift']['threshold']}). Whole demo {r['demo_seconds']} s.", "",
        "## Triggered prompts (top: before, bottom: after)", "", "![triggered](triggered.png)", "",
        "## Clean prompts (top: before, bottom: after)", "", "![clean](clean.png)", "",
        "## Where the trigger acts", "",
        "| mask | prediction difference | trigger attention |", "|---|---|---|",
        "| ![mask](heatmaps/mask.png) | ![difference](heatmaps/difference.png) | ![attention](heatmaps/attention.png) |", "",
        "Cross-attention layers by score (trigger attention inside the mask, strongest = 1):", "",
        *[f"- `{k}`: {v:.2f}" for k, v in layers], "",
        "The patch (`patch.safetensors`) records every setting; `sau clean` writes it as a merged model or LoRA.",
    ]
    return "\n".join(lines) + "\n"
