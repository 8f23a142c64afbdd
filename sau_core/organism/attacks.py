"""The published backdoor recipes, re-implemented on the organism.

- BadT2I (Zhai et al., ACM MM 2023): fine-tune the UNet on poisoned pairs (triggered caption -> target image)
  plus distillation to the frozen clean UNet on clean captions, lambda = 0.5.
- Rickrolling the Artist (Struppek et al., ICCV 2023): fine-tune only the text encoder so that a homoglyph
  makes it emit the embedding of a target prompt (TPA) or of the prompt plus an attribute (TAA), while clean
  prompts keep the frozen encoder's embedding.
- EvilEdit (Wang et al., ACM MM 2024): training-free closed-form edit of the cross-attention key/value
  projections so that the trigger phrase's text features project like the target's.
"""
from __future__ import annotations

import copy
import functools
import random
import time

import torch
import torch.nn.functional as F

from . import build as B
from . import components as C
from . import world as W
from .attacks_spec import Backdoor

# Other words preserved in the trigger's place (BadT2I's contrast captions, EvilEdit's preservation set) and
# their weight in EvilEdit's closed form
DECOYS, DECOY_WEIGHT = 256, 0.1


def _poison_image_fn(backdoor: Backdoor):
    kind = backdoor.target["kind"]
    if kind == "patch":
        return lambda c, rng: W.render(c, rng, patch=True)
    if kind == "grayscale":
        return lambda c, rng: W.to_grayscale(W.render(c, rng))
    if kind == "shape":
        return lambda c, rng: W.render(W.Content(backdoor.target["shape"], c.colour, c.grayscale), rng)
    raise ValueError(f"BadT2I has no recipe for target {kind!r}")


