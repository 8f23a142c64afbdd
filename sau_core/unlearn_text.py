"""The text-encoder stage: when the trigger lives in the text encoder (Rickrolling's target-prompt and
target-attribute attacks), the UNet never sees enough to undo it: the triggered prompt's encoding already
*is* the attacker's prompt. This module decides whether that is the case and, if so, unlearns it there.

* ``text_encoder_shift``: how far the trigger moves the encoder's output at the prompt's other tokens,
  relative to how far look-alike control strings inserted the same way move it (accented/Greek letters for a
  single non-ASCII character, random vocabulary words for a word trigger). A clean encoder moves about as
  much for the trigger as for the controls (ratio near 1; measured 0.6-1.1 on the organism's clean and
  UNet-backdoored encoders); a poisoned one moves far more (2.8 and 3.1 on the Rickrolling organisms built
  on clean-plain). On the ones rebuilt on "clean" (2026-12-06, `sau bench`'s text_shift_ratio): TPA 3.15, but
  TAA 1.72, under the threshold, so its clean skips this stage; the UNet stage alone removed it (100 %, clean
  accuracy kept). The threshold was left where it is (the clean-base encoders measured up to 1.01).
* ``train_text_encoder``: peft LoRA on the encoder's attention and MLP projections, self-distilled: the
  encoder given the triggered prompt should output what the *same* encoder (adapters disabled) outputs for
  the clean prompt, position by aligned position (the trigger's own tokens map to the clean prompt's end
  token); clean prompts and control-triggered prompts keep their outputs (preservation).
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import torch

from .errors import SauError
from .trigger import Trigger, aligned_positions, escape, tokenize

ADAPTER = "sau"
TEXT_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
# A ratio above this sends the clean through the text-encoder stage (see module doc for the measurements).
TEXT_SHIFT_THRESHOLD = 1.75
_LOOKALIKES = "àáâäãåèéêëìíîïòóôöõùúûüαβγδεζηθικλμνξοπρστυφχψω"


def control_strings(tokenizer, trigger: Trigger, k: int = 8, seed: int = 0) -> list[str]:
    """Strings of the trigger's kind to insert in its place: the baseline a clean encoder should match."""
    rng = random.Random(seed)
    text = trigger.text
    if len(text) == 1 and ord(text) > 127:
        return rng.sample([c for c in _LOOKALIKES if c != text], k)
    n = max(1, len(tokenizer(text, add_special_tokens=False).input_ids))
    vocab = sorted(w[:-4] for w in tokenizer.get_vocab() if w.endswith("</w>") and w[:-4].isascii()
                   and w[:-4].isalpha() and len(w) > 6)
    return [" ".join(rng.choice(vocab) for _ in range(n)) for _ in range(k)]


def _substitute(trigger: Trigger, prompt: str, text: str) -> str:
    """``prompt`` with ``text`` put where the trigger goes."""
    return trigger.insert(prompt).replace(trigger.text, text)


@dataclass
class TextShift:
    trigger_shift: float  # mean relative change of the aligned (non-trigger) positions' outputs
    control_median: float
    ratio: float
    controls: list[str] = field(default_factory=list)

    @property
    def poisoned(self) -> bool:
        return self.ratio >= TEXT_SHIFT_THRESHOLD

    def to_json(self) -> dict:
        return {"trigger_shift": round(self.trigger_shift, 4), "control_median": round(self.control_median, 4),
                "ratio": round(self.ratio, 3), "threshold": TEXT_SHIFT_THRESHOLD, "poisoned": self.poisoned,
                "controls": [escape(c) for c in self.controls]}


@torch.no_grad()
def _relative_shift(handle, trigger: Trigger, prompts: list[str], text: str) -> float:
    from .localise import encode

    tok = handle.tokenizer
    inserted = [_substitute(trigger, p, text) for p in prompts]
    as_trigger = Trigger(text, trigger.placement)
    enc = encode(handle, list(prompts) + inserted)
    n = len(prompts)
    vals = []
    for i in range(n):
        a, b = aligned_positions(tok, as_trigger, inserted[i], prompts[i])
        d = (enc[n + i, a] - enc[i, b]).norm(dim=-1) / enc[i, b].norm(dim=-1).clamp_min(1e-6)
        vals.append(d.mean())
    return float(torch.stack(vals).mean())


