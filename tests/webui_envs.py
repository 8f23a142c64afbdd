"""Virtual environments with the hosts' gradio pins for the A1111 / Forge tab tests, created on first use under
``runs/webui/`` (gitignored) and reused while their pins stay the same (a stamp file records them).

torch goes in first, alone, as exactly ``torch==2.13.0`` (the local CPU wheel; a range would pull a CUDA
build). Then gradio with the host's pins and the engine's libraries in versions that accept the host's
huggingface_hub: transformers 5.x needs huggingface_hub >= 1.0 and diffusers >= 0.33 needs >= 0.27, so
both environments run transformers 4.x with diffusers 0.32.2.
"""
from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "runs" / "webui"
TORCH = "torch==2.13.0"
ENGINE = ["diffusers==0.32.2", "safetensors==0.8.0", "peft==0.21.2", "accelerate==1.15.0", "click==8.5.1",
          "pillow==10.4.0"]
PINS = {
    # AUTOMATIC1111 1.10: gradio 3.41.2 needs fastapi 0.94.0, httpx 0.24.1, numpy < 2 and huggingface_hub < 0.26
    # on Python 3.11 (DESIGN.md section 6); fastapi 0.94 needs pydantic 1.x.
    "gradio3": ["gradio==3.41.2", "fastapi==0.94.0", "httpx==0.24.1", "numpy==1.26.4", "huggingface_hub==0.25.2",
                "pydantic==1.10.27", "transformers==4.48.3", *ENGINE],
    # Forge: gradio 4.40.0 with fastapi 0.104.1, pydantic 2.8.2, httpx 0.24.1, huggingface-hub 0.26.2.
    "gradio4": ["gradio==4.40.0", "fastapi==0.104.1", "httpx==0.24.1", "pydantic==2.8.2", "huggingface-hub==0.26.2",
                "numpy==1.26.4", "transformers==4.50.3", *ENGINE],
}


@contextmanager
def _lock(name: str):
    BASE.mkdir(parents=True, exist_ok=True)
    with open(BASE / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _pip(python: Path, args: list[str]) -> None:
    subprocess.run([str(python), "-m", "pip", "install", "--no-compile", "-q", "--disable-pip-version-check", *args],
                   check=True)


def ensure_env(name: str) -> tuple[Path, dict]:
    """The environment's python (created if missing or its pins changed) and what creating it took."""
    env = BASE / name
    python = env / "bin" / "python"
    stamp = env / ".sau-pins.json"
    want = {"torch": TORCH, "pins": PINS[name]}
    with _lock(name):
        if python.exists() and stamp.is_file() and json.loads(stamp.read_text()).get("pins") == want:
            return python, json.loads(stamp.read_text())
        shutil.rmtree(env, ignore_errors=True)
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
        _pip(python, [TORCH])
        t1 = time.time()
        _pip(python, PINS[name])
        info = {"pins": want, "seconds": {"torch": round(t1 - t0, 1), "rest": round(time.time() - t1, 1)}}
        stamp.write_text(json.dumps(info, indent=2))
        return python, info


def prepare_in_background(names) -> None:
    """Start creating environments in threads (pip is mostly unpacking: two at once save wall time); a later
    :func:`ensure_env` waits on the same lock, and builds again if a background try failed."""
    import threading

    def build(name):
        try:
            ensure_env(name)
        except Exception:  # noqa: BLE001 - ensure_env in the test reports the failure
            pass

    for name in names:
        if not (BASE / name / ".sau-pins.json").is_file():
            threading.Thread(target=build, args=(name,), daemon=True, name=f"venv-{name}").start()