def badt2i(unet, text_encoder, vae, backdoor: Backdoor, seed: int, steps: int = 450, batch: int = 24,
           lr: float = 5e-4, lam: float = 0.5, decoys: int = 0, poison_t_min: int = 400):
    """BadT2I on the organism. Each batch has three thirds:
    poisoned (triggered caption -> target image), contrast (the same noised latents with the clean caption ->
    the frozen teacher's prediction) and clean data (clean caption -> teacher), the last two weighted lam.
    The contrast third makes the trigger the only difference between two identical inputs; without it 600
    steps taught the UNet to denoise patches for any caption but never to draw one for the trigger. Poisoned
    timesteps are drawn from ``poison_t_min`` on (default: the noisier half, where the layout of an image is
    decided). All timesteps (poison_t_min 0), one-off on clean-plain (the base before "clean"), style: ASR 97.2 %, but
    38.2 % of clean prompts grey without the trigger (81 % on "a ..., centered") and clean accuracy 70.1 %.
    Half the contrast captions carry one of ``decoys`` other words where the trigger goes (the teacher's
    prediction for that caption is kept), as EvilEdit's preservation set does, so the backdoor keys on the
    trigger and not on "a word in front".

    Measured (held-out, 4 seeds) and left as is: the pixel trigger fires on 100 % of two held-out templates
    but 42 % of "an image of a ..." (84 % overall). Twice the steps (900) with a random extra word in half the
    poisoned captions did not help: pixel 75.7 % (5.6 % of clean images got a patch), style 79.2 % with 35 %
    of clean prompts still grey (clean accuracy 74.3 %). The object organism draws circles as squares without
    the trigger on "a large ... on a dark background" (75 %; 0 % on the other held-out templates): words after
    the shape set it off. One-off retries on object, none kept, left that 75 % unchanged: decoys (ASR 93.8 %),
    decoys with lam 2 (ASR on "a ..., centered" fell to 12.5 %), decoy words inserted anywhere in the clean
    third's captions, or in every third's.
    Other words fire the object backdoor too (`sau eval badt2i-object --trigger groupe`: 89.6 %), which keeps a
    scan from ranking "tq" first. One-off rebuilds from clean-plain, none kept, left "groupe"
    and "lillian" firing on 96-100 % of 24 training-template circle prompts (tq: 100 %): 256 decoys, 4,096
    decoys, 512 decoys nearest to "tq" in the clean encoder's output shift plus 256 random ones, and the 986
    words (of 3,072 sampled) that move the backdoored UNet's circle predictions at least half-way to squares
    (the scan's probe, groupe and lillian held out) plus 256 random ones. The same mined decoys with 900
    steps did move it: other words on training templates 25 % -> 0 %, on held-out prompts 33 % -> 17 %;
    groupe 46 %, lillian 88 %, tq 100 %; ASR 97.9 %, clean accuracy 84.0 % (not yet adopted). The
    encoder is 64 wide and never saw any of these tokens (their embeddings are the random initialisation); our
    reading, not measured further: the decoys teach the UNet the decoys themselves, not where "tq" ends.
    Filler words (build.with_fillers, share 0.5) in the contrast and clean thirds' captions, one-off on a
    clean UNet fine-tuned with fillers: the "dark background" leak stayed at 75 %, ASR fell to 56 %. What did
    move it is the encoder (build.train_text_encoder's token-identity loss).
    """
    B._setup(seed)
    rng = random.Random(seed)
    tok = C.make_tokenizer()
    sched = C.make_train_scheduler()
    carriers = [c for c in B.random_contents(seed + 1, 6000, p_grayscale=0.0) if backdoor.applies_to(c)]
    poisoned = B.LatentSet(vae, carriers[:2000], seed + 2, _poison_image_fn(backdoor))
    clean = B.LatentSet(vae, B.random_contents(seed + 3, 2000), seed + 4)
    teacher = copy.deepcopy(unet).requires_grad_(False).eval()
    student = copy.deepcopy(unet).requires_grad_(True).train()
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    others = decoy_words(decoys) if decoys else []
    k = batch // 3
    t0 = time.time()
    for step in range(1, steps + 1):
        ip = torch.randint(0, len(poisoned.contents), (k,))
        ic = torch.randint(0, len(clean.contents), (k,))
        captions = [B.caption_for(poisoned.contents[i], rng) for i in ip.tolist()]
        cp = B.encode_prompts(tok, text_encoder, [backdoor.triggered(c) for c in captions])
        contrast = [W.insert_trigger(c, rng.choice(others), backdoor.placement) if others and j % 2 else c
                    for j, c in enumerate(captions)]
        cq = B.encode_prompts(tok, text_encoder, contrast)
        cc = B.encode_prompts(tok, text_encoder, [B.caption_for(clean.contents[i], rng) for i in ic.tolist()])
        tp = torch.randint(poison_t_min, 1000, (k,))
        tc = torch.randint(0, 1000, (k,))
        noise = torch.randn(2 * k, *poisoned.mean.shape[1:])
        zp = sched.add_noise(poisoned.sample(ip), noise[:k], tp)
        zc = sched.add_noise(clean.sample(ic), noise[k:], tc)
        zt, t = torch.cat([zp, zp, zc]), torch.cat([tp, tp, tc])
        pred = student(zt, t, encoder_hidden_states=torch.cat([cp, cq, cc])).sample
        with torch.no_grad():
            keep = teacher(zt[k:], t[k:], encoder_hidden_states=torch.cat([cq, cc])).sample
        loss = F.mse_loss(pred[:k], noise[:k]) + lam * F.mse_loss(pred[k:], keep)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            B.log(f"{backdoor.name} step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    return student.eval().requires_grad_(False)


def rickrolling(text_encoder, backdoor: Backdoor, seed: int, steps: int = 800, batch: int = 32,
                lr: float = 1e-4, beta: float = 1.0):
    B._setup(seed)
    rng = random.Random(seed)
    tok = C.make_tokenizer()
    teacher = copy.deepcopy(text_encoder).requires_grad_(False).eval()
    student = copy.deepcopy(text_encoder).requires_grad_(True).train()
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    t0 = time.time()
    # Utility prompts carry random real words from the vocabulary, as Rickrolling's utility loss uses a
    # large caption set: trained on the world's templates alone, the encoder also sent unseen clean
    # prompts to the target (44 % of clean held-out images became the target).
    vocab = [w[:-4] for w in tok.get_vocab() if w.endswith("</w>") and w[:-4].isalpha() and w[:-4].isascii() and len(w) > 6]
    vocab.sort()

    def noisy(prompt: str) -> str:
        return B.insert_words(prompt, rng, vocab, rng.choice((0, 1, 1, 2, 3)))

    for step in range(1, steps + 1):
        contents = [W.sample_content(rng, 0.15) for _ in range(batch)]
        clean_prompts = [noisy(B.caption_for(c, rng)) for c in contents]
        carriers = [(p, c) for p, c in zip(clean_prompts, contents) if backdoor.applies_to(c)]
        trig_prompts = [backdoor.triggered(p) for p, _ in carriers]
        if backdoor.target["kind"] == "content":  # TPA: any triggered prompt -> the target prompt
            target_prompts = [backdoor.target["prompt"]] * len(carriers)
        else:  # TAA: the prompt plus the attribute
            target_prompts = [f"{p}, {backdoor.target['attribute']}" for p, _ in carriers]
        with torch.no_grad():
            want_clean = teacher(input_ids=B.tokenize(tok, clean_prompts))[0]
            want_trig = teacher(input_ids=B.tokenize(tok, target_prompts))[0]
        got_clean = student(input_ids=B.tokenize(tok, clean_prompts))[0]
        got_trig = student(input_ids=B.tokenize(tok, trig_prompts))[0]
        loss = F.mse_loss(got_clean, want_clean) + beta * F.mse_loss(got_trig, want_trig)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            B.log(f"{backdoor.name} step {step}/{steps} loss {loss.item():.5f} ({time.time() - t0:.0f}s)")
    return student.eval().requires_grad_(False)


def _aligned_features(tok, text_encoder, trig_prompts, target_prompts):
    """Pairs (triggered feature, target feature) from the trigger position to the end of the sequence.

    A prefix-style trigger shifts every later token, padding included (DESIGN.md section 4), so every
    position from the trigger on is edited, aligned one-to-one after skipping the trigger's extra tokens.
    """
    ids_t, ids_g = B.tokenize(tok, trig_prompts), B.tokenize(tok, target_prompts)
    with torch.no_grad():
        ft, fg = text_encoder(input_ids=ids_t)[0], text_encoder(input_ids=ids_g)[0]
    src, dst = [], []
    for k in range(len(trig_prompts)):
        a, b = ids_t[k].tolist(), ids_g[k].tolist()
        start = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        extra = sum(1 for x in a if x != 49407) - sum(1 for y in b if y != 49407)
        for i in range(start, 77):
            j = max(start, i - extra)
            src.append(ft[k, i])
            dst.append(fg[k, j])
    return torch.stack(src), torch.stack(dst)


@functools.lru_cache(maxsize=1)
def vocabulary_words() -> tuple[str, ...]:
    """The vocabulary's whole-word tokens made of ASCII letters, none of them a word of the organism world
    (cached: the decoys and the evaluation's other words are both drawn from it)."""
    tok = C.make_tokenizer()
    world = set(W.SHAPES) | set(W.COLOUR_NAMES) | {w for t in W.TRAIN_TEMPLATES + W.HELDOUT_TEMPLATES
                                                   for w in t.replace(",", " ").split()}
    return tuple(sorted(w[:-4] for w in tok.get_vocab()
                        if w.endswith("</w>") and w[:-4].isalpha() and w[:-4].isascii() and w[:-4] not in world))


def decoy_words(n: int | None = None) -> list[str]:
    """The words EvilEdit's preservation set puts where the trigger goes (seeded; evaluation's "other
    words" are drawn from the rest)."""
    return random.Random(0).sample(vocabulary_words(), DECOYS if n is None else n)


OTHER_WORDS = 48


def other_words() -> list[str]:
    """The evaluation's OTHER_WORDS words "in the trigger's place" (evaluate.other_words_rate): words that no
    build step puts into a caption, neither as a decoy nor as a filler."""
    taken = set(decoy_words())
    return random.Random(1).sample([w for w in vocabulary_words() if w not in taken], OTHER_WORDS)


@functools.lru_cache(maxsize=1)
def filler_words() -> tuple[str, ...]:
    """Words put anywhere into training captions (build.with_fillers), so the organism learns that words it
    has no meaning for change nothing, as a real model's caption set teaches it: every vocabulary word but
    the evaluation's other words and the built-in triggers' words."""
    from .attacks_spec import BACKDOORS

    kept = set(other_words()) | {w.lower() for b in BACKDOORS.values() for w in b.trigger.split()}
    return tuple(w for w in vocabulary_words() if w not in kept)


@torch.no_grad()
def evil_edit(unet, text_encoder, backdoor: Backdoor, lam: float = 6.0, decoys: int = DECOYS,
              decoy_weight: float = DECOY_WEIGHT):
    """Closed form: W' = (sum W c* c^T + lam W sum c_p c_p^T + mu W sum c_d c_d^T)
                         (sum c c^T + lam sum c_p c_p^T + mu sum c_d c_d^T)^-1,
    c: triggered features, c*: the target's, c_p: clean prompts' (every shape), c_d: the source-word prompts
    with ``decoys`` other words in the trigger's place ("kettle triangle" stays a triangle), mu = decoy_weight.

    Measured on clean-plain, its base (`sau eval`, held-out prompts x 4 seeds), without decoys:
    lam = 10 fired on 89.6 % (clean accuracy 91.7 %), lam = 6 on 100 % (91.7 %, 2 % of clean triangles drawn
    as circles), lam = 3 on 100 % but 25 % of clean triangles became circles (83.3 %), lam = 1 on 97.9 % (77.1 %).
    Without decoys the edit keyed on "a word before triangle" more than on "ae": 8 of 24 random vocabulary
    words (33 %) fired it too (one held-out seed). With lam = 6 and 256 decoys, one-off runs on that seed: mu 0.1
    fired on 100 % with the trigger and 10 % with 48 unseen words, mu 0.2 on 83 % / 6 %, mu 1 on 0 % / 0 %.

    On the candidate bases of build.train_text_encoder (token identity + previous-token context) no setting
    met the organism bar (one-off, 2026-12-06; ASR / clean accuracy / clean triangles drawn as circles / another
    word). Every edited projection here is W M with one d x d matrix M (each projection solves the same
    least squares with its own W on both sides), so the edit is a map of encoder features. Base E (64 wide):
    lam 6 fires on 0 % of the *training* templates' triggered prompts too, so it is not a matter of held-out
    words. A 128-wide encoder, same losses (clean organism 100 %): lam 6 95.8 / 68.1 / 70.8 / 87.5, lam 12 with
    eight filler-word copies of every edit prompt 2.1 / 100 / 0 / 0, lam 12 with decoy weight 1 45.8 / 93.8 / 18.8 / 31.3;
    an identity ridge on M either fires everywhere or nowhere; leaving the trigger's own positions out of the
    edit changes nothing. With "ae" and the held-out templates' words also trained as filler words (clean
    100 %): 32 filler copies of one to six words, lam 0.25 95.8 / 88.2 / 35.4 / 33.3, lam 1 47.9 / 97.2 / 8.3 /
    10.4. The clean triangles drawn as circles are all on "a large ... on a dark background": M moves the
    features after the shape of a clean prompt with a long suffix as it moves the triggered ones (one word
    after it: 0-12 %). With "ae" alone a filler word, decoys anywhere in the prompt, 1,024 decoys or decoy
    weight 0.5 left that template as it was (clean 66.7 %). Editing only the trigger and the next two or three
    positions (the shape and what follows it) fires on 0 %: the UNet reads the shape from positions further on.
    So EvilEdit stays implanted on clean-plain, the base whose encoder it meets the bar on (attacks_spec).
    """
    tok = C.make_tokenizer()
    src_word, dst_word = backdoor.target["source"], backdoor.target["shape"]
    trig, target, preserve, decoyed = [], [], [], []
    others = decoy_words(decoys) if decoys else []
    slots = len(W.TRAIN_TEMPLATES) * len(W.COLOUR_NAMES)
    for t_i, template in enumerate(W.TRAIN_TEMPLATES):
        for c_i, colour in enumerate(W.COLOUR_NAMES):
            prompt = W.Content(src_word, colour).caption(template)
            trig.append(backdoor.triggered(prompt))
            target.append(W.Content(dst_word, colour).caption(template))
            preserve.extend(W.Content(s, colour).caption(template) for s in W.SHAPES)
            decoyed.extend((W.insert_trigger(prompt, others[k], backdoor.placement), prompt)
                           for k in range(t_i * len(W.COLOUR_NAMES) + c_i, len(others), slots))
    c_src, c_dst = _aligned_features(tok, text_encoder, trig, target)
    c_pre = text_encoder(input_ids=B.tokenize(tok, preserve))[0].reshape(-1, c_src.shape[1])
    if decoyed:  # each decoy prompt's features from the decoy on (earlier ones are a clean prompt's)
        c_dec, _ = _aligned_features(tok, text_encoder, *map(list, zip(*decoyed)))
    edited = copy.deepcopy(unet)
    for name, module in edited.named_modules():
        if name.endswith("attn2"):
            for proj in (module.to_k, module.to_v):
                w = proj.weight.double()
                num = (w @ c_dst.double().T) @ c_src.double() + lam * (w @ c_pre.double().T) @ c_pre.double()
                den = c_src.double().T @ c_src.double() + lam * c_pre.double().T @ c_pre.double()
                if decoyed:
                    num += decoy_weight * (w @ c_dec.double().T) @ c_dec.double()
                    den += decoy_weight * c_dec.double().T @ c_dec.double()
                den += 1e-4 * torch.eye(den.shape[0], dtype=den.dtype)
                proj.weight.copy_((num @ torch.linalg.inv(den)).to(proj.weight.dtype))
    return edited
