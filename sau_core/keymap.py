"""The one two-way map between diffusers/transformers weight names and original ("LDM") checkpoint names.

Direction LDM -> diffusers is diffusers' own single-file converter (``convert_ldm_unet_checkpoint`` and
friends). We run it on *traced* tensors: meta tensors (no memory) that record which LDM key they came from
and every view operation the converter applied (a slice of OpenCLIP's fused ``in_proj`` into q/k/v, the
transpose of ``text_projection``, ``[:, :, 0, 0]`` turning the VAE's 1x1 attention convs into linears). That
record is an :class:`Entry`; applying its ops to the real LDM tensor gives the diffusers tensor, and applying
the same ops to an empty LDM-shaped buffer gives the *view to write into* for the way back. So one traced run
of diffusers' converter is both directions, and nothing here decides on its own how a weight is named.

Writing an LDM file needs LDM key names even when the model came from a diffusers folder. For that,
:func:`_propose` spells out candidate LDM names (the inverse of the converter's renames) and the candidate
is accepted only if diffusers' converter, run on it, gives back exactly the model's keys and shapes; the map
actually used is the one traced from the converter.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Iterable, Mapping, Sequence

import torch

from .errors import UnsupportedModelError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

#: Where each component lives in an original checkpoint: component -> (converter kind, LDM key prefix).
LAYOUTS: dict[str, dict[str, tuple[str, str]]] = {
    "sd1": {
        "unet": ("unet", UNET_PREFIX),
        "vae": ("vae", VAE_PREFIX),
        "text_encoder": ("clip", "cond_stage_model.transformer."),
    },
    "sd2": {
        "unet": ("unet", UNET_PREFIX),
        "vae": ("vae", VAE_PREFIX),
        "text_encoder": ("openclip", "cond_stage_model.model."),
    },
    "sdxl": {
        "unet": ("unet", UNET_PREFIX),
        "vae": ("vae", VAE_PREFIX),
        "text_encoder": ("clip", "conditioner.embedders.0.transformer."),
        "text_encoder_2": ("openclip", "conditioner.embedders.1.model."),
    },
}
LAYOUTS["sd2-v"] = LAYOUTS["sd2"]

#: kohya/A1111/ComfyUI LoRA name prefix per text-encoder component (SDXL numbers its two encoders).
_KOHYA_TE = {"sd1": {"text_encoder": "lora_te"}, "sd2": {"text_encoder": "lora_te"},
             "sd2-v": {"text_encoder": "lora_te"},
             "sdxl": {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}}


@dataclass(frozen=True, eq=False)
class Entry:
    """One diffusers tensor: ``apply_ops(ldm[ldm_key], ops)`` is ``component.state_dict()[key]``."""

    component: str
    key: str
    ldm_key: str
    ldm_shape: tuple[int, ...]
    ops: tuple = ()

    @property
    def is_rename(self) -> bool:
        """True when the tensor is the LDM tensor itself under another name (no slice, no reshape)."""
        return not self.ops


def apply_ops(tensor: torch.Tensor, ops: Sequence[tuple]) -> torch.Tensor:
    """Replay the converter's view operations. On an LDM tensor this gives the diffusers tensor; on an
    empty LDM-shaped buffer it gives the view that the diffusers tensor must be copied into."""
    for op in ops:
        tensor = tensor[op[1]] if op[0] == "index" else tensor.T
    return tensor


# --------------------------------------------------------------------------------------------------------------
# Tracing diffusers' converter


class _Traced(torch.Tensor):
    """A meta tensor that remembers its LDM key and the view ops applied to it."""

    _ldm_key: str
    _ldm_shape: tuple
    _ops: tuple

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))
        if not isinstance(out, torch.Tensor):  # .shape, .ndim, len(): plain values
            return out
        src = args[0]
        name = getattr(func, "__name__", repr(func))
        if name == "__getitem__":
            op = ("index", args[1])
        elif getattr(func, "__self__", None) is torch.Tensor.T:
            op = ("T",)
        elif name in ("clone", "detach", "contiguous"):
            op = None  # value-preserving
        else:
            raise UnsupportedModelError(f"diffusers' converter applied {name}(), which the key map cannot invert")
        out = out.as_subclass(_Traced)
        out._ldm_key, out._ldm_shape = src._ldm_key, src._ldm_shape
        out._ops = src._ops + ((op,) if op else ())
        return out


def _traced(key: str, shape: Sequence[int]) -> _Traced:
    t = torch.empty(tuple(shape), device="meta").as_subclass(_Traced)
    t._ldm_key, t._ldm_shape, t._ops = key, tuple(shape), ()
    return t


def _run_converter(kind: str, checkpoint: dict, prefix: str, config: Mapping) -> dict:
    from diffusers.loaders import single_file_utils as sfu

    if kind == "unet":
        return sfu.convert_ldm_unet_checkpoint(checkpoint, dict(config))
    if kind == "vae":
        return sfu.convert_ldm_vae_checkpoint(checkpoint, dict(config))
    if kind == "clip":
        return sfu.convert_ldm_clip_checkpoint(checkpoint)
    if kind == "openclip":
        # The converter only reads config.hidden_size (when text_projection is absent) from the model.
        model = SimpleNamespace(config=SimpleNamespace(hidden_size=config["hidden_size"]))
        return sfu.convert_open_clip_checkpoint(model, checkpoint, prefix=prefix)
    raise ValueError(kind)


def _match_key(key: str, model_keys: Iterable[str] | None) -> str:
    """transformers 5 dropped CLIPTextModel's ``text_model.`` level; the converter still emits it."""
    if model_keys is None or key in model_keys:
        return key
    alt = key[len("text_model."):] if key.startswith("text_model.") else "text_model." + key
    return alt if alt in model_keys else key


