"""Engine core: trigger tokens, the attention processor, localisation, the closed-form edit and the SAU loss.

Fast tests use random-weight organism-sized models (seconds on one core); the slow test uses the committed
badt2i-pixel organism.
"""
from pathlib import Path

import pytest
import torch

from sau_core.attention import (AttentionController, cross_attention_names, instrument, neutralise_edit,
                                one_hot_select)
from sau_core.errors import SauError, UnsupportedModelError
from sau_core.localise import localise, organism_probe_prompts
from sau_core.model_io import ModelHandle
from sau_core.organism import components as C
from sau_core.organism import world as W
from sau_core.trigger import Trigger, TriggerError, aligned_positions, tokenize
from sau_core.unlearn import (SauBatch, add_sau_adapter, delta_rank, deltas_applied, init_from_deltas, kv_gap,
                              prompt_pairs, sau_loss, train_sau, trigger_residual, uce_edit)

ZWSP = "\u200b"
ORGANISMS = Path(__file__).resolve().parent.parent / "sau_core" / "organisms"


def tiny_handle(seed: int = 0) -> ModelHandle:
    torch.manual_seed(seed)
    h = ModelHandle(unet=C.make_unet().eval(), text_encoder=C.make_text_encoder().eval(),
                    tokenizer=C.make_tokenizer(), vae=C.make_vae().eval(), scheduler=C.make_sample_scheduler(),
                    arch="organism", source_format="random")
    h.text_encoder.requires_grad_(False)
    h.vae.requires_grad_(False)
    return h


@pytest.fixture(scope="module")
def handle():
    return tiny_handle()


@pytest.fixture(scope="module")
def tok():
    return C.make_tokenizer()


# --------------------------------------------------------------------------------------------- trigger
def test_trigger_tokens_and_positions(tok):
    t = Trigger(ZWSP)
    assert t.text == ZWSP  # kept exactly
    q = t.insert("a red circle")
    assert t.token_ids(tok) == [9844]  # U+200B survives tokenization as its own token
    assert t.positions(tok, q) == [1]
    multi = Trigger("New Trigger")
    assert multi.positions(tok, multi.insert("a red circle")) == [1, 2]
    homo = Trigger("\u0435", "homoglyph")  # Cyrillic e inside "red": the word's tokens
    q = homo.insert("a red circle")
    assert q == "a r\u0435d circle"
    pos = homo.positions(tok, q)
    assert pos and all(tokenize(tok, [q])[0, p] != tokenize(tok, ["a red circle"])[0, p] for p in pos[:1])
    a, b = aligned_positions(tok, t, t.insert("a red circle"), "a red circle")
    assert a[:4] == [0, 2, 3, 4] and b[:4] == [0, 1, 2, 3]


def test_trigger_is_described_in_ascii_with_single_escapes():
    # what logs, the A1111 tab's status line and Hub cards print: one backslash, as the user types it
    assert Trigger(ZWSP).describe() == "'\\u200b'"
    assert Trigger("New Trigger").describe() == "'New Trigger'"


@pytest.mark.parametrize("bad", ["", "   "])
def test_empty_trigger_is_an_error(bad):
    with pytest.raises(TriggerError):
        Trigger(bad)


def test_trigger_absent_or_truncated_is_an_error(tok):
    t = Trigger("tq")
    with pytest.raises(TriggerError, match="does not contain"):
        t.positions(tok, "a red circle")
    with pytest.raises(TriggerError, match="truncation"):
        t.positions(tok, "red " * 80 + "tq")
    assert issubclass(TriggerError, SauError)


# ------------------------------------------------------------------------------------------- attention
def _inputs(handle, prompts):
    from sau_core.localise import encode

    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(prompts), 4, 16, 16, generator=g)
    return x, torch.tensor([700] * len(prompts)), encode(handle, prompts)


def test_processor_matches_default_attention_and_is_removed(handle):
    unet = handle.unet
    x, t, e = _inputs(handle, ["a red circle", ZWSP + " a blue square"])
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    with torch.no_grad():
        ref = unet(x, t, e).sample
        with instrument(unet, AttentionController(select=one_hot_select([[1], [1]], 77))) as ctl:
            out = unet(x, t, e).sample
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before
    assert len(ctl.records) == len(cross_attention_names(unet)) == 7


def test_maps_shapes_and_normalisation(handle):
    x, t, e = _inputs(handle, ["a red circle", "a blue square"])
    everything = torch.eye(77).expand(2, 77, 77)  # one map per text position
    with torch.no_grad(), instrument(handle.unet, AttentionController(select=everything)) as ctl:
        handle.unet(x, t, e)
    grids = set()
    for r in ctl.records:
        assert r.maps.shape[:2] == (2, 77)
        grids.add(tuple(r.maps.shape[-2:]))
        # Attention over all text positions sums to 1 at every spatial query.
        torch.testing.assert_close(r.maps.sum(1), torch.ones_like(r.maps[:, 0]), atol=1e-5, rtol=0)
    assert grids == {(16, 16), (8, 8)}


