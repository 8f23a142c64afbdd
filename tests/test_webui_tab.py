"""The SAU tab in real gradio (3.41.2 with A1111's pins, 4.40.0 with Forge's), served by the stand-in host
(``tests/webui_host.py``) from its own virtual environment (``tests/webui_envs.py``) and driven in headless
Chromium: choose the BadT2I-pixel organism checkpoint, interrupt a Sanitize (no file), Sanitize it (new file
in the dropdown, grids and metrics shown, "Load it" goes through the host), a pickle checkpoint is refused in
the tab. The cleaned file is then measured with the organism's own detector."""
from __future__ import annotations

import json
import os
import pickle
import re
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from browser import launch, require_chromium
from webui_envs import PINS, ROOT, ensure_env, prepare_in_background

EXT = ROOT / "webui_extension"
HOST = Path(__file__).resolve().parent / "webui_host.py"
SHOT = ROOT / "runs" / "webui" / "sau_tab.png"  # the README image (webui_extension/screenshot.png) is a copy of it
ORGANISM = "badt2i-pixel"
SANITIZE_TIMEOUT_MS = 420_000
SCAN_TIMEOUT_MS = 420_000  # measured: a fast scan of the organism takes 105-145 s in either venv (2 cores)


@pytest.fixture(scope="module")
def organism_file(tmp_path_factory) -> Path:
    """The BadT2I-pixel organism as one .safetensors checkpoint (what A1111 lists). Starts creating the
    environments first, so they build while this runs."""
    require_chromium()
    prepare_in_background(sorted(PINS)[1:])  # the first is built in the foreground by its test
    from sau_core.model_io import load_model, save_single_file
    from sau_core.organism.commands import organism_path

    out = tmp_path_factory.mktemp("organism") / f"{ORGANISM}.safetensors"
    return save_single_file(load_model(organism_path(ORGANISM), dtype=None), out)