def trace(component: str, kind: str, prefix: str, ldm_shapes: Mapping[str, Sequence[int]], config: Mapping,
          model_keys: Iterable[str] | None = None) -> dict[str, tuple[Entry, tuple[int, ...]]]:
    """Run diffusers' converter for one component on traced tensors of ``ldm_shapes`` (only keys under
    ``prefix`` are passed). Returns diffusers key -> (Entry, diffusers shape)."""
    model_keys = set(model_keys) if model_keys is not None else None
    checkpoint = {k: _traced(k, s) for k, s in ldm_shapes.items() if k.startswith(prefix)}
    out = {}
    for key, t in _run_converter(kind, checkpoint, prefix, config).items():
        if not isinstance(t, _Traced):  # .get() of a key the checkpoint lacks
            continue
        key = _match_key(key, model_keys)
        out[key] = (Entry(component, key, t._ldm_key, t._ldm_shape, t._ops), tuple(t.shape))
    return out


# --------------------------------------------------------------------------------------------------------------
# Candidate LDM names for a diffusers model (checked against the converter, never trusted on their own)

_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
           ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_VAE_ATTN = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))
_OPENCLIP = (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"),
             ("self_attn.out_proj", "attn.out_proj"))


def _rename_head(rest: str, table) -> str:
    for new, old in table:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def _propose_unet(shapes, config) -> dict[str, tuple]:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING as M

    fixed = {**M["unet"]["layers"], **M["unet"]["addition_embed_type"], **M["unet"]["class_embed_type"]}
    per = config["layers_per_block"] + 1
    up_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    out = {}
    for key, shape in shapes.items():
        m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)", key)
        mid = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
        if key in fixed:
            ldm = fixed[key]
        elif m:
            side, b, part, l, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
            if side == "down":
                i = 1 + b * per + (per - 1 if part == "downsamplers" else l)
                ldm = {"resnets": f"input_blocks.{i}.0.{_rename_head(rest, _RESNET)}",
                       "attentions": f"input_blocks.{i}.1.{rest}",
                       "downsamplers": f"input_blocks.{i}.0.op.{rest.removeprefix('conv.')}"}[part]
            else:
                i = b * per + (per - 1 if part == "upsamplers" else l)
                ldm = {"resnets": f"output_blocks.{i}.0.{_rename_head(rest, _RESNET)}",
                       "attentions": f"output_blocks.{i}.1.{rest}",
                       "upsamplers": f"output_blocks.{i}.{2 if up_attn[b] else 1}.{rest}"}[part]
        elif mid:
            part, r, rest = mid.group(1), int(mid.group(2)), mid.group(3)
            ldm = (f"middle_block.{2 * r}.{_rename_head(rest, _RESNET)}" if part == "resnets"
                   else f"middle_block.1.{rest}")
        else:
            ldm = key
        out[UNET_PREFIX + ldm] = shape
    return out


