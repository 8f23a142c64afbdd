"""ComfyUI objects <-> SAU engine objects (DESIGN.md section 6, "ComfyUI").

This module owns the translation and nothing else: the engine (``sau_core``) does the work, its key map names
the weights. What lives here:

* :func:`organism_objects` builds ComfyUI ``MODEL``/``CLIP``/``VAE`` objects around one of the engine's
  built-in organisms (tiny real SD pipelines that ComfyUI's checkpoint loader cannot recognise). The CLIP is
  ComfyUI's own SD1 CLIP implementation fed the organism's config, tokenizer and weights; the UNet and VAE
  are the organism's diffusers modules wrapped in ComfyUI's ``BaseModel``/``VAE`` (ComfyUI's UNet and VAE
  hard-code 32 normalisation groups; the organism uses 8 and 16).
* :func:`handle_from_comfy` reads the weights a ``ModelPatcher`` + ``CLIP`` currently stand for (their
  patches included) into a fresh :class:`sau_core.model_io.ModelHandle` (a copy: the host's model is never
  edited); :func:`add_patch` applies a patch's LoRA deltas to clones with ``add_patches`` and checks that
  every key landed.
* :class:`GuardedCLIP`: a CLIP whose conditioning has the trigger tokens' rows replaced by the end token's
  row, which is exactly the engine's token-neutralising guard (in every cross-attention layer the trigger
  tokens' keys and values become the end token's: keys/values are linear in those rows).
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from sau_core.errors import SauError

ORGANISM_ATTR = "sau_organism"


# --------------------------------------------------------------------------------------------------------------
# Errors and host plumbing


class UnsupportedComfyModel(SauError):
    """A MODEL or CLIP that SAU cannot read or patch (quantised packs, other architectures)."""


def _mm():
    import comfy.model_management as mm

    return mm


def interrupted() -> None:
    """Raise ComfyUI's interruption exception when the user pressed Cancel."""
    _mm().throw_exception_if_processing_interrupted()


def progress_callback(bar=None) -> Callable[[str, int, int], None]:
    """An engine ``progress(stage, done, total)`` that drives a ``comfy.utils.ProgressBar`` and honours
    interruption (the engine calls it between steps)."""
    import comfy.utils

    state: dict[str, Any] = {"bar": bar, "stage": None}

    def report(stage: str, done: int, total: int) -> None:
        interrupted()
        if state["stage"] != stage or state["bar"] is None:
            state["stage"] = stage
            state["bar"] = comfy.utils.ProgressBar(max(int(total), 1))
        state["bar"].update_absolute(int(done), max(int(total), 1))

    return report


def make_interruptible(handle) -> None:
    """Check ComfyUI's Cancel before every UNet and text-encoder forward of the engine's work on ``handle``
    (the engine reports progress between stages and steps; a localisation pass can take a while on its own).
    The hooks sit on the handle's own modules, which are copies: ComfyUI's models are not touched."""
    from sau_core.interrupt import check_before_forward

    check_before_forward(handle, interrupted)


@dataclass
class Organism:
    name: str
    path: Path


def organism_of(model) -> Organism | None:
    return getattr(getattr(model, "model", None), ORGANISM_ATTR, None)


# --------------------------------------------------------------------------------------------------------------
# Organism -> ComfyUI objects


class OrganismUNet(torch.nn.Module):
    """The organism's diffusers UNet behind the call ComfyUI's ``BaseModel`` makes on ``diffusion_model``.
    Cross-attention patches that ComfyUI passes in ``transformer_options`` do not reach it."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    @property
    def dtype(self):
        return next(self.unet.parameters()).dtype

    def forward(self, x, timesteps=None, context=None, **kwargs):
        return self.unet(x, timesteps, encoder_hidden_states=context).sample


class OrganismVAEModule(torch.nn.Module):
    """The organism's diffusers VAE with the ``encode``/``decode`` that ComfyUI's ``VAE`` calls (images in
    [-1, 1], latents unscaled as ComfyUI keeps them)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def encode(self, x):
        return self.vae.encode(x).latent_dist.mode()

    def decode(self, z, **kwargs):
        return self.vae.decode(z).sample