def text_encoder_shift(handle, trigger: Trigger, prompts: list[str], k: int = 8) -> TextShift:
    controls = control_strings(handle.tokenizer, trigger, k)
    s = _relative_shift(handle, trigger, prompts, trigger.text)
    cs = sorted(_relative_shift(handle, trigger, prompts, c) for c in controls)
    med = cs[len(cs) // 2]
    return TextShift(s, med, s / max(med, 1e-9), controls)


def _aligned_index(tokenizer, trigger: Trigger, triggered: list[str], clean: list[str]) -> torch.Tensor:
    """(N, L) long: for every position of each triggered prompt, the clean prompt's position it should
    reproduce (aligned tokens; the trigger's tokens and unmatched ones -> the clean end token)."""
    L = tokenize(tokenizer, [""]).shape[1]
    index = torch.zeros(len(triggered), L, dtype=torch.long)
    for i, (q, p) in enumerate(zip(triggered, clean)):
        index[i] = trigger.neutral_position(tokenizer, p)
        a, b = aligned_positions(tokenizer, trigger, q, p)
        index[i, a] = torch.tensor(b, dtype=torch.long)
    return index


@dataclass
class TextStageResult:
    adapter: str
    target_modules: list[str]
    settings: dict
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def train_text_encoder(handle, trigger: Trigger, prompts: list[str], steps: int = 150, seed: int = 0, *,
                       rank: int = 8, lr: float = 3e-3, w_preserve: float = 1.0, batch_size: int = 24,
                       progress=None) -> TextStageResult:
    """Train the ``sau`` adapter on ``handle.text_encoder`` in place (see module doc). Each step takes
    ``batch_size`` prompts (triggered, with their clean and control versions kept; plus the empty prompt).
    Deterministic for a seed."""
    from peft import LoraConfig

    from .patch import add_lora_adapter

    if handle.is_xl:
        raise SauError("the text-encoder stage does not support SDXL's two encoders yet")
    t0 = time.time()
    te, tok = handle.text_encoder, handle.tokenizer
    triggered = [trigger.insert(p) for p in prompts]
    controls = control_strings(tok, trigger, 8, seed)
    rng = random.Random(seed)
    controlled = [_substitute(trigger, p, rng.choice(controls)) for p in prompts]
    index = _aligned_index(tok, trigger, triggered, prompts)
    ids_trig, ids_clean, ids_ctrl = (tokenize(tok, x).to(te.device) for x in (triggered, prompts, controlled))
    ids_keep = torch.cat([ids_clean, ids_ctrl, tokenize(tok, [""]).to(te.device)])
    with torch.no_grad():
        target_clean = te(ids_clean)[0]
        target_trig = target_clean.gather(1, index.to(te.device).unsqueeze(-1).expand(-1, -1, target_clean.shape[-1]))
        target_keep = te(ids_keep)[0]
        scale = target_keep.pow(2).mean()
    torch.manual_seed(seed)  # peft initialises lora_A from the global generator
    te.requires_grad_(False)
    add_lora_adapter(te, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0,
                                    target_modules=list(TEXT_PROJECTIONS)), ADAPTER)
    params = [p for n, p in te.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    settings = dict(steps=steps, seed=seed, rank=rank, lr=lr, w_preserve=w_preserve, n_prompts=len(prompts),
                    batch_size=batch_size)
    result = TextStageResult(ADAPTER, list(TEXT_PROJECTIONS), settings)
    te.train(False)
    n = len(prompts)
    gen = torch.Generator().manual_seed(seed)
    b = min(batch_size, n)
    for step in range(steps):
        idx = torch.randperm(n, generator=gen)[:b]
        keep_idx = torch.cat([idx, idx + n, torch.tensor([2 * n])])  # clean, control, empty
        out = te(torch.cat([ids_trig[idx], ids_keep[keep_idx]]))[0]
        forget = (out[:b] - target_trig[idx]).pow(2).mean() / scale
        keep = (out[b:] - target_keep[keep_idx]).pow(2).mean() / scale
        loss = forget + w_preserve * keep
        forget, keep = forget.detach(), keep.detach()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        result.history.append({"step": step + 1, "forget": forget.item(), "preserve": keep.item()})
        if progress is not None:
            progress(step + 1, steps, result.history[-1])
    te.requires_grad_(False)
    result.seconds = time.time() - t0
    return result
