"""SAU nodes for ComfyUI (V3 schema). Each node translates ComfyUI objects into engine calls through
:mod:`sau_nodes.bridge` and back; the engine (``sau_core``) does the work."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from sau_core.errors import SauError

from . import bridge

CATEGORY = "SAU (backdoor removal)"
PATCH_FOLDER = "sau_patches"
SauPatchType = io.Custom("SAU_PATCH")


def _folder_paths():
    import folder_paths

    if PATCH_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(PATCH_FOLDER, os.path.join(folder_paths.models_dir, PATCH_FOLDER))
    return folder_paths


def _organisms() -> list[str]:
    from sau_core.organism.attacks_spec import BACKDOORS, BASES

    return ["badt2i-pixel"] + [n for n in BACKDOORS if n != "badt2i-pixel"] + list(BASES)


def _text(s: str) -> str:
    """Trigger text from a widget: ``\\u200b``-style escapes allowed (invisible characters are hard to type)."""
    from sau_core.patch import unescape_trigger

    if "\\u" in s or "\\x" in s or "\\U" in s:
        return unescape_trigger(s)
    return s


def _trigger(model, text: str, placement: str):
    from sau_core.engine_commands import resolve_trigger

    text = _text(text)
    if not text:
        raise SauError("no trigger given: type the string that fires the backdoor (escapes such as \\u200b work)")
    org = bridge.organism_of(model)
    where = org.path if org is not None else Path("<ComfyUI MODEL>")
    trig, _ = resolve_trigger(where, text, None if placement in ("", "auto") else placement)
    return trig


def _image(path: str | None, size: int = 256) -> torch.Tensor:
    """A heatmap PNG as an IMAGE batch (1, H, W, 3), nearest-upsampled to ``size`` so the grid stays visible."""
    from PIL import Image

    if path is None:
        return torch.zeros(1, size, size, 3)
    img = Image.open(path).convert("RGB").resize((size, size), Image.NEAREST)
    return torch.from_numpy(np.asarray(img).astype(np.float32) / 255.0)[None]


def _engine(fn, *args, **kwargs):
    """Run engine work inside a prompt: gradients on (prompts run under inference_mode)."""
    with torch.inference_mode(False), torch.enable_grad():
        return fn(*args, **kwargs)


class OrganismLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SAU_OrganismLoader",
            display_name="SAU Load Organism",
            category=CATEGORY,
            description="A built-in tiny backdoored Stable Diffusion model (32x32 images, runs on a CPU in "
                        "seconds). Its VAE upsamples 2x: a 128x128 Empty Latent Image gives its 16x16 latent.",
            inputs=[io.Combo.Input("organism", options=_organisms(), default="badt2i-pixel")],
            outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output(),
                     io.String.Output(display_name="trigger")],
        )

    @classmethod
    def execute(cls, organism) -> io.NodeOutput:
        from sau_core.organism.attacks_spec import BACKDOORS
        from sau_core.patch import escape_trigger

        model, clip, vae = bridge.organism_objects(organism)
        bd = BACKDOORS.get(organism)
        return io.NodeOutput(model, clip, vae, escape_trigger(bd.trigger) if bd else "")


class Scan(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SAU_Scan",
            display_name="SAU Scan for Triggers",
            category=CATEGORY,
            description="Looks for trigger strings (vocabulary tokens, homoglyphs, known trigger strings and "
                        "yours) whose effect on the text encoder and the UNet stands out. A scan never "
                        "declares a model clean; the report says what it covered.",
            inputs=[io.Model.Input("model"), io.Clip.Input("clip"),
                    io.Combo.Input("budget", options=["fast", "full"], default="fast"),
                    io.String.Input("candidates", multiline=True, default="", optional=True,
                                    tooltip="Extra candidate strings, one a line (escapes such as \\u200b work)"),
                    io.Int.Input("seed", default=0, min=0, max=2**31 - 1, optional=True,
                                 control_after_generate=False)],
            outputs=[io.String.Output(display_name="report"), io.Image.Output(display_name="heatmap"),
                     io.String.Output(display_name="top_candidate")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, budget="fast", candidates="", seed=0) -> io.NodeOutput:
        import folder_paths

        from sau_core.patch import escape_trigger
        from sau_core.scan import scan, user_candidate

        handle = bridge.handle_from_comfy(model, clip)
        bridge.make_interruptible(handle)
        cands = [user_candidate(_text(line.strip())) for line in (candidates or "").splitlines() if line.strip()]
        out = Path(folder_paths.get_temp_directory()) / "sau_scan" / f"{int(time.time() * 1000)}"
        res = _engine(scan, handle, candidates=cands, budget=budget, progress=bridge.progress_callback(),
                      use_cache=True, heatmaps=str(out), seed=seed)
        data = res.to_json()
        top = data["candidates"][0] if data["candidates"] else None
        lines = [f"verdict: {data['verdict']} (threshold {data['threshold']})"]
        for i, c in enumerate(data["candidates"][:8], 1):
            lines.append(f"{i}. {c['escaped']} [{c['placement']}, {c['source']}] score {c['score']}")
        lines.append(data["note"])
        heat = _image(top.get("heatmap") if top else None)
        ui_cands = [{"rank": i, "text": escape_trigger(c["text"]), "placement": c["placement"],
                     "source": c["source"], "score": c["score"]}
                    for i, c in enumerate(data["candidates"][:8], 1)]
        ui = {"sau_scan": [{"verdict": data["verdict"], "threshold": data["threshold"], "candidates": ui_cands}]}
        from comfy_api.latest import ui as comfy_ui

        preview = comfy_ui.PreviewImage(heat, cls=cls).as_dict()
        ui.update(preview)
        return io.NodeOutput("\n".join(lines), heat, escape_trigger(top["text"]) if top else "", ui=ui)


class Unlearn(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SAU_Unlearn",
            display_name="SAU Unlearn Backdoor",
            category=CATEGORY,
            description="Finds where the trigger acts (cross-attention maps, latent difference) and unlearns it "
                        "with a low-rank patch, so triggered prompts render the clean prompt's content. The "
                        "input MODEL/CLIP stay as they are; the outputs are patched clones.",
            inputs=[io.Model.Input("model"), io.Clip.Input("clip"),
                    io.String.Input("trigger", default="", tooltip="The exact trigger (escapes such as \\u200b "
                                    "work)"),
                    io.Combo.Input("preset", options=["fast", "standard", "thorough"], default="fast"),
                    io.String.Input("placement", default="auto", optional=True,
                                    tooltip="auto, prefix, homoglyph or before:WORD"),
                    io.Int.Input("seed", default=0, min=0, max=2**31 - 1, optional=True,
                                 control_after_generate=False)],
            outputs=[io.Model.Output(), io.Clip.Output(), SauPatchType.Output(display_name="patch"),
                     io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, model, clip, trigger, preset="fast", placement="auto", seed=0) -> io.NodeOutput:
        m, c, patch = run_unlearn(model, clip, _trigger(model, trigger, placement), preset, seed)
        return io.NodeOutput(m, c, patch, bridge.json_report(patch.report))


def run_unlearn(model, clip, trig, preset: str = "fast", seed: int = 0, *, overrides: dict | None = None,
                latent_size: int | None = None):
    """What SAU Unlearn does: read MODEL+CLIP into an engine handle, ``sanitize`` it (gradients on, progress
    and interruption through ComfyUI), and return patched clones plus the patch. ``overrides`` (preset fields)
    and ``latent_size`` (the localisation's latent grid) exist for quick plumbing runs on full-size models."""
    from sau_core.patch import kohya_tensors, patch_metadata, patch_tensors
    from sau_core.sanitize import sanitize

    handle = bridge.handle_from_comfy(model, clip)
    bridge.make_interruptible(handle)
    if latent_size is not None:
        handle.unet.register_to_config(sample_size=int(latent_size))
    res = _engine(sanitize, handle, trig, preset, seed=seed, progress=bridge.progress_callback(),
                  **(overrides or {}))
    bridge.interrupted()
    meta = patch_metadata(handle, res.metadata())
    kohya = kohya_tensors(handle) if handle.arch in ("sd1", "sd2", "sd2-v") else None
    report = {"trigger": trig.describe(), "placement": trig.placement, "preset": preset, "arch": handle.arch,
              "stages": res.stages, "seconds": res.seconds, "text_shift": res.text_shift,
              "localisation": res.localisation.summary()}
    patch = bridge.SauPatch(patch_tensors(handle), meta, handle.arch, trig.text, kohya, report)
    del handle
    m, c = bridge.add_patch(model, clip, patch)
    return m, c, patch


class Guard(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SAU_Guard",
            display_name="SAU Guard (neutralise trigger)",
            category=CATEGORY,
            description="Changes no weight: prompts encoded with the returned CLIP have the trigger tokens' "
                        "keys and values replaced by the end token's in every cross-attention layer (their "
                        "conditioning rows are replaced). Prompts without the trigger are unchanged.",
            inputs=[io.Model.Input("model"), io.Clip.Input("clip"),
                    io.String.Input("trigger", default="", tooltip="escapes such as \\u200b work")],
            outputs=[io.Model.Output(), io.Clip.Output()],
        )

    @classmethod
    def execute(cls, model, clip, trigger) -> io.NodeOutput:
        bridge.check_model(model)
        trig = _trigger(model, trigger, "auto")
        return io.NodeOutput(model.clone(), bridge.make_guarded_clip(clip, trig.text))


class ApplyPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SAU_ApplyPatch",
            display_name="SAU Apply Patch",
            category=CATEGORY,
            inputs=[io.Model.Input("model"), io.Clip.Input("clip"), SauPatchType.Input("patch"),
                    io.Float.Input("strength", default=1.0, min=-4.0, max=4.0, step=0.05)],
            outputs=[io.Model.Output(), io.Clip.Output()],
        )

    @classmethod
    def execute(cls, model, clip, patch, strength=1.0) -> io.NodeOutput:
        _check_arch(model, patch)
        m, c = bridge.add_patch(model, clip, patch, strength)
        return io.NodeOutput(m, c)