@functools.lru_cache(maxsize=None)
def _organism_model_config(scale_factor: float):
    import comfy.latent_formats
    import comfy.supported_models_base

    class OrganismLatent(comfy.latent_formats.LatentFormat):
        latent_channels = 4

        def __init__(self):
            self.scale_factor = scale_factor

    class OrganismConfig(comfy.supported_models_base.BASE):
        """SD1-like: epsilon prediction, the SD noise schedule (what the organism was trained with)."""

        unet_config = {"disable_unet_model_creation": True}
        unet_extra_config = {}
        latent_format = OrganismLatent
        supported_inference_dtypes = [torch.float32]
        memory_usage_factor = 1.0

    return OrganismConfig


def _organism_clip(handle, tokenizer_dir: Path):
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base

    te = handle.text_encoder
    cfg = te.config.to_dict()
    width = int(cfg["hidden_size"])
    tokenizer = functools.partial(
        comfy.sd1_clip.SD1Tokenizer,
        tokenizer=functools.partial(comfy.sd1_clip.SDTokenizer, tokenizer_path=str(tokenizer_dir),
                                    embedding_size=width, embedding_key="clip_l"))
    target = comfy.supported_models_base.ClipTarget(tokenizer, comfy.sd1_clip.SD1ClipModel)
    target.params = {"clip_model": comfy.sd1_clip.SDClipModel, "textmodel_json_config": cfg,
                     "return_projected_pooled": False}
    state = {}
    for k, v in te.state_dict().items():
        if k.endswith("position_ids"):
            continue
        k = k if k.startswith("text_model.") else "text_model." + k
        state["clip_l.transformer." + k] = v
    params = sum(v.numel() for v in state.values())
    clip = comfy.sd.CLIP(target, tokenizer_data={}, parameters=params,
                         model_options={"dtype": torch.float32})
    missing, unexpected = clip.load_sd(state, full_model=True)
    missing = [k for k in missing if "text_projection" not in k and "logit_scale" not in k]
    if missing or unexpected:
        raise SauError(f"organism text encoder does not fit ComfyUI's CLIP: missing {missing[:3]}, "
                       f"unexpected {unexpected[:3]}")
    return clip


def _organism_vae(handle):
    import comfy.model_patcher
    import comfy.sd

    mm = _mm()
    # A VAE object whose model we then replace: ComfyUI's own AutoencoderKL cannot hold the organism's VAE.
    vae = comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})
    module = OrganismVAEModule(handle.vae).eval().to(torch.float32)
    ratio = 2 ** (len(handle.vae.config.block_out_channels) - 1)
    vae.first_stage_model = module
    vae.downscale_ratio = vae.upscale_ratio = ratio
    vae.latent_channels = int(handle.vae.config.latent_channels)
    vae.working_dtypes = [torch.float32]
    vae.vae_dtype = torch.float32
    vae.memory_used_encode = lambda shape, dtype: 4000 * shape[2] * shape[3] * 4
    vae.memory_used_decode = lambda shape, dtype: 4000 * shape[2] * shape[3] * ratio * ratio * 4
    vae.size = None
    vae.patcher = comfy.model_patcher.ModelPatcher(module, load_device=vae.device,
                                                   offload_device=mm.vae_offload_device())
    return vae


def organism_objects(name: str):
    """(MODEL, CLIP, VAE) of a built-in organism, as ComfyUI objects."""
    import comfy.model_base
    import comfy.model_patcher

    from sau_core.model_io import load_model
    from sau_core.organism.commands import organism_path

    path = organism_path(name)
    handle = load_model(path, dtype=torch.float32)
    for m in (handle.unet, handle.vae, handle.text_encoder):
        m.eval().requires_grad_(False)
    cfg_cls = _organism_model_config(float(handle.vae.config.scaling_factor))
    model_config = cfg_cls({"disable_unet_model_creation": True})
    model_config.set_inference_dtype(torch.float32, None)
    base = comfy.model_base.BaseModel(model_config, comfy.model_base.ModelType.EPS, device=torch.device("cpu"))
    base.diffusion_model = OrganismUNet(handle.unet)
    setattr(base, ORGANISM_ATTR, Organism(name, Path(path)))
    mm = _mm()
    model = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                             offload_device=mm.unet_offload_device())
    clip = _organism_clip(handle, Path(path) / "tokenizer")
    vae = _organism_vae(handle)
    return model, clip, vae


# --------------------------------------------------------------------------------------------------------------
# ComfyUI objects -> engine handle


