"""The patch file and its exports (sau_core/patch.py).

Fast tests use organism-sized random models (tiny_handle) with LoRA adapters on UNet attn2 projections and on
the text encoder, lora_B moved off zero so the adapters change the outputs. The SD1.5-architecture tests
(kohya, single-file) build a full-size random model and are marked slow.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sau_core.errors import SauError, UnsafeFileError
from sau_core.localise import encode
from sau_core.model_io import load_model, random_handle, write_safetensors
from sau_core.organism import components as C
from sau_core.patch import (
    FORMAT,
    LORA_WEIGHT_NAME,
    PROVENANCE_NAME,
    Patch,
    apply_patch,
    escape_trigger,
    export,
    kohya_tensors,
    load_patch,
    merge_patch,
    merged_handle,
    model_fingerprint,
    patch_tensors,
    remove_patch,
    save_patch,
)
from sau_core.safety import load_safetensors, validate_safetensors
from sau_core.unlearn import add_sau_adapter
from test_engine_core import tiny_handle  # an organism-sized random model, identical for the same seed

ZWSP = "\u200b"
TRIGGER = ZWSP + "r\u0435d \\ tq"  # invisible char, Cyrillic e, a backslash
META = {"method": "sau", "trigger": TRIGGER, "settings": {"steps": 3, "layers": ["a", "b"]},
        "metrics": {"asr_before": 0.9, "asr_after": 0.05}}
PROMPTS = ["a red circle", ZWSP + " a blue square"]


def _randomise_lora(model, adapter="sau", seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f".lora_B.{adapter}." in name:
                p.copy_(scale * torch.randn(p.shape, generator=g).to(p.dtype))


def add_te_adapter(te, rank=2, alpha=2, layers=(0, 1), seed=0, projections=("q_proj", "v_proj")):
    """LoRA on the text encoder's q/v projections. transformers' own add_adapter wants peft >= 0.22 here, so
    inject with peft directly (what add_adapter does)."""
    from peft import LoraConfig, inject_adapter_in_model

    prefix = "text_model." if hasattr(te, "text_model") else ""
    targets = [f"{prefix}encoder.layers.{i}.self_attn.{p}" for i in layers for p in projections]
    torch.manual_seed(seed)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets), te,
                            adapter_name="sau")
    _randomise_lora(te, seed=seed + 1)


def unet_layers(unet, n=3):
    return [name for name, _ in unet.named_modules() if name.endswith("attn2")][:n]


def adapted(seed=0, te=True, alpha=8):
    """tiny_handle(seed) with a rank-4 UNet adapter (alpha 8: LoRA scale 2) and a rank-2 text-encoder one."""
    h = tiny_handle(seed)
    add_sau_adapter(h.unet, unet_layers(h.unet), rank=4, alpha=alpha)
    _randomise_lora(h.unet, seed=seed + 10)
    if te:
        add_te_adapter(h.text_encoder, seed=seed + 20)
    return h


@torch.no_grad()
def outputs(h, te_states=None):
    """(text-encoder states, UNet prediction) for fixed inputs; ``te_states`` overrides the UNet's context."""
    enc = encode(h, PROMPTS)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(PROMPTS), 4, 16, 16, generator=g)
    t = torch.tensor([700, 300])
    return enc, h.unet(x, t, encoder_hidden_states=enc if te_states is None else te_states).sample


def plain_keys(model_factory):
    return set(model_factory().state_dict())


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def src():
    return adapted(0)


@pytest.fixture(scope="module")
def patch_file(src, tmp_path_factory):
    return save_patch(src, tmp_path_factory.mktemp("patch") / "clean.sau.safetensors", META)


def rewrite(path: Path, out: Path, tensors=None, meta=None) -> Path:
    info = validate_safetensors(path)
    t = load_safetensors(path)
    write_safetensors(out, tensors(t) if tensors else t, meta(dict(info.metadata)) if meta else info.metadata)
    return out


# ------------------------------------------------------------------------------------------- patch tensors
def test_patch_tensors_are_peft_state_dict_with_scale_folded(src):
    from peft import get_peft_model_state_dict

    t = patch_tensors(src)
    unet = get_peft_model_state_dict(src.unet, adapter_name="sau")
    te = get_peft_model_state_dict(src.text_encoder, adapter_name="sau")
    prefix = "" if hasattr(src.text_encoder, "text_model") else "text_model."
    assert set(t) == {f"unet.{k}" for k in unet} | {f"text_encoder.{prefix}{k}" for k in te}
    assert len(unet) == 3 * 4 * 2 and len(te) == 2 * 2 * 2
    for k, v in unet.items():  # UNet: alpha 8 / rank 4 -> lora_B carries the factor 2
        torch.testing.assert_close(t[f"unet.{k}"], v * (2.0 if ".lora_B." in k else 1.0), rtol=0, atol=0)
    for k, v in te.items():  # text encoder: alpha = rank -> unchanged
        assert torch.equal(t[f"text_encoder.{prefix}{k}"], v)