def _check_arch(model, patch) -> None:
    have = bridge.model_arch(model)
    want = "organism" if patch.arch not in ("sd1", "sd2", "sd2-v", "sdxl") else patch.arch
    if want.startswith("sd2") and have == "sd2":
        return
    if have != want:
        raise SauError(f"the patch was made for a {patch.arch} model; this MODEL is {have}")


class SavePatch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SAU_SavePatch",
            display_name="SAU Save Patch",
            category=CATEGORY,
            description="'sau patch' goes to models/sau_patches (SAU Load Patch); 'kohya LoRA' goes to "
                        "models/loras, where ComfyUI's Load LoRA node reads it (SD1.x/SD2.x only).",
            inputs=[SauPatchType.Input("patch"),
                    io.String.Input("filename_prefix", default="sau_clean"),
                    io.Combo.Input("format", options=["sau patch", "kohya LoRA"], default="sau patch")],
            outputs=[io.String.Output(display_name="path")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, patch, filename_prefix="sau_clean", format="sau patch") -> io.NodeOutput:
        from sau_core.model_io import write_safetensors

        fp = _folder_paths()
        if format == "kohya LoRA":
            if patch.kohya is None:
                raise SauError(f"a {patch.arch} model has no kohya LoRA naming (SD1.x/SD2.x only); save it as "
                               "a sau patch")
            folder, tensors = fp.get_folder_paths("loras")[0], patch.kohya
            meta = {f"sau.{k}": v for k, v in patch.metadata.items()}
        else:
            folder, tensors, meta = fp.get_folder_paths(PATCH_FOLDER)[0], patch.tensors, patch.metadata
        Path(folder).mkdir(parents=True, exist_ok=True)
        name = Path(filename_prefix).name or "sau_clean"
        i = 1
        while (Path(folder) / f"{name}_{i:05d}.safetensors").exists():
            i += 1
        path = Path(folder) / f"{name}_{i:05d}.safetensors"
        write_safetensors(path, tensors, meta)
        return io.NodeOutput(str(path), ui={"text": [str(path)]})


class LoadPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SAU_LoadPatch",
            display_name="SAU Load Patch",
            category=CATEGORY,
            description="Applies a saved SAU patch (models/sau_patches) to MODEL and CLIP clones.",
            inputs=[io.Model.Input("model"), io.Clip.Input("clip"),
                    io.Combo.Input("patch_name", options=_folder_paths().get_filename_list(PATCH_FOLDER)),
                    io.Float.Input("strength", default=1.0, min=-4.0, max=4.0, step=0.05)],
            outputs=[io.Model.Output(), io.Clip.Output(), SauPatchType.Output(display_name="patch")],
        )

    @classmethod
    def execute(cls, model, clip, patch_name, strength=1.0) -> io.NodeOutput:
        from sau_core.patch import load_patch

        fp = _folder_paths()
        path = fp.get_full_path(PATCH_FOLDER, patch_name)
        if path is None:
            raise SauError(f"no patch named {patch_name!r} in models/{PATCH_FOLDER}")
        p = load_patch(path)
        patch = bridge.SauPatch(dict(p.tensors), dict(p.raw_metadata), p.arch, p.trigger)
        _check_arch(model, patch)
        m, c = bridge.add_patch(model, clip, patch, strength)
        return io.NodeOutput(m, c, patch)


NODES = [OrganismLoader, Scan, Unlearn, Guard, ApplyPatch, SavePatch, LoadPatch]


class SauExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