def check_model(model) -> None:
    """Refuse, with a message a user can act on, MODEL objects SAU cannot read or patch."""
    import comfy.model_patcher

    if not isinstance(model, comfy.model_patcher.ModelPatcher):
        raise UnsupportedComfyModel(f"MODEL is a {type(model).__name__}, not a ComfyUI ModelPatcher")
    if type(model) is not comfy.model_patcher.ModelPatcher:
        raise UnsupportedComfyModel(
            f"MODEL comes from another node pack ({type(model).__module__}.{type(model).__name__}, for example a "
            "quantised GGUF/NF4 loader); SAU reads and patches full-precision weights: load the checkpoint with "
            "Load Checkpoint instead")
    if organism_of(model) is not None:
        return
    import comfy.ldm.modules.diffusionmodules.openaimodel as oai

    dm = getattr(model.model, "diffusion_model", None)
    if not isinstance(dm, oai.UNetModel):
        raise UnsupportedComfyModel(
            f"{type(model.model).__name__} with a {type(dm).__name__} is not a Stable Diffusion 1.x/2.x UNet; "
            "SAU supports SD1.x and SD2.x checkpoints (and its built-in organisms)")
    for name, p in dm.named_parameters():
        if type(p.data) is not torch.Tensor or p.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise UnsupportedComfyModel(
                f"weight {name} is {type(p.data).__name__} {p.dtype}: a quantised model; SAU needs fp16/bf16/fp32 "
                "weights")


def _patched_state(patcher) -> dict[str, torch.Tensor]:
    """The weights ``patcher`` stands for (its patches applied), copied to CPU float32."""
    _mm().load_models_gpu([patcher], force_patch_weights=True, force_full_load=True)
    return {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in patcher.model.state_dict().items()}


def clip_prefix(clip) -> str:
    """The key prefix of the CLIP-L/H text model inside a ComfyUI CLIP (``clip_l.transformer.``)."""
    keys = [k for k in clip.patcher.model.state_dict() if k.endswith("text_model.embeddings.token_embedding.weight")]
    if len(keys) != 1:
        raise UnsupportedComfyModel(
            f"CLIP holds {len(keys)} CLIP text models; SAU supports SD1.x/SD2.x (one text encoder)")
    return keys[0][: -len("text_model.embeddings.token_embedding.weight")]


def handle_from_comfy(model, clip):
    """A fresh engine handle (float32, on ComfyUI's torch device) holding the weights of ``model`` + ``clip``
    as they are patched now. VAE: not read (scan and clean work in latent space); SD checkpoints get a
    zero-stride placeholder that no engine path used here reads."""
    from sau_core.keymap import get_keymap
    from sau_core.model_io import handle_from_state_dict, load_model

    check_model(model)
    if clip is None or not hasattr(clip, "patcher"):
        raise UnsupportedComfyModel("CLIP input is missing or not a ComfyUI CLIP")
    with torch.inference_mode(False):
        org = organism_of(model)
        te_prefix = clip_prefix(clip)
        clip_sd = _patched_state(clip.patcher)
        if org is not None:
            handle = load_model(org.path, dtype=torch.float32)
            unet_sd = _patched_state(model)
            unet_sd = {k[len("diffusion_model.unet."):]: v for k, v in unet_sd.items()
                       if k.startswith("diffusion_model.unet.")}
            handle.unet.load_state_dict(unet_sd, strict=True)
            te_keys = set(handle.text_encoder.state_dict())
            te_sd = {}
            for k, v in clip_sd.items():
                if not k.startswith(te_prefix):
                    continue
                k = k[len(te_prefix):]
                if k not in te_keys:
                    k = k.removeprefix("text_model.")
                if k in te_keys:
                    te_sd[k] = v
            handle.text_encoder.load_state_dict(te_sd, strict=False)
            missing = te_keys - set(te_sd) - {k for k in te_keys if k.endswith("position_ids")}
            if missing:
                raise SauError(f"CLIP lacks organism text-encoder weights: {sorted(missing)[:3]}")
            handle.source = f"organism:{org.name} (ComfyUI)"
        else:
            unet_sd = _patched_state(model)
            unet_sd = {k: v for k, v in unet_sd.items() if k.startswith("diffusion_model.")}
            sd = model.model.state_dict_for_saving(clip_sd, None)
            sd = {k: v for k, v in sd.items() if not k.startswith("model.diffusion_model.")}
            sd.update({"model." + k: v for k, v in unet_sd.items()})
            from sau_core.model_io import detect_architecture

            arch = detect_architecture({k: v.shape for k, v in sd.items()})
            for e in get_keymap(arch).entries:  # placeholder VAE: no memory, never read here
                if e.component == "vae" and e.ldm_key not in sd:
                    sd[e.ldm_key] = torch.zeros((), dtype=torch.float32).expand(e.ldm_shape)
            handle = handle_from_state_dict(sd, arch, dtype=torch.float32, copy=False)
            handle.source = "ComfyUI MODEL+CLIP"
    dev = _mm().get_torch_device()
    handle.unet.to(dev)
    handle.text_encoder.to(dev)
    return handle


