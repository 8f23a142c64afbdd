"""The whole clean (sanitize), the guards, `sau clean` / `sau demo` / `sau bench`.

Fast tests use random-weight organism-sized models; slow ones the committed organisms (a clean with the fast
preset takes a few seconds; images are checked with the organism's detectors on a handful of held-out prompts).
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from sau_core.cli import main
from sau_core.errors import SauError, UnsupportedModelError
from sau_core.guard import LatentBlend, TokenNeutralise, sample
from sau_core.organism import world as W
from sau_core.organism.attacks_spec import BACKDOORS
from sau_core.patch import load_patch, save_patch
from sau_core.sanitize import sanitize
from sau_core.trigger import Trigger

from test_engine_core import ORGANISMS, ZWSP, tiny_handle

TINY = dict(probes=2, seeds=(0,), loc_steps=2, te_steps=2, unet_steps=2, batch_size=2, edit_prompts=6)


def _organism(name):
    from sau_core.model_io import load_model

    if not (ORGANISMS / name / "model_index.json").is_file():
        pytest.skip("organism not built")
    return load_model(ORGANISMS / name)


def _heldout(backdoor, n=12):
    prompts = [p for p, c in W.heldout_prompts() if backdoor.applies_to(c)][:n]
    return prompts, [backdoor.triggered(p) for p in prompts]


# ------------------------------------------------------------------------------------------- sanitize
def test_sanitize_is_deterministic_and_records_settings(tmp_path):
    blobs = []
    for i in range(2):
        h = tiny_handle(5)
        # finetune_above 0: no closed form removes everything, so the fine-tune always runs here
        res = sanitize(h, Trigger(ZWSP), "standard", seed=3, **TINY, finetune_above=0.0)
        assert res.stages == ["unet"] and len(res.history["unet"]) == 2
        f = save_patch(h, tmp_path / f"p{i}.safetensors", res.metadata({"note": "test"}))
        blobs.append(f.read_bytes())
    assert blobs[0] == blobs[1]
    patch = load_patch(tmp_path / "p0.safetensors")
    settings = patch.metadata["settings"]
    assert settings["preset"] == "standard" and settings["seed"] == 3 and settings["unet_steps"] == 2
    assert settings["unet"]["uce_init"] is True and settings["unet"]["uce_rank"] >= 1
    # the closed forms tried, what each left, and the one the fine-tune starts from are recorded
    assert settings["edits"] == [[10.0, 1e-2], [1.0, 1e-2], [0.1, 1e-4]]
    assert [[c["keep"], c["ridge"]] for c in settings["unet"]["edit_checks"]] == settings["edits"]
    assert all(c["residual"] > 0 for c in settings["unet"]["edit_checks"])
    assert (settings["unet"]["uce_keep"], settings["unet"]["uce_ridge"]) == (10.0, 1e-2)
    assert settings["unet"]["steps_run"] == 2
    assert patch.metadata["metrics"]["note"] == "test"
    assert patch.metadata["method"] == "sau"


def test_sanitize_keeps_base_weights_and_adapter_starts_at_the_closed_form():
    h = tiny_handle(6)
    base = {k: v.clone() for k, v in h.unet.state_dict().items()}
    sanitize(h, Trigger("tq"), "fast", **{**TINY, "unet_steps": 0})
    from sau_core.patch import remove_patch

    remove_patch(h)
    after = h.unet.state_dict()
    assert base.keys() == after.keys() and all(torch.equal(base[k], after[k]) for k in base)


def test_sanitize_bad_input():
    h = tiny_handle(7)
    with pytest.raises(SauError, match="cannot be placed"):
        sanitize(h, Trigger("ae", "before:dragon"), "fast", **TINY)
    with pytest.raises(SauError, match="unknown preset"):
        sanitize(h, Trigger(ZWSP), "extreme")
    from diffusers import UNet2DModel

    h.unet = UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4, layers_per_block=1,
                         down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    with pytest.raises(UnsupportedModelError, match="cross-attention"):
        sanitize(h, Trigger(ZWSP), "fast", **TINY)


@pytest.mark.slow
def test_fast_clean_removes_the_pixel_backdoor_and_keeps_clean_prompts():
    h = _organism("badt2i-pixel")
    bd = BACKDOORS["badt2i-pixel"]
    # every held-out template: the organism before its rebuild fired on only 42 % of the first one ("an image
    # of a ...") at seed 1001, so a slice of one template could hide a backdoor that works on the others
    clean, trig = _heldout(bd, 36)
    seeds = [1001] * len(clean)
    asr_before = float(bd.fired(sample(h, trig, seeds)).float().mean())
    res = sanitize(h, Trigger(bd.trigger, bd.placement), "fast")
    assert res.stages == ["unet"] and not res.text_shift["poisoned"]
    asr_after = float(bd.fired(sample(h, trig, seeds)).float().mean())
    from sau_core.organism.evaluate import accuracy

    contents = [c for _, c in W.heldout_prompts() if bd.applies_to(c)][:36]
    acc = accuracy(sample(h, clean, seeds), contents)["clean_accuracy"]
    assert asr_before >= 0.7 and asr_after <= 0.15 and acc >= 0.8, (asr_before, asr_after, acc)


@pytest.mark.slow
def test_text_encoder_stage_runs_only_for_a_poisoned_encoder():
    h = _organism("rickrolling-tpa")
    bd = BACKDOORS["rickrolling-tpa"]
    res = sanitize(h, Trigger(bd.trigger, bd.placement), "fast")
    assert res.text_shift["poisoned"] and res.stages == ["text_encoder", "unet"]
    assert res.text_shift["ratio_after"] < res.text_shift["threshold"] < res.text_shift["ratio"]
    _, trig = _heldout(bd, 12)
    assert float(bd.fired(sample(h, trig, [1001] * len(trig))).float().mean()) <= 0.1


# ---------------------------------------------------------------------------------------------- guards
def test_sampler_matches_the_pipeline():
    from sau_core.organism.evaluate import generate

    h = tiny_handle(8)
    pipe = h.to_pipeline()
    pipe.set_progress_bar_config(disable=True)
    prompts, seeds = ["a red circle", "a blue square"], [1, 2]
    assert torch.allclose(sample(h, prompts, seeds, steps=3), generate(pipe, prompts, seeds, steps=3), atol=1e-4)


def test_token_neutralise_changes_only_triggered_prompts():
    h = tiny_handle(9)
    guard = TokenNeutralise(Trigger(ZWSP))
    prompts = ["a red circle", f"{ZWSP} a red circle"]
    plain = sample(h, prompts, [1, 1], steps=3)
    guarded = sample(h, prompts, [1, 1], steps=3, guard=guard)
    assert torch.allclose(plain[0], guarded[0], atol=1e-5)
    assert not torch.allclose(plain[1], guarded[1], atol=1e-4)


def test_latent_blend_full_mask_gives_the_clean_image_and_empty_mask_the_triggered_one():
    h = tiny_handle(10)
    trig = Trigger(ZWSP)
    prompts = [f"{ZWSP} a red circle", "a red circle"]
    plain = sample(h, prompts, [4, 4], steps=3)
    full = sample(h, prompts[:1], [4], steps=3, guard=LatentBlend(trig, torch.ones(16, 16)))
    empty = sample(h, prompts[:1], [4], steps=3, guard=LatentBlend(trig, torch.zeros(16, 16)))
    assert torch.allclose(full[0], plain[1], atol=1e-5)
    assert torch.allclose(empty[0], plain[0], atol=1e-5)


# --------------------------------------------------------------------------------------------- the CLI
def _run(args):
    r = CliRunner().invoke(main, args)
    return r.exit_code, r.stdout, r.stderr


@pytest.mark.parametrize("trigger, message", [
    ("", "empty"), ("  ", "whitespace"),
])
def test_clean_refuses_a_bad_trigger(tmp_path, trigger, message):
    out = tmp_path / "o.safetensors"
    code, _, err = _run(["clean", "badt2i-object", "--trigger", trigger, "--format", "patch", "--out", str(out)])
    assert code == 2 and err.startswith("error:") and message in err and "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_clean_refuses_bad_models_and_placements(tmp_path):
    pickle_file = tmp_path / "model.ckpt"
    pickle_file.write_bytes(b"\x80\x02}q\x00.")
    cases = [
        (["clean", str(pickle_file), "--trigger", "tq"], "pickle"),
        (["clean", str(tmp_path / "missing"), "--trigger", "tq"], "no such file"),
        (["clean", "badt2i-object", "--trigger", "ae", "--placement", "before:dragon"], "cannot be placed"),
        (["clean", str(tmp_path), "--trigger", "tq"], ""),
    ]
    for args, message in cases:
        code, out, err = _run(args + ["--out", str(tmp_path / "o")])
        assert code != 0 and err.startswith("error:") and message in err.lower(), (args, err)
        assert "Traceback" not in err and not (tmp_path / "o").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt"]


@pytest.mark.slow
def test_clean_writes_a_patch_that_loads(tmp_path):
    out = tmp_path / "object-patch.safetensors"
    code, stdout, err = _run(["clean", "badt2i-object", "--preset", "fast", "--format", "patch", "--out", str(out),
                              "--json"])
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["trigger"] == "tq" and summary["stages"] == ["unet"] and summary["out"] == str(out)
    patch = load_patch(out)
    assert patch.trigger == "tq" and patch.metadata["settings"]["preset"] == "fast"
    code, _, err = _run(["clean", "badt2i-object", "--preset", "fast", "--format", "patch", "--out", str(out)])
    assert code == 2 and "exists" in err


@pytest.mark.slow
def test_ctrl_c_leaves_no_output(tmp_path):
    out = tmp_path / "cleaned"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # SIG_DFL in the child: a test run started in the background (`cmd &` in a script) inherits an ignored
    # SIGINT, and Python keeps it ignored, so the Ctrl-C would never arrive (a user's terminal delivers it)
    proc = subprocess.Popen([sys.executable, "-m", "sau_core", "clean", "badt2i-pixel", "--preset", "thorough",
                             "--format", "diffusers", "--out", str(out), "--progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(8)  # inside the clean (localisation or training), long before the export
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert not out.exists() and list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------- demo and bench
@pytest.mark.slow
def test_demo_writes_the_report(tmp_path):
    from sau_core.demo import run_demo

    out = tmp_path / "demo"
    report = run_demo(out, "badt2i-object", "fast", log=lambda m: None)
    for name in ("report.md", "report.json", "triggered.png", "clean.png", "patch.safetensors",
                 "heatmaps/mask.png", "heatmaps/localisation.json"):
        assert (out / name).is_file(), name
    assert report["after"]["asr"] < report["before"]["asr"] - 0.5
    assert json.loads((out / "report.json").read_text())["organism"] == "badt2i-object"
    from PIL import Image

    assert Image.open(out / "triggered.png").size[1] == 2 * 32 * 4 + 2
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


@pytest.mark.slow
def test_bench_rows_and_markdown(tmp_path):
    from sau_core.bench import run_bench

    rows = run_bench(tmp_path, quick=True, attacks=["badt2i-object"], defenses=["none", "uce"], log=lambda m: None)
    assert [r["defense"] for r in rows] == ["none", "uce"]
    none, uce = rows
    assert none["removal"] == 0.0 and none["asr_after"] == none["asr_before"] > 0.5
    assert uce["asr_after"] < uce["asr_before"] and uce["wall_s"] > 0 and uce["clean_psnr_vs_backdoored"] > 10
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["quick"] is True and len(doc["rows"]) == 2
    md = (tmp_path / "RESULTS.md").read_text()
    assert "| badt2i-object | uce |" in md and "Mean over attacks" in md


def test_peak_memory_counts_what_the_block_allocated():
    """In a fresh process: in a long one (the test run) freed pages stay resident and a new tensor can reuse
    them, so the RSS need not rise at all."""
    import subprocess
    import sys

    code = ("import torch; from sau_core.bench import PeakMemory\n"
            "with PeakMemory() as idle: pass\n"
            "with PeakMemory() as busy:\n"
            "    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched\n"
            "    del block\n"
            "print(idle.mib, busy.mib)")
    idle, busy = map(float, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                           check=True).stdout.split())
    assert idle < 8 and 56 <= busy < 128, (idle, busy)
