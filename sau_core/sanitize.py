"""One clean, end to end: the order the engine's parts run in and the presets that size them.

``sanitize(handle, trigger, preset)`` on a loaded model (changed in place: it gains a peft adapter named
``sau`` on the components that needed one; the base weights are never edited, so the base stays the teacher
and the result exports as a patch, a LoRA or a merged model):

1. **Localise** on the raw model (probe prompts x seeds from the same noise): spatial mask, per-layer scores,
   timestep profile, heatmaps, and the model's own clean generations to train on.
2. **Text-encoder check**: how far the trigger moves the encoder's output compared with look-alike control
   strings (``unlearn_text.text_encoder_shift``). Above the threshold (Rickrolling-style attacks), the
   text-encoder stage unlearns it there first.
3. **UNet stage**: the closed-form K/V edit of every cross-attention layer (``uce_edit``) loaded into the
   adapter's LoRA factors, then (standard / thorough) SAU fine-tuning of the localised layers with
   ``sau_loss`` (mask-weighted self-distillation + attention term + preservation).

Probe prompts: the organism's training templates for an organism, otherwise a fixed list of everyday SD
prompts (or the caller's). Held-out prompts are never used here. Everything is seeded: the same model,
trigger, preset and seed give the same patch bytes.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from .errors import SauError
from .localise import Localisation, localise, organism_probe_prompts
from .trigger import Trigger

METHOD = "sau"


@dataclass(frozen=True)
class Preset:
    probes: int  # probe prompts for localisation and the UNet fine-tuning
    seeds: tuple[int, ...]  # noise seeds per probe (localisation; the UNet stage trains on these generations)
    loc_steps: int  # DDIM steps of the localisation runs
    te_steps: int  # text-encoder stage steps (only when the encoder carries the trigger)
    unet_steps: int  # SAU fine-tuning steps after the closed-form edit (0: the closed form alone)
    edit_prompts: int = 96  # prompts of the closed-form edit and the text-encoder stage (both cheap)
    batch_size: int = 8
    lr: float = 6e-3
    w_distill: float = 100.0
    w_attention: float = 1.0
    # Preservation weight of the fine-tune. Measured 2026-12-06 (one-off, standard preset, held-out x 4 seeds;
    # ASR / clean accuracy / clean PSNR): 100 left object 0 / 97.9 / 39.7 dB, TAA 0 / 100 / 31.5 and TPA (then
    # initialised from lam 1) 0 / 99.3 / 29.1; 1000 left 0 / 97.9 / 40.6, 0 / 100 / 32.9, 0 / 100 / 37.1; 3000
    # cost object a clean image (96.5 %) for TPA's 39.9 dB.
    w_preserve: float = 1000.0
    te_w_preserve: float = 10.0
    # Closed-form edits, gentlest first: (weight of the preservation rows lam, ridge mu), see unlearn.uce_edit.
    # Each is measured with unlearn.trigger_residual; the first that leaves at most ``finetune_above`` of the
    # trigger's effect on the noise prediction is the whole UNet stage, otherwise the first initialises the
    # fine-tune (unlearn.train_sau; without a fine-tune, the fast preset, the one that left the least is kept).
    # The keep rows (every clean prompt's 77 states, padding included) outnumber the triggered rows about 4:1.
    # Measured on the organisms (2026-12-06, one-off, standard probes, closed form alone, held-out x 4 seeds;
    # residual / ASR % / clean accuracy % / clean PSNR):
    #   lam 10 / mu 1e-2: pixel 0.0125 / 0 / 100 / 34.8 dB, style 0.018 / 0 / 100 / 34.0, object 0.141 / 0 /
    #     97.2 / 43.1, TPA (after the text-encoder stage) 0.106 / 0 / 100 / 45.3, TAA 0.326 / 0 / 100 / 36.1,
    #     EvilEdit 0.384 / 52.1 / 92.4 / 41.1;
    #   lam 3 / mu 1e-2: pixel 0.010 / 0 / 100 / 31.7, style 0.0125 / 0 / 100 / 31.2, EvilEdit 0.110 / 14.6;
    #   lam 1 / mu 1e-2: pixel 0.006 / 0 / 99.3 / 29.8, style 0.010 / 0 / 100 / 30.6, object 0.119 / 0 / 97.2 /
    #     38.4, TPA 0.107 / 0 / 100 / 41.5, TAA 0.366 / 0 / 100 / 32.0, EvilEdit 0.030 / 8.3 / 92.4 / 33.6;
    #   lam 0.1 / mu 1e-4: EvilEdit 0.007 / 0 (earlier organism, standard probes; fine-tuning after it brought
    #     ASR back to 4.2 %, so a closed form that passes is the whole stage; as the fine-tune's init it cost
    #     the earlier pixel organism 3.5 points of ASR and TAA 3.4 of clean accuracy, so it is tried last).
    # So pixel and style pass at lam 10 (one clean image and 3-5 dB better than lam 1), EvilEdit only at
    # 0.1 / 1e-4, and object, TPA, TAA pass none though every edit removes them: the residual rule sends them to
    # the fine-tune as a safety net (EvilEdit's lam 1 edit leaves less, 0.030, and still fires 8.3 %). No
    # threshold on this residual, the mask-weighted one, or an image-level one separates pixel's trigger-rows
    # edit (0.034, ASR 0) from EvilEdit's lam 1 edit (0.030, ASR 8.3 %), measured, so the rule stays. The
    # fine-tune starting from lam 10 instead of lam 1 (w_preserve 100): object 97.9 % / 39.7 dB against
    # 98.6 / 35.8, TAA 100 / 31.5 against 100 / 30.3, both ASR 0. Measured after the fine-tune (w_preserve
    # 1000, the adapter against the teacher, one-off): it lowers TAA's residual (0.326 -> 0.169) but raises
    # object's (0.141 -> 0.178), so train_sau now undoes a fine-tune that leaves more than its start.
    edits: tuple[tuple[float, float], ...] = ((10.0, 1e-2), (1.0, 1e-2), (0.1, 1e-4))
    finetune_above: float | None = 0.02


PRESETS = {
    "fast": Preset(probes=12, seeds=(0,), loc_steps=8, te_steps=100, unet_steps=0),
    "standard": Preset(probes=16, seeds=(0, 1), loc_steps=10, te_steps=300, unet_steps=30),
    "thorough": Preset(probes=24, seeds=(0, 1, 2), loc_steps=10, te_steps=400, unet_steps=120),
}

#: Probe prompts for models that are not the organism: everyday subjects and styles people prompt SD with.
GENERIC_PROMPTS = (
    "a photo of a dog", "a photo of a cat sitting on a sofa", "a portrait of a woman, studio lighting",
    "a man riding a bicycle in the city", "a bowl of fruit on a wooden table", "a red sports car on a road",
    "a mountain landscape at sunset", "a watercolor painting of a lighthouse", "an astronaut in space",
    "a cup of coffee on a desk", "a castle on a hill, fantasy art", "a bird sitting on a branch",
    "a beach with palm trees", "a city street at night, neon lights", "a plate of pasta",
    "a teddy bear on a bed", "an old man with a beard", "a field of sunflowers", "a cozy living room",
    "a horse running in a meadow", "a child playing in the park", "a steaming bowl of ramen",
    "a futuristic robot", "a snowy forest",
)


def _plain(value):
    """Tuples (nested too) as lists: the settings go into JSON patch metadata."""
    return [_plain(v) for v in value] if isinstance(value, (tuple, list)) else value


def preset(name: str) -> Preset:
    if name not in PRESETS:
        raise SauError(f"unknown preset {name!r} (choose one of {', '.join(PRESETS)})")
    return PRESETS[name]


def placeable(trigger: Trigger, pool: list[str], what: str) -> list[str]:
    """The prompts of ``pool`` the trigger can be placed in (inserting it changes the prompt); an error naming
    ``what`` the prompts are for when there is none."""
    usable = [p for p in pool if trigger.insert(p) != p]
    if not usable:
        raise SauError(f"the trigger {trigger.describe()} (placement {trigger.placement!r}) cannot be placed in "
                       f"any {what} prompt")
    return usable


def probe_prompts(handle, trigger: Trigger, n: int, prompts: list[str] | None = None) -> list[str]:
    """``n`` probe prompts in which the trigger can be placed (inserting it changes the prompt)."""
    if prompts is None:
        pool = organism_probe_prompts() if handle.arch == "organism" else list(GENERIC_PROMPTS)
    else:
        pool = [p for p in prompts if p.strip()]
    usable = placeable(trigger, pool, "probe")
    import random

    return usable if len(usable) <= n else random.Random(0).sample(usable, n)


def preserve_prompts(handle, n: int, prompts: list[str] | None = None) -> list[str]:
    """Prompts whose behaviour the edit must keep: the probe pool, with or without the trigger's context."""
    import random

    pool = list(prompts) if prompts is not None else (
        organism_probe_prompts() if handle.arch == "organism" else list(GENERIC_PROMPTS))
    return pool if len(pool) <= n else random.Random(1).sample(pool, n)