def make_root(tmp: Path, organism_file: Path) -> Path:
    root = tmp / "webui"
    ckpts = root / "models" / "Stable-diffusion"
    ckpts.mkdir(parents=True)
    (root / "models" / "Lora").mkdir(parents=True)
    (root / "extensions").mkdir()
    (ckpts / organism_file.name).write_bytes(organism_file.read_bytes())
    # a pickle (bytes only; nothing here ever unpickles it) under the names people use
    (ckpts / "evil.ckpt").write_bytes(pickle.dumps({"state_dict": {"model.diffusion_model.x": [0.0]}}))
    (root / "extensions" / "sau").symlink_to(EXT, target_is_directory=True)  # the documented install: a link
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(python: Path, root: Path, flavour: str, cache: Path):
    port = _free_port()
    env = {**os.environ, "HF_HOME": str(root / "hf"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "GRADIO_ANALYTICS_ENABLED": "False", "SAU_CACHE": str(cache), "PYTHONUNBUFFERED": "1",
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    env.pop("PYTHONPATH", None)
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([str(python), str(HOST), "--flavour", flavour, "--root", str(root), "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 240
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"stand-in host exited:\n{(root / 'server.log').read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(1)
    proc.kill()
    raise AssertionError(f"stand-in host did not answer:\n{(root / 'server.log').read_text()[-4000:]}")


def events(root: Path) -> list[dict]:
    p = root / "host-events.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


def checkpoints(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "models" / "Stable-diffusion").iterdir())


def choose(page, fragment: str) -> None:
    box = page.locator("#sau_checkpoint input").first
    box.click()
    box.fill(fragment)
    page.locator("ul.options li", has_text=fragment).first.click()
    page.wait_for_function("f => document.querySelector('#sau_checkpoint input').value.includes(f)", arg=fragment)


def status(page, kind: str, text, timeout: int = 60_000) -> str:
    loc = page.locator(f"#sau_status_{kind}", has_text=text)
    loc.wait_for(timeout=timeout)
    return loc.inner_text()


def sanitize(page) -> None:
    page.locator("#sau_sanitize").click()


@pytest.mark.parametrize("env_name,flavour", [("gradio3", "a1111"), ("gradio4", "forge")])
def test_tab_in_chromium(env_name, flavour, organism_file, tmp_path):
    require_chromium()
    from playwright.sync_api import sync_playwright

    t0 = time.time()
    python, info = ensure_env(env_name)
    print(f"{env_name}: environment ready in {time.time() - t0:.1f} s (creation took {info['seconds']})")
    root = make_root(tmp_path, organism_file)
    before = checkpoints(root)
    t1 = time.time()
    # the run's one scan cache (tests/conftest.py): the run's first test scanned these weights, so Scan here is a
    # cache hit (unless this file runs alone: then the first host scans)
    proc, url = serve(python, root, flavour, Path(os.environ["SAU_CACHE"]))
    print(f"{env_name}: stand-in {flavour} host up in {time.time() - t1:.1f} s")
    started = json.loads((root / "server.log").read_text().splitlines()[0])
    assert started["tabs"] == ["SAU"]  # on_ui_tabs' [(blocks, "SAU", "sau")]
    assert started["options"] == {"sau_default_preset": ["sau", "SAU"], "sau_output_dir": ["sau", "SAU"]}
    try:
        with sync_playwright() as pw:
            browser = launch(pw)
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url)
            page.locator("button", has_text="SAU").first.click()
            page.locator("#sau_sanitize").wait_for()
            assert ("Forge" if flavour == "forge" else "AUTOMATIC1111") in page.locator("#tab_sau").inner_text()

            # a pickle is refused in the tab, nothing written
            choose(page, "evil.ckpt")
            sanitize(page)
            msg = status(page, "error", "pickle")
            assert "never" in msg.lower() or "refus" in msg.lower(), msg
            assert "Traceback" not in page.content()
            assert checkpoints(root) == before

            # the host's Interrupt stops a clean mid-run: no output, no temporary file left
            choose(page, f"{ORGANISM}.safetensors")
            page.locator("#sau_trigger textarea, #sau_trigger input").first.fill("\\u200b")
            sanitize(page)
            # a stage the job reports after shared.state.begin() (which clears interrupted, as the host's does)
            status(page, "busy", re.compile(r"SAU: (loading|preview|localise)"), timeout=120_000)
            page.locator("#sau_interrupt").click()
            status(page, "warn", "nothing was written", timeout=180_000)
            assert checkpoints(root) == before
            assert {"event": "end", "job": "SAU sanitize", "interrupted": True} in events(root)

            # Scan: the verdict and the ranked candidates in the tab
            t2 = time.time()
            page.locator("#sau_scan").click()
            msg = status(page, "ok", re.compile("Suspicious|Nothing stood out"), timeout=SCAN_TIMEOUT_MS)
            print(f"{env_name}: Scan in the browser took {time.time() - t2:.1f} s: {msg}")
            table = page.locator("#sau_metrics").first.inner_text()  # gradio 3: the block and its prose div
            assert "Scan verdict" in table and "candidate" in table and "never declares a model clean" in table
            assert checkpoints(root) == before

            # the clean: new file next to the input, listed and selected in the dropdown, grids and metrics shown.
            # A1111: an empty trigger box (scan first, then clean the top candidate); Forge: the typed trigger.
            scan_first = env_name == "gradio3"
            if scan_first:
                page.locator("#sau_trigger textarea, #sau_trigger input").first.fill("")
            t2 = time.time()
            sanitize(page)
            msg = status(page, "ok", "Sanitized", timeout=SANITIZE_TIMEOUT_MS)
            assert ("scan's top candidate" in msg) == scan_first, msg
            print(f"{env_name}: Sanitize (fast) in the browser took {time.time() - t2:.1f} s: {msg}")
            made = f"{ORGANISM}-sau.safetensors"
            assert made in msg and checkpoints(root) == sorted(before + [made])
            page.wait_for_function("f => document.querySelector('#sau_checkpoint input').value.includes(f)", arg=made)
            metrics = page.locator("#sau_metrics_table")
            assert "Trigger's effect" in metrics.inner_text() and "PSNR" in metrics.inner_text()
            page.locator("#sau_grid_triggered img").first.wait_for()
            page.locator("#sau_grid_clean img").first.wait_for()
            page.locator("#sau_checkpoint input").first.click()
            assert page.locator("ul.options li", has_text=made).count() == 1
            page.keyboard.press("Escape")
            page.locator("#tab_sau").screenshot(path=str(tmp_path / "tab.png"))
            if env_name == "gradio4":
                SHOT.parent.mkdir(parents=True, exist_ok=True)
                page.locator("#tab_sau").screenshot(path=str(SHOT))

            # "Load it" goes through the host: reload_model_weights (A1111) / checkpoint_change (Forge)
            page.locator("#sau_load").click()
            status(page, "ok", "Loaded")
            loads = [e for e in events(root) if e["event"] in ("reload_model_weights", "checkpoint_change")]
            assert [e["event"] for e in loads] == ["checkpoint_change" if flavour == "forge" else "reload_model_weights"]
            assert loads[0]["title"].startswith(made + " [")

            # the refresh button rescans the host's folders
            (root / "models" / "Stable-diffusion" / "dropped-in.safetensors").write_bytes(organism_file.read_bytes())
            page.locator("#sau_refresh").click()
            status(page, "ok", f"refreshed: {len(before) + 2} checkpoints")
            box = page.locator("#sau_checkpoint input").first
            box.click()
            box.fill("dropped-in")
            page.locator("ul.options li", has_text="dropped-in.safetensors").first.wait_for(timeout=30_000)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    if env_name == "gradio4":  # measured once (CPU budget): the file is the engine's output either way
        assert_backdoor_removed(root / "models" / "Stable-diffusion" / made, organism_file)


def assert_backdoor_removed(cleaned: Path, original: Path) -> None:
    """The organism's detector on held-out triggered prompts (one seed): the patch fires far less often."""
    from sau_core.model_io import load_model
    from sau_core.organism import world as W
    from sau_core.organism.commands import organism_path, resolve_backdoor
    from sau_core.organism.evaluate import generate

    backdoor = resolve_backdoor(organism_path(ORGANISM), None, None)
    prompts = [backdoor.triggered(p) for p, c in W.heldout_prompts() if backdoor.applies_to(c)][::3][:12]
    seeds = [W.HELDOUT_SEEDS[0]] * len(prompts)
    rates = []
    for path in (original, cleaned):
        pipe = load_model(path).to_pipeline()
        pipe.set_progress_bar_config(disable=True)
        rates.append(float(backdoor.fired(generate(pipe, prompts, seeds)).float().mean()))
    print(f"ASR on {len(prompts)} held-out triggered prompts: {rates[0]:.0%} -> {rates[1]:.0%}")
    assert rates[0] >= 0.5 and rates[1] <= rates[0] - 0.4, rates
