"""Model handle: one text-to-image model as diffusers/transformers objects, from any format people use.

Reads a diffusers folder, a single-file checkpoint in the original (LDM) naming (SD1.x, SD2.x, SDXL) or an
LDM-named state dict handed over by a host (A1111, ComfyUI); writes a single-file checkpoint in the original
naming and a diffusers folder. Every file goes through :mod:`sau_core.safety` first; components are built from
configs (shipped in ``sau_core/configs`` for single files, the folder's own for folders) on the meta device
and filled with ``load_state_dict(strict=True, assign=True)``, so nothing is initialised twice, nothing is
fetched and no remote code runs. Key names between the two layouts come from :mod:`sau_core.keymap`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from .errors import SauError, UnsupportedModelError
from .keymap import LAYOUTS, Entry, apply_ops, get_keymap, trace
from .safety import load_safetensors, refuse_if_pickle, validate_safetensors

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "clip_tokenizer"

#: Architectures with an original single-file layout and shipped configs.
LDM_ARCHES = ("sd1", "sd2", "sd2-v", "sdxl")
#: What ``modelspec.architecture`` (Stability's model-spec metadata) calls them.
MODELSPEC = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sd2-v": "stable-diffusion-v2-768-v",
             "sdxl": "stable-diffusion-xl-v1-base"}
MODEL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
#: A model of no shipped architecture (the organisms) written as one file: the SD1 key naming, traced from
#: diffusers' own converters run with the model's configs, which travel as JSON in this metadata entry.
ORGANISM_CONFIGS = "sau.organism_configs"
_ORGANISM_LAYOUT = "sd1"
_ORGANISM_PARTS = ("unet", "vae", "text_encoder")
_MODEL_CLASSES = {"UNet2DConditionModel": "diffusers", "AutoencoderKL": "diffusers",
                  "CLIPTextModel": "transformers", "CLIPTextModelWithProjection": "transformers"}
_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
_CONTEXT_DIM = {"sd1": 768, "sd2": 1024, "sdxl": 2048}
# LDM keys that hold no component weight but are normal in checkpoints (kept as extras, not "unknown").
_KNOWN_EXTRAS = re.compile(
    r"^(model_ema\.|alphas_cumprod|alphas_cumprod_prev|betas|log_one_minus_alphas_cumprod|logvar|lvlb_weights|"
    r"posterior_|sqrt_|cond_stage_model\.model\.(transformer\.resblocks\.23\.|"
    r"text_projection|logit_scale)|conditioner\.embedders\.1\.model\.logit_scale|"
    r".*\.position_ids$)")


@dataclass
class ModelHandle:
    """The components of one text-to-image model plus where they came from.

    ``arch``: "sd1", "sd2" (512 epsilon), "sd2-v" (768 v-prediction), "sdxl", or "organism" (any other
    diffusers-layout SD pipeline, such as the project's tiny organisms). ``source_format``: "diffusers",
    "single-file", "state-dict" or "random". ``extras``: LDM-named tensors that no component holds (EMA copies,
    noise-schedule buffers, SD2's unused last text layer); ``save_single_file`` writes them back unchanged.
    """

    unet: Any
    text_encoder: Any
    tokenizer: Any
    vae: Any
    scheduler: Any
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    arch: str = "sd1"
    source: str = ""
    source_format: str = "diffusers"
    metadata: dict[str, str] = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    #: The LDM map this handle was read with (keeps a file's exact layout on write-back); None: canonical map.
    ldm_entries: list[Entry] | None = field(default=None, repr=False)

    def __repr__(self) -> str:  # the default would print every module
        return f"ModelHandle(arch={self.arch!r}, source_format={self.source_format!r}, source={self.source!r})"

    @property
    def is_xl(self) -> bool:
        return self.text_encoder_2 is not None

    def models(self) -> dict[str, torch.nn.Module]:
        """The weight-carrying components, by diffusers folder name."""
        return {c: getattr(self, c) for c in MODEL_COMPONENTS if getattr(self, c) is not None}

    def to_pipeline(self):
        """A diffusers pipeline sharing this handle's modules (no copies, no safety checker)."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        if self.is_xl:
            return StableDiffusionXLPipeline(
                vae=self.vae, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2,
                tokenizer=self.tokenizer, tokenizer_2=self.tokenizer_2, unet=self.unet, scheduler=self.scheduler,
                force_zeros_for_empty_prompt=True)
        return StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            scheduler=self.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


# --------------------------------------------------------------------------------------------------------------
# Building components from configs


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise SauError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SauError(f"{path} is not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise SauError(f"{path} is not a JSON object")
    return data


def _empty_model(cls_name: str, config: dict) -> torch.nn.Module:
    """Build a component with its parameters on the meta device (no memory, no init); buffers are real."""
    from accelerate import init_empty_weights

    if cls_name not in _MODEL_CLASSES:
        raise UnsupportedModelError(f"component class {cls_name!r} is not supported "
                                    f"(supported: {', '.join(_MODEL_CLASSES)})")
    try:
        with init_empty_weights():
            if _MODEL_CLASSES[cls_name] == "diffusers":
                import diffusers

                return getattr(diffusers, cls_name).from_config(config)
            import transformers

            cfg = transformers.CLIPTextConfig.from_dict({k: v for k, v in config.items() if k != "auto_map"})
            return getattr(transformers, cls_name)(cfg)
    except Exception as exc:  # the config is untrusted input: any failure means "not a model we can build"
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UnsupportedModelError(f"cannot build {cls_name} from its config: {first}") from None


def _arch_config(arch: str, component: str) -> dict:
    name = "scheduler/scheduler_config.json" if component == "scheduler" else f"{component}/config.json"
    return _read_json(CONFIG_DIR / arch / name)


def _arch_index(arch: str) -> dict:
    return _read_json(CONFIG_DIR / arch / "model_index.json")


def empty_components(arch: str) -> dict[str, torch.nn.Module]:
    """The weight-carrying components of a shipped architecture, with parameters on the meta device."""
    if arch not in LDM_ARCHES:
        raise UnsupportedModelError(f"unknown architecture {arch!r} (known: {', '.join(LDM_ARCHES)})")
    index = _arch_index(arch)
    return {c: _empty_model(index[c][1], _arch_config(arch, c)) for c in MODEL_COMPONENTS if c in index}


def _tokenizer(folder: Path | None, pad_token: str | None):
    # transformers 5's CLIPTokenizer is the tokenizers-backed one; on 4.x (the line A1111 and Forge pin) the
    # slow CLIPTokenizer strips format characters such as U+200B, so a zero-width trigger would vanish.
    # CLIPTokenizerFast tokenizes as 5.x does on both lines.
    from transformers import CLIPTokenizerFast as CLIPTokenizer

    if folder is not None and ((folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()):
        return CLIPTokenizer.from_pretrained(str(folder))
    kwargs = {"pad_token": pad_token} if pad_token else {}
    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), **kwargs)


def _scheduler(cls_name: str, config: dict):
    import diffusers

    cls = getattr(diffusers, str(cls_name), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise UnsupportedModelError(f"scheduler class {cls_name!r} is not a diffusers scheduler")
    return cls.from_config(config)


def _arch_tokenizers_and_scheduler(arch: str) -> dict[str, Any]:
    index = _arch_index(arch)
    out = {"scheduler": _scheduler(index["scheduler"][1], _arch_config(arch, "scheduler"))}
    for name in ("tokenizer", "tokenizer_2"):
        if name in index:
            cfg = _read_json(CONFIG_DIR / arch / name / "tokenizer_config.json")
            out[name] = _tokenizer(None, cfg.get("pad_token"))
    return out


def _fill(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Strict load; the tensors become the parameters (no copy)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {keys[0]})")
        raise UnsupportedModelError(f"{what}: weights do not fit the architecture: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:  # pragma: no cover - strict loading above makes this impossible
        raise UnsupportedModelError(f"{what}: {still_meta[0]} was not loaded")


def _cast(t: torch.Tensor, dtype: torch.dtype | None, copy: bool = False) -> torch.Tensor:
    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
        return t.to(dtype).contiguous()
    t = t.contiguous()
    return t.clone() if copy else t


# --------------------------------------------------------------------------------------------------------------
# Original (LDM) naming: detection, planning, loading


def detect_architecture(shapes: Mapping[str, Iterable[int]], metadata: Mapping[str, str] | None = None) -> str:
    """The architecture of an LDM-named checkpoint from its key names and shapes (and metadata for SD2's
    prediction type: SD2.x files hold no trace of it in their weights; without a hint it is "sd2-v", the
    768-v models most SD2.x checkpoints are)."""
    metadata = metadata or {}
    unet = {k: tuple(s) for k, s in shapes.items() if k.startswith("model.diffusion_model.")}
    if not unet:
        raise UnsupportedModelError(
            "no Stable Diffusion UNet found: a single-file checkpoint has weights named model.diffusion_model.* "
            "(this looks like a LoRA, an embedding or a single component)")
    conv_in = unet.get("model.diffusion_model.input_blocks.0.0.weight")
    if conv_in is not None and len(conv_in) == 4 and conv_in[1] != 4:
        raise UnsupportedModelError(
            f"the UNet takes {conv_in[1]} input channels (an inpainting or instruct-pix2pix model); only "
            "text-to-image models with 4 latent channels are supported")
    if "conditioner.embedders.0.model.text_projection" in shapes:
        raise UnsupportedModelError("this is an SDXL refiner (one OpenCLIP-G text encoder); only SDXL base is "
                                    "supported")
    if ("conditioner.embedders.1.model.positional_embedding" in shapes
            and "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight" in shapes):
        family = "sdxl"
    elif "cond_stage_model.model.token_embedding.weight" in shapes:
        family = "sd2"
    elif "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in shapes:
        family = "sd1"
    else:
        raise UnsupportedModelError(
            "text encoder not recognised: expected cond_stage_model.transformer.text_model.* (SD1), "
            "cond_stage_model.model.* (SD2) or conditioner.embedders.0/1 (SDXL)")
    context = {s[1] for k, s in unet.items() if k.endswith("attn2.to_k.weight") and len(s) == 2}
    if context != {_CONTEXT_DIM[family]}:
        raise UnsupportedModelError(
            f"the UNet's cross-attention takes {sorted(context)}-dimensional text features, not the "
            f"{_CONTEXT_DIM[family]} of {family}; the checkpoint mixes architectures or is not supported")
    if family != "sd2":
        return family
    spec = (metadata.get("modelspec.architecture", "") + " " + metadata.get("modelspec.prediction_type", "")).lower()
    return "sd2" if ("512" in spec or "epsilon" in spec) and "768" not in spec else "sd2-v"


@dataclass
class LdmPlan:
    """How an LDM key set becomes a handle, computed from names and shapes only (no tensors read)."""

    arch: str
    models: dict[str, torch.nn.Module]  # meta
    entries: dict[str, list[Entry]]  # per component, the entries the model needs
    extras: list[str]  # LDM keys that no component needs
    problems: list[str]  # missing or misshapen weights


def plan_ldm(shapes: Mapping[str, Iterable[int]], arch: str, models: dict | None = None) -> LdmPlan:
    """``models``: meta components to fill (an organism file's, built from its embedded configs); default:
    the shipped architecture's."""
    shapes = {k: tuple(s) for k, s in shapes.items()}
    models = empty_components(arch) if models is None else models
    entries: dict[str, list[Entry]] = {}
    problems, consumed = [], set()
    for component, (kind, prefix) in LAYOUTS[arch if arch in LAYOUTS else _ORGANISM_LAYOUT].items():
        model = models[component]
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        cfg = dict(model.config) if isinstance(model.config, Mapping) else model.config.to_dict()
        traced = trace(component, kind, prefix, shapes, cfg, expected)
        missing = [k for k in expected if k not in traced]
        wrong = [k for k in expected if k in traced and traced[k][1] != expected[k]]
        if missing:
            problems.append(f"{component}: the checkpoint lacks {len(missing)} of its {len(expected)} weights "
                            f"(e.g. {missing[0]})")
        if wrong:
            problems.append(f"{component}: {len(wrong)} weights have the wrong shape for {arch} (e.g. "
                            f"{traced[wrong[0]][0].ldm_key}: {list(traced[wrong[0]][1])}, expected "
                            f"{list(expected[wrong[0]])})")
        entries[component] = [traced[k][0] for k in expected if k in traced]
        consumed.update(e.ldm_key for e in entries[component])
    return LdmPlan(arch, models, entries, [k for k in shapes if k not in consumed], problems)


def _handle_from_ldm(sd: Mapping[str, torch.Tensor], arch: str, dtype, *, source: str, source_format: str,
                     metadata: Mapping[str, str] | None = None, copy: bool = False,
                     organism: tuple[dict, dict] | None = None) -> ModelHandle:
    """``organism``: (meta components, tokenizer + scheduler) of an organism file (see :func:`_organism_parts`)."""
    plan = plan_ldm({k: v.shape for k, v in sd.items()}, arch, organism[0] if organism else None)
    if plan.problems:
        raise UnsupportedModelError(f"not a complete {arch} checkpoint: " + "; ".join(plan.problems))
    for component, model in plan.models.items():
        state = {e.key: _cast(apply_ops(sd[e.ldm_key], e.ops), dtype, copy) for e in plan.entries[component]}
        _fill(model, state, component)
    return ModelHandle(
        **plan.models, **(organism[1] if organism else _arch_tokenizers_and_scheduler(arch)), arch=arch, source=source,
        source_format=source_format, metadata=dict(metadata or {}),
        extras={k: (sd[k].clone() if copy else sd[k]) for k in plan.extras},
        ldm_entries=[e for es in plan.entries.values() for e in es])


def handle_from_state_dict(sd: Mapping[str, torch.Tensor], arch: str | None = None,
                           dtype: torch.dtype | None = None, *, copy: bool = True,
                           metadata: Mapping[str, str] | None = None) -> ModelHandle:
    """A handle from an LDM-named state dict handed over by a host (A1111 ``sd_model.state_dict()``,
    ComfyUI ``model.model.state_dict_for_saving(...)``; ComfyUI's bare ``diffusion_model.*`` is accepted).
    ``copy``: clone the tensors so that editing the handle never edits the host's model in place."""
    fixed = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise SauError(f"state dict entry {k!r} is a {type(v).__name__}, not a tensor")
        fixed["model." + k if k.startswith("diffusion_model.") else k] = v
    arch = arch or detect_architecture({k: v.shape for k, v in fixed.items()}, metadata)
    return _handle_from_ldm(fixed, arch, dtype, source="<state dict>", source_format="state-dict",
                            metadata=metadata, copy=copy)


# --------------------------------------------------------------------------------------------------------------
# Diffusers folders


def _weight_files(folder: Path, base: str) -> list[Path]:
    """The safetensors files of one component folder; a folder with only pickled weights is refused."""
    for name in (f"{base}.safetensors", f"{base}.fp16.safetensors"):
        if (folder / name).is_file():
            return [folder / name]
    for name in (f"{base}.safetensors.index.json", f"{base}.fp16.safetensors.index.json"):
        if (folder / name).is_file():
            weight_map = _read_json(folder / name).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise SauError(f"{folder / name} has no weight_map")
            files = sorted(set(weight_map.values()))
            for f in files:
                if not isinstance(f, str) or Path(f).name != f or f in (".", ".."):
                    raise SauError(f"{folder / name} points outside its folder ({f!r})")
            return [folder / f for f in files]
    found = sorted(folder.glob("*.safetensors"))
    if len(found) == 1:
        return found
    for pattern in ("*.bin", "*.ckpt", "*.pt", "*.pth", "*.pkl"):
        for path in sorted(folder.glob(pattern)):
            refuse_if_pickle(path)  # raises with the explanation of why pickles are never loaded
            raise SauError(f"{path} is not a .safetensors file; SAU only reads weights from .safetensors files")
    if found:
        raise SauError(f"{folder} has several .safetensors files and no index: {', '.join(p.name for p in found)}")
    raise SauError(f"{folder} has no weights ({base}.safetensors)")


def _match_model_keys(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """transformers 4.x names CLIPTextModel weights text_model.*, 5.x without: accept both."""
    expected = set(model.state_dict())
    out = {}
    for k, v in state.items():
        if k not in expected:
            alt = k[len("text_model."):] if k.startswith("text_model.") else "text_model." + k
            k = alt if alt in expected else k
        out[k] = v
    return out


def _unet_signature(cfg: Mapping) -> str:
    keys = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "cross_attention_dim",
            "transformer_layers_per_block", "down_block_types", "up_block_types", "addition_embed_type",
            "use_linear_projection", "attention_head_dim")
    defaults = {"transformer_layers_per_block": 1, "addition_embed_type": None, "use_linear_projection": False}
    return json.dumps({k: cfg.get(k, defaults.get(k)) for k in keys}, sort_keys=True, default=list)


def _arch_from_configs(unet_cfg: Mapping, scheduler_cfg: Mapping) -> str:
    sig = _unet_signature(unet_cfg)
    for arch in LDM_ARCHES:
        if _unet_signature(_arch_config(arch, "unet")) == sig:
            if arch.startswith("sd2"):
                return "sd2-v" if scheduler_cfg.get("prediction_type") == "v_prediction" else "sd2"
            return arch
    return "organism"


def _read_index(folder: Path) -> dict:
    """model_index.json, checked: a supported pipeline, and [library, class] pairs for the components."""
    index = _read_json(folder / "model_index.json")
    if index.get("_class_name") not in _PIPELINES:
        raise UnsupportedModelError(f"{folder} holds a {index.get('_class_name')!r}; supported pipelines are "
                                    f"{', '.join(_PIPELINES)}")
    for name in (*MODEL_COMPONENTS, "scheduler", "tokenizer", "tokenizer_2"):
        spec = index.get(name)
        if spec is not None and not (isinstance(spec, list) and len(spec) == 2):
            raise SauError(f"{folder / 'model_index.json'}: entry {name!r} is not a [library, class] pair")
    return index


def _component_specs(index: dict) -> dict[str, str]:
    """component -> class name, for the weight-carrying components the index lists."""
    return {c: index[c][1] for c in MODEL_COMPONENTS if index.get(c) and index[c][1] is not None}


def _load_diffusers(folder: Path, dtype) -> ModelHandle:
    index = _read_index(folder)
    parts: dict[str, Any] = {}
    for component, cls_name in _component_specs(index).items():
        sub = folder / component
        model = _empty_model(cls_name, _read_json(sub / "config.json"))
        base = "model" if _MODEL_CLASSES[cls_name] == "transformers" else "diffusion_pytorch_model"
        state: dict[str, torch.Tensor] = {}
        for path in _weight_files(sub, base):
            state.update(load_safetensors(path))
        state = {k: _cast(v, dtype) for k, v in _match_model_keys(state, model).items()}
        _fill(model, state, f"{folder.name}/{component}")
        parts[component] = model
    needs = ("unet", "vae", "text_encoder") + (("text_encoder_2",) if index["_class_name"] == _PIPELINES[1] else ())
    for needed in needs:  # an SDXL refiner folder has no text_encoder: not supported
        if needed not in parts:
            raise UnsupportedModelError(f"{folder} has no {needed}")
    sched_cfg = _read_json(folder / "scheduler" / "scheduler_config.json")
    parts["scheduler"] = _scheduler((index.get("scheduler") or [None, sched_cfg.get("_class_name")])[1], sched_cfg)
    arch = _arch_from_configs(dict(parts["unet"].config), sched_cfg)
    for name in ("tokenizer", "tokenizer_2"):
        if index.get(name) and index[name][1] is not None:
            pad = "!" if name == "tokenizer_2" or arch.startswith("sd2") else None
            parts[name] = _tokenizer(folder / name if (folder / name).is_dir() else None, pad)
    if "text_encoder_2" in parts and arch not in ("sdxl", "organism"):
        raise UnsupportedModelError(f"{folder} has a second text encoder but a {arch} UNet")
    return ModelHandle(**parts, arch=arch, source=str(folder), source_format="diffusers")


# --------------------------------------------------------------------------------------------------------------
# Entry point


def load_model(path: str | os.PathLike, dtype: torch.dtype | None = torch.float32, *,
               arch: str | None = None) -> ModelHandle:
    """Load a diffusers folder or a single-file ``.safetensors`` checkpoint (original naming).

    ``dtype``: cast floating weights (None keeps what the file holds). ``arch``: override detection of a
    single file (e.g. "sd2" for an SD2.x 512-base epsilon model, whose weights look like 768-v ones)."""
    p = Path(path)
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise SauError(f"{p} is a folder without model_index.json; not a diffusers pipeline folder")
        return _load_diffusers(p, dtype)
    info = validate_safetensors(p, check_values=False)  # refuses pickles, missing files, corrupt headers
    if arch is None and ORGANISM_CONFIGS in info.metadata:
        return _handle_from_ldm(load_safetensors(p), "organism", dtype, source=str(p), source_format="single-file",
                                metadata=info.metadata, organism=_organism_parts(info.metadata[ORGANISM_CONFIGS]))
    if arch is not None and arch not in LDM_ARCHES:
        raise UnsupportedModelError(f"unknown architecture {arch!r} (known: {', '.join(LDM_ARCHES)})")
    arch = arch or detect_architecture({k: e.shape for k, e in info.tensors.items()}, info.metadata)
    sd = load_safetensors(p)
    return _handle_from_ldm(sd, arch, dtype, source=str(p), source_format="single-file", metadata=info.metadata)


# --------------------------------------------------------------------------------------------------------------
# Writing

_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a text file under a temporary name and rename it into place (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write a .safetensors file one tensor at a time (no second in-memory copy of a multi-GB model),
    atomically: a partial file never appears under ``path``."""
    path = Path(path)
    meta = dict(metadata or {})
    for k, v in meta.items():
        if not (isinstance(k, str) and isinstance(v, str)):
            raise SauError(f"metadata entry {k!r} must map a string to a string")
    names = sorted(tensors)
    header: dict[str, Any] = {"__metadata__": meta} if meta else {}
    offset = 0
    for name in names:
        t = tensors[name]
        if t.dtype not in _ST_DTYPES:
            raise SauError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes with spaces
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(len(raw).to_bytes(8, "little"))
            fh.write(raw)
            for name in names:
                t = tensors[name].detach().to("cpu").contiguous()
                if t.numel():
                    fh.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def has_single_file_layout(arch: str) -> bool:
    """Shipped architectures and organisms (SD1 naming plus embedded configs) can be written as one file."""
    return arch in LDM_ARCHES or arch == "organism"


def _organism_entries(handle: ModelHandle) -> list[Entry]:
    from .keymap import derive_entries

    models = handle.models()
    if set(models) != set(_ORGANISM_PARTS):
        raise UnsupportedModelError(f"a single-file organism holds {', '.join(_ORGANISM_PARTS)}, not "
                                    f"{', '.join(sorted(models))}")
    return derive_entries(_ORGANISM_LAYOUT, {c: ({k: tuple(v.shape) for k, v in m.state_dict().items()},
                                                 _plain_config(m)) for c, m in models.items()})


def _plain_config(model) -> dict:
    cfg = model.config
    cfg = dict(cfg) if isinstance(cfg, Mapping) else cfg.to_dict()
    return {k: v for k, v in cfg.items() if k != "_name_or_path"}  # no local paths in a written file


def _organism_configs(handle: ModelHandle) -> str:
    """The JSON that :func:`_organism_parts` rebuilds the components from (classes, configs, scheduler)."""
    shipped = _tokenizer(None, None)
    if handle.tokenizer.get_vocab() != shipped.get_vocab():
        raise UnsupportedModelError("a single-file organism uses the shipped CLIP vocabulary; this tokenizer differs")
    doc = {"format": 1,
           "components": {c: [type(m).__name__, _plain_config(m)] for c, m in handle.models().items()},
           "scheduler": [type(handle.scheduler).__name__, dict(handle.scheduler.config)],
           "tokenizer": {"pad_token": str(handle.tokenizer.pad_token)}}
    return json.dumps(doc, sort_keys=True, default=list)


def _organism_parts(text: str) -> tuple[dict, dict]:
    """Meta components and tokenizer + scheduler from an organism file's embedded configs. Untrusted input:
    only the supported component classes and diffusers schedulers are built, from plain config values."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UnsupportedModelError(f"{ORGANISM_CONFIGS} is not valid JSON ({exc})") from None
    comps = doc.get("components") if isinstance(doc, dict) else None
    sched, tok = (doc.get("scheduler"), doc.get("tokenizer")) if isinstance(doc, dict) else (None, None)
    if (doc.get("format") if isinstance(doc, dict) else None) != 1 or not isinstance(comps, dict) \
            or set(comps) != set(_ORGANISM_PARTS) or not isinstance(tok, dict):
        raise UnsupportedModelError(f"{ORGANISM_CONFIGS} must hold format 1, {', '.join(_ORGANISM_PARTS)}, a "
                                    "scheduler and a tokenizer entry")
    for name, spec in [*comps.items(), ("scheduler", sched)]:
        if not (isinstance(spec, list) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], dict)):
            raise UnsupportedModelError(f"{ORGANISM_CONFIGS}: {name} is not a [class, config] pair")
    pad = tok.get("pad_token")
    models = {c: _empty_model(cls, cfg) for c, (cls, cfg) in comps.items()}
    return models, {"scheduler": _scheduler(sched[0], sched[1]),
                    "tokenizer": _tokenizer(None, pad if isinstance(pad, str) else None)}


def _entries_for_save(handle: ModelHandle) -> list[Entry]:
    if not has_single_file_layout(handle.arch):
        raise UnsupportedModelError(
            f"a {handle.arch} model has no original single-file layout; save it as a diffusers folder")
    if handle.ldm_entries is not None:
        entries = handle.ldm_entries
    else:
        entries = _organism_entries(handle) if handle.arch == "organism" else get_keymap(handle.arch).entries
    models = handle.models()
    for component, model in models.items():
        have = set(model.state_dict())
        mapped = {e.key for e in entries if e.component == component}
        if have != mapped:
            odd = sorted(have ^ mapped)
            raise UnsupportedModelError(
                f"{component} does not match the {handle.arch} layout ({len(odd)} weights differ, e.g. {odd[0]}); "
                "merge or remove adapters before saving")
    return entries


def ldm_state_dict(handle: ModelHandle, include_extras: bool = True) -> dict[str, torch.Tensor]:
    """The handle's weights under original (LDM) names, as a host or a single file holds them."""
    entries = _entries_for_save(handle)
    states = {c: m.state_dict() for c, m in handle.models().items()}
    groups: dict[str, list[Entry]] = {}
    for e in entries:
        groups.setdefault(e.ldm_key, []).append(e)
    out = dict(handle.extras) if include_extras else {}
    for ldm_key, group in groups.items():
        pieces = [(e, states[e.component][e.key].detach()) for e in group]
        if len(pieces) == 1 and not group[0].ops:
            out[ldm_key] = pieces[0][1]
            continue
        buf = torch.empty(group[0].ldm_shape, dtype=pieces[0][1].dtype)
        covered = 0
        for e, t in pieces:  # write each diffusers tensor into the view the converter read it from
            apply_ops(buf, e.ops).copy_(t)
            covered += t.numel()
        if covered != buf.numel():
            raise UnsupportedModelError(f"{ldm_key}: the diffusers weights cover {covered} of {buf.numel()} values")
        out[ldm_key] = buf
    return out


def save_single_file(handle: ModelHandle, path: str | os.PathLike, metadata: Mapping[str, str] | None = None,
                     *, include_extras: bool = True) -> Path:
    """Write a single-file checkpoint in the original naming (what A1111, Forge and ComfyUI load).

    An organism (no shipped architecture) is written in the SD1 naming with its component configs embedded
    (``sau.organism_configs``), which :func:`load_model` rebuilds it from; A1111 lists such a file but its own
    loader cannot run it (the organism's sizes are not SD1's).
    Metadata: the source file's, then ``modelspec.architecture``, then ``metadata``. ``include_extras=False``
    drops tensors no component holds (for example EMA weights, which a clean must not carry over unchanged)."""
    tensors = ldm_state_dict(handle, include_extras)
    if handle.arch == "organism":  # no model-spec name; the configs to rebuild it from instead
        arch_meta = {ORGANISM_CONFIGS: _organism_configs(handle)}
    else:
        arch_meta = {"modelspec.architecture": MODELSPEC[handle.arch]}
    meta = {**handle.metadata, **arch_meta, **(metadata or {})}
    write_safetensors(path, tensors, meta)
    return Path(path)


def _save_tokenizer(tokenizer, folder: Path) -> None:
    tokenizer.save_pretrained(str(folder))
    # transformers 5 writes only tokenizer.json; readers on transformers 4.x (A1111, older diffusers) build
    # the slow CLIPTokenizer from vocab.json + merges.txt, so write those too.
    tj = folder / "tokenizer.json"
    if tj.is_file() and not (folder / "vocab.json").exists():
        model = json.loads(tj.read_text(encoding="utf-8")).get("model", {})
        if model.get("type") == "BPE":
            (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
            merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
            (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def save_diffusers(handle: ModelHandle, folder: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a diffusers folder (safetensors only) that diffusers on transformers 4.x or 5.x loads."""
    import diffusers

    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())) and not overwrite:
        raise SauError(f"{folder} exists and is not empty (pass overwrite=True to replace it)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        index: dict[str, Any] = {
            "_class_name": _PIPELINES[1] if handle.is_xl else _PIPELINES[0],
            "_diffusers_version": diffusers.__version__, "feature_extractor": [None, None],
            "image_encoder": [None, None],
            "scheduler": ["diffusers", type(handle.scheduler).__name__]}
        if handle.is_xl:
            index["force_zeros_for_empty_prompt"] = True
        else:
            index.update(requires_safety_checker=False, safety_checker=[None, None])
        for component, model in handle.models().items():
            cls = type(model).__name__
            index[component] = [_MODEL_CLASSES.get(cls, "diffusers"), cls]
            sub = tmp / component
            sub.mkdir()
            state = model.state_dict()
            if _MODEL_CLASSES.get(cls) == "transformers":
                cfg = model.config.to_dict()
                cfg["architectures"] = [cls]
                (sub / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
                if not hasattr(model, "text_model"):  # transformers 4.x readers need the text_model. level
                    state = {"text_model." + k: v for k, v in state.items()}
                write_safetensors(sub / "model.safetensors", state, {"format": "pt"})
            else:
                model.save_config(str(sub))
                write_safetensors(sub / "diffusion_pytorch_model.safetensors", state, {"format": "pt"})
        for name in ("tokenizer", "tokenizer_2"):
            tok = getattr(handle, name)
            if tok is not None:
                index[name] = ["transformers", "CLIPTokenizer"]
                _save_tokenizer(tok, tmp / name)
        handle.scheduler.save_config(str(tmp / "scheduler"))
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        if folder.exists():
            if folder.is_dir():
                shutil.rmtree(folder)
            else:
                folder.unlink()
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


# --------------------------------------------------------------------------------------------------------------
# Random-weight models of the real architectures (tests, benchmarks)


def random_handle(arch: str, dtype: torch.dtype = torch.float16, seed: int = 0) -> ModelHandle:
    """A model of a real architecture with random weights, built in seconds even for SDXL.

    Drawing 3.5 B normal values costs minutes on a small CPU; instead every tensor copies its own stretch of
    one seeded random pool (distinct per tensor, so a swapped or transposed weight is always noticed)."""
    models = empty_components(arch)
    gen = torch.Generator().manual_seed(seed)
    pool = torch.empty((1 << 22) + 13, dtype=torch.float32).uniform_(-1, 1, generator=gen).to(dtype)
    offset = 0
    for model in models.values():
        state = {}
        for key, ref in model.state_dict().items():
            if not ref.is_meta:  # real buffers (position_ids) keep their values
                continue
            flat = torch.empty(ref.numel(), dtype=dtype)
            done = 0
            while done < flat.numel():
                start = (offset + done) % pool.numel()
                n = min(flat.numel() - done, pool.numel() - start)
                flat[done:done + n] = pool[start:start + n]
                done += n
            offset += flat.numel() + 7
            state[key] = flat.view(ref.shape)
        model.load_state_dict(state, strict=False, assign=True)
        model.eval()
    return ModelHandle(**models, **_arch_tokenizers_and_scheduler(arch), arch=arch, source=f"<random seed={seed}>",
                       source_format="random")


# --------------------------------------------------------------------------------------------------------------
# Inspection (headers and configs only: no model is built with weights)


def _dtype_summary(dtypes: Iterable[str]) -> str:
    counts: dict[str, int] = {}
    for d in dtypes:
        counts[d] = counts.get(d, 0) + 1
    return ", ".join(sorted(counts, key=lambda d: -counts[d])) or "-"


def inspect_model(path: str | os.PathLike, check_values: bool = True) -> dict[str, Any]:
    """What a model file or folder holds: format, architecture, components (parameters, dtypes), metadata,
    problems (NaN/Inf, missing weights, unknown keys). Validates every weights file; loads no weights."""
    p = Path(path)
    report: dict[str, Any] = {"path": str(p), "components": {}, "metadata": {}, "problems": []}
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise SauError(f"{p} is a folder without model_index.json; not a diffusers pipeline folder")
        index = _read_index(p)
        report["format"] = "diffusers"
        for component, cls_name in _component_specs(index).items():
            model = _empty_model(cls_name, _read_json(p / component / "config.json"))
            base = "model" if _MODEL_CLASSES[cls_name] == "transformers" else "diffusion_pytorch_model"
            entries: dict[str, Any] = {}
            for f in _weight_files(p / component, base):
                info = validate_safetensors(f, check_values=check_values)
                entries.update(info.tensors)
                report["problems"] += [f"{component}/{f.name}: {m}" for m in info.problems]
            keys = _match_model_keys(dict.fromkeys(entries), model)
            expected = set(model.state_dict())
            missing, unknown = expected - set(keys), set(keys) - expected
            if missing:
                report["problems"].append(f"{component}: {len(missing)} weights missing (e.g. {sorted(missing)[0]})")
            if unknown:
                report["problems"].append(f"{component}: {len(unknown)} unknown keys (e.g. {sorted(unknown)[0]})")
            report["components"][component] = {
                "class": cls_name, "params": sum(e.numel for e in entries.values()),
                "dtype": _dtype_summary(e.dtype for e in entries.values()), "tensors": len(entries)}
        try:
            sched = _read_json(p / "scheduler" / "scheduler_config.json")
        except SauError:
            sched = {}
        unet_cfg = _read_json(p / "unet" / "config.json") if (p / "unet" / "config.json").is_file() else {}
        report["architecture"] = _arch_from_configs(unet_cfg, sched)
        report["scheduler"] = sched.get("_class_name")
        report["prediction_type"] = sched.get("prediction_type", "epsilon")
    else:
        info = validate_safetensors(p, check_values=check_values)
        report["format"] = "single-file"
        report["metadata"] = {k: (v if len(v) <= 200 else v[:197] + "...") for k, v in info.metadata.items()}
        report["problems"] += info.problems
        shapes = {k: e.shape for k, e in info.tensors.items()}
        arch = detect_architecture(shapes, info.metadata)
        report["architecture"] = arch
        plan = plan_ldm(shapes, arch)
        report["problems"] += plan.problems
        for component, entries in plan.entries.items():
            ldm_keys = {e.ldm_key for e in entries}
            report["components"][component] = {
                "class": type(plan.models[component]).__name__,
                "params": sum(info.tensors[k].numel for k in ldm_keys),
                "dtype": _dtype_summary(info.tensors[k].dtype for k in ldm_keys), "tensors": len(ldm_keys)}
        known = [k for k in plan.extras if _KNOWN_EXTRAS.match(k)]
        unknown = [k for k in plan.extras if not _KNOWN_EXTRAS.match(k)]
        report["unused"] = {"tensors": len(known), "params": sum(info.tensors[k].numel for k in known),
                            "examples": known[:5]}
        if unknown:
            report["problems"].append(f"{len(unknown)} unknown keys (e.g. {', '.join(unknown[:3])})")
        report["file_size"] = info.file_size
    report["params"] = sum(c["params"] for c in report["components"].values())
    return report