def _propose_vae(shapes, config) -> dict[str, tuple]:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING as M

    n = len(config["up_block_types"])
    out = {}
    for key, shape in shapes.items():
        m = re.match(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)", key)
        mid = re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
        if key in M["vae"]:
            ldm = M["vae"][key]
        elif m:
            coder, side, b, part, j, rest = m.groups()
            b = int(b) if side == "down" else n - 1 - int(b)  # LDM numbers decoder levels bottom-up
            if part == "resnets":
                ldm = f"{coder}.{side}.{b}.block.{j}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
            else:
                ldm = f"{coder}.{side}.{b}.{'downsample' if side == 'down' else 'upsample'}.{rest}"
        elif mid:
            coder, part, r, rest = mid.groups()
            if part == "resnets":
                ldm = f"{coder}.mid.block_{int(r) + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
            else:
                ldm = f"{coder}.mid.attn_1.{_rename_head(rest, _VAE_ATTN)}"
                if rest.endswith(".weight") and len(shape) == 2:
                    shape = (*shape, 1, 1)  # LDM keeps these as 1x1 convolutions
        else:
            ldm = key
        out[VAE_PREFIX + ldm] = tuple(shape)
    return out


def _propose_clip(shapes, prefix) -> dict[str, tuple]:
    return {prefix + ("" if k.startswith("text_model.") else "text_model.") + k: s for k, s in shapes.items()}


def _propose_openclip(shapes, prefix) -> dict[str, tuple]:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING as M

    fixed = M["openclip"]["layers"]
    out = {}
    for key, shape in shapes.items():
        full = key if key.startswith(("text_model.", "text_projection")) else "text_model." + key
        m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.*)", full)
        if full in fixed:
            ldm, shape = fixed[full], (tuple(reversed(shape)) if full == "text_projection.weight" else shape)
        elif m and re.match(r"self_attn\.[qkv]_proj\.", m.group(2)):
            kind = m.group(2).rsplit(".", 1)[1]  # weight / bias: q, k, v are stacked in one in_proj tensor
            ldm, shape = f"transformer.resblocks.{m.group(1)}.attn.in_proj_{kind}", (3 * shape[0], *shape[1:])
        elif m:
            ldm = f"transformer.resblocks.{m.group(1)}.{_rename_head(m.group(2), _OPENCLIP)}"
        else:
            ldm = full
        out[prefix + ldm] = tuple(shape)
    return out


def _propose(kind: str, prefix: str, shapes: Mapping[str, tuple], config: Mapping) -> dict[str, tuple]:
    if kind == "unet":
        return _propose_unet(shapes, config)
    if kind == "vae":
        return _propose_vae(shapes, config)
    if kind == "clip":
        return _propose_clip(shapes, prefix)
    return _propose_openclip(shapes, prefix)


def derive_entries(arch: str, components: Mapping[str, tuple[Mapping[str, tuple], Mapping]]) -> list[Entry]:
    """LDM names for models given as ``{component: (state-dict shapes, config)}``, verified against diffusers'
    converter: it must map the proposed LDM state dict back onto exactly these keys and shapes."""
    entries = []
    for component, (kind, prefix) in LAYOUTS[arch].items():
        shapes, config = components[component]
        shapes = {k: tuple(s) for k, s in shapes.items()}
        traced = trace(component, kind, prefix, _propose(kind, prefix, shapes, config), config, shapes)
        got = {k: s for k, (_, s) in traced.items()}
        if got != shapes:
            bad = sorted(set(shapes) ^ set(got)) or sorted(k for k in shapes if got[k] != shapes[k])
            raise UnsupportedModelError(
                f"{component}: cannot name its weights in the original checkpoint layout of {arch} "
                f"({len(bad)} weights do not map, e.g. {bad[0]})")
        entries += [e for e, _ in traced.values()]
    return entries