def test_no_adapter_is_an_error(tmp_path):
    h = tiny_handle(0)
    with pytest.raises(SauError, match="no adapter named 'sau'"):
        patch_tensors(h)
    with pytest.raises(SauError, match="no adapter"):
        export(h, "patch", tmp_path / "p.safetensors", META)
    assert listing(tmp_path) == []


# ------------------------------------------------------------------------------------------- save / load / apply
def test_save_load_apply_reproduces_the_adapted_model(src, patch_file, tmp_path):
    patch = load_patch(patch_file)
    assert isinstance(patch, Patch) and patch.arch == "organism"
    m = patch.metadata
    assert m["format"] == FORMAT and m["method"] == "sau" and patch.trigger == TRIGGER
    assert m["settings"] == META["settings"] and m["metrics"] == META["metrics"]
    assert m["base_model_sha256"] == model_fingerprint(src) == model_fingerprint(tiny_handle(0))
    assert m["rank"] == {"unet": 4, "text_encoder": 2} and m["alpha"] == {"unet": 8, "text_encoder": 2}
    assert sorted(patch.components) == ["text_encoder", "unet"] and len(patch.components["unet"]) == 12
    assert all(x.startswith("text_model.encoder.layers.") for x in patch.components["text_encoder"])
    assert m["target_modules"] == patch.components
    assert patch.raw_metadata["trigger"].isascii() and patch.raw_metadata["trigger"] == escape_trigger(TRIGGER)

    fresh = tiny_handle(0)
    base_out = outputs(fresh)
    apply_patch(fresh, patch)
    enc_a, out_a = outputs(fresh)
    enc_s, out_s = outputs(src)
    torch.testing.assert_close(enc_a, enc_s, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out_a, out_s, atol=1e-6, rtol=1e-6)
    assert (out_a - base_out[1]).abs().max() > 1e-3 and (enc_a - base_out[0]).abs().max() > 1e-3  # it does act

    # Same content -> same bytes; the applied copy exports the same tensors again.
    again = save_patch(src, tmp_path / "again.safetensors", META)
    assert again.read_bytes() == patch_file.read_bytes()
    re_saved = load_patch(save_patch(fresh, tmp_path / "resaved.safetensors", META))
    assert re_saved.tensors.keys() == patch.tensors.keys()
    assert all(torch.equal(re_saved.tensors[k], v) for k, v in patch.tensors.items())
    assert re_saved.metadata["alpha"] == {"unet": 4, "text_encoder": 2}  # applied with the scale folded in


def test_apply_twice_and_remove(patch_file):
    fresh = tiny_handle(0)
    ref = outputs(fresh)[1]
    patch = load_patch(patch_file)
    apply_patch(fresh, patch)
    with pytest.raises(SauError, match="already has an adapter named 'sau'"):
        apply_patch(fresh, patch)
    assert remove_patch(fresh) == ["unet", "text_encoder"]
    assert set(fresh.unet.state_dict()) == plain_keys(C.make_unet)
    assert torch.equal(outputs(fresh)[1], ref)


def test_unet_only_patch(tmp_path):
    h = adapted(0, te=False)
    patch = load_patch(save_patch(h, tmp_path / "u.safetensors", META))
    assert list(patch.components) == ["unet"]
    fresh = tiny_handle(0)
    apply_patch(fresh, patch)
    torch.testing.assert_close(outputs(fresh)[1], outputs(h)[1], atol=1e-6, rtol=1e-6)
    assert not hasattr(fresh.text_encoder, "peft_config")


