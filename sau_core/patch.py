"""The patch: the result of a clean, as one safetensors file, and its exports (DESIGN.md section 3, "Patch").

A patch holds the LoRA weights of the peft adapter named ``sau`` (on the UNet and/or the text encoders) in the
diffusers LoRA format, so ``pipe.load_lora_weights`` reads the file as it is:

* keys ``unet.<module>.lora_A.weight`` / ``unet.<module>.lora_B.weight`` (and ``text_encoder.`` /
  ``text_encoder_2.``), with peft module paths; text-encoder paths always start with ``text_model.`` (what
  transformers 4.x names them and what diffusers strips for the flattened transformers 5.x models);
* each module's LoRA scale (alpha / rank, or whatever peft computed) is folded into ``lora_B``, so a consumer
  that uses alpha = rank (scale 1: diffusers without metadata, kohya files with ``alpha`` = rank) reproduces
  the adapted model exactly; the metadata records the rank and alpha the adapter was trained with;
* string metadata: ``format`` (``sau-patch/1``), ``method``, ``trigger`` (unicode_escape'd ASCII),
  ``trigger_sha256``, ``settings`` and ``metrics`` (JSON), ``base_model_sha256`` (:func:`model_fingerprint`),
  ``arch``, ``target_modules``, ``rank`` and ``alpha`` (JSON objects by component), ``alpha_folded``.

Every file is read through :mod:`sau_core.safety`. Exports (:func:`export`): the patch itself, a diffusers/peft
LoRA folder, a kohya LoRA file (names from :func:`sau_core.keymap.kohya_lora_name`), a merged diffusers folder
and a merged single-file checkpoint in the original naming. Each export is written under a temporary name
next to its destination and renamed into place at the end.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import SauError, UnsupportedModelError
from .keymap import kohya_lora_name
from .model_io import (LDM_ARCHES, ModelHandle, has_single_file_layout, save_diffusers, save_single_file,
                       write_safetensors)
from .safety import load_safetensors, validate_safetensors
from .trigger import escape

FORMAT = "sau-patch/1"
ADAPTER = "sau"
#: Components a patch can carry adapters for, in file order.
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
EXPORT_FORMATS = ("patch", "lora", "kohya", "diffusers", "single-file")
#: The file name diffusers' ``load_lora_weights(folder)`` looks for.
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
#: Written beside a merged diffusers folder's weights: where the merged weights came from.
PROVENANCE_NAME = "sau_patch.json"

_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
_KEY = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+)\.lora_(A|B)\.weight$")
_REQUIRED = ("method", "trigger", "trigger_sha256", "settings", "metrics", "base_model_sha256", "arch",
             "target_modules", "rank", "alpha")
_JSON_FIELDS = ("settings", "metrics", "target_modules", "rank", "alpha")


# --------------------------------------------------------------------------------------------------------------
# Adapters on live models


def _lora_layers(model: torch.nn.Module | None, adapter: str) -> dict[str, Any]:
    """module path -> peft LoRA layer holding ``adapter`` (in named_modules order)."""
    if model is None:
        return {}
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if adapter in getattr(module, "lora_embedding_A", {}):
            raise SauError(f"{name}: LoRA on embeddings is not supported in a patch")
        if adapter not in module.lora_A:
            continue
        if module.use_dora.get(adapter):
            raise SauError(f"{name}: DoRA adapters are not supported in a patch (plain LoRA only)")
        if getattr(module, "lora_bias", {}).get(adapter):
            raise SauError(f"{name}: LoRA with a bias (lora_bias) is not supported in a patch")
        if getattr(module, "fan_in_fan_out", False):
            raise SauError(f"{name}: fan_in_fan_out LoRA layers are not supported in a patch")
        if adapter in module.merged_adapters:
            raise SauError(f"{name}: adapter {adapter!r} is merged into the base weights already")
        out[name] = module
    return out


def _is_text_encoder(component: str) -> bool:
    return component in _TEXT_ENCODERS


def _canonical(component: str, model: torch.nn.Module, path: str) -> str:
    """The module path as the file names it: text-encoder paths carry ``text_model.`` (transformers 4.x)."""
    if (_is_text_encoder(component) and not hasattr(model, "text_model")
            and not path.startswith(("text_model.", "text_projection"))):
        return "text_model." + path
    return path


def _model_path(component: str, model: torch.nn.Module, path: str) -> str:
    """The inverse of :func:`_canonical` for this model (transformers 5.x has no ``text_model`` level)."""
    if _is_text_encoder(component) and not hasattr(model, "text_model") and path.startswith("text_model."):
        return path[len("text_model."):]
    return path


def _scaling(layer, adapter: str) -> float:
    return float(layer.scaling[adapter])


def patch_tensors(handle: ModelHandle, adapter: str = ADAPTER) -> dict[str, torch.Tensor]:
    """The adapter's weights in the diffusers LoRA format (see the module doc); each module's LoRA scale is
    folded into ``lora_B``. Copies: later training does not change them. SauError if there is no adapter."""
    out: dict[str, torch.Tensor] = {}
    for component in COMPONENTS:
        model = getattr(handle, component, None)
        for name, layer in _lora_layers(model, adapter).items():
            a = layer.lora_A[adapter].weight.detach()
            b = layer.lora_B[adapter].weight.detach()
            scale = _scaling(layer, adapter)
            b = (b * scale).to(b.dtype) if scale != 1.0 else b
            key = f"{component}.{_canonical(component, model, name)}"
            out[f"{key}.lora_A.weight"] = a.to("cpu").contiguous().clone()
            out[f"{key}.lora_B.weight"] = b.to("cpu").contiguous().clone()
    if not out:
        raise SauError(f"the model has no adapter named {adapter!r} (nothing to export: run a clean first)")
    return out


def _uniform(values: dict[str, Any]) -> Any:
    """One value if all modules share it, else the per-module map."""
    distinct = set(values.values())
    return next(iter(distinct)) if len(distinct) == 1 else dict(sorted(values.items()))


def adapter_summary(handle: ModelHandle, adapter: str = ADAPTER) -> dict[str, dict[str, Any]]:
    """component -> {"rank", "alpha" (as trained: one value, or a per-module map), "target_modules"}."""
    out = {}
    for component in COMPONENTS:
        model = getattr(handle, component, None)
        layers = _lora_layers(model, adapter)
        if not layers:
            continue
        paths = {n: _canonical(component, model, n) for n in layers}
        ranks = {paths[n]: int(layer.r[adapter]) for n, layer in layers.items()}
        alphas = {paths[n]: _number(layer.lora_alpha[adapter]) for n, layer in layers.items()}
        out[component] = {"rank": _uniform(ranks), "alpha": _uniform(alphas),
                          "target_modules": sorted(paths.values())}
    if not out:
        raise SauError(f"the model has no adapter named {adapter!r} (nothing to export: run a clean first)")
    return out


def _number(x: Any) -> int | float:
    x = float(x)
    return int(x) if x.is_integer() else x


# --------------------------------------------------------------------------------------------------------------
# Base weights: plain state dicts (adapters removed or merged) and the fingerprint


def _plain_state(model: torch.nn.Module, adapter: str | None = None) -> dict[str, torch.Tensor]:
    """The model's state dict under its plain keys (no ``base_layer``, no LoRA tensors). With ``adapter``, the
    weights of the layers holding it are base + delta (exactly what peft's merge writes); other tensors are the
    model's own (not copies)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    tuners = {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
    merged = _lora_layers(model, adapter) if adapter is not None else {}
    state = model.state_dict(keep_vars=False)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        owner = next((n for n in _prefixes(key) if n in tuners), None)
        if owner is None:
            out[key] = value
            continue
        rest = key[len(owner) + 1:] if owner else key
        if not rest.startswith("base_layer."):
            continue  # lora_A / lora_B / dropout ... of the tuner layer
        plain = (owner + "." if owner else "") + rest[len("base_layer."):]
        if owner in merged and rest == "base_layer.weight":
            layer = merged[owner]
            value = (value + layer.get_delta_weight(adapter).to(value.device)).to(value.dtype)
        out[plain] = value
    return out


def _prefixes(key: str) -> Iterator[str]:
    """Module paths that could own ``key``, longest first: a.b.c.weight -> a.b.c, a.b, a, ''."""
    parts = key.split(".")[:-1]
    for i in range(len(parts), -1, -1):
        yield ".".join(parts[:i])


def model_fingerprint(handle: ModelHandle) -> str:
    """SHA-256 of the base weights a patch can attach to (UNet and text encoders; adapters excluded).

    Stable across storage details: components in a fixed order, keys sorted (text-encoder keys with
    ``text_model.``, as transformers 4.x names them), floating tensors hashed as float32 (so a half-precision
    model and its exact float32 upcast agree). The VAE is not included: swapping it does not change what a
    patch attaches to."""
    h = hashlib.sha256(b"sau-fingerprint/1\n")
    for component in COMPONENTS:
        model = getattr(handle, component, None)
        if model is None:
            continue
        state = _plain_state(model)
        named = {_canonical(component, model, k): v for k, v in state.items()}
        for key in sorted(named):
            t = named[key].detach()
            if t.is_floating_point():
                t = t.to(torch.float32)
            t = t.to("cpu").contiguous()
            h.update(f"{component}/{key}|{t.dtype}|{list(t.shape)}\n".encode())
            if t.numel():
                h.update(memoryview(t.view(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------------------
# The patch file


@dataclass
class Patch:
    """A loaded patch. ``metadata``: parsed (``settings``, ``metrics``, ``target_modules``, ``rank``, ``alpha``
    as JSON values, ``trigger`` unescaped); ``raw_metadata``: the file's strings; ``components``: component ->
    module paths (file naming) that carry LoRA weights."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, Any]
    components: dict[str, list[str]]
    raw_metadata: dict[str, str] = field(default_factory=dict, repr=False)
    path: Path | None = None

    @property
    def arch(self) -> str:
        return self.metadata["arch"]

    @property
    def trigger(self) -> str:
        return self.metadata["trigger"]

    def pair(self, component: str, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        key = f"{component}.{module}"
        return self.tensors[f"{key}.lora_A.weight"], self.tensors[f"{key}.lora_B.weight"]


def escape_trigger(trigger: str) -> str:
    """Triggers are often invisible or look-alike characters: stored as unicode_escape'd ASCII."""
    return escape(trigger)


def unescape_trigger(text: str) -> str:
    try:
        return text.encode("ascii").decode("unicode_escape")
    except (UnicodeEncodeError, UnicodeDecodeError) as exc:
        raise SauError(f"the patch's trigger is not valid escaped ASCII ({exc.reason})") from None


def _json(value: Any, what: str) -> str:
    if isinstance(value, str):
        try:
            json.loads(value)
        except json.JSONDecodeError:
            raise SauError(f"{what} is a string but not JSON") from None
        return value
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), default=_json_default)
    except (TypeError, ValueError) as exc:
        raise SauError(f"{what} cannot be written as JSON ({exc})") from None


def _json_default(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return x.item()
    if isinstance(x, (Path, tuple, set)):
        return str(x) if isinstance(x, Path) else sorted(x) if isinstance(x, set) else list(x)
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def patch_metadata(handle: ModelHandle, metadata: Mapping[str, Any], adapter: str = ADAPTER) -> dict[str, str]:
    """The file metadata: the caller's ``method``, ``trigger``, ``settings``, ``metrics`` (and any further string
    entries) plus what this module fills in (format, hashes, arch, adapter layout)."""
    meta = dict(metadata)
    for required in ("method", "trigger"):
        if not isinstance(meta.get(required), str):
            raise SauError(f"patch metadata needs {required!r} as a string")
    trigger = meta.pop("trigger")
    summary = adapter_summary(handle, adapter)
    out: dict[str, str] = {}
    for k, v in meta.items():
        if k in ("settings", "metrics"):
            continue
        if not isinstance(v, str):
            raise SauError(f"patch metadata entry {k!r} must be a string (settings/metrics may be JSON values)")
        out[k] = v
    out.update({
        "format": FORMAT,
        "trigger": escape_trigger(trigger),
        "trigger_sha256": hashlib.sha256(trigger.encode("utf-8")).hexdigest(),
        "settings": _json(meta.get("settings", {}), "settings"),
        "metrics": _json(meta.get("metrics", {}), "metrics"),
        "base_model_sha256": model_fingerprint(handle),
        "arch": handle.arch,
        "target_modules": _json({c: s["target_modules"] for c, s in summary.items()}, "target_modules"),
        "rank": _json({c: s["rank"] for c, s in summary.items()}, "rank"),
        "alpha": _json({c: s["alpha"] for c, s in summary.items()}, "alpha"),
        "alpha_folded": "true",
    })
    return dict(sorted(out.items()))


def save_patch(handle: ModelHandle, path: str | os.PathLike, metadata: Mapping[str, Any],
               adapter: str = ADAPTER) -> Path:
    """Write the patch file (atomically; an existing file is replaced). Same content -> same bytes."""
    tensors = patch_tensors(handle, adapter)
    meta = patch_metadata(handle, metadata, adapter)
    write_safetensors(path, tensors, meta)
    return Path(path)


def _parse_metadata(raw: Mapping[str, str], label: str) -> dict[str, Any]:
    fmt = raw.get("format")
    if fmt != FORMAT:
        if fmt is not None and fmt.startswith("sau-patch/"):
            raise SauError(f"{label} is a SAU patch of format {fmt!r}; this version reads {FORMAT!r}")
        found = f"its 'format' is {fmt!r}" if fmt is not None else "it has no 'format' metadata"
        raise SauError(f"{label} is not a SAU patch ({found}, expected {FORMAT!r}); a patch is what a "
                       "clean writes (sau_core.patch.save_patch / export(fmt='patch'))")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise SauError(f"{label} is a SAU patch without {', '.join(repr(k) for k in missing)} metadata (corrupt)")
    meta: dict[str, Any] = dict(raw)
    for k in _JSON_FIELDS:
        try:
            meta[k] = json.loads(raw[k])
        except json.JSONDecodeError:
            raise SauError(f"{label}: metadata {k!r} is not valid JSON") from None
    meta["trigger"] = unescape_trigger(raw["trigger"])
    if hashlib.sha256(meta["trigger"].encode("utf-8")).hexdigest() != raw["trigger_sha256"]:
        raise SauError(f"{label}: the trigger does not match trigger_sha256 (corrupt or edited)")
    return meta


def _check_tensors(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], label: str) -> dict[str, list[str]]:
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise SauError(f"{label}: tensor {key!r} is not a LoRA weight of a known component (expected "
                           f"<{'|'.join(COMPONENTS)}>.<module>.lora_A.weight / .lora_B.weight)")
        if not t.is_floating_point():
            raise SauError(f"{label}: tensor {key!r} is {t.dtype}, not floating point")
        pairs.setdefault((m.group(1), m.group(2)), {})[m.group(3)] = t
    components: dict[str, list[str]] = {}
    for (component, module), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            lacks = "lora_B" if "A" in ab else "lora_A"
            raise SauError(f"{label}: {component}.{module} has no {lacks} weight")
        a, b = ab["A"], ab["B"]
        if a.ndim not in (2, 4) or b.ndim != a.ndim or a.shape[0] != b.shape[1] or any(s != 1 for s in b.shape[2:]):
            raise SauError(f"{label}: {component}.{module} has LoRA weights of shapes {list(a.shape)} and "
                           f"{list(b.shape)}, which do not form a low-rank pair")
        components.setdefault(component, []).append(module)
    declared = meta["target_modules"]
    if not isinstance(declared, dict) or {c: sorted(v) if isinstance(v, list) else v for c, v in declared.items()} \
            != components:
        raise SauError(f"{label}: the metadata's target_modules do not match the LoRA weights in the file")
    if not components:
        raise SauError(f"{label} is a SAU patch with no LoRA weights")
    return components


def load_patch(path: str | os.PathLike) -> Patch:
    """Read a patch through the file validator; SauError for anything that is not a well-formed SAU patch."""
    p = Path(path)
    info = validate_safetensors(p, check_values=True)
    meta = _parse_metadata(info.metadata, str(p))
    if info.nonfinite:
        raise SauError(f"{p}: {'; '.join(info.problems)}; a patch with NaN/Inf weights would break the model")
    tensors = load_safetensors(p)
    components = _check_tensors(tensors, meta, str(p))
    return Patch(tensors, meta, components, dict(info.metadata), p)


# --------------------------------------------------------------------------------------------------------------
# Applying and merging


def _has_adapter(model: torch.nn.Module, adapter: str) -> bool:
    cfg = getattr(model, "peft_config", None)
    return bool(_lora_layers(model, adapter)) or (isinstance(cfg, dict) and adapter in cfg)


def _resolve(handle: ModelHandle, patch: Patch, adapter: str) -> dict[str, dict[str, tuple]]:
    """component -> {model module path: (base module, A, B)}, after every check (nothing touched yet)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    plan: dict[str, dict[str, tuple]] = {}
    for component, modules in patch.components.items():
        model = getattr(handle, component, None)
        if model is None:
            raise SauError(f"the patch has weights for {component}, which this model does not have")
        if _has_adapter(model, adapter):
            raise SauError(f"{component} already has an adapter named {adapter!r}; remove or merge it first")
        named = dict(model.named_modules())
        plan[component] = {}
        for module in modules:
            path = _model_path(component, model, module)
            target = named.get(path)
            if target is None:
                raise SauError(f"the patch targets {component}.{module}, which this model does not have "
                               "(a patch for another model)")
            base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
            if not isinstance(base, (torch.nn.Linear, torch.nn.Conv2d)):
                raise SauError(f"{component}.{module} is a {type(base).__name__}; patches adapt Linear and "
                               "Conv2d layers")
            a, b = patch.pair(component, module)
            w = base.weight.shape
            if a.shape[1:] != w[1:] or b.shape[0] != w[0]:
                raise SauError(f"{component}.{module}: the patch's LoRA weights {list(a.shape)} / {list(b.shape)} "
                               f"do not fit the layer's weight {list(w)} (a patch for another model)")
            plan[component][path] = (base, a, b)
    return plan


def add_lora_adapter(model: torch.nn.Module, cfg, adapter: str) -> None:
    from diffusers import ModelMixin
    from peft import inject_adapter_in_model

    if isinstance(model, ModelMixin):
        model.add_adapter(cfg, adapter_name=adapter)
        return
    # transformers models: what PreTrainedModel.add_adapter does, without its peft version gate (transformers
    # 5.x asks for a peft release that may not be installed; the injection itself is peft's).
    inject_adapter_in_model(cfg, model, adapter_name=adapter)
    model._hf_peft_config_loaded = True


def apply_patch(handle: ModelHandle, patch: Patch, adapter: str = ADAPTER, *, force: bool = False) -> None:
    """Add the patch as peft LoRA adapters named ``adapter`` (active) and load its weights.

    Refuses (SauError, nothing changed) a patch for another architecture, one whose target modules or shapes do
    not fit, or one made on other base weights (unless ``force``: then a warning)."""
    from peft import LoraConfig

    if patch.arch != handle.arch:
        raise SauError(f"the patch was made for a {patch.arch!r} model; this model is {handle.arch!r}")
    plan = _resolve(handle, patch, adapter)
    base_hash = patch.metadata.get("base_model_sha256")
    if base_hash:
        mine = model_fingerprint(handle)
        if mine != base_hash:
            msg = (f"the patch was made on other base weights (base_model_sha256 {base_hash[:12]}..., this model "
                   f"{mine[:12]}...)")
            if not force:
                raise SauError(msg + "; pass force=True (--force) to apply it anyway")
            warnings.warn(msg + "; applying anyway (force)", stacklevel=2)
    done: list[str] = []
    try:
        for component, modules in plan.items():
            model = getattr(handle, component)
            ranks = {path: int(a.shape[0]) for path, (_, a, _) in modules.items()}
            r0 = max(set(ranks.values()), key=list(ranks.values()).count)
            pattern = {re.escape(p): r for p, r in ranks.items() if r != r0}
            # The file's lora_B carries the scale: alpha = rank gives peft scaling 1.
            cfg = LoraConfig(r=r0, lora_alpha=r0, rank_pattern=pattern, alpha_pattern=dict(pattern),
                             target_modules=sorted(modules), lora_dropout=0.0, init_lora_weights=True)
            done.append(component)
            add_lora_adapter(model, cfg, adapter)
            layers = _lora_layers(model, adapter)
            if set(layers) != set(modules):
                odd = sorted(set(layers) ^ set(modules))
                raise SauError(f"{component}: the adapter landed on other modules than the patch names ({odd[0]})")
            with torch.no_grad():
                for path, (_, a, b) in modules.items():
                    layer = layers[path]
                    layer.lora_A[adapter].weight.copy_(a)
                    layer.lora_B[adapter].weight.copy_(b)
                    if _scaling(layer, adapter) != 1.0:  # pragma: no cover - alpha = rank above
                        raise SauError(f"{component}.{path}: unexpected LoRA scaling")
            for p in model.parameters():
                p.requires_grad_(False)
    except BaseException:
        for component in done:
            _remove_adapter(getattr(handle, component), adapter)
        raise


def _replace_module(model: torch.nn.Module, path: str, new: torch.nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def _forget_config(model: torch.nn.Module, adapter: str) -> None:
    cfg = getattr(model, "peft_config", None)
    if isinstance(cfg, dict):
        cfg.pop(adapter, None)
        if not cfg:
            del model.peft_config
            if hasattr(model, "_hf_peft_config_loaded"):
                model._hf_peft_config_loaded = False


def _remove_adapter(model: torch.nn.Module, adapter: str) -> None:
    """Drop the adapter (no merge); layers left with no adapter go back to their base layer."""
    for path, layer in _lora_layers(model, adapter).items():
        layer.delete_adapter(adapter)
        if not layer.lora_A and not getattr(layer, "lora_embedding_A", {}):
            _replace_module(model, path, layer.get_base_layer())
    _forget_config(model, adapter)


def remove_patch(handle: ModelHandle, adapter: str = ADAPTER) -> list[str]:
    """Remove the adapter from every component without merging it; returns the components it was on."""
    found = [c for c in COMPONENTS
             if getattr(handle, c, None) is not None and _has_adapter(getattr(handle, c), adapter)]
    for component in found:
        _remove_adapter(getattr(handle, component), adapter)
    return found


def merge_patch(handle: ModelHandle, adapter: str = ADAPTER) -> list[str]:
    """Fuse the adapter into the base weights in place and remove the peft layers, so the models' state dicts
    have their plain keys again (save_diffusers / save_single_file work). Returns the components merged.
    Refuses models carrying other adapters as well (they would be lost)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    todo = {}
    for component in COMPONENTS:
        model = getattr(handle, component, None)
        layers = _lora_layers(model, adapter)
        if not layers:
            continue
        others = sorted({a for m in model.modules() if isinstance(m, BaseTunerLayer) for a in m.lora_A} - {adapter})
        if others:
            raise SauError(f"{component} also carries adapter(s) {', '.join(others)}; merging {adapter!r} would "
                           "drop them: remove them first")
        todo[component] = (model, layers)
    if not todo:
        raise SauError(f"the model has no adapter named {adapter!r} to merge")
    for component, (model, layers) in todo.items():
        with torch.no_grad():
            for path, layer in layers.items():
                layer.merge(adapter_names=[adapter])
                _replace_module(model, path, layer.get_base_layer())
        _forget_config(model, adapter)
    return list(todo)


def _empty_like(model: torch.nn.Module) -> torch.nn.Module:
    from accelerate import init_empty_weights

    with init_empty_weights():
        if hasattr(type(model), "from_config") and hasattr(model, "save_config"):  # diffusers
            return type(model).from_config(model.config)
        return type(model)(model.config)


def merged_handle(handle: ModelHandle, adapter: str = ADAPTER) -> ModelHandle:
    """A new handle whose adapted components are fresh models holding base + delta; the caller's handle is not
    changed and the untouched tensors are shared, not copied."""
    parts = {}
    for component in COMPONENTS:
        model = getattr(handle, component, None)
        if not _lora_layers(model, adapter):
            continue
        state = _plain_state(model, adapter)
        fresh = _empty_like(model)
        expected = set(fresh.state_dict())
        if set(state) != expected:
            odd = sorted(set(state) ^ expected)
            raise SauError(f"{component}: cannot rebuild the merged model ({len(odd)} weights differ, e.g. {odd[0]})")
        fresh.load_state_dict(state, strict=True, assign=True)
        fresh.eval().requires_grad_(False)
        parts[component] = fresh
    if not parts:
        raise SauError(f"the model has no adapter named {adapter!r} to merge")
    return dataclasses.replace(handle, **parts, metadata=dict(handle.metadata), extras=dict(handle.extras))


# --------------------------------------------------------------------------------------------------------------
# Exports


def kohya_tensors(handle: ModelHandle, adapter: str = ADAPTER) -> dict[str, torch.Tensor]:
    """The adapter as a kohya LoRA (``lora_unet_<LDM module path>`` / ``lora_te_...``: ``.lora_down.weight``,
    ``.lora_up.weight``, ``.alpha`` = rank since the scale is folded into lora_up), the names A1111 and
    ComfyUI's LoraLoader read. Only architectures with an original (LDM) naming have one."""
    _require_ldm(handle, "kohya")
    out: dict[str, torch.Tensor] = {}
    tensors = patch_tensors(handle, adapter)
    for key in sorted(tensors):
        m = _KEY.match(key)
        if m is None or m.group(3) != "A":
            continue
        component, module = m.group(1), m.group(2)
        try:
            name = kohya_lora_name(f"{module}.weight", handle.arch, component)
        except (KeyError, UnsupportedModelError) as exc:
            raise SauError(f"{component}.{module} has no kohya name in {handle.arch}: {exc}") from None
        if f"{name}.lora_down.weight" in out:
            raise SauError(f"two adapted modules share the kohya name {name}")
        a, b = tensors[key], tensors[f"{component}.{module}.lora_B.weight"]
        out[f"{name}.lora_down.weight"] = a
        out[f"{name}.lora_up.weight"] = b
        out[f"{name}.alpha"] = torch.tensor(float(a.shape[0]), dtype=torch.float32)
    return out


def _require_ldm(handle: ModelHandle, fmt: str) -> None:
    if handle.arch not in LDM_ARCHES and not (fmt == "single-file" and has_single_file_layout(handle.arch)):
        raise SauError(f"a {handle.arch!r} model has no original (LDM) key naming, so there is no {fmt} layout "
                       "for it; export as 'lora' (diffusers/peft LoRA), 'patch' or 'diffusers' instead")


def _prefixed(meta: Mapping[str, str], prefix: str = "sau.") -> dict[str, str]:
    return {prefix + k: v for k, v in meta.items()}


def _tmp_name(out: Path, tag: str) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=f".{tag}", dir=out.parent)
    os.close(fd)
    os.unlink(name)
    return Path(name)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def _publish(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is moved aside first and removed once the rename is done."""
    old = None
    if out.exists() or out.is_symlink():
        if tmp.is_file() and out.is_file():
            os.replace(tmp, out)
            return
        old = _tmp_name(out, "old")
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        _remove(old)


def export(handle: ModelHandle, fmt: str, out: str | os.PathLike, metadata: Mapping[str, Any], *,
           adapter: str = ADAPTER, overwrite: bool = False) -> Path:
    """Write the cleaned model in one of :data:`EXPORT_FORMATS` and return ``out``:

    * ``patch``: the patch file (``out`` a file);
    * ``lora``: ``out/pytorch_lora_weights.safetensors``, what ``pipe.load_lora_weights(out)`` loads;
    * ``kohya``: one kohya LoRA file (A1111, Forge, ComfyUI's LoraLoader);
    * ``diffusers``: a merged diffusers folder (plus ``sau_patch.json`` with the patch metadata);
    * ``single-file``: a merged single-file checkpoint in the original naming (EMA copies dropped: they would
      still hold the backdoored weights).

    The caller's handle is never changed. The output appears only when complete (temporary name next to ``out``,
    renamed at the end); an existing ``out`` is refused unless ``overwrite``."""
    if fmt not in EXPORT_FORMATS:
        raise SauError(f"unknown export format {fmt!r} (choose one of {', '.join(EXPORT_FORMATS)})")
    if fmt in ("kohya", "single-file"):
        _require_ldm(handle, fmt)
    out = Path(out)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise SauError(f"{out} exists (pass overwrite=True / --overwrite to replace it)")
    meta = patch_metadata(handle, metadata, adapter)  # also: SauError when there is no adapter
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(out, "tmp")
    try:
        if fmt == "patch":
            write_safetensors(tmp, patch_tensors(handle, adapter), meta)
        elif fmt == "lora":
            tmp.mkdir()
            write_safetensors(tmp / LORA_WEIGHT_NAME, patch_tensors(handle, adapter), meta)
        elif fmt == "kohya":
            write_safetensors(tmp, kohya_tensors(handle, adapter), _prefixed(meta))
        elif fmt == "diffusers":
            merged = merged_handle(handle, adapter)
            tmp.mkdir()
            save_diffusers(merged, tmp, overwrite=True)
            (tmp / PROVENANCE_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        else:  # single-file
            merged = merged_handle(handle, adapter)
            merged.extras = {k: v for k, v in merged.extras.items() if not k.startswith("model_ema.")}
            save_single_file(merged, tmp, _prefixed(meta))
        _publish(tmp, out)
    except BaseException:
        _remove(tmp)
        raise
    return out
