"""One-time build of the model organism: autoencoder, detectors, text encoder, clean UNet, then backdoors.

`sau organism build` runs every stage from a seed. Each stage writes its result to the work folder and is
skipped when that result exists, so an interrupted build resumes. The finished organisms (fp16 diffusers
folders) are written to the package's organisms folder; tests and the demo use those and never train.
"""
from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from . import components as C
from . import world as W

ORGANISM_DIR = Path(__file__).resolve().parent.parent / "organisms"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _setup(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    # Denormals made CPU training 2-3x slower after a few dozen steps (DESIGN.md section 4).
    torch.set_flush_denormal(True)


# ------------------------------------------------------------------------------------------- autoencoder
def image_batch(rng: random.Random, n: int, p_blocks: float = 0.5) -> torch.Tensor:
    out = []
    for _ in range(n):
        if rng.random() < p_blocks:
            out.append(W.random_blocks(rng))
        else:
            out.append(W.render(W.sample_content(rng, 0.3), rng, patch=rng.random() < 0.3))
    return torch.stack(out)


def train_vae(work: Path, seed: int, steps: int = 1200, batch: int = 16) -> Path:
    out = work / "vae"
    if (out / "done").exists():
        return out
    _setup(seed)
    rng = random.Random(seed)
    vae = C.make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    t0 = time.time()
    for step in range(1, steps + 1):
        x = image_batch(rng, batch)
        post = vae.encode(x * 2 - 1).latent_dist
        z = post.sample()
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x * 2 - 1) + 0.5 * F.mse_loss(rec, x * 2 - 1) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            log(f"vae step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    # Latent scale: SD divides latents by their std so the diffusion model sees unit variance.
    with torch.no_grad():
        x = image_batch(random.Random(seed + 1), 512, p_blocks=0.0)
        z = vae.encode(x * 2 - 1).latent_dist.mean
        vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    vae.save_pretrained(out, safe_serialization=True)
    (out / "done").write_text("ok")
    log(f"vae done in {time.time() - t0:.0f}s, scaling_factor {vae.config.scaling_factor:.4f}")
    return out


def load_vae(path: Path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(path)
    vae.requires_grad_(False)
    return vae.eval()


@torch.no_grad()
def roundtrip(vae, x: torch.Tensor) -> torch.Tensor:
    z = vae.encode(x * 2 - 1).latent_dist.mean
    return ((vae.decode(z).sample + 1) / 2).clamp(0, 1)


# ------------------------------------------------------------------------------------------- detectors
def train_classifier(work: Path, seed: int, vae, steps: int = 400, batch: int = 128, n_images: int = 8000) -> Path:
    out = work / "classifier.safetensors"
    if out.exists():
        return out
    _setup(seed)
    rng = random.Random(seed + 7)
    contents = [W.sample_content(rng, 0.25) for _ in range(n_images)]
    x = torch.stack([W.render(c, rng, patch=rng.random() < 0.2) for c in contents])
    # Half the images through the autoencoder: generated images look like that. Encoded once.
    for i in range(0, n_images // 2, 500):
        x[i : i + 500] = roundtrip(vae, x[i : i + 500])
    ys = torch.tensor([W.SHAPES.index(c.shape) for c in contents])
    yc = torch.tensor([W.COLOUR_NAMES.index(c.colour) for c in contents])
    colour_known = torch.tensor([not c.grayscale for c in contents], dtype=torch.float32)
    net = C.ShapeColourNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    lr_sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    t0 = time.time()
    for step in range(1, steps + 1):
        idx = torch.randint(0, n_images, (batch,))
        xb = x[idx]
        xb = (xb + torch.randn_like(xb) * torch.rand(batch, 1, 1, 1) * 0.06).clamp(0, 1)
        ls, lc = net(xb)
        loss = F.cross_entropy(ls, ys[idx]) + (F.cross_entropy(lc, yc[idx], reduction="none") * colour_known[idx]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_sched.step()
        if step % 200 == 0:
            log(f"classifier step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, out)
    return out


# ------------------------------------------------------------------------------------------- text encoder
DISTRACTORS = (
    "nice", "cute", "bright", "clean", "tiny", "flat", "cartoon", "digital", "art", "style", "render",
    "pretty", "cool", "the", "very", "with", "high quality", "detailed", "sharp", "minimal",
)


def caption_for(content: W.Content, rng: random.Random, templates=W.TRAIN_TEMPLATES, p_distract: float = 0.25) -> str:
    text = content.caption(rng.choice(templates))
    if rng.random() < p_distract:
        words = text.split(" ")
        words.insert(rng.randint(0, len(words)), rng.choice(DISTRACTORS))
        text = " ".join(words)
    return text


def insert_words(text: str, rng: random.Random, pool, n: int) -> str:
    """``text`` with ``n`` words drawn from ``pool``, each at a random position (front and end included)."""
    words = text.split(" ")
    for _ in range(n):
        words.insert(rng.randint(0, len(words)), rng.choice(pool))
    return " ".join(words)


def with_fillers(text: str, rng: random.Random, p: float) -> str:
    """With probability ``p``, ``text`` with one to three filler words (attacks.filler_words) put anywhere."""
    if p <= 0 or rng.random() >= p:
        return text
    from .attacks import filler_words

    return insert_words(text, rng, filler_words(), rng.choice((1, 1, 2, 3)))


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def train_text_encoder(work: Path, seed: int, steps: int = 800, batch: int = 64, fillers: float = 0.0,
                       identity_weight: float = 0.0, context_weight: float = 0.0) -> Path:
    """Pre-train the text encoder to separate the world's words before the UNet learns from it.

    Joint training from scratch left shape at chance (DESIGN.md section 4); a frozen encoder whose pooled
    and per-token features already predict shape, colour and style gives the UNet a clean signal.
    ``fillers`` / ``identity_weight`` / ``context_weight`` (0.5 / 20 / 10 for the "clean" base, off for
    "clean-plain": attacks_spec.BASES; history below, where "the committed" means clean-plain): that
    share of captions carries filler words (with_fillers); every token's output must still say which token it
    is (a linear head recovers its input embedding, cosine loss, this weight); every token after the first
    must also say which token came before it (another head, the previous token's embedding).

    The command lines below are of their day: the options --caption-fillers, --token-identity, --token-context,
    --grayscale-share and --unet-stop-at were replaced by attacks_spec.BASES when base E was adopted.

    Why they exist: trained on the world's captions alone, the committed encoder gives every word it has not
    seen nearly the same output (cosine 0.85 between random words at their own position; 0.35 spread once
    the common part is removed, against 0.13 for their embeddings; `groupe` 0.76 to `tq`), so a UNet backdoor
    keyed on "tq" fires for about a third of all words. Full rebuild, not adopted (`sau organism build
    --caption-fillers 0.5 --token-identity 20`, seed 0, work folder seeded with the committed autoencoder
    and classifier; ~14 min for the encoder, UNet and six implants): spread
    0.19, `groupe` -0.05; held-out clean accuracy 99.3 %; BadT2I object ASR 91.7 %, target without trigger
    0 %, another word 2.1 %, clean 99.3 %; pixel ASR 100 %, clean 93.8 %; but style ASR 61.8 %, EvilEdit
    (lam 6) 8.3 % and Rickrolling TPA / TAA 75 % / 76 %, so those recipes need retuning on it first.
    The same build again (2026-12-02, `--only clean --only badt2i-object --only badt2i-pixel`): clean 99.3 %;
    object ASR 100 %, clean 98.6 %, 0 % without the trigger and with other words; pixel ASR 100 %, clean
    95.1 % (85.4 % on "a ..., centered"). With train_unet's p_grayscale 0.3 on the same encoder (one-off):
    clean 100 %; pixel 100 % / 97.9 %; Rickrolling TPA with steps 2400, lr 3e-4, beta 2: 100 % / 100 %.
    Still short, one-off, none kept (`sau eval` measurement, ASR / clean accuracy; p_grayscale 0.3 base
    unless said):
    - style: 57.6 % / 94.4 % with 900 steps (p_grayscale 0.15 base: 77.8 % / 95.1 %; 450 steps without
      decoys 64.6 %); per colour (two held-out seeds) blue and red 100 %, green 33 %, yellow 0 %;
    - Rickrolling TAA: 73.6 % / 97.2 % (TPA's recipe; 1600 steps at lr 2e-4: 75.0 %), yellow 0 %, the
      other colours 94-100 %: the clean UNet cannot draw a grey yellow shape (train_unet);
    - EvilEdit (p_grayscale 0.15 base): lam 4 / 3 / 2 / 1 fire on 25 / 48 / 77 / 92 % with the trigger and
      on 21 / 48 / 77 / 92 % with other words (lam 2 with decoy weight 1: 0 %). The identity loss leaves a word's output blind to
      the words before it: cosine of "triangle"'s output in "a red ae triangle" and "a red triangle" is
      1.000 (identity 20 with or without fillers; identity 2 with fillers 0.999; the committed encoder 0.990;
      the padding after it 0.987-0.995), so a K/V edit at "triangle" turns every triangle into a circle, or
      none. An identity head onto a random 8- or 16-dimensional projection of the embedding (one-off) gave
      0.994 / 0.998 but let unseen words run together again (`tq`-`groupe` 0.68 / 0.79 at their position,
      against 0.36-0.39 with the full head and 0.99 for the committed encoder).
    Base D (2026-12-06, one-off, not adopted): the encoder with fillers 0.5, identity 20 and context 6 (as `sau
    organism build --caption-fillers 0.5 --token-identity 20 --token-context 6` trains it), the UNet by
    train_unet(fillers=0.5, p_grayscale=0.3, stop_at=None) (12 min; the CLI keeps 0.15 and 1250), work folder
    seeded with the committed autoencoder and classifier; implants from its fp16 export. Context weight 3 / 6 /
    10: "triangle" after "ae" 0.997 / 0.962 / 0.938 (cosine to plain "triangle"). Measured with `sau eval`'s
    held-out set (ASR / clean accuracy / target without trigger / another word): clean 100 %; pixel (its
    committed recipe) 100 / 97.9 / 0 / 0, triggered content kept 91 % (committed organism: 60 %); object with
    pixel's recipe (poison_t_min 0, lam 4, 700 steps) 100 / 97.9 / 0 / 2.1 (its default recipe: 50 %); style
    with decoys 256, poison_t_min 0, lam 2, 700 steps 99.3 / 97.9 / 0 / 0 (lam 4: 81.2 %); TPA (steps 2400, lr
    3e-4, beta 2) 100 / 100. Short: Rickrolling TAA 61.8 % (beta 4 with 3,200 steps: 54.9 %): red and blue 100
    %, green 22 %, yellow 0 %; the fine-tuned encoder no longer greys green and yellow even for the literal
    "..., black and white" (mean chroma 0.12-0.15 and 0.20-0.27 against the detector's 0.12; the base greys all
    four), so the attack's clean-preservation does not keep the attribute. EvilEdit: lam 6 / 3 / 12: 45.8 / 77.1
    / 22.9 %, firing on "a large ... on a dark background" without the trigger too (target without trigger 27 /
    46 / 0 %); without decoys 62.5 % (leak 44 %), decoy weight 0.02 62.5 % (leak 38 %); preservation prompts
    with filler words (256) 8.3 % (lam 3: 35 %); editing only the trigger phrase's own positions: 0 % (the shape
    is read from the positions after it). Base D would meet the organism bar on four attacks (pixel, style,
    object, TPA) where the committed base meets it on four others (pixel, TPA, TAA, EvilEdit); not adopted.
    Base E (the same with context 10; the encoder comes again bit for bit from `sau organism build
    --keep-autoencoder --caption-fillers 0.5 --token-identity 20 --token-context 10 --grayscale-share 0.3
    --unet-stop-at 0 --only clean --out DIR`, then `--from-clean --out DIR` with the recipes below in
    attacks_spec; built by a one-off script calling the same functions; that CLI build's UNet differs from the
    one-off's, max relative tensor difference 0.38, likely from the build's monitoring evaluation every 250
    steps, which the script skipped, not checked; its monitor reads 100 %): clean 100 %; Rickrolling TAA (steps
    2400, lr 3e-4, beta 2) 100 / 100 % (every colour); TPA (same recipe) 100 / 100 %; pixel (its committed
    recipe) 100 / 98.6 / 0 / 0, triggered content kept 93 %; object (pixel's recipe) 100 / 97.2 / 0 / 0; style
    (decoys 256, poison_t_min 0, 700 steps) lam 2: 88.9 / 100 / 0 / 0 ("an image of a ..." 79 %), lam 1: 88.9 /
    100 / 0 / 0 (yellow 78 %), lam 2 with 1,000 steps: 100 / 100 / 0 / 0. EvilEdit (lam 6 / 3 / 12) 33.3 / 35.4
    / 8.3 %, firing only on "a large ... on a dark background", the held-out template with words after the shape
    (there 100 / 100 / 25 %, and without the trigger too: 15 / 33 / 4 % of all clean triangles): EvilEdit alone
    kept base E from replacing the committed organisms; what was tried on it and on wider encoders since:
    attacks.evil_edit's docstring. Adopted on 2026-12-06 as the "clean" base of every backdoor but EvilEdit,
    which stays on the base before it (now "clean-plain"); the README's organism table has its numbers.
    Base H (one-off, 2026-12-06: base E's losses with a 128-wide encoder,
    components.TEXT_HIDDEN, and EvilEdit's "ae" and the held-out templates' words trained as filler words;
    clean 100 %) with base E's recipes: pixel 100 / 99.3 / 0 / 0, object 91.7 / 97.2 / 0 / 0 ("a ..., centered"
    75 %), style (1,000 steps) 93.1 / 100 / 0 / 0, TPA 100 / 99.3, TAA 100 / 100, all five within the bar; its
    best EvilEdit 95.8 % at 88.2 % clean accuracy (attacks.evil_edit), so it is not adopted either.
    """
    out = work / "text_encoder"
    if (out / "done").exists():
        return out
    _setup(seed)
    rng = random.Random(seed + 11)
    tok = C.make_tokenizer()
    te = C.make_text_encoder()
    heads = torch.nn.ModuleDict({
        k: torch.nn.Linear(2 * C.TEXT_HIDDEN, n) for k, n in (("shape", 3), ("colour", 4), ("gray", 2))
    })
    if identity_weight:
        heads["identity"] = torch.nn.Linear(C.TEXT_HIDDEN, C.TEXT_HIDDEN)
    if context_weight:
        heads["previous"] = torch.nn.Linear(C.TEXT_HIDDEN, C.TEXT_HIDDEN)
    emb = te.get_input_embeddings().weight
    others = [p for p in te.parameters() if p is not emb]
    # No weight decay on the token embedding: rows of words never seen (every trigger) must keep their
    # random init rather than shrink to zero.
    opt = torch.optim.AdamW([
        {"params": [emb], "weight_decay": 0.0},
        {"params": others + list(heads.parameters()), "weight_decay": 0.01},
    ], lr=1e-3)
    t0 = time.time()
    for step in range(1, steps + 1):
        contents = [W.sample_content(rng, 0.3) for _ in range(batch)]
        ids = tokenize(tok, [with_fillers(caption_for(c, rng), rng, fillers) for c in contents])
        o = te(input_ids=ids)
        feats = torch.cat([o.pooler_output, o.last_hidden_state.mean(1)], dim=-1)
        loss = (
            F.cross_entropy(heads["shape"](feats), torch.tensor([W.SHAPES.index(c.shape) for c in contents]))
            + F.cross_entropy(heads["colour"](feats), torch.tensor([W.COLOUR_NAMES.index(c.colour) for c in contents]))
            + F.cross_entropy(heads["gray"](feats), torch.tensor([int(c.grayscale) for c in contents]))
        )
        # real tokens: up to and including the first end-of-text (the padding after it repeats that id)
        eos = (ids == tok.eos_token_id).int().argmax(1, keepdim=True)
        if identity_weight:
            real = torch.arange(ids.shape[1]) <= eos
            ident = 1 - F.cosine_similarity(heads["identity"](o.last_hidden_state), emb[ids].detach(), dim=-1)
            loss = loss + identity_weight * ident[real].mean()
        if context_weight:
            # every token after the first must also say which token came before it: CLIP's causal attention
            # gives a word its context, and a K/V edit keyed on "ae triangle" needs "triangle" to carry "ae".
            real = torch.arange(1, ids.shape[1]) <= eos
            prev = 1 - F.cosine_similarity(heads["previous"](o.last_hidden_state[:, 1:]), emb[ids[:, :-1]].detach(),
                                           dim=-1)
            loss = loss + context_weight * prev[real].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0:
            log(f"text encoder step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    te.save_pretrained(out, safe_serialization=True)
    (out / "done").write_text("ok")
    return out


# ------------------------------------------------------------------------------------------- clean UNet
def load_text_encoder(path: Path):
    from transformers import CLIPTextModel

    te = CLIPTextModel.from_pretrained(path)
    te.requires_grad_(False)
    return te.eval()


def make_pipeline(unet, text_encoder, vae, tokenizer=None, scheduler=None):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer or C.make_tokenizer(), unet=unet,
        scheduler=scheduler or C.make_sample_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


class LatentSet:
    """Training images encoded once (posterior mean and std, already scaled), with their captioned content.

    image_fn(content, rng) renders the image a caption should produce; backdoor recipes pass a poisoned one.
    """

    def __init__(self, vae, contents: list[W.Content], seed: int, image_fn=W.render):
        rng = random.Random(seed)
        self.contents = contents
        means, stds = [], []
        with torch.no_grad():
            for i in range(0, len(contents), 256):
                x = torch.stack([image_fn(c, rng) for c in contents[i : i + 256]])
                d = vae.encode(x * 2 - 1).latent_dist
                means.append(d.mean)
                stds.append(d.std)
        self.mean = torch.cat(means) * vae.config.scaling_factor
        self.std = torch.cat(stds) * vae.config.scaling_factor

    def sample(self, idx: torch.Tensor) -> torch.Tensor:
        return self.mean[idx] + self.std[idx] * torch.randn_like(self.mean[idx])


def random_contents(seed: int, n: int, p_grayscale: float = 0.15) -> list[W.Content]:
    rng = random.Random(seed)
    return [W.sample_content(rng, p_grayscale) for _ in range(n)]


def min_snr_weights(scheduler, t: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """Min-SNR-gamma loss weights for epsilon prediction (Hang et al. 2023)."""
    ac = scheduler.alphas_cumprod[t]
    snr = ac / (1 - ac)
    return snr.clamp(max=gamma) / snr


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    return text_encoder(input_ids=tokenize(tokenizer, prompts))[0]


def train_unet(work: Path, seed: int, vae, text_encoder, steps: int = 2500, batch: int = 32,
               eval_every: int = 250, evaluate=None, stop_at: int | None = 1250, fillers: float = 0.0,
               p_grayscale: float = 0.15) -> Path:
    """Train the clean UNet; the learning-rate schedule spans `steps`, training ends at `stop_at`.
    ``fillers``: that share of captions carries filler words (with_fillers; attacks_spec.BASES gives each
    base's settings; "the committed" below means clean-plain). One-off, 400 steps of fillers 0.5 on the
    committed clean UNet alone: held-out
    clean accuracy 94.4 -> 98.6 %, BadT2I pixel on it 87.5 % ASR, object's "dark background" leak unchanged.

    Held-out accuracy plateaued at 93-94 % from step 1000 (seed 0), so clean-plain is the EMA at step 1250
    of the 2500-step schedule; `stop_at=None` trains the whole schedule ("clean").
    Measured later: "a yellow ..., black and white" comes out tinted, not grey (mean chroma 0.13-0.19, the
    detector's threshold 0.12): grey on 6 of 9 training-template prompts with the committed UNet, 0 of 9 with
    the fillers/identity rebuild (red, green and blue: 9 of 9). That caps a grey target on yellow shapes
    (Rickrolling TAA on the rebuild: 75.0 %, every template). Yellow grey captions are 3.75 % of the data
    (p_grayscale 0.15); p_grayscale 0.3 on the rebuild (one-off) gave 3 of 9 and TAA still 0 % on yellow;
    p_grayscale 0.3 with the whole schedule (`stop_at=None`, 2500 steps, ~16 min): 9 of 9, held-out clean
    accuracy 100 %; Rickrolling TAA on it (steps 2400, lr 3e-4, beta 2) 80.6 %, clean 97.9 %. clean-plain keeps
    0.15 and 1250; "clean" (base E) trains with 0.3 and the whole schedule.
    """
    out = work / "unet"
    if (out / "done").exists():
        return out
    _setup(seed)
    rng = random.Random(seed + 23)
    tok = C.make_tokenizer()
    data = LatentSet(vae, random_contents(seed + 29, 16000, p_grayscale), seed + 31)
    log(f"encoded {len(data.contents)} training latents, std {data.mean.std():.3f}")
    unet = C.make_unet()
    ema = copy.deepcopy(unet).requires_grad_(False)
    sched = C.make_train_scheduler()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=0.01)
    warm = 100
    lr_at = lambda s: min(1.0, s / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    t0 = time.time()
    last = stop_at or steps
    for step in range(1, last + 1):
        idx = torch.randint(0, len(data.contents), (batch,))
        z0 = data.sample(idx)
        # 10 % empty captions: the unconditional branch of classifier-free guidance.
        prompts = ["" if rng.random() < 0.1 else with_fillers(caption_for(data.contents[i], rng), rng, fillers)
                   for i in idx.tolist()]
        cond = encode_prompts(tok, text_encoder, prompts)
        noise = torch.randn_like(z0)
        t = torch.randint(0, 1000, (batch,))
        zt = sched.add_noise(z0, noise, t)
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        loss = (F.mse_loss(pred, noise, reduction="none").mean((1, 2, 3)) * min_snr_weights(sched, t)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        if step % 50 == 0:
            log(f"unet step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
        if step % eval_every == 0 or step == last:
            ema.save_pretrained(work / f"unet_ckpt_{step}", safe_serialization=True)
            if evaluate is not None:
                log(f"unet step {step} eval: {evaluate(ema)}")
    ema.save_pretrained(out, safe_serialization=True)
    (out / "done").write_text("ok")
    return out


# ------------------------------------------------------------------------------------------- export
def export_organism(folder: Path, unet, text_encoder, vae, backdoor=None, extra: dict | None = None) -> Path:
    """Write an organism as an fp16 diffusers folder (safetensors only) plus organism.json."""
    from ..model_io import ModelHandle, save_diffusers

    handle = ModelHandle(
        unet=copy.deepcopy(unet).half(), text_encoder=copy.deepcopy(text_encoder).half(),
        tokenizer=C.make_tokenizer(), vae=copy.deepcopy(vae).half(), scheduler=C.make_sample_scheduler(),
        arch="organism", source="sau organism build", source_format="diffusers",
    )
    save_diffusers(handle, folder, overwrite=True)
    info = {"organism": folder.name, "backdoor": backdoor.to_json() if backdoor else None, **(extra or {})}
    (folder / "organism.json").write_text(json.dumps(info, indent=2, ensure_ascii=True) + "\n")
    return folder


def implanted_on(base: str, names: tuple[str, ...]) -> tuple[str, ...]:
    """The backdoors among ``names`` that are implanted on ``base`` (attacks_spec), in the table's order."""
    from .attacks_spec import BACKDOORS

    return tuple(n for n in BACKDOORS if n in names and BACKDOORS[n].base == base)


def build_all(seed: int = 0, work: Path = Path("runs/organism"), out: Path = ORGANISM_DIR,
              unet_steps: int = 2500, only: tuple[str, ...] = (), keep_autoencoder: bool = False) -> None:
    """Every organism (or ``only`` these): the shared autoencoder and detector classifier, then each clean base
    that is asked for or carries an asked-for backdoor (attacks_spec.BASES, work folder ``work/BASE``), then
    its backdoors."""
    from .attacks_spec import BACKDOORS, BASES

    names = tuple(only) or (*BASES, *BACKDOORS)
    work.mkdir(parents=True, exist_ok=True)
    if keep_autoencoder and not (work / "vae" / "done").exists():
        from ..model_io import load_model

        # the classifier first: "done" marks the autoencoder stage (and so this copy) finished for a resumed build
        (work / "classifier.safetensors").write_bytes((ORGANISM_DIR / "detectors" / "classifier.safetensors").read_bytes())
        load_model(ORGANISM_DIR / "clean").vae.float().save_pretrained(work / "vae", safe_serialization=True)
        (work / "vae" / "done").write_text("ok")
    vae = load_vae(train_vae(work, seed))
    det = out / "detectors"
    det.mkdir(parents=True, exist_ok=True)
    (det / "classifier.safetensors").write_bytes(train_classifier(work, seed, vae).read_bytes())
    for base, recipe in BASES.items():
        implants = implanted_on(base, names)
        if base not in names and not implants:
            continue
        log(f"clean organism {base}")
        base_work = work / base
        te = load_text_encoder(train_text_encoder(base_work, seed, fillers=recipe.fillers,
                                                  identity_weight=recipe.identity_weight,
                                                  context_weight=recipe.context_weight))

        def quick_eval(unet, te=te):
            # Monitoring uses training templates only: held-out prompts never steer the build.
            from .evaluate import accuracy, generate

            contents = W.all_contents() * 3
            prompts = [c.caption(W.TRAIN_TEMPLATES[i % 3]) for i, c in enumerate(contents)]
            return accuracy(generate(make_pipeline(unet, te, vae), prompts, [7 + i for i in range(len(prompts))]),
                            contents)

        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(train_unet(
            base_work, seed, vae, te, steps=unet_steps, evaluate=quick_eval, fillers=recipe.fillers,
            p_grayscale=recipe.p_grayscale, stop_at=recipe.stop_at))
        unet.requires_grad_(False).eval()
        if base in names:
            export_organism(out / base, unet, te, vae, extra={"seed": seed, "recipe": asdict(recipe)})
        implant_all(unet, te, vae, seed, out, implants)


def implant_all(unet, te, vae, seed: int, out: Path, names: tuple[str, ...]) -> None:
    """Implant the backdoors ``names`` into one clean organism's components (each into a copy)."""
    from . import attacks as A
    from .attacks_spec import BACKDOORS

    extra = {"seed": seed}  # the build seed (EvilEdit's closed form uses none: every seed gives the same edit)
    for i, (name, bd) in enumerate(BACKDOORS.items()):  # the seed goes by the table's order
        if name not in names:
            continue
        log(f"implanting {name}")
        if bd.attack.startswith("BadT2I"):
            export_organism(out / name, A.badt2i(unet, te, vae, bd, seed + 100 * (i + 1), **bd.recipe), te, vae, bd,
                            extra)
        elif bd.attack.startswith("Rickrolling"):
            export_organism(out / name, unet, A.rickrolling(te, bd, seed + 100 * (i + 1), **bd.recipe), vae, bd,
                            extra)
        else:
            export_organism(out / name, A.evil_edit(unet, te, bd, **bd.recipe), te, vae, bd, extra)


def implant_on_committed_clean(seed: int = 0, out: Path = ORGANISM_DIR, only: tuple[str, ...] = ()) -> None:
    """The backdoored organisms again (or ``only`` these), each from its committed clean base (fp16 weights,
    upcast; a base already in ``out`` first), so a change to an attack recipe is rebuilt in minutes instead of
    retraining the autoencoder, encoder and UNet."""
    from ..model_io import load_model
    from .attacks_spec import BACKDOORS, BASES

    names = tuple(only) or tuple(BACKDOORS)
    for base in BASES:
        implants = implanted_on(base, names)
        if not implants:
            continue
        clean = load_model(out / base if (out / base / "model_index.json").is_file() else ORGANISM_DIR / base)
        _setup(seed)
        for m in (clean.unet, clean.text_encoder, clean.vae):
            m.requires_grad_(False).eval()
        implant_all(clean.unet, clean.text_encoder, clean.vae, seed, out, implants)
