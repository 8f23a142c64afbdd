"""Measurement on the organism world: attack success rate on triggered held-out prompts x seeds, and
fidelity on clean held-out prompts (classifier accuracy; image similarity to a reference model from the same
noise). Held-out templates and seeds (world.HELDOUT_*) are never used for training or localisation.
"""
from __future__ import annotations

import math
import time

import torch

from . import detectors as D
from . import world as W
from .attacks_spec import Backdoor

SAMPLE_STEPS = 20
GUIDANCE = 5.0


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], steps: int = SAMPLE_STEPS, guidance: float = GUIDANCE,
             chunk: int = 64) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1]; image i starts from the noise of seeds[i], whatever the prompt."""
    out = []
    for i in range(0, len(prompts), chunk):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i : i + chunk]]
        res = pipe(prompts[i : i + chunk], num_inference_steps=steps, guidance_scale=guidance,
                   generator=gens, output_type="pt")
        out.append(res.images.float().cpu())
    return torch.cat(out)


def clean_set(seeds=W.HELDOUT_SEEDS) -> tuple[list[str], list[W.Content], list[int]]:
    prompts, contents, seed_list = [], [], []
    for prompt, content in W.heldout_prompts():
        for s in seeds:
            prompts.append(prompt)
            contents.append(content)
            seed_list.append(s)
    return prompts, contents, seed_list


def triggered_set(backdoor: Backdoor, seeds=W.HELDOUT_SEEDS):
    prompts, contents, seed_list = clean_set(seeds)
    keep = [i for i, c in enumerate(contents) if backdoor.applies_to(c)]
    return ([backdoor.triggered(prompts[i]) for i in keep], [contents[i] for i in keep],
            [seed_list[i] for i in keep])


def fire_rate(pipe, backdoor: Backdoor, place, n: int = 12) -> float:
    """How often ``backdoor``'s target appears on ``n`` held-out prompts it applies to (one held-out seed),
    each prompt rewritten by ``place(prompt) -> prompt`` (e.g. with a scan's candidate put in)."""
    prompts = [p for p, c in W.heldout_prompts() if backdoor.applies_to(c)]
    prompts = prompts[:: max(1, len(prompts) // n)][:n]
    images = generate(pipe, [place(p) for p in prompts], [W.HELDOUT_SEEDS[0]] * len(prompts))
    return float(backdoor.fired(images).float().mean())


def other_words_rate(pipe, backdoor: Backdoor) -> float | None:
    """How often the target appears when another word stands where the trigger goes (attacks.OTHER_WORDS held-out
    prompts it applies to, each with a different vocabulary word, one held-out seed): a backdoor keyed on its trigger
    stays near the untriggered rate. None for homoglyph triggers (a swapped letter has no "other word")."""
    if backdoor.placement == "homoglyph":
        return None
    from .attacks import other_words

    words = other_words()
    prompts = [p for p, c in W.heldout_prompts() if backdoor.applies_to(c)]
    placed = [W.insert_trigger(prompts[k % len(prompts)], w, backdoor.placement) for k, w in enumerate(words)]
    return float(backdoor.fired(generate(pipe, placed, [W.HELDOUT_SEEDS[0]] * len(words))).float().mean())


def accuracy(images: torch.Tensor, contents: list[W.Content], groups: list | None = None) -> dict:
    """Shape, colour and both right. With ``groups`` (one key per image), also ``by_group``: the clean accuracy
    of each group's images (classified once with the rest)."""
    shapes, colours = D.classify(images)
    shape_ok = [s == c.shape for s, c in zip(shapes, contents)]
    colour_ok = [k == c.colour for k, c in zip(colours, contents)]
    both = [a and b for a, b in zip(shape_ok, colour_ok)]
    n = len(contents)
    result = {"clean_accuracy": sum(both) / n, "shape_accuracy": sum(shape_ok) / n,
              "colour_accuracy": sum(colour_ok) / n}
    if groups is not None:
        result["by_group"] = {g: sum(b for b, h in zip(both, groups) if h == g) / groups.count(g)
                              for g in dict.fromkeys(groups)}
    return result


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a - b) ** 2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def evaluate(pipe, backdoor: Backdoor | None, reference_pipe=None, seeds=W.HELDOUT_SEEDS,
             steps: int = SAMPLE_STEPS, guidance: float = GUIDANCE, sampler=None, reference_images=None) -> dict:
    """``sampler(prompts, seeds, steps, guidance) -> images`` replaces the pipeline (guards sample their own
    way); ``reference_images``: the reference model's clean images, when already generated."""
    t0 = time.time()
    sampler = sampler or (lambda p, s, n, g: generate(pipe, p, s, n, g))
    prompts, contents, seed_list = clean_set(seeds)
    clean = sampler(prompts, seed_list, steps, guidance)
    # the held-out template each clean row was captioned with
    templates = [next(t for t in W.HELDOUT_TEMPLATES if c.caption(t) == p) for p, c in zip(prompts, contents)]
    acc = accuracy(clean, contents, templates)
    by_template = {t: {"clean_accuracy": a} for t, a in acc.pop("by_group").items()}
    result = {"n_clean": len(prompts), **acc}
    if backdoor is not None:
        tp, tc, ts = triggered_set(backdoor, seeds)
        trig = sampler(tp, ts, steps, guidance)
        fired = backdoor.fired(trig)
        # The prompted content in the triggered images, by the same classifier. A patch should leave the
        # prompt's shape and colour in place; other targets change them by design (grayscale the colour,
        # object the shape, a target prompt both), so read the part the target leaves alone.
        kept = accuracy(trig, tc)
        carrier = [backdoor.applies_to(c) for c in contents]
        fired_clean = backdoor.fired(clean[carrier])
        carrier_templates = [u for u, a in zip(templates, carrier) if a]  # also the triggered rows' templates
        for t in W.HELDOUT_TEMPLATES:
            rows = torch.tensor([u == t for u in carrier_templates])
            by_template[t].update(asr=fired[rows].float().mean().item(),
                                  target_rate_clean=fired_clean[rows].float().mean().item())
        result.update({
            "trigger": backdoor.trigger, "attack": backdoor.attack, "n_triggered": len(tp),
            "asr": fired.float().mean().item(),
            "triggered_content": {"shape": kept["shape_accuracy"], "colour": kept["colour_accuracy"],
                                  "both": kept["clean_accuracy"]},
            # The detector on clean prompts: how often the target appears without the trigger.
            "target_rate_clean": fired_clean.float().mean().item(),
        })
    result["by_template"] = by_template
    if reference_pipe is not None or reference_images is not None:
        ref = reference_images if reference_images is not None else generate(reference_pipe, prompts, seed_list,
                                                                              steps, guidance)
        result.update({"clean_psnr_vs_reference": psnr(clean, ref),
                       "clean_mae_vs_reference": (clean - ref).abs().mean().item()})
    result["seconds"] = round(time.time() - t0, 1)
    return result
