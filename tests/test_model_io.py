"""Model handle: every format in and out, with random-weight models of the real SD1.5, SD2 and SDXL
architectures (from the shipped configs; nothing downloaded) and tiny pipelines for diffusers folders."""
from __future__ import annotations

import json
import math
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from sau_core.cli import main as cli
from sau_core.errors import SauError, UnsafeFileError, UnsupportedModelError
from sau_core.keymap import (
    UNET_PREFIX,
    apply_ops,
    diffusers_to_ldm_key,
    get_keymap,
    kohya_lora_name,
    ldm_to_diffusers_key,
)
from sau_core.model_io import (
    ORGANISM_CONFIGS,
    TOKENIZER_DIR,
    ModelHandle,
    detect_architecture,
    empty_components,
    handle_from_state_dict,
    inspect_model,
    ldm_state_dict,
    load_model,
    random_handle,
    save_diffusers,
    save_single_file,
    write_safetensors,
)
from sau_core.safety import load_safetensors, validate_safetensors

# ------------------------------------------------------------------------------------------------------------
# Helpers


def assert_same_weights(a: ModelHandle, b: ModelHandle) -> None:
    assert a.models().keys() == b.models().keys()
    for name, model in a.models().items():
        sa, sb = model.state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), f"{name}.{key}"


def assert_same_files(a: Path, b: Path) -> None:
    """Identical key sets, dtypes, shapes and tensor bytes (metadata may differ)."""
    ia, ib = validate_safetensors(a, check_values=False), validate_safetensors(b, check_values=False)
    assert ia.tensors.keys() == ib.tensors.keys()
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for name, ea in sorted(ia.tensors.items(), key=lambda kv: kv[1].start):
            eb = ib.tensors[name]
            assert (ea.dtype, ea.shape) == (eb.dtype, eb.shape), name
            fa.seek(ia.data_offset + ea.start)
            fb.seek(ib.data_offset + eb.start)
            assert fa.read(ea.nbytes) == fb.read(eb.nbytes), name


