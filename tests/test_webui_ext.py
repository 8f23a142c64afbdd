"""The A1111 / Forge extension without a browser (main venv, seconds): the host interface on the stand-in host's
modules (``tests/webui_host.py``) for both flavours, host detection, the script as the host loads it, output
naming, interruption, errors, and ``install.py`` through a stand-in ``launch`` module."""
from __future__ import annotations

import importlib.util
import pickle
import sys
import types
from pathlib import Path

import pytest

from sau_core.errors import SauError, UnsafeFileError
from sau_core.interrupt import Cancelled

ROOT = Path(__file__).resolve().parents[1]
EXT = ROOT / "webui_extension"
sys.path.insert(0, str(Path(__file__).resolve().parent))
import webui_host  # noqa: E402


@pytest.fixture(params=["a1111", "forge"])
def host_root(request, tmp_path, monkeypatch):
    """The stand-in host's modules importable (cleaned up afterwards) and a models folder with two files."""
    root = tmp_path / "webui"
    monkeypatch.setenv("SAU_STANDIN_ROOT", str(root))
    host_dir = webui_host.write_host(root, request.param)
    ckpts = root / "models" / "Stable-diffusion"
    (ckpts / "sub").mkdir()
    (ckpts / "sub" / "model.safetensors").write_bytes(b"not really a model")
    (ckpts / "evil.ckpt").write_bytes(pickle.dumps({"state_dict": {}}))
    monkeypatch.syspath_prepend(str(host_dir))
    monkeypatch.syspath_prepend(str(EXT))
    yield request.param, root
    for name in [m for m in sys.modules if m.split(".")[0] in ("modules", "modules_forge", "sau_webui", "sau_tab")]:
        del sys.modules[name]


def load_script(root: Path):
    """scripts/sau_tab.py loaded by path, as A1111's script loader does."""
    spec = importlib.util.spec_from_file_location("sau_tab", EXT / "scripts" / "sau_tab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_registers_tab_and_settings_and_detects_host(host_root):
    flavour, root = host_root
    from modules import script_callbacks, sd_models

    sd_models.list_models()
    tab = load_script(root)
    assert script_callbacks.callbacks_ui_tabs == [tab.on_ui_tabs]
    assert script_callbacks.callbacks_ui_settings == [tab.on_ui_settings]
    assert tab.HOST.name == ("Forge" if flavour == "forge" else "AUTOMATIC1111")
    assert list((EXT / "scripts").iterdir()) == [EXT / "scripts" / "sau_tab.py"]  # hosts run every file there


def test_host_services(host_root):
    flavour, root = host_root
    from modules import shared, sd_models

    sd_models.list_models()
    host = load_script(root).HOST
    titles = host.checkpoint_titles()
    assert [t.split(" [")[0] for t in titles] == ["evil.ckpt", "sub/model.safetensors"]
    ckpts = root / "models" / "Stable-diffusion"
    assert host.checkpoint_path(titles[1]) == ckpts / "sub" / "model.safetensors"
    assert host.title_of(ckpts / "evil.ckpt") == titles[0]
    assert host.checkpoint_dirs() == [ckpts] and host.lora_dir() == root / "models" / "Lora"
    (ckpts / "new.safetensors").write_bytes(b"x")
    assert len(host.refresh_checkpoints()) == 3
    with pytest.raises(LookupError, match="not in the list"):
        host.checkpoint_path("missing.safetensors")
    loaded = host.load_checkpoint("sub/model.safetensors")  # a name resolves like get_closet_checkpoint_match
    assert loaded == titles[1]
    assert shared.opts.sd_model_checkpoint == titles[1]
    last = webui_host_events(root)[-1]
    assert last == {"event": "checkpoint_change" if flavour == "forge" else "reload_model_weights", "title": titles[1]}
    assert host.option("sau_default_preset") == "fast" and host.option("sau_output_dir") == ""
    shared.opts.data["sau_default_preset"] = "thorough"
    assert host.option("sau_default_preset") == "thorough"


def webui_host_events(root: Path) -> list[dict]:
    import json

    return [json.loads(x) for x in (root / "host-events.jsonl").read_text().splitlines()]


def test_progress_and_interrupt_through_shared_state(host_root):
    _, root = host_root
    from modules import shared

    host = load_script(root).HOST
    from sau_webui.jobs import Reporter

    rep = Reporter(host)
    from modules import call_queue

    with host.job("SAU test", job_count=3) as st:
        assert call_queue.queue_lock.locked()  # the host's GPU-job lock is held while the job runs
        rep("localise", 2, 5)
        assert (st.sampling_step, st.sampling_steps, st.textinfo, st.job) == (2, 5, "SAU: localise 2/5", "SAU test")
        host.interrupt()  # what the host's Interrupt button does: shared.state.interrupt()
        assert shared.state.interrupted
        with pytest.raises(Cancelled, match="nothing was written"):
            rep("localise", 3, 5)
    assert shared.state.job == "" and webui_host_events(root)[-1]["interrupted"] is True
    with host.job("SAU again"):
        assert not shared.state.interrupted  # begin() clears it, as the host's does


def test_pickle_checkpoint_refused_before_anything(host_root):
    _, root = host_root
    from modules import sd_models

    sd_models.list_models()
    host = load_script(root).HOST
    from sau_webui.jobs import sanitize_job

    before = sorted(p.name for p in (root / "models" / "Stable-diffusion").iterdir())
    with pytest.raises(UnsafeFileError, match="pickle"):
        sanitize_job(host, host.checkpoint_titles()[0], "\\u200b", "fast")
    with pytest.raises(SauError, match="unknown preset"):
        sanitize_job(host, host.checkpoint_titles()[0], "x", "ultra")
    assert sorted(p.name for p in (root / "models" / "Stable-diffusion").iterdir()) == before


def test_output_names_never_overwrite(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXT))
    from sau_webui.jobs import output_path, parse_trigger

    src = tmp_path / "model.fp16.safetensors"
    src.write_bytes(b"x")
    assert output_path(src) == tmp_path / "model-sau.safetensors"
    (tmp_path / "model-sau.safetensors").write_bytes(b"x")
    assert output_path(src) == tmp_path / "model-sau-2.safetensors"
    (tmp_path / "model-sau-2.safetensors").write_bytes(b"x")
    assert output_path(src) == tmp_path / "model-sau-3.safetensors"
    assert output_path(src, "mine") == tmp_path / "mine.safetensors"
    assert output_path(src, "mine.safetensors", str(tmp_path / "out")) == tmp_path / "out" / "mine.safetensors"
    with pytest.raises(SauError, match="never overwrites"):
        output_path(src, "model-sau")
    with pytest.raises(SauError, match="not a path"):
        output_path(src, "../elsewhere")
    assert parse_trigger("") is None and parse_trigger("\\u200b") == "\u200b" and parse_trigger("tq") == "tq"