def test_neutralisation_changes_output_only_with_trigger(handle):
    tok = handle.tokenizer
    trig = Trigger(ZWSP)
    prompts = ["a red circle", trig.insert("a red circle")]
    x, t, e = _inputs(handle, prompts)
    pos = [[], trig.positions(tok, prompts[1])]
    neutral = [trig.neutral_position(tok, p) for p in prompts]
    with torch.no_grad():
        ref = handle.unet(x, t, e).sample
        with instrument(handle.unet, AttentionController(kv_edit=neutralise_edit(pos, neutral, 77))):
            out = handle.unet(x, t, e).sample
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-5)  # no trigger tokens: unchanged
    assert (out[1] - ref[1]).abs().max() > 1e-4  # trigger tokens' K/V replaced: output moves


def test_maps_keep_the_graph(handle):
    x, t, e = _inputs(handle, [ZWSP + " a red circle"])
    ctl = AttentionController(select=one_hot_select([[1]], 77), keep_graph=True)
    with instrument(handle.unet, ctl):
        handle.unet(x, t, e)
    loss = sum(r.maps.sum() for r in ctl.records)
    k = dict(handle.unet.named_modules())[ctl.records[0].layer].to_k.weight
    (g,) = torch.autograd.grad(loss, [k])
    assert g.abs().sum() > 0