def attention_keys(arch: str) -> list[str]:
    return [e.key for e in get_keymap(arch).entries if e.component == "unet"
            and re.search(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)\.(weight|bias)$", e.key)]


def tiny_handle(seed: int = 0) -> ModelHandle:
    """A tiny but real SD pipeline (the organism's kind), random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                        sample_size=16, layers_per_block=1)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406,
                                      eos_token_id=49407, pad_token_id=49407))
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    return ModelHandle(unet=unet.eval(), text_encoder=te.eval(), tokenizer=CLIPTokenizer.from_pretrained(
        str(TOKENIZER_DIR)), vae=vae.eval(), scheduler=sched, arch="organism", source="<test>")


# ------------------------------------------------------------------------------------------------------------
# Shipped configs: the real architectures


@pytest.mark.parametrize("arch,counts", [
    ("sd1", {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}),
    ("sd2", {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840}),
    ("sd2-v", {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840}),
    ("sdxl", {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
              "text_encoder_2": 694_659_840}),
])
def test_shipped_configs_have_the_published_parameter_counts(arch, counts):
    got = {c: sum(p.numel() for p in m.parameters()) for c, m in empty_components(arch).items()}
    assert got == counts


# ------------------------------------------------------------------------------------------------------------
# Key map


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_every_unet_attention_key_maps_both_ways(arch):
    keys = attention_keys(arch)
    assert len(keys) == {"sd1": 16, "sdxl": 70}[arch] * 2 * 5  # blocks x attn1/2 x q,k,v,out.w,out.b
    ldm_keys = set()
    for key in keys:
        ldm = diffusers_to_ldm_key(key, arch, "unet")
        assert ldm.startswith(UNET_PREFIX) and ldm.endswith(key.split("transformer_blocks.", 1)[1])
        assert ldm_to_diffusers_key(ldm, arch) == ("unet", key)
        assert ldm_to_diffusers_key(ldm[len("model."):], arch) == ("unet", key)  # ComfyUI's names
        ldm_keys.add(ldm)
    assert len(ldm_keys) == len(keys)


def test_known_attention_names():
    d = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    assert diffusers_to_ldm_key(d, "sd1") == f"{UNET_PREFIX}input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    assert ldm_to_diffusers_key(f"{UNET_PREFIX}output_blocks.11.1.transformer_blocks.0.attn1.to_out.0.bias",
                                "sd1") == ("unet", "up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_out.0.bias")
    assert ldm_to_diffusers_key(f"{UNET_PREFIX}middle_block.1.transformer_blocks.0.attn2.to_v.weight", "sd1") == \
        ("unet", "mid_block.attentions.0.transformer_blocks.0.attn2.to_v.weight")
    # SDXL: no attention in the first level, 10 transformer blocks in the last
    assert diffusers_to_ldm_key("down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k.weight", "sdxl") == \
        f"{UNET_PREFIX}input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight"
    assert kohya_lora_name(d, "sd1") == "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"


def test_text_encoder_keys_both_ways():
    for key in ("encoder.layers.3.self_attn.q_proj.weight", "text_model.encoder.layers.3.self_attn.q_proj.weight"):
        ldm = diffusers_to_ldm_key(key, "sd1", "text_encoder")
        assert ldm == "cond_stage_model.transformer.text_model.encoder.layers.3.self_attn.q_proj.weight"
        assert ldm_to_diffusers_key(ldm, "sd1") == ("text_encoder", "encoder.layers.3.self_attn.q_proj.weight")
        assert kohya_lora_name(key, "sd1", "text_encoder") == "lora_te_text_model_encoder_layers_3_self_attn_q_proj"
    assert diffusers_to_ldm_key("encoder.layers.0.mlp.fc1.weight", "sdxl", "text_encoder") == \
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    assert kohya_lora_name("text_model.encoder.layers.5.self_attn.v_proj.weight", "sdxl", "text_encoder_2") == \
        "lora_te2_text_model_encoder_layers_5_self_attn_v_proj"
    # OpenCLIP fuses q, k, v: one LDM tensor, three slices
    km = get_keymap("sdxl")
    fused = "conditioner.embedders.1.model.transformer.resblocks.5.attn.in_proj_weight"
    parts = km.entries_for_ldm(fused)
    assert sorted(e.key.rsplit(".", 2)[1] for e in parts) == ["k_proj", "q_proj", "v_proj"]
    with pytest.raises(KeyError):
        ldm_to_diffusers_key(fused, "sdxl")
    tagged = torch.arange(3840 * 2).reshape(3840, 2)
    k = km.entry("text_encoder_2", "encoder.layers.5.self_attn.k_proj.weight")
    assert torch.equal(apply_ops(tagged, k.ops), tagged[1280:2560])
    proj = km.entry("text_encoder_2", "text_projection.weight")
    assert proj.ldm_key == "conditioner.embedders.1.model.text_projection" and proj.ops == (("T",),)
    assert diffusers_to_ldm_key("encoder.layers.22.self_attn.out_proj.weight", "sd2", "text_encoder") == \
        "cond_stage_model.model.transformer.resblocks.22.attn.out_proj.weight"


@pytest.mark.parametrize("arch,known", [
    ("sd1", {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "model.diffusion_model.middle_block.2.emb_layers.1.weight": (1280, 1280),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "model.diffusion_model.time_embed.0.weight": (1280, 320),
        "first_stage_model.decoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "first_stage_model.encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
        "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
        "cond_stage_model.transformer.text_model.final_layer_norm.bias": (768,),
    }),
    ("sdxl", {
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        "model.diffusion_model.input_blocks.4.1.proj_in.weight": (640, 640),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight": (5120, 1280),
        "conditioner.embedders.1.model.positional_embedding": (77, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "conditioner.embedders.1.model.ln_final.weight": (1280,),
    }),
])
def test_canonical_layout_uses_the_original_names(arch, known):
    shapes = {e.ldm_key: e.ldm_shape for e in get_keymap(arch).entries}
    for key, shape in known.items():
        assert shapes.get(key) == shape, key
    assert len(shapes) == {"sd1": 1130, "sdxl": 2513}[arch]


def test_detect_architecture():
    def shapes(arch):
        return {e.ldm_key: e.ldm_shape for e in get_keymap(arch).entries}

    assert detect_architecture(shapes("sd1")) == "sd1"
    assert detect_architecture(shapes("sdxl")) == "sdxl"
    assert detect_architecture(shapes("sd2")) == "sd2-v"  # most SD2.x files are 768-v
    assert detect_architecture(shapes("sd2"), {"modelspec.architecture": "stable-diffusion-v2-512"}) == "sd2"
    assert detect_architecture(shapes("sd2"), {"modelspec.prediction_type": "epsilon"}) == "sd2"
    inpaint = dict(shapes("sd1"), **{f"{UNET_PREFIX}input_blocks.0.0.weight": (320, 9, 3, 3)})
    with pytest.raises(UnsupportedModelError, match="9 input channels"):
        detect_architecture(inpaint)
    with pytest.raises(UnsupportedModelError, match="no Stable Diffusion UNet"):
        detect_architecture({"lora_unet_x.lora_up.weight": (4, 4)})
    refiner = dict(shapes("sdxl"), **{"conditioner.embedders.0.model.text_projection": (1280, 1280)})
    with pytest.raises(UnsupportedModelError, match="refiner"):
        detect_architecture(refiner)
    mixed = {k: v for k, v in shapes("sd1").items() if not k.startswith("cond_stage_model")}
    mixed.update({k: v for k, v in shapes("sd2").items() if k.startswith("cond_stage_model")})
    with pytest.raises(UnsupportedModelError, match="768"):
        detect_architecture(mixed)


# ------------------------------------------------------------------------------------------------------------
# Tiny pipelines: diffusers folders (the organism's format)


def test_tiny_diffusers_folder_round_trip_and_generation(tmp_path):
    h = tiny_handle()
    folder = save_diffusers(h, tmp_path / "tiny")
    te_keys = validate_safetensors(folder / "text_encoder" / "model.safetensors", check_values=False).tensors
    assert all(k.startswith("text_model.") for k in te_keys)  # the layout transformers 4.x and 5.x both read
    assert {"vocab.json", "merges.txt"} <= {p.name for p in (folder / "tokenizer").iterdir()}
    assert json.loads((folder / "model_index.json").read_text())["safety_checker"] == [None, None]
    back = load_model(folder, dtype=None)
    assert (back.arch, back.source_format, back.text_encoder_2) == ("organism", "diffusers", None)
    assert_same_weights(h, back)
    assert back.tokenizer("a red circle").input_ids == h.tokenizer("a red circle").input_ids
    pipe = back.to_pipeline()
    out = pipe("a red circle", num_inference_steps=2, height=16, width=16, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 16, 16, 3) and math.isfinite(float(out.images.sum()))
    assert load_model(folder).unet.dtype == torch.float32
    assert load_model(folder, dtype=torch.float16).text_encoder.dtype == torch.float16
    with pytest.raises(SauError, match="not empty"):
        save_diffusers(h, folder)
    save_diffusers(tiny_handle(seed=1), folder, overwrite=True)
    assert not torch.equal(load_model(folder).unet.conv_in.weight, h.unet.conv_in.weight)


# ------------------------------------------------------------------------------------------------------------
# Organisms as one file (what A1111 / Forge list in models/Stable-diffusion): SD1 naming + embedded configs


def test_organism_single_file_round_trip(tmp_path):
    h = tiny_handle()
    path = save_single_file(h, tmp_path / "tiny.safetensors")
    info = validate_safetensors(path, check_values=False)
    assert ORGANISM_CONFIGS in info.metadata and "modelspec.architecture" not in info.metadata
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in info.tensors
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in info.tensors
    assert "first_stage_model.decoder.conv_out.weight" in info.tensors
    back = load_model(path, dtype=None)
    assert (back.arch, back.source_format) == ("organism", "single-file")
    assert_same_weights(h, back)
    assert dict(back.scheduler.config) == dict(h.scheduler.config) and type(back.scheduler) is type(h.scheduler)
    assert back.tokenizer("\u200ba red circle").input_ids == h.tokenizer("\u200ba red circle").input_ids
    again = save_single_file(back, tmp_path / "again.safetensors")
    assert again.read_bytes() == path.read_bytes()  # load -> save gives the same file, byte for byte
    # an SD1.5 file still loads as SD1 (the organism path only triggers on the embedded configs)
    assert load_model(save_single_file(random_handle("sd1"), tmp_path / "sd1.safetensors"), dtype=None).arch == "sd1"


@pytest.mark.parametrize("edit,match", [
    (lambda d: {**d, "format": 2}, "format 1"),
    (lambda d: {**d, "components": {k: v for k, v in d["components"].items() if k != "vae"}}, "format 1"),
    (lambda d: {**d, "components": {**d["components"], "unet": ["os.system", {}]}}, "not supported"),
    (lambda d: {**d, "scheduler": ["AutoencoderKL", {}]}, "not a diffusers scheduler"),
    (lambda d: {**d, "scheduler": "DDIMScheduler"}, "not a .class, config. pair"),
    (lambda d: {**d, "components": {**d["components"], "unet": ["UNet2DConditionModel", {
        **d["components"]["unet"][1], "block_out_channels": [64, 128]}]}}, "do not fit|wrong shape"),
])
def test_organism_single_file_bad_configs_refused(tmp_path, edit, match):
    path = save_single_file(tiny_handle(), tmp_path / "tiny.safetensors")
    meta = dict(validate_safetensors(path, check_values=False).metadata)
    meta[ORGANISM_CONFIGS] = json.dumps(edit(json.loads(meta[ORGANISM_CONFIGS])))
    bad = tmp_path / "bad.safetensors"
    write_safetensors(bad, load_safetensors(path), meta)
    with pytest.raises(UnsupportedModelError, match=match):
        load_model(bad)
    meta[ORGANISM_CONFIGS] = "{not json"
    write_safetensors(bad, load_safetensors(path), meta)
    with pytest.raises(UnsupportedModelError, match="not valid JSON"):
        load_model(bad)


def test_folder_written_by_diffusers_itself_loads(tmp_path):
    h = tiny_handle()
    h.to_pipeline().save_pretrained(tmp_path / "pipe", safe_serialization=True)  # transformers-5 names
    back = load_model(tmp_path / "pipe", dtype=None)
    assert back.arch == "organism"
    assert_same_weights(h, back)
    assert inspect_model(tmp_path / "pipe")["problems"] == []


def test_malformed_folders_are_refused(tmp_path):
    folder = save_diffusers(tiny_handle(), tmp_path / "tiny")
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    for bad, message in (({**index, "unet": "UNet2DConditionModel"}, "not a \\[library, class\\] pair"),
                         ({**index, "unet": ["diffusers", "MaliciousModel"]}, "not supported"),
                         ({**index, "_class_name": "StableDiffusionXLPipeline"}, "no text_encoder_2"),
                         ({**index, "_class_name": "FluxPipeline"}, "supported pipelines")):
        index_path.write_text(json.dumps(bad))
        with pytest.raises(SauError, match=message):
            load_model(folder)
    index_path.write_text(json.dumps(index))
    (folder / "unet" / "config.json").write_text(json.dumps({"block_out_channels": "nonsense"}))
    with pytest.raises(UnsupportedModelError, match="cannot build UNet2DConditionModel"):
        load_model(folder)


def test_folder_variants_load(tmp_path):
    """transformers-5 names (no text_model.), fp16 variant files and sharded weights with an index."""
    h = tiny_handle()
    folder = save_diffusers(h, tmp_path / "tiny")
    te = folder / "text_encoder"
    write_safetensors(te / "model.fp16.safetensors", h.text_encoder.state_dict())
    (te / "model.safetensors").unlink()
    unet = folder / "unet"
    sd = h.unet.state_dict()
    keys = sorted(sd)
    shards = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2:]}
    for name, part in shards.items():
        write_safetensors(unet / name, {k: sd[k] for k in part})
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: n for n, part in shards.items() for k in part}}))
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    assert_same_weights(h, load_model(folder, dtype=None))
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {keys[0]: "../../evil.safetensors"}}))
    with pytest.raises(SauError, match="outside its folder"):
        load_model(folder)


def test_folder_with_pickled_weights_is_refused_unloaded(tmp_path):
    folder = save_diffusers(tiny_handle(), tmp_path / "tiny")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()

    class Boom:
        def __reduce__(self):
            return (Path(tmp_path / "pwned").touch, ())

    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps({"w": Boom()}, protocol=2))
    with pytest.raises(UnsafeFileError, match="pickle.*never unpickles"):
        load_model(folder)
    assert not (tmp_path / "pwned").exists()


def test_bad_inputs(tmp_path):
    with pytest.raises(UnsafeFileError, match="does not exist"):
        load_model(tmp_path / "missing.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SauError, match="model_index.json"):
        load_model(tmp_path / "empty")
    lora = tmp_path / "lora.safetensors"
    write_safetensors(lora, {"lora_unet_x.lora_up.weight": torch.zeros(4, 4)})
    with pytest.raises(UnsupportedModelError, match="LoRA"):
        load_model(lora)
    with pytest.raises(UnsupportedModelError, match="unknown architecture"):
        load_model(lora, arch="sd3")


# ------------------------------------------------------------------------------------------------------------
# Random-weight real architectures: single files in the original naming


@pytest.fixture(autouse=True)
def _free_disk(tmp_path):
    """pytest keeps the temp folders of recent runs; do not keep gigabytes of random checkpoints there."""
    yield
    for f in tmp_path.rglob("*.safetensors"):
        f.unlink()


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    h = random_handle("sd1", torch.float16, seed=1)
    path = save_single_file(h, tmp_path_factory.mktemp("sd1") / "sd15.safetensors", {"note": "random"})
    yield h, path
    path.unlink()


def test_sd1_single_file_round_trip(sd1, tmp_path):
    h, path = sd1
    back = load_model(path, dtype=None)
    assert (back.arch, back.source_format, back.extras) == ("sd1", "single-file", {})
    assert back.metadata["modelspec.architecture"] == "stable-diffusion-v1" and back.metadata["note"] == "random"
    assert_same_weights(h, back)
    again = save_single_file(back, tmp_path / "again.safetensors")
    assert_same_files(path, again)


def test_sd1_layout_is_what_diffusers_converter_reads(sd1):
    """Independent of our tracing: diffusers' converters on the real tensors give the model's weights."""
    from diffusers.loaders import single_file_utils as sfu

    h, _ = sd1
    ldm = ldm_state_dict(h)
    unet = sfu.convert_ldm_unet_checkpoint(ldm, dict(h.unet.config))
    vae = sfu.convert_ldm_vae_checkpoint(ldm, dict(h.vae.config))
    te = {k.removeprefix("text_model."): v for k, v in sfu.convert_ldm_clip_checkpoint(ldm).items()}
    for model, converted in ((h.unet, unet), (h.vae, vae), (h.text_encoder, te)):
        sd = model.state_dict()
        assert sd.keys() == converted.keys()
        assert all(torch.equal(sd[k], converted[k]) for k in sd)


def test_sd1_diffusers_folder_and_back_to_single_file(sd1, tmp_path):
    h, path = sd1
    folder = save_diffusers(h, tmp_path / "sd15")
    back = load_model(folder, dtype=None)
    assert back.arch == "sd1" and back.ldm_entries is None
    assert_same_weights(h, back)
    assert back.tokenizer.pad_token == "<|endoftext|>"
    # written with the canonical map (no original file): the same bytes as the first file
    assert_same_files(path, save_single_file(back, tmp_path / "from_folder.safetensors"))


def test_host_state_dict(sd1):
    h, _ = sd1
    host = {k.removeprefix("model."): v for k, v in ldm_state_dict(h).items()}  # ComfyUI: diffusion_model.*
    host["alphas_cumprod"] = torch.linspace(1, 0, 1000)
    handle = handle_from_state_dict(host)
    assert (handle.arch, handle.source_format) == ("sd1", "state-dict")
    assert_same_weights(h, handle)
    assert torch.equal(handle.extras["alphas_cumprod"], host["alphas_cumprod"])
    with torch.no_grad():
        handle.unet.conv_in.weight.add_(1)  # a copy: the host's model is never edited in place
    assert torch.equal(host["diffusion_model.input_blocks.0.0.weight"], h.unet.conv_in.weight)


def test_sd2_extras_and_prediction_type_survive(tmp_path):
    h = random_handle("sd2-v", torch.float16, seed=2)
    ldm = ldm_state_dict(h)
    gen = torch.Generator().manual_seed(0)
    extras = {  # what real SD2 files carry besides the diffusers weights
        "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight": torch.randn(3072, 1024, generator=gen),
        "cond_stage_model.model.transformer.resblocks.23.ln_1.weight": torch.randn(1024, generator=gen),
        "cond_stage_model.model.text_projection": torch.randn(1024, 1024, generator=gen),
        "cond_stage_model.model.logit_scale": torch.tensor(4.6052),
        "alphas_cumprod": torch.linspace(1, 0, 1000, dtype=torch.float64),
    }
    handle = handle_from_state_dict({**ldm, **extras}, copy=False)
    assert handle.arch == "sd2-v" and handle.extras.keys() == extras.keys()
    path = save_single_file(handle, tmp_path / "sd21.safetensors")
    report = inspect_model(path, check_values=False)
    assert report["architecture"] == "sd2-v" and report["unused"]["tensors"] == 5 and report["problems"] == []
    back = load_model(path, dtype=None)
    assert back.arch == "sd2-v" and back.scheduler.config.prediction_type == "v_prediction"
    assert back.tokenizer.pad_token == "!"
    assert_same_weights(h, back)
    assert all(torch.equal(back.extras[k], v) for k, v in extras.items())
    assert_same_files(path, save_single_file(back, tmp_path / "again.safetensors"))
    base = save_single_file(back, tmp_path / "base.safetensors",
                            {"modelspec.architecture": "stable-diffusion-v2-512"}, include_extras=False)
    assert validate_safetensors(base, check_values=False).tensors.keys() == ldm.keys()
    loaded = load_model(base, dtype=None)
    assert loaded.arch == "sd2" and loaded.scheduler.config.prediction_type == "epsilon"


@pytest.mark.slow
def test_sdxl_single_file_round_trip(tmp_path):
    import gc

    from diffusers import StableDiffusionXLPipeline

    h = random_handle("sdxl", torch.float16, seed=3)
    path = save_single_file(h, tmp_path / "sdxl.safetensors")
    back = load_model(path, dtype=None)
    assert back.arch == "sdxl" and back.tokenizer_2.pad_token == "!" and back.tokenizer.pad_token != "!"
    assert_same_weights(h, back)
    del h
    gc.collect()  # keeps the peak at two copies of the model (< 15 GB)
    assert isinstance(back.to_pipeline(), StableDiffusionXLPipeline)
    assert_same_files(path, save_single_file(back, tmp_path / "again.safetensors"))


# ------------------------------------------------------------------------------------------------------------
# The organism, when its build has been shipped


@pytest.mark.parametrize("folder", sorted(p.parent for p in (Path(__file__).resolve().parent.parent / "sau_core"
                                                             / "organisms").glob("*/model_index.json")) or [None])
def test_organism_loads(folder, tmp_path):
    if folder is None:
        pytest.skip("no organism has been built yet")
    h = load_model(folder)
    assert h.arch == "organism" and h.source_format == "diffusers"
    assert_same_weights(h, load_model(save_diffusers(h, tmp_path / "copy")))


# ------------------------------------------------------------------------------------------------------------
# sau inspect


@pytest.fixture()
def partial_sd1(tmp_path):
    """A small file with SD1 names and shapes for a few weights, a NaN and an unknown key."""
    km = get_keymap("sd1")
    keep = [f"{UNET_PREFIX}input_blocks.0.0.weight",
            f"{UNET_PREFIX}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
            "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"]
    shapes = {e.ldm_key: e.ldm_shape for e in km.entries}
    tensors = {k: torch.zeros(shapes[k], dtype=torch.float16) for k in keep}
    tensors[keep[1]][0, 0] = float("nan")
    tensors["model_ema.decay"] = torch.tensor(0.9999)
    tensors["hidden.payload"] = torch.zeros(3)
    path = tmp_path / "partial.safetensors"
    write_safetensors(path, tensors, {"ss_\x1b[2Jtitle": "x\x1b[31m"})
    return path


def test_inspect_reports_problems(partial_sd1):
    runner = CliRunner()
    result = runner.invoke(cli, ["inspect", str(partial_sd1)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "architecture: sd1" in out and "single-file" in out
    assert "NaN or Inf" in out and "lacks" in out and "1 unknown keys (e.g. hidden.payload)" in out
    assert "\x1b" not in out  # metadata cannot drive the terminal
    report = json.loads(runner.invoke(cli, ["inspect", "--json", str(partial_sd1)]).output)
    assert report["architecture"] == "sd1" and report["unused"]["examples"] == ["model_ema.decay"]
    assert report["components"]["unet"]["params"] == 320 * 4 * 9 + 320 * 768


def test_inspect_full_models(sd1, tmp_path):
    _, path = sd1
    result = CliRunner().invoke(cli, ["inspect", "--skip-values", str(path)])
    assert result.exit_code == 0, result.output
    assert "859,520,964" in result.output and "problems:     none found" in result.output
    folder = save_diffusers(tiny_handle(), tmp_path / "tiny")
    report = json.loads(CliRunner().invoke(cli, ["inspect", "--json", str(folder)]).output)
    assert report["format"] == "diffusers" and report["architecture"] == "organism"
    assert report["components"]["unet"]["params"] == sum(p.numel() for p in tiny_handle().unet.parameters())


@pytest.mark.parametrize("make,message", [
    (lambda d: d / "missing.safetensors", "does not exist"),
    (lambda d: (d / "m.ckpt").write_bytes(pickle.dumps({"a": 1}, protocol=2)) and d / "m.ckpt", "pickle"),
    (lambda d: d, "model_index.json"),
    (lambda d: write_safetensors(d / "l.safetensors", {"a.lora_up.weight": torch.zeros(2)}) or d / "l.safetensors",
     "no Stable Diffusion UNet"),
])
def test_inspect_bad_input_is_one_line(tmp_path, make, message):
    target = make(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    result = CliRunner().invoke(cli, ["inspect", str(target)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert "Traceback" not in result.output and sorted(tmp_path.rglob("*")) == before


def test_inspect_subprocess(partial_sd1, tmp_path):
    sau = Path(sys.executable).parent / "sau"
    cmd = [str(sau)] if sau.exists() else [sys.executable, "-c", "from sau_core.cli import main; main()"]
    ok = subprocess.run(cmd + ["inspect", "--json", str(partial_sd1)], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["architecture"] == "sd1"
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    res = subprocess.run(cmd + ["inspect", str(bad)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.startswith("error: ") and len(res.stderr.strip().splitlines()) == 1
    assert "Traceback" not in res.stderr