# --------------------------------------------------------------------------------------------------------------
# Engine patch -> ComfyUI patches


@dataclass
class SauPatch:
    """What flows on a SAU_PATCH wire: the patch in the engine's diffusers LoRA format plus its metadata, and
    the kohya LoRA tensors where the architecture has an original naming (for ComfyUI's LoraLoader)."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    arch: str
    trigger: str
    kohya: dict[str, torch.Tensor] | None = None
    report: dict = field(default_factory=dict)


def _delta(a: torch.Tensor, b: torch.Tensor, shape) -> torch.Tensor:
    d = b.flatten(1).float() @ a.flatten(1).float()
    if tuple(d.shape) != tuple(shape):
        if d.numel() != torch.Size(shape).numel():
            raise SauError(f"LoRA delta {tuple(d.shape)} does not fit a weight of shape {tuple(shape)}")
        d = d.reshape(shape)
    return d


def comfy_keys(model, clip, arch: str, tensors: dict[str, torch.Tensor]):
    """{component: {host key: delta}} for a patch in the engine's format."""
    import re

    from sau_core.keymap import get_keymap

    pat = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+)\.lora_A\.weight$")
    org = organism_of(model)
    unet_shapes = {k: tuple(v.shape) for k, v in model.model.state_dict().items()}
    te_prefix = clip_prefix(clip)
    te_shapes = {k: tuple(v.shape) for k, v in clip.patcher.model.state_dict().items()}
    out: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "text_encoder": {}}
    for key, a in tensors.items():
        m = pat.match(key)
        if not m:
            continue
        component, module = m.group(1), m.group(2)
        b = tensors[f"{component}.{module}.lora_B.weight"]
        if component == "unet":
            if org is not None:
                host = f"diffusion_model.unet.{module}.weight"
            else:
                host = get_keymap(arch).entry("unet", f"{module}.weight").ldm_key.removeprefix("model.")
            shapes = unet_shapes
        elif component == "text_encoder":
            mod = module if module.startswith("text_model.") else "text_model." + module
            host = f"{te_prefix}{mod}.weight"
            shapes = te_shapes
        else:
            raise UnsupportedComfyModel("patches for a second text encoder (SDXL) are not supported")
        if host not in shapes:
            raise SauError(f"the patch adapts {component}.{module}, which this model does not have ({host})")
        out[component][host] = _delta(a, b, shapes[host])
    return out


def add_patch(model, clip, patch: SauPatch, strength: float = 1.0):
    """Clones of ``model`` and ``clip`` with the patch added through ``add_patches`` (originals untouched)."""
    check_model(model)
    deltas = comfy_keys(model, clip, patch.arch, patch.tensors)
    m = model.clone()
    c = clip.clone()
    for component, target in (("unet", m), ("text_encoder", c)):
        want = deltas[component]
        if not want:
            continue
        dtype = torch.float32
        added = target.add_patches({k: (v.to(dtype),) for k, v in want.items()}, strength)
        lost = set(want) - set(added)
        if lost:
            raise SauError(f"ComfyUI refused {len(lost)} of {len(want)} {component} patch keys (e.g. "
                           f"{sorted(lost)[0]}); the model does not match the patch")
    return m, c


def model_arch(model) -> str:
    """"organism" or the SD architecture ComfyUI's MODEL holds (from its UNet's cross-attention width)."""
    check_model(model)
    if organism_of(model) is not None:
        return "organism"
    ctx = model.model.diffusion_model.state_dict()
    widths = {tuple(v.shape)[1] for k, v in ctx.items() if k.endswith("attn2.to_k.weight")}
    return {frozenset({768}): "sd1", frozenset({1024}): "sd2"}.get(frozenset(widths), f"context {sorted(widths)}")


# --------------------------------------------------------------------------------------------------------------
# Guard


def _hf_tokenizer(clip):
    tok = getattr(clip.tokenizer, "clip_l", None) or getattr(clip.tokenizer, "clip_h", None)
    if tok is None:
        raise UnsupportedComfyModel("CLIP tokenizer is not an SD1/SD2 CLIP tokenizer")
    return tok