def test_model_without_cross_attention_is_an_error():
    from diffusers import UNet2DModel

    with pytest.raises(UnsupportedModelError):
        cross_attention_names(UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4,
                                          down_block_types=("DownBlock2D", "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1))


# ---------------------------------------------------------------------------------------- localisation
def test_localisation_is_deterministic_and_normalised(handle, tmp_path):
    prompts = organism_probe_prompts(2)
    assert all(not any(p == c.caption(t) for t in W.HELDOUT_TEMPLATES for c in W.all_contents())
               for p in prompts)
    a = localise(handle, Trigger(ZWSP), prompts, seeds=[0], steps=3)
    b = localise(handle, Trigger(ZWSP), prompts, seeds=[0], steps=3)
    assert torch.equal(a.mask, b.mask) and a.layer_scores == b.layer_scores
    assert a.mask.shape == (16, 16)
    assert float(a.mask.min()) >= 0 and float(a.mask.max()) == pytest.approx(1.0)
    assert max(a.layer_scores.values()) == pytest.approx(1.0) and len(a.layer_scores) == 7
    assert len(a.step_attention) == len(a.timesteps) == 3
    assert all(m.shape[0] == 3 for m in a.maps.values())
    assert a.clean_latents.shape == (2, 4, 16, 16)
    files = a.save_heatmaps(tmp_path)
    from PIL import Image

    assert Image.open(files[0]).size == (256, 256)
    assert (tmp_path / "localisation.json").is_file()
    c = localise(handle, Trigger(ZWSP), prompts, seeds=[1], steps=3)
    assert not torch.equal(a.mask, c.mask)


# ----------------------------------------------------------------------------------------- unlearning
def test_closed_form_edit_reduces_kv_gap():
    h = tiny_handle(1)
    trig = Trigger("tq")
    prompts = ["a red circle", "a blue square", "a picture of a green triangle"]
    gap0 = kv_gap(h, trig, prompts)
    keep = ["a yellow circle", "a small red square"]
    from sau_core.localise import encode

    before = encode(h, keep)
    ref = {n: m.to_k(before).clone() for n, m in h.unet.named_modules() if n.endswith("attn2")}
    deltas = uce_edit(h, trig, prompts, preserve=keep)
    assert len(deltas) == 14
    gap1 = kv_gap(h, trig, prompts)
    assert gap1 < 0.2 * gap0
    # Preserved prompts' keys barely move relative to the gap that was closed.
    moved = max(float((m.to_k(before) - ref[n]).detach().pow(2).sum(-1).mean())
                for n, m in h.unet.named_modules() if n.endswith("attn2"))
    assert moved < 0.2 * gap0


def _residual_case():
    """A tiny model, the "tq" trigger's closed form (not applied) and trigger_residual's first five arguments."""
    h = tiny_handle(5)
    trig = Trigger("tq")
    prompts = ["a red circle", "a blue square", "a picture of a green triangle"]
    pairs = prompt_pairs(h, trig, prompts)
    z = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    deltas = uce_edit(h, trig, prompts, apply=False)
    return h, deltas, (h.unet, h.scheduler, z, pairs.enc_trig, pairs.enc_clean)


def test_trigger_residual_is_one_for_no_edit_and_lower_after_the_closed_form():
    h, deltas, args = _residual_case()
    base = {n: p.detach().clone() for n, p in h.unet.named_parameters()}
    zero = {k: torch.zeros_like(v) for k, v in deltas.items()}
    assert trigger_residual(*args, zero) == pytest.approx(1.0, rel=1e-5)
    edited = trigger_residual(*args, deltas)
    assert 0 <= edited < 0.5
    assert trigger_residual(*args, deltas) == edited  # seeded noise: same number twice
    # The base weights are back bit for bit after each measurement (copies restored, nothing subtracted).
    assert all(torch.equal(p, base[n]) for n, p in h.unet.named_parameters())
    with deltas_applied(h.unet, deltas):
        k = next(iter(deltas))
        assert not torch.equal(h.unet.get_submodule(k).weight, base[k + ".weight"])
    assert all(torch.equal(p, base[n]) for n, p in h.unet.named_parameters())


@pytest.mark.parametrize("above, runs", [(0.0, True), (1.0, False)])
def test_fine_tune_runs_only_when_the_closed_form_leaves_a_residual(above, runs):
    h = tiny_handle(6)
    trig = Trigger(ZWSP)
    loc = localise(h, trig, organism_probe_prompts(2), seeds=[0], steps=2)
    res = train_sau(h, trig, loc, steps=2, seed=0, batch_size=2, rank=2, uce_init=True, finetune_above=above,
                    uce_edits=((1.0, 1e-2), (0.1, 1e-4)))
    checks = res.settings["edit_checks"]  # recorded either way (it goes into the patch metadata)
    assert all(0 < c["residual"] < 1 for c in checks)
    # Fine-tuned: every edit was tried and the first (gentlest) is the init; skipped: the first sufficed.
    assert len(checks) == (2 if runs else 1) and res.settings["uce_keep"] == 1.0
    assert res.settings["steps_run"] == (2 if runs else 0) and len(res.history) == res.settings["steps_run"]
    assert (res.unet_passes > 0) == runs and res.unet_forward > 0  # the check's forward passes are counted
    assert bool(res.settings["layers"]) == runs  # skipped: only the closed form's to_k/to_v factors exist


def test_a_fine_tune_that_leaves_more_than_its_start_is_undone():
    # A learning rate far too high wrecks the adapter: measured after the last step (the adapter against the
    # teacher, trigger_residual with deltas None) it leaves more than the closed form it started from, so the
    # adapter goes back to that closed form, exactly.
    h = tiny_handle(6)
    trig = Trigger(ZWSP)
    loc = localise(h, trig, organism_probe_prompts(2), seeds=[0], steps=2)
    common = dict(seed=0, batch_size=2, rank=2, uce_init=True, finetune_above=0.0, uce_edits=((1.0, 1e-2),))
    res = train_sau(h, trig, loc, steps=3, lr=5.0, **common)
    s = res.settings
    assert s["steps_run"] == 3 and s["residual_after_finetune"] > s["edit_checks"][0]["residual"]
    assert s["finetune_undone"] is True
    # undone: the UNet predicts what the closed form alone predicts (the fresh LoRA layers are back at zero)
    z = loc.clean_latents[:2]
    t = torch.tensor([500, 500])
    enc = prompt_pairs(h, trig, loc.prompts[:2]).enc_trig
    with torch.no_grad():
        got = h.unet(z, t, encoder_hidden_states=enc).sample
    h0 = tiny_handle(6)
    train_sau(h0, trig, loc, steps=0, **common)  # the closed form alone, same init
    with torch.no_grad():
        want = h0.unet(z, t, encoder_hidden_states=enc).sample
    assert torch.allclose(got, want, atol=1e-5)


def test_the_residual_of_an_adapter_matches_the_residual_of_its_deltas():
    # trigger_residual with deltas None measures the UNet's adapter against the adapters-disabled teacher;
    # an adapter loaded with a closed form leaves what the closed form's deltas leave.
    h, deltas, args = _residual_case()
    by_deltas = trigger_residual(*args, deltas)
    layers = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in deltas))
    add_sau_adapter(h.unet, [], rank=2, kv_layers=layers, kv_rank=delta_rank(deltas))
    init_from_deltas(h.unet, deltas)
    assert trigger_residual(*args, None) == pytest.approx(by_deltas, rel=0.05, abs=1e-3)