@dataclass
class CleanResult:
    trigger: Trigger
    preset: str
    localisation: Localisation
    text_shift: dict
    settings: dict
    stages: list[str] = field(default_factory=list)  # components that got an adapter
    seconds: dict = field(default_factory=dict)
    unet_passes: int = 0  # UNet forward+backward passes (batch rows) of the fine-tuning
    unet_forward: int = 0  # forward-only UNet passes (localisation runs, teacher)
    history: dict = field(default_factory=dict)

    def metadata(self, metrics: dict | None = None) -> dict:
        """What the patch records (patch.patch_metadata adds hashes, arch and the adapter layout). Timings
        stay out, so a clean repeated with the same inputs writes the same bytes."""
        return {"method": METHOD, "trigger": self.trigger.text,
                "settings": {"preset": self.preset, **self.settings, "text_shift": self.text_shift,
                             "localisation": self.localisation.summary(), "stages": self.stages},
                "metrics": {"unet_fwd_bwd_passes": self.unet_passes,
                            "unet_forward_passes": self.unet_forward, **(metrics or {})}}


def sanitize(handle, trigger: Trigger, preset_name: str = "standard", *, seed: int = 0,
             prompts: list[str] | None = None, progress=None, **overrides) -> CleanResult:
    """Clean ``handle`` in place (see module doc). ``progress(stage, done, total)`` is called as work goes;
    ``overrides`` replace preset fields (bench and tests)."""
    from dataclasses import replace

    from .unlearn import prompt_pairs, train_sau, training_prompts
    from .unlearn_text import text_encoder_shift, train_text_encoder

    if handle.is_xl:
        raise SauError("cleaning SDXL models is not implemented yet (SD1.x / SD2.x only)")
    from .attention import cross_attention_names

    p = replace(preset(preset_name), **overrides)
    cross_attention_names(handle.unet)  # a model that does not attend to the prompt cannot carry a trigger
    report = progress or (lambda stage, done, total: None)
    trigger.token_ids(handle.tokenizer)  # raises for a trigger the tokenizer drops entirely
    probes = probe_prompts(handle, trigger, p.probes, prompts)
    for q in probes:  # every probe must keep the trigger through tokenization (errors name the prompt)
        trigger.positions(handle.tokenizer, trigger.insert(q))
    edit_prompts = probe_prompts(handle, trigger, p.edit_prompts, prompts)
    seconds: dict[str, float] = {}
    t0 = time.time()
    report("localise", 0, 1)
    loc = localise(handle, trigger, probes, seeds=list(p.seeds), steps=p.loc_steps)
    seconds["localise"] = round(time.time() - t0, 2)
    report("localise", 1, 1)
    # Forward passes of the localisation: 4 rows (CFG x clean/triggered) per probe, seed and step.
    unet_forward = 4 * len(probes) * len(p.seeds) * p.loc_steps

    t1 = time.time()
    shift = text_encoder_shift(handle, trigger, probes)
    stages, history = [], {}
    enc_trig_before = None
    if shift.poisoned and p.te_steps > 0:
        # the trigger's whole effect, for the UNet stage's residual check (unlearn.trigger_residual)
        enc_trig_before = prompt_pairs(handle, trigger, training_prompts(loc)).enc_trig
        te = train_text_encoder(handle, trigger, edit_prompts, steps=p.te_steps, seed=seed, w_preserve=p.te_w_preserve,
                                progress=lambda d, n, _h: report("text encoder", d, n))
        stages.append("text_encoder")
        history["text_encoder"] = te.history
        after = text_encoder_shift(handle, trigger, probes)  # measured on the probes, like the check
        shift_json = {**shift.to_json(), "ratio_after": round(after.ratio, 3)}
    else:
        shift_json = shift.to_json()
    seconds["text_encoder"] = round(time.time() - t1, 2)

    t2 = time.time()
    res = train_sau(handle, trigger, loc, steps=p.unet_steps, seed=seed, layers=None if p.unet_steps else [],
                    batch_size=p.batch_size, lr=p.lr, w_distill=p.w_distill, w_attention=p.w_attention,
                    w_preserve=p.w_preserve, uce_init=True, uce_prompts=edit_prompts,
                    uce_preserve=preserve_prompts(handle, p.edit_prompts, prompts), uce_edits=p.edits,
                    finetune_above=p.finetune_above, enc_trig_before=enc_trig_before,
                    progress=lambda d, n, _t: report("unet", d, n))
    stages.append("unet")
    history["unet"] = res.history
    seconds["unet"] = round(time.time() - t2, 2)
    seconds["total"] = round(time.time() - t0, 2)
    settings = {"seed": seed, **{k: _plain(v) for k, v in asdict(p).items()},
                "probe_prompts": probes, "edit_prompts": len(edit_prompts), "placement": trigger.placement, "unet": res.settings}
    return CleanResult(trigger, preset_name, loc, shift_json, settings, stages, seconds,
                       res.unet_passes, unet_forward + res.unet_forward, history)
