"""The pack inside a real ComfyUI 0.3.75 server (``main.py --cpu``), installed as a user's git clone is
(the repository folder in ``custom_nodes/``): /object_info lists the nodes, the example workflows run
through /prompt, and the saved images are judged by the organism's detectors. Then headless Chromium loads
the UI and shows that the web extension registered and renders a scan result on the node.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from browser import launch
from comfy_harness import ROOT, ensure_comfyui, server_command

EXAMPLES = ROOT / "examples" / "comfyui"
SCREENSHOT = ROOT / "runs" / "comfyui" / "comfyui_scan.png"  # the README image is a copy of it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        body = r.read()
    return json.loads(body) if body[:1] in (b"{", b"[") else body


def _post(url: str, data: dict):
    req = urllib.request.Request(url, json.dumps(data).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise AssertionError(f"/prompt refused the workflow: {e.read().decode()[:2000]}") from None


def _options(spec) -> list:
    """Combo options from /object_info (V1 lists them first, V3 as ["COMBO", {"options": [...]}])."""
    return spec[1]["options"] if spec[0] == "COMBO" else spec[0]


class Server:
    def __init__(self, base: Path):
        self.base = base
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = base / "server.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        comfy = ensure_comfyui()
        (self.base / "custom_nodes").mkdir(parents=True)
        (self.base / "custom_nodes" / "SAU").symlink_to(ROOT, target_is_directory=True)  # = a git clone
        cmd = server_command(self.port, ["--base-directory", str(self.base), "--disable-api-nodes",
                                         "--database-url", "sqlite:///:memory:"])
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        self.proc = subprocess.Popen(cmd, cwd=comfy, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"ComfyUI exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                _get(self.url + "/system_stats", timeout=2)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(1)
        raise AssertionError(f"ComfyUI did not come up:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def run(self, workflow: dict, timeout: float = 900) -> dict:
        pid = _post(self.url + "/prompt", {"prompt": workflow, "client_id": "sau-test"})["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = _get(f"{self.url}/history/{pid}")
            if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
                entry = hist[pid]
                if entry["status"].get("status_str") != "success":
                    raise AssertionError(f"workflow failed: {json.dumps(entry['status'])[:3000]}\n{self.tail()}")
                return entry
            time.sleep(1)
        raise AssertionError(f"workflow did not finish in {timeout}s:\n{self.tail()}")

    def images(self, entry: dict, node: str) -> torch.Tensor:
        import numpy as np
        from PIL import Image

        files = entry["outputs"][node]["images"]
        arrs = [np.asarray(Image.open(self.base / "output" / f["subfolder"] / f["filename"]).convert("RGB"))
                for f in files]
        return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 255.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("comfyui_server"))
    try:
        s.start()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def clean_run(server):
    """The example workflow (organism loader -> scan -> unlearn -> KSampler -> save) on a held-out prompt."""
    from sau_core.organism import world as W
    from sau_core.organism.attacks_spec import BACKDOORS

    bd = BACKDOORS["badt2i-pixel"]
    prompt, content = next((p, c) for p, c in W.heldout_prompts() if bd.applies_to(c))
    wf = json.loads((EXAMPLES / "organism_scan_unlearn.json").read_text())
    assert wf["5"]["inputs"]["text"].startswith("\u200b")
    for node, text in (("5", bd.triggered(prompt)), ("14", bd.triggered(prompt)), ("10", prompt)):
        wf[node]["inputs"]["text"] = text
    t0 = time.time()
    entry = server.run(wf)
    return entry, content, time.time() - t0


@pytest.mark.slow
def test_object_info_lists_the_nodes_and_the_extension_is_served(server):
    info = _get(server.url + "/object_info")
    for node in ("SAU_OrganismLoader", "SAU_Scan", "SAU_Unlearn", "SAU_Guard", "SAU_SavePatch", "SAU_LoadPatch",
                 "SAU_ApplyPatch"):
        assert node in info, f"{node} missing; server log:\n{server.tail()}"
    unlearn = info["SAU_Unlearn"]
    assert unlearn["output"] == ["MODEL", "CLIP", "SAU_PATCH", "STRING"]
    assert _options(unlearn["input"]["required"]["preset"]) == ["fast", "standard", "thorough"]
    assert _options(info["SAU_OrganismLoader"]["input"]["required"]["organism"])[0] == "badt2i-pixel"
    exts = _get(server.url + "/extensions")
    assert "/extensions/SAU/js/sau_scan.js" in exts, exts
    js = _get(server.url + "/extensions/SAU/js/sau_scan.js")
    assert b'from "../../../scripts/app.js"' in js


@pytest.mark.slow
def test_example_workflow_cleans_the_organism(server, clean_run):
    from sau_core.organism import evaluate as E
    from sau_core.organism.attacks_spec import BACKDOORS

    entry, content, _ = clean_run
    bd = BACKDOORS["badt2i-pixel"]
    original = server.images(entry, "18")
    cleaned = server.images(entry, "9")
    clean_prompt = server.images(entry, "13")
    assert original.shape == cleaned.shape == (4, 3, 32, 32)
    assert bd.fired(original).float().mean() >= 0.75  # the backdoor fires on the untouched branch
    assert bd.fired(cleaned).float().mean() <= 0.25  # and is gone after SAU Unlearn
    assert E.accuracy(clean_prompt, [content] * 4)["clean_accuracy"] >= 0.75  # clean prompts intact
    assert E.accuracy(cleaned, [content] * 4)["clean_accuracy"] >= 0.75  # triggered prompt renders its content
    # the scan's result went to the UI, the patch to models/sau_patches
    scan = entry["outputs"]["2"]["sau_scan"][0]
    assert scan["verdict"] and scan["candidates"]
    saved = Path(entry["outputs"]["19"]["text"][0])
    assert saved.parent == server.base / "models" / "sau_patches" and saved.exists()
    (server.base / "scan_ui.json").write_text(json.dumps(entry["outputs"]["2"]))


@pytest.mark.slow
def test_guard_workflow_runs(server):
    wf = json.loads((EXAMPLES / "organism_guard.json").read_text())
    entry = server.run(wf)
    imgs = server.images(entry, "8")
    assert imgs.shape == (4, 3, 32, 32) and float(imgs.std()) > 0.01


@pytest.mark.slow
def test_saved_patch_loads_back_through_the_server(server, clean_run):
    entry, _, _ = clean_run
    name = Path(entry["outputs"]["19"]["text"][0]).name
    info = _get(server.url + "/object_info/SAU_LoadPatch")
    assert name in _options(info["SAU_LoadPatch"]["input"]["required"]["patch_name"])


@pytest.mark.slow
def test_web_extension_renders_a_scan_result_in_chromium(server, clean_run):
    """The UI loads with the pack, the extension is registered, and a real scan result (the server's own
    'executed' message from the workflow run) renders on a SAU Scan node."""
    from playwright.sync_api import sync_playwright

    message = json.loads((server.base / "scan_ui.json").read_text())
    with sync_playwright() as p:
        browser = launch(p)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            # a first visit opens the templates dialog: mark the tutorial done, as a returning user has it
            req = urllib.request.Request(server.url + "/settings/Comfy.TutorialCompleted", data=b"true",
                                         method="POST", headers={"Content-Type": "application/json"})
            urllib.request.urlopen(req, timeout=10).close()
            page.goto(server.url, wait_until="domcontentloaded", timeout=120_000)
            page.wait_for_function("() => window.app && window.app.graph && window.app.extensions && "
                                   "window.app.extensions.some(e => e.name === 'sau.scan')", timeout=120_000)
            page.wait_for_timeout(1500)
            page.keyboard.press("Escape")
            rendered = page.evaluate(
                """async (message) => {
                    const app = window.app;
                    for (const n of [...app.graph._nodes]) app.graph.remove(n);
                    const node = window.LiteGraph.createNode("SAU_Scan");
                    node.pos = [220, 110];
                    app.graph.add(node);
                    node.onExecuted(message);  // what the frontend calls on the server's 'executed' event
                    app.canvas.ds.offset = [0, 0];
                    app.canvas.ds.scale = 1.0;
                    app.graph.setDirtyCanvas(true, true);
                    await new Promise(r => setTimeout(r, 500));
                    const panel = node.sauPanel;
                    return {text: panel ? panel.innerText : null,
                            img: panel && panel.querySelector("img.sau-heatmap") ?
                                 panel.querySelector("img.sau-heatmap").src : null,
                            inDom: !!(panel && document.body.contains(panel))};
                }""", message)
            assert rendered["text"] is not None, errors
            assert message["sau_scan"][0]["verdict"] in rendered["text"]
            assert message["sau_scan"][0]["candidates"][0]["placement"] in rendered["text"]
            assert rendered["img"] and "/view?" in rendered["img"]
            page.wait_for_function("() => { const i = document.querySelector('img.sau-heatmap'); "
                                   "return i && i.complete && i.naturalWidth > 0; }", timeout=30_000)
            assert not [e for e in errors if "sau" in e.lower()], errors
            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOT))
            # the example workflow (API format) loads into the canvas as a dropped file does
            wf = json.loads((EXAMPLES / "organism_scan_unlearn.json").read_text())
            types = page.evaluate(
                """async (wf) => {
                    await window.app.loadApiJson(wf, "organism_scan_unlearn.json");
                    await new Promise(r => setTimeout(r, 500));
                    return window.app.graph._nodes.map(n => n.type);
                }""", wf)
            assert sorted(types) == sorted(n["class_type"] for n in wf.values())
        finally:
            browser.close()


@pytest.mark.slow
def test_every_example_workflow_matches_the_servers_nodes(server):
    """Each example (including the SD1.5 one, which needs a real checkpoint to run) names existing nodes and
    gives every required input."""
    info = _get(server.url + "/object_info")
    files = sorted(EXAMPLES.glob("*.json"))
    assert {f.name for f in files} >= {"organism_scan_unlearn.json", "organism_guard.json", "sd15_unlearn.json"}
    for f in files:
        wf = json.loads(f.read_text())
        for nid, node in wf.items():
            spec = info.get(node["class_type"])
            assert spec is not None, f"{f.name}: node {nid} {node['class_type']} unknown"
            missing = set(spec["input"].get("required", {})) - set(node["inputs"])
            assert not missing, f"{f.name}: node {nid} lacks {missing}"
            known = set(spec["input"].get("required", {})) | set(spec["input"].get("optional", {}))
            unknown = set(node["inputs"]) - known
            assert not unknown, f"{f.name}: node {nid} has unknown inputs {unknown}"


@pytest.mark.slow
def test_cancel_interrupts_unlearn(server):
    """Cancel (POST /interrupt) stops a running SAU Unlearn: the prompt ends as interrupted in that node."""
    wf = {
        "1": {"class_type": "SAU_OrganismLoader", "inputs": {"organism": "badt2i-object"}},
        "2": {"class_type": "SAU_Unlearn", "inputs": {"model": ["1", 0], "clip": ["1", 1], "trigger": ["1", 3],
                                                      "preset": "thorough", "placement": "auto", "seed": 0}},
        "3": {"class_type": "SAU_SavePatch", "inputs": {"patch": ["2", 2], "filename_prefix": "interrupted",
                                                        "format": "sau patch"}},
    }
    pid = _post(server.url + "/prompt", {"prompt": wf, "client_id": "sau-test"})["prompt_id"]
    deadline = time.time() + 120
    while not _get(server.url + "/queue")["queue_running"]:
        assert time.time() < deadline, server.tail()
        time.sleep(0.2)
    time.sleep(4)  # inside SAU Unlearn (the loader takes about a second)
    req = urllib.request.Request(server.url + "/interrupt", data=b"{}", method="POST",
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=10).close()
    t0 = time.time()
    while True:
        hist = _get(f"{server.url}/history/{pid}")
        if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
            break
        assert time.time() - t0 < 30, "Unlearn did not stop after Cancel:\n" + server.tail()
        time.sleep(0.5)
    messages = dict((m[0], m[1]) for m in hist[pid]["status"]["messages"])
    assert "execution_interrupted" in messages, messages
    assert messages["execution_interrupted"]["node_type"] == "SAU_Unlearn"
    assert "3" not in hist[pid]["outputs"]
