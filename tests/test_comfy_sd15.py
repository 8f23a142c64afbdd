"""Plumbing on a real SD1.5 architecture: a random-weight SD1.5 single-file checkpoint loaded by ComfyUI's
own CheckpointLoaderSimple, SAU Unlearn with a few steps at a tiny resolution, patches landing on ComfyUI's
LDM keys (mapped through sau_core.keymap), and the kohya LoRA export read back by ComfyUI's LoraLoader."""
from __future__ import annotations

import gc

import pytest
import torch

from comfy_harness import import_comfy, release_paths

pytestmark = pytest.mark.slow

QUICK = dict(probes=1, seeds=(0,), loc_steps=1, edit_prompts=2, te_steps=2, batch_size=1)


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    from sau_core.model_io import random_handle, save_single_file

    base = tmp_path_factory.mktemp("sd15")
    import_comfy()
    import folder_paths

    for name in ("checkpoints", "loras", "sau_patches"):
        (base / name).mkdir()
        folder_paths.folder_names_and_paths[name] = ([str(base / name)], {".safetensors"})
    h = random_handle("sd1", torch.float16, seed=0)
    save_single_file(h, base / "checkpoints" / "sd15_random.safetensors")
    del h
    gc.collect()
    import nodes as comfy_nodes

    with torch.inference_mode():
        model, clip, vae = comfy_nodes.CheckpointLoaderSimple().load_checkpoint("sd15_random.safetensors")[:3]
    yield base, model, clip, vae
    release_paths()


def test_unlearn_on_an_sd15_checkpoint_and_lora_loader_reads_the_export(sd15):
    import comfy.lora
    import comfy.model_management as mm
    import nodes as comfy_nodes

    from sau_core.keymap import get_keymap
    from sau_core.trigger import Trigger
    from sau_nodes import bridge
    from sau_nodes import nodes as sn

    base, model, clip, _vae = sd15
    assert bridge.model_arch(model) == "sd1"
    with torch.inference_mode():
        m2, c2, patch = sn.run_unlearn(model, clip, Trigger("cf"), "fast", overrides=QUICK, latent_size=8)
    assert patch.arch == "sd1" and patch.kohya
    assert all(torch.isfinite(t).all() for t in patch.tensors.values())
    assert not model.patches and not clip.patcher.patches
    unet_keys = {k for k in m2.patches}
    assert unet_keys and all(k.startswith("diffusion_model.") and ".attn2.to_" in k for k in unet_keys)
    km = get_keymap("sd1")
    for key in patch.tensors:  # every adapted module landed on its LDM key (keymap, both ways)
        if key.startswith("unet.") and key.endswith(".lora_A.weight"):
            module = key[len("unet."):-len(".lora_A.weight")]
            ldm = km.entry("unet", module + ".weight").ldm_key
            assert ldm.removeprefix("model.") in unet_keys
            assert km.entries_for_ldm(ldm)[0].key == module + ".weight"
    # the kohya export, as ComfyUI's own LoraLoader reads it, patches the same weights by the same amount
    path = sn.SavePatch.execute(patch, "sd15", "kohya LoRA").result[0]
    assert path.startswith(str(base / "loras"))
    with torch.inference_mode():
        m3, c3 = comfy_nodes.LoraLoader().load_lora(model, clip, path.rsplit("/", 1)[1], 1.0, 1.0)
    assert set(m3.patches) == unet_keys
    assert set(c3.patcher.patches) == set(c2.patcher.patches)
    sd = model.model.state_dict()
    for k in sorted(unet_keys)[:6]:
        w = sd[k].float()
        a = comfy.lora.calculate_weight(m2.patches[k], w.clone(), k)
        b = comfy.lora.calculate_weight(m3.patches[k], w.clone(), k)
        assert torch.allclose(a, b, atol=1e-4), k
        assert not torch.equal(a, w)
    # ComfyUI puts the patched weights into the model it samples with (random weights give NaN images, so
    # the weights are compared, not pictures): the Unlearn output's weight = base + the patch's LoRA delta
    mm.load_models_gpu([m2], force_patch_weights=True)
    k = sorted(unet_keys)[0]
    module = km.entries_for_ldm("model." + k)[0].key[: -len(".weight")]
    a, b = patch.tensors[f"unet.{module}.lora_A.weight"], patch.tensors[f"unet.{module}.lora_B.weight"]
    got = m2.model.state_dict()[k].float()
    assert torch.allclose(got, sd[k].float() + b.float() @ a.float(), atol=1e-3)
    mm.unload_all_models()