def test_install_uses_the_hosts_launch_helpers_and_leaves_pins_alone(monkeypatch):
    """install.py with a stand-in for the host's ``launch`` module (``is_installed``, ``run_pip``)."""
    calls = []
    launch = types.ModuleType("launch")
    installed = {"torch", "gradio", "numpy", "huggingface_hub", "diffusers", "safetensors", "accelerate", "click",
                 "sau_core"}
    launch.is_installed = lambda package: package in installed
    launch.run_pip = lambda command, desc=None, live=False: calls.append((command, desc))
    monkeypatch.setitem(sys.modules, "launch", launch)
    spec = importlib.util.spec_from_file_location("sau_install", EXT / "install.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    commands = [c for c, _ in calls]
    assert commands == ['install "transformers>=4.45,<5"', 'install "peft>=0.13"']
    assert not any(word in c for c in commands for word in ("torch", "gradio", "numpy", "huggingface", "--upgrade"))


def test_bad_trigger_is_refused_and_nothing_is_written(host_root):
    """A whitespace-only trigger (the tokenizer drops it): refused before any work."""
    _, root = host_root
    from sau_core.model_io import load_model, save_single_file
    from sau_core.organism.commands import organism_path
    from modules import sd_models

    ckpts = root / "models" / "Stable-diffusion"
    save_single_file(load_model(organism_path("badt2i-pixel"), dtype=None), ckpts / "org.safetensors")
    sd_models.list_models()
    host = load_script(root).HOST
    from sau_webui.jobs import sanitize_job

    before = sorted(p.name for p in ckpts.iterdir())
    with pytest.raises(SauError, match="only whitespace"):
        sanitize_job(host, host.title_of(ckpts / "org.safetensors"), "   ", "fast")
    assert sorted(p.name for p in ckpts.iterdir()) == before