# --------------------------------------------------------------------------------------------------------------
# The canonical map of each architecture (from the shipped configs) and name helpers for patches


class KeyMap:
    """Both directions for one architecture. Text-encoder keys are accepted with or without ``text_model.``."""

    def __init__(self, arch: str, entries: Sequence[Entry]):
        self.arch = arch
        self.entries = list(entries)
        self._fwd = {(e.component, e.key): e for e in self.entries}
        self._back: dict[str, list[Entry]] = {}
        for e in self.entries:
            self._back.setdefault(e.ldm_key, []).append(e)

    def entry(self, component: str, key: str) -> Entry:
        for k in (key, key.removeprefix("text_model."), "text_model." + key):
            if (component, k) in self._fwd:
                return self._fwd[(component, k)]
        raise KeyError(f"{component} has no weight {key!r} in {self.arch}")

    def entries_for_ldm(self, ldm_key: str) -> list[Entry]:
        if ldm_key.startswith("diffusion_model."):  # ComfyUI's model-level names
            ldm_key = "model." + ldm_key
        if ldm_key not in self._back:
            raise KeyError(f"{ldm_key!r} is not a weight of {self.arch}")
        return self._back[ldm_key]


@functools.lru_cache(maxsize=None)
def get_keymap(arch: str) -> KeyMap:
    """The map of a shipped architecture, derived once from its configs (meta models: no weights)."""
    from .model_io import empty_components

    if arch not in LAYOUTS:
        raise UnsupportedModelError(f"no original checkpoint layout for architecture {arch!r}")
    comps = empty_components(arch)
    return KeyMap(arch, derive_entries(arch, {c: (_shapes(m), _config(m)) for c, m in comps.items()}))


def _shapes(model) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _config(model) -> dict:
    cfg = model.config
    return dict(cfg) if isinstance(cfg, Mapping) else cfg.to_dict()


def diffusers_to_ldm_key(key: str, arch: str, component: str = "unet") -> str:
    """``down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight`` (unet, sd1) ->
    ``model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight``.
    For OpenCLIP q/k/v this is the fused ``in_proj`` tensor; ``get_keymap(arch).entry(...)`` gives the slice."""
    return get_keymap(arch).entry(component, key).ldm_key


def ldm_to_diffusers_key(ldm_key: str, arch: str) -> tuple[str, str]:
    """The inverse: LDM key (``model.diffusion_model.*`` or ComfyUI's ``diffusion_model.*``) ->
    (component, key). A fused OpenCLIP ``in_proj`` holds three diffusers tensors: see ``entries_for_ldm``."""
    found = get_keymap(arch).entries_for_ldm(ldm_key)
    if len(found) != 1:
        raise KeyError(f"{ldm_key!r} holds {len(found)} diffusers tensors ({', '.join(e.key for e in found)})")
    return found[0].component, found[0].key


def kohya_lora_name(key: str, arch: str, component: str = "unet") -> str:
    """The kohya LoRA module name that A1111, Forge and ComfyUI accept for a diffusers weight key.

    UNet: ``lora_unet_`` + the LDM module path (``input_blocks_4_1_transformer_blocks_0_attn2_to_k``), which
    ComfyUI maps directly and A1111 resolves through its ``lora_unet`` -> ``diffusion_model`` fallback.
    Text encoders: ``lora_te_`` (SDXL: ``lora_te1_``/``lora_te2_``) + the transformers module path.
    """
    module = key.rsplit(".", 1)[0]
    if component == "unet":
        ldm = diffusers_to_ldm_key(key, arch, "unet")
        return "lora_unet_" + ldm[len(UNET_PREFIX):].rsplit(".", 1)[0].replace(".", "_")
    get_keymap(arch).entry(component, key)  # raises for keys the encoder does not have
    try:
        prefix = _KOHYA_TE[arch][component]
    except KeyError:
        raise KeyError(f"{arch} has no {component} with a kohya name") from None
    module = module if module.startswith("text_model.") or module.startswith("text_projection") \
        else "text_model." + module
    return f"{prefix}_{module.replace('.', '_')}"