# ------------------------------------------------------------------------------------------------ merging
def test_merge_matches_adapter_and_leaves_plain_keys(src, patch_file):
    h = tiny_handle(0)
    apply_patch(h, load_patch(patch_file))
    merged_copy = merged_handle(h)  # out of place: h keeps its adapters
    assert _has_lora(h) and not _has_lora(merged_copy)
    assert merge_patch(h) == ["unet", "text_encoder"]
    assert set(h.unet.state_dict()) == plain_keys(C.make_unet)
    assert set(h.text_encoder.state_dict()) == plain_keys(C.make_text_encoder)
    assert not _has_lora(h) and not hasattr(h.unet, "peft_config")
    enc_m, out_m = outputs(h)
    enc_s, out_s = outputs(src)
    torch.testing.assert_close(enc_m, enc_s, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_m, out_s, atol=1e-5, rtol=1e-5)
    for name in ("unet", "text_encoder"):  # the out-of-place merge writes exactly what peft's merge writes
        a, b = getattr(h, name).state_dict(), getattr(merged_copy, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    with pytest.raises(SauError, match="no adapter named 'sau' to merge"):
        merge_patch(h)


def _has_lora(h):
    return any("lora_" in k or "base_layer" in k for m in (h.unet, h.text_encoder) for k in m.state_dict())


# ------------------------------------------------------------------------------------------------ exports
def test_lora_export_loads_with_diffusers_loader(tmp_path):
    h = adapted(0, te=False)
    out = export(h, "lora", tmp_path / "lora", META)
    assert listing(out) == [LORA_WEIGHT_NAME] and listing(tmp_path) == ["lora"]
    fresh = tiny_handle(0)
    pipe = fresh.to_pipeline()
    pipe.load_lora_weights(str(out))  # diffusers' own loader, its own key conversion
    torch.testing.assert_close(outputs(fresh)[1], outputs(h)[1], atol=1e-6, rtol=1e-6)
    # The patch file itself is in the same format.
    fresh2 = tiny_handle(0)
    patch = export(h, "patch", tmp_path / "x.safetensors", META)
    fresh2.to_pipeline().load_lora_weights(str(tmp_path), weight_name=patch.name)
    torch.testing.assert_close(outputs(fresh2)[1], outputs(h)[1], atol=1e-6, rtol=1e-6)


def test_lora_export_with_text_encoder_loads_with_diffusers_loader(src, tmp_path):
    out = export(src, "lora", tmp_path / "lora", META)
    fresh = tiny_handle(0)
    fresh.to_pipeline().load_lora_weights(str(out))
    for a, b in zip(outputs(fresh), outputs(src)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_diffusers_export_reloads_as_the_merged_model(src, tmp_path):
    out = export(src, "diffusers", tmp_path / "clean", META)
    assert listing(tmp_path) == ["clean"] and (out / PROVENANCE_NAME).is_file()
    assert json.loads((out / PROVENANCE_NAME).read_text())["format"] == FORMAT
    back = load_model(out)
    assert back.arch == "organism"
    merged = merged_handle(src)
    for name in ("unet", "text_encoder", "vae"):
        a, b = getattr(back, name).state_dict(), getattr(merged, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    for x, y in zip(outputs(back), outputs(src)):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    assert _has_lora(src)  # the caller's handle still carries its adapters


def test_organism_has_no_kohya_layout(src, tmp_path):
    with pytest.raises(SauError, match="no original .LDM. key naming.*'lora'"):
        export(src, "kohya", tmp_path / "x.safetensors", META)
    assert listing(tmp_path) == []
    with pytest.raises(SauError, match="no original"):
        kohya_tensors(src)


def test_organism_single_file_export_reloads_as_the_merged_model(src, tmp_path):
    out = export(src, "single-file", tmp_path / "clean.safetensors", META)
    assert listing(tmp_path) == ["clean.safetensors"]
    back = load_model(out)
    assert (back.arch, back.source_format) == ("organism", "single-file")
    merged = merged_handle(src)
    for name in ("unet", "text_encoder", "vae"):
        a, b = getattr(back, name).state_dict(), getattr(merged, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert validate_safetensors(out).metadata["sau.method"] == "sau"


def test_unknown_format_and_overwrite(src, tmp_path):
    with pytest.raises(SauError, match="unknown export format 'ckpt'"):
        export(src, "ckpt", tmp_path / "x", META)
    out = export(src, "patch", tmp_path / "p.safetensors", META)
    first = out.read_bytes()
    with pytest.raises(SauError, match="exists"):
        export(src, "patch", out, META)
    d = export(src, "lora", tmp_path / "lora", META)
    with pytest.raises(SauError, match="exists"):
        export(src, "lora", d, META)
    out.write_bytes(b"old")
    export(src, "patch", out, META, overwrite=True)
    assert out.read_bytes() == first
    (d / "stale.txt").write_text("x")
    export(src, "lora", d, META, overwrite=True)  # a folder is replaced whole
    assert listing(d) == [LORA_WEIGHT_NAME]
    assert listing(tmp_path) == ["lora", "p.safetensors"]


@pytest.mark.parametrize("fmt", ["patch", "lora", "diffusers"])
def test_interrupted_export_leaves_nothing(src, tmp_path, monkeypatch, fmt):
    import sau_core.model_io as mio
    import sau_core.patch as P

    calls = []

    def broken(path, *a, **k):
        calls.append(path)
        if len(calls) == 2 or fmt != "diffusers":  # diffusers: die on the second weights file
            raise KeyboardInterrupt
        return real(path, *a, **k)

    real = mio.write_safetensors
    monkeypatch.setattr(P, "write_safetensors", broken)
    monkeypatch.setattr(mio, "write_safetensors", broken)
    target = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        export(src, fmt, target, META)
    assert calls and listing(tmp_path) == []
    # Overwriting: the old output survives an interrupted replacement.
    target.mkdir()
    (target / "keep.txt").write_text("old")
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        export(src, fmt, target, META, overwrite=True)
    assert listing(tmp_path) == ["out"] and (target / "keep.txt").read_text() == "old"


# ------------------------------------------------------------------------------------------------ bad input
def test_not_a_patch(tmp_path):
    plain = tmp_path / "plain.safetensors"
    write_safetensors(plain, {"x": torch.zeros(2)}, {"format": "pt"})
    with pytest.raises(SauError, match="is not a SAU patch .its 'format' is 'pt'"):
        load_patch(plain)
    write_safetensors(plain, {"x": torch.zeros(2)})
    with pytest.raises(SauError, match="no 'format' metadata"):
        load_patch(plain)


def test_newer_format_and_corrupt_metadata(patch_file, tmp_path):
    p = rewrite(patch_file, tmp_path / "v2.safetensors", meta=lambda m: {**m, "format": "sau-patch/2"})
    with pytest.raises(SauError, match="format 'sau-patch/2'"):
        load_patch(p)
    p = rewrite(patch_file, tmp_path / "j.safetensors", meta=lambda m: {**m, "settings": "{oops"})
    with pytest.raises(SauError, match="'settings' is not valid JSON"):
        load_patch(p)
    p = rewrite(patch_file, tmp_path / "t.safetensors", meta=lambda m: {**m, "trigger": "other"})
    with pytest.raises(SauError, match="trigger_sha256"):
        load_patch(p)
    p = rewrite(patch_file, tmp_path / "m.safetensors", meta=lambda m: {k: v for k, v in m.items() if k != "arch"})
    with pytest.raises(SauError, match="without 'arch'"):
        load_patch(p)


def test_foreign_keys_are_refused(patch_file, tmp_path):
    p = rewrite(patch_file, tmp_path / "k.safetensors",
                tensors=lambda t: {**t, "vae.decoder.x.lora_A.weight": torch.zeros(2, 2)})
    with pytest.raises(SauError, match="'vae.decoder.x.lora_A.weight' is not a LoRA weight of a known component"):
        load_patch(p)
    first_b = next(k for k in load_safetensors(patch_file) if k.endswith("lora_B.weight"))
    p = rewrite(patch_file, tmp_path / "b.safetensors", tensors=lambda t: {k: v for k, v in t.items() if k != first_b})
    with pytest.raises(SauError, match="has no lora_B weight"):
        load_patch(p)


def test_patch_for_another_arch(patch_file, tmp_path):
    p = rewrite(patch_file, tmp_path / "sd1.safetensors", meta=lambda m: {**m, "arch": "sd1"})
    h = tiny_handle(0)
    with pytest.raises(SauError, match="made for a 'sd1' model; this model is 'organism'"):
        apply_patch(h, load_patch(p))
    assert not _has_lora(h)


def test_mismatched_shape_and_missing_module(patch_file, tmp_path):
    key = next(k for k in load_safetensors(patch_file) if k.startswith("unet.") and k.endswith("to_k.lora_A.weight"))
    p = rewrite(patch_file, tmp_path / "s.safetensors",
                tensors=lambda t: {**t, key: torch.zeros(4, t[key].shape[1] + 1)})
    h = tiny_handle(0)
    with pytest.raises(SauError, match="do not fit the layer's weight"):
        apply_patch(h, load_patch(p))
    assert not _has_lora(h)  # refused before anything was added

    def rename(t):
        return {k.replace("down_blocks.0.", "down_blocks.7."): v for k, v in t.items()}

    def fix_meta(m):
        return {**m, "target_modules": m["target_modules"].replace("down_blocks.0.", "down_blocks.7.")}

    p = rewrite(patch_file, tmp_path / "m.safetensors", tensors=rename, meta=fix_meta)
    with pytest.raises(SauError, match="targets unet.down_blocks.7.*which this model does not have"):
        apply_patch(h, load_patch(p))
    assert not _has_lora(h)


def test_other_base_weights_need_force(patch_file):
    patch = load_patch(patch_file)
    other = tiny_handle(5)  # same architecture, other weights
    with pytest.raises(SauError, match="other base weights.*force"):
        apply_patch(other, patch)
    assert not _has_lora(other)
    with pytest.warns(UserWarning, match="applying anyway"):
        apply_patch(other, patch, force=True)
    assert _has_lora(other)


def test_truncated_and_hostile_files_go_through_the_validator(patch_file, tmp_path):
    data = patch_file.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-10])
    with pytest.raises(UnsafeFileError, match="cut.safetensors"):
        load_patch(cut)
    bomb = tmp_path / "bomb.safetensors"
    bomb.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(UnsafeFileError, match="header bomb"):
        load_patch(bomb)
    pickle = tmp_path / "patch.ckpt"
    pickle.write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(UnsafeFileError, match="pickle checkpoint; SAU never unpickles"):
        load_patch(pickle)
    nan = rewrite(patch_file, tmp_path / "nan.safetensors",
                  tensors=lambda t: {k: (v.clone().fill_(float("nan")) if i == 0 else v)
                                     for i, (k, v) in enumerate(sorted(t.items()))})
    with pytest.raises(SauError, match="NaN"):
        load_patch(nan)


# ------------------------------------------------------------------------------ SD1.5 architecture (full size)
def _close(a, b, what, exact=False):
    assert a.keys() == b.keys(), what
    for k in a:
        if exact:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{what}.{k}"
        else:  # fp16: the kohya route folds the scale into lora_up before the product
            torch.testing.assert_close(a[k].float(), b[k].float(), atol=2e-3, rtol=2e-3, msg=f"{what}.{k}")


@pytest.mark.slow
def test_sd1_single_file_and_kohya_exports(tmp_path):
    from diffusers import StableDiffusionPipeline

    from sau_core.patch import _plain_state

    h = random_handle("sd1", torch.float16, seed=1)
    layers = ["down_blocks.1.attentions.0.transformer_blocks.0.attn2", "mid_block.attentions.0.transformer_blocks.0.attn2",
              "up_blocks.3.attentions.2.transformer_blocks.0.attn2"]
    add_sau_adapter(h.unet, layers, rank=4, alpha=8)
    _randomise_lora(h.unet, seed=3, scale=0.02)
    # q/k/v/out: diffusers' converter cannot tell the format of a kohya text-encoder LoRA without out_proj
    # ("Could not automatically infer state dict type"), whoever wrote it.
    add_te_adapter(h.text_encoder, rank=4, alpha=4, layers=(0, 11), seed=4,
                   projections=("q_proj", "k_proj", "v_proj", "out_proj"))
    merged = merged_handle(h)
    assert any(not torch.equal(merged.unet.state_dict()[k], v) for k, v in _plain_state(h.unet).items())

    # Single file in the original naming: reloads as the merged model, bit for bit.
    sf = export(h, "single-file", tmp_path / "clean.safetensors", META)
    meta = validate_safetensors(sf, check_values=False).metadata
    assert meta["sau.format"] == FORMAT and meta["modelspec.architecture"] == "stable-diffusion-v1"
    back = load_model(sf, dtype=None)
    assert back.arch == "sd1"
    for name in ("unet", "text_encoder", "vae"):
        _close(getattr(back, name).state_dict(), getattr(merged, name).state_dict(), name, exact=True)
    del back
    sf.unlink()

    # kohya: LDM module names, alpha = rank (the scale is in lora_up).
    kp = export(h, "kohya", tmp_path / "clean_kohya.safetensors", META)
    kohya = load_safetensors(kp)
    assert len(kohya) == 3 * (3 * 4 + 2 * 4)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight" in kohya
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_out_0.lora_up.weight" in kohya
    assert "lora_unet_output_blocks_11_1_transformer_blocks_0_attn2_to_v.alpha" in kohya
    assert "lora_te_text_model_encoder_layers_11_self_attn_v_proj.lora_down.weight" in kohya
    assert validate_safetensors(kp, check_values=False).metadata["sau.format"] == FORMAT

    # diffusers' own loader and kohya converter on the base model (given the UNet config to map LDM block
    # numbers, which its SDXL loader passes by itself): the result equals our merge.
    _, alphas = StableDiffusionPipeline.lora_state_dict(str(kp), unet_config=h.unet.config)
    assert set(alphas.values()) == {4.0}
    remove_patch(h)
    pipe = h.to_pipeline()
    pipe.load_lora_weights(str(kp), unet_config=pipe.unet.config, adapter_name="k")
    _close(_plain_state(h.unet, "k"), merged.unet.state_dict(), "unet")
    _close(_plain_state(h.text_encoder, "k"), merged.text_encoder.state_dict(), "text_encoder")