def _find(seq: list[int], sub: list[int]) -> list[int]:
    hits = []
    for i in range(len(seq) - len(sub) + 1):
        if seq[i: i + len(sub)] == sub:
            hits.extend(range(i, i + len(sub)))
    return hits


def _flat_ids(tokens, key: str) -> tuple[list[int], int]:
    chunks = tokens[key]
    ids = [int(t[0]) if not torch.is_tensor(t[0]) else -1 for chunk in chunks for t in chunk]
    return ids, (len(chunks[0]) if chunks else 0)


def trigger_positions(with_ids: list[int], without_ids: list[int], trigger_ids: list[int]) -> list[int]:
    """Positions of the trigger's tokens in a tokenized prompt: where its own ids occur, else (a trigger
    inside a word, such as a homoglyph) where the prompt's tokens differ from the prompt with it deleted."""
    import difflib

    found = _find(with_ids, trigger_ids) if trigger_ids else []
    if not found:
        sm = difflib.SequenceMatcher(a=with_ids, b=without_ids, autojunk=False)
        for tag, a0, a1, _b0, _b1 in sm.get_opcodes():
            if tag in ("replace", "delete"):
                found.extend(range(a0, a1))
    return found


def neutralise_rows(cond: torch.Tensor, ids: list[int], chunk: int, positions: list[int], end_id: int) -> torch.Tensor:
    """``cond`` (B, chunk*k, D) with the rows at ``positions`` replaced by their chunk's first end-token row."""
    cond = cond.clone()
    for p in positions:
        c0 = (p // chunk) * chunk
        row = ids[c0: c0 + chunk]
        if end_id not in row:
            continue
        cond[:, p] = cond[:, c0 + row.index(end_id)]
    return cond


def make_guarded_clip(clip, trigger_text: str):
    """A clone of ``clip`` that neutralises ``trigger_text`` (see the module doc). Clones of it stay guarded.
    ``tokenize`` records, for a prompt holding the trigger, which token positions are the trigger's;
    ``encode_from_tokens`` replaces those rows of the conditioning. Positions are found as the engine's
    ``Trigger.positions`` finds them: the trigger's own token ids, else the tokens that differ from the
    prompt with the trigger deleted."""
    import comfy.sd

    from sau_core.trigger import Trigger

    trig = Trigger(trigger_text)

    class GuardedCLIP(comfy.sd.CLIP):
        def clone(self):
            n = super().clone()
            n.__class__ = type(self)
            n.sau_trigger, n.sau_positions = self.sau_trigger, self.sau_positions
            return n

        def _key(self, tokens):
            return next((k for k in ("l", "h") if k in tokens), None)

        def tokenize(self, text, return_word_ids=False, **kwargs):
            tokens = super().tokenize(text, return_word_ids, **kwargs)
            key = self._key(tokens)
            if key is not None and self.sau_trigger.text in text:
                without = super().tokenize(text.replace(self.sau_trigger.text, ""), return_word_ids, **kwargs)
                ids, _ = _flat_ids(tokens, key)
                tk = _hf_tokenizer(self)
                own = tk.tokenizer(self.sau_trigger.text)["input_ids"][1:-1]
                self.sau_positions[tuple(ids)] = trigger_positions(ids, _flat_ids(without, key)[0], own)
            return tokens

        def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
            out = super().encode_from_tokens(tokens, return_pooled=return_pooled, return_dict=return_dict)
            key = self._key(tokens)
            if key is None:
                return out
            ids, chunk = _flat_ids(tokens, key)
            pos = self.sau_positions.get(tuple(ids))
            if pos is None:  # tokens made elsewhere: the trigger's own ids
                tk = _hf_tokenizer(self)
                pos = _find(ids, tk.tokenizer(self.sau_trigger.text)["input_ids"][1:-1])
            if not pos:
                return out
            tk = _hf_tokenizer(self)
            end_id = tk.end_token if tk.end_token is not None else tk.tokenizer.eos_token_id
            if return_dict:
                out = dict(out)
                out["cond"] = neutralise_rows(out["cond"], ids, chunk, pos, end_id)
                return out
            if return_pooled:
                return (neutralise_rows(out[0], ids, chunk, pos, end_id),) + tuple(out[1:])
            return neutralise_rows(out, ids, chunk, pos, end_id)

    g = clip.clone()
    g.__class__ = GuardedCLIP
    g.sau_trigger, g.sau_positions = trig, {}
    return g


def json_report(obj) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False, default=str)