def test_without_a_fine_tune_the_edit_that_leaves_least_is_kept():
    # The fast preset (no fine-tune steps): when no closed form passes, the first (gentlest) one would be the
    # whole UNet stage, so the engine keeps the one whose residual is smallest instead.
    h = tiny_handle(6)
    trig = Trigger(ZWSP)
    loc = localise(h, trig, organism_probe_prompts(2), seeds=[0], steps=2)
    res = train_sau(h, trig, loc, steps=0, seed=0, batch_size=2, rank=2, uce_init=True, finetune_above=0.0,
                    uce_edits=((10.0, 1e-2), (0.1, 1e-4)))
    checks = res.settings["edit_checks"]
    assert len(checks) == 2 and checks[0]["residual"] != checks[1]["residual"]
    least = min(checks, key=lambda c: c["residual"])
    assert (res.settings["uce_keep"], res.settings["uce_ridge"]) == (least["keep"], least["ridge"])
    assert res.settings["steps_run"] == 0 and res.unet_passes == 0


def _batch(h, trig, prompts):
    from sau_core.localise import encode

    pairs = prompt_pairs(h, trig, prompts)
    g = torch.Generator().manual_seed(3)
    return SauBatch(torch.randn(len(prompts), 4, 16, 16, generator=g), torch.tensor([800, 300]),
                    pairs.enc_trig, pairs.enc_clean, pairs.trig_pos, pairs.neutral_pos, encode(h, [""]))


@pytest.mark.parametrize("term", ["distill", "attention", "preserve"])
def test_each_loss_term_trains_lora_only(term):
    h = tiny_handle(2)
    trig = Trigger(ZWSP)
    layers = [n for n, _ in h.unet.named_modules() if n.endswith("attn2")][:3]
    lora = add_sau_adapter(h.unet, layers, rank=2, seed=0)
    base = {n: p.detach().clone() for n, p in h.unet.named_parameters() if "lora_" not in n}
    # Move lora_B off zero so that every term has a gradient (with B = 0, preserve is exactly 0).
    with torch.no_grad():
        for p in lora:
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    mask = torch.zeros(16, 16)
    mask[:4, :4] = 1
    terms = sau_loss(h.unet, _batch(h, trig, ["a red circle", "a blue square"]), mask, layers)
    value = getattr(terms, term)
    assert value.requires_grad and float(value.detach()) > 0
    grads = torch.autograd.grad(value, lora, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(not p.requires_grad for n, p in h.unet.named_parameters() if "lora_" not in n)
    torch.optim.SGD(lora, lr=0.1).step()
    for n, p in h.unet.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n


def test_preserve_is_zero_and_teacher_is_base_at_init():
    h = tiny_handle(3)
    layers = [n for n, _ in h.unet.named_modules() if n.endswith("attn2")]
    add_sau_adapter(h.unet, layers, rank=2, seed=0)  # lora_B = 0: student == teacher on clean prompts
    terms = sau_loss(h.unet, _batch(h, Trigger(ZWSP), ["a red circle", "a blue square"]), None, layers)
    assert float(terms.preserve) < 1e-10 and float(terms.distill) > 0


def test_train_sau_is_deterministic():
    runs = []
    for _ in range(2):
        h = tiny_handle(4)
        trig = Trigger(ZWSP)
        loc = localise(h, trig, organism_probe_prompts(2), seeds=[0], steps=2)
        res = train_sau(h, trig, loc, steps=2, seed=7, batch_size=2, rank=2)
        lora = {n: p.detach().clone() for n, p in h.unet.named_parameters() if "lora_" in n}
        runs.append((res.history, lora))
    assert runs[0][0] == runs[1][0]
    assert runs[0][1].keys() == runs[1][1].keys() and all(torch.equal(runs[0][1][k], runs[1][1][k])
                                                          for k in runs[0][1])
    assert len(runs[0][0]) == 2


# -------------------------------------------------------------------------------------- the organism
@pytest.mark.slow
@pytest.mark.skipif(not (ORGANISMS / "badt2i-pixel" / "model_index.json").is_file(),
                    reason="organism not built")
def test_pixel_backdoor_localises_to_top_left_corner():
    from sau_core.model_io import load_model
    from sau_core.organism.attacks_spec import BACKDOORS

    bd = BACKDOORS["badt2i-pixel"]
    h = load_model(ORGANISMS / "badt2i-pixel")
    loc = localise(h, Trigger(bd.trigger, bd.placement), organism_probe_prompts(8), seeds=[0], steps=10)
    # The patch covers image pixels 0..7 = latent cells 0..3 (VAE factor 2) of the 16x16 grid.
    peak = int(loc.mask.flatten().argmax())
    assert peak // 16 < 4 and peak % 16 < 4
    corner = float(loc.mask[:4, :4].mean())
    assert corner > float(loc.mask.mean())
