"""A stand-in for the AUTOMATIC1111 / Forge application, for SAU's extension tests (neither app can be installed
offline). It is NOT their code: it writes small importable ``modules.*`` packages (and ``modules_forge`` for
the Forge flavour) that follow the real modules' contracts, as read from their sources:

* ``modules.paths.models_path``; ``modules.shared``: ``cmd_opts`` (``ckpt_dir``, ``lora_dir``, ``ckpt``),
  ``opts`` (``data``, ``data_labels``, ``add_option``, ``set``, ``onchange``, attribute access), ``OptionInfo``
  (``default, label, component, component_args, onchange, section, ...``), ``state`` (``modules/shared_state.py``
  ``State``: ``begin(job)``, ``end()``, ``interrupt()``, ``interrupted``, ``job_count``, ``sampling_step``...);
* ``modules.sd_models``: ``model_path``, ``CheckpointInfo(filename)`` (``name``, ``model_name``, ``title``
  ``"name [shorthash]"``, ``ids``), ``checkpoints_list`` / ``checkpoint_aliases``, ``list_models()`` (every
  ``.ckpt`` / ``.safetensors`` under the folders), ``get_closet_checkpoint_match``,
  ``reload_model_weights(sd_model=None, info=None)`` (records the load instead of building a model);
* ``modules.call_queue.queue_lock``; ``modules.script_callbacks``: ``on_ui_tabs(fn)``, ``on_ui_settings(fn)`` and the lists they fill;
* Forge: ``modules_forge.main_entry.checkpoint_change(ckpt_name)`` (sets ``sd_model_checkpoint``; records).

``python tests/webui_host.py --flavour a1111|forge --root DIR --port N`` loads every extension under
``DIR/extensions/*/scripts/*.py`` the way the hosts do (by file path, as a module), runs the settings
callbacks, builds the ``on_ui_tabs`` tabs inside ``gr.Tabs`` (``gr.TabItem(label, id=ifid,
elem_id=f"tab_{ifid}")``, extensions' ``style.css`` in the page) and serves them with the queue enabled.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

FILES = {
    "modules/__init__.py": "",
    "modules/paths.py": '''
import os
script_path = os.environ["SAU_STANDIN_ROOT"]
data_path = script_path
models_path = os.path.join(data_path, "models")
''',
    "modules/shared.py": '''
"""Stand-in for A1111's modules.shared (SAU tests)."""
import argparse, json, os, time
from modules import paths

cmd_opts = argparse.Namespace(ckpt_dir=None, ckpt=None, lora_dir=os.path.join(paths.models_path, "Lora"),
                              freeze_settings=False)
config_filename = os.path.join(paths.data_path, "config.json")


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, comment_before="", comment_after="", infotext=None, restrict_api=False,
                 category_id=None):
        self.default, self.label, self.component, self.component_args = default, label, component, component_args
        self.onchange, self.section, self.refresh, self.category_id = onchange, section, refresh, category_id
        self.do_not_save = False


class Options:
    def __init__(self):
        object.__setattr__(self, "data_labels", {"sd_model_checkpoint": OptionInfo(None, "Stable Diffusion checkpoint")})
        object.__setattr__(self, "data", {"sd_model_checkpoint": None})

    def __getattr__(self, item):
        if item in self.data:
            return self.data[item]
        if item in self.data_labels:
            return self.data_labels[item].default
        raise AttributeError(item)

    def add_option(self, key, info):
        self.data_labels[key] = info
        if key not in self.data:
            self.data[key] = info.default

    def set(self, key, value, is_api=False, run_callbacks=True):
        if self.data.get(key) == value:
            return False
        self.data[key] = value
        info = self.data_labels[key]
        if run_callbacks and info.onchange is not None:
            info.onchange()
        return True

    def onchange(self, key, func, call=True):
        self.data_labels[key].onchange = func
        if call:
            func()

    def save(self, filename):
        with open(filename, "w", encoding="utf8") as fh:
            json.dump(self.data, fh, indent=4, ensure_ascii=False)


opts = Options()


class State:
    skipped = False
    interrupted = False
    job = ""
    job_no = 0
    job_count = 0
    sampling_step = 0
    sampling_steps = 0
    textinfo = None
    time_start = None

    def interrupt(self):
        self.interrupted = True

    def begin(self, job="(unknown)"):
        self.sampling_step = 0
        self.time_start = time.time()
        self.job_count = -1
        self.job_no = 0
        self.skipped = False
        self.interrupted = False
        self.textinfo = None
        self.job = job
        log_event({"event": "begin", "job": job})

    def end(self):
        log_event({"event": "end", "job": self.job, "interrupted": self.interrupted})
        self.job = ""
        self.job_count = 0


def log_event(event):
    with open(os.path.join(paths.data_path, "host-events.jsonl"), "a", encoding="utf8") as fh:
        fh.write(json.dumps(event) + "\\n")


state = State()
sd_model = None
''',
    "modules/sd_models.py": '''
"""Stand-in for A1111's modules.sd_models (SAU tests): the checkpoint list; loading is recorded."""
import hashlib, os
from modules import shared
from modules.paths import models_path

model_dir = "Stable-diffusion"
model_path = os.path.abspath(os.path.join(models_path, model_dir))
checkpoints_list = {}
checkpoint_aliases = {}


class CheckpointInfo:
    def __init__(self, filename):
        self.filename = filename
        abspath = os.path.abspath(filename)
        if shared.cmd_opts.ckpt_dir is not None and abspath.startswith(shared.cmd_opts.ckpt_dir):
            name = abspath.replace(shared.cmd_opts.ckpt_dir, "")
        elif abspath.startswith(model_path):
            name = abspath.replace(model_path, "")
        else:
            name = os.path.basename(filename)
        name = name.lstrip("/\\\\")
        self.name = name
        self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
        self.model_name = os.path.splitext(name.replace("/", "_").replace("\\\\", "_"))[0]
        with open(filename, "rb") as fh:
            self.sha256 = hashlib.sha256(fh.read()).hexdigest()
        self.shorthash = self.sha256[0:10]
        self.hash = self.sha256[0:8]
        self.title = f"{name} [{self.shorthash}]"
        self.ids = [self.hash, self.model_name, self.title, name, self.shorthash, self.sha256]

    def register(self):
        checkpoints_list[self.title] = self
        for i in self.ids:
            checkpoint_aliases[i] = self


def list_models():
    checkpoints_list.clear()
    checkpoint_aliases.clear()
    folders = [model_path] + ([shared.cmd_opts.ckpt_dir] if shared.cmd_opts.ckpt_dir else [])
    for folder in folders:
        for root, _, files in os.walk(folder):
            for f in sorted(files):
                if f.endswith((".ckpt", ".safetensors")) and not f.endswith(".vae.safetensors"):
                    CheckpointInfo(os.path.join(root, f)).register()


def get_closet_checkpoint_match(search_string):
    info = checkpoint_aliases.get(search_string)
    if info is not None:
        return info
    found = sorted([i for i in checkpoints_list.values() if search_string in i.title], key=lambda x: len(x.title))
    return found[0] if found else None


def reload_model_weights(sd_model=None, info=None):
    shared.log_event({"event": "reload_model_weights", "title": info.title if info else None})
''',
    "modules/call_queue.py": '''
"""Stand-in for A1111's modules.call_queue (SAU tests): the lock around GPU jobs."""
import threading

queue_lock = threading.Lock()
''',
    "modules/script_callbacks.py": '''
"""Stand-in for A1111's modules.script_callbacks (SAU tests): the two registrations the tab uses."""
callbacks_ui_tabs = []
callbacks_ui_settings = []


def on_ui_tabs(callback):
    callbacks_ui_tabs.append(callback)


def on_ui_settings(callback):
    callbacks_ui_settings.append(callback)


def ui_tabs_callback():
    res = []
    for cb in callbacks_ui_tabs:
        res += cb() or []
    return res


def ui_settings_callback():
    for cb in callbacks_ui_settings:
        cb()
''',
}
FORGE_FILES = {
    "modules_forge/__init__.py": "",
    "modules_forge/main_entry.py": '''
"""Stand-in for Forge's modules_forge.main_entry (SAU tests)."""
from modules import shared


def checkpoint_change(ckpt_name):
    shared.opts.set("sd_model_checkpoint", ckpt_name)
    shared.log_event({"event": "checkpoint_change", "title": ckpt_name})
''',
}


def write_host(root: Path, flavour: str) -> Path:
    """The stand-in packages under ``root/host`` (returned; put it first on sys.path)."""
    host = root / "host"
    files = {**FILES, **(FORGE_FILES if flavour == "forge" else {})}
    for rel, text in files.items():
        p = host / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text.lstrip("\n"))
    for d in ("models/Stable-diffusion", "models/Lora", "extensions"):
        (root / d).mkdir(parents=True, exist_ok=True)
    return host


def load_extensions(root: Path, flavour: str):
    """Import the stand-in host, then every extension script the way A1111's script loader does (by path)."""
    import os

    os.environ["SAU_STANDIN_ROOT"] = str(root)
    sys.path.insert(0, str(write_host(root, flavour)))
    from modules import script_callbacks, sd_models

    sd_models.list_models()
    css = []
    for ext in sorted((root / "extensions").iterdir()):
        for script in sorted((ext / "scripts").glob("*.py")):
            spec = importlib.util.spec_from_file_location(script.stem, script)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        if (ext / "style.css").is_file():
            css.append((ext / "style.css").read_text())
    script_callbacks.ui_settings_callback()
    return script_callbacks, "\n".join(css)


def build_app(root: Path, flavour: str):
    import gradio as gr

    script_callbacks, css = load_extensions(root, flavour)
    tabs = script_callbacks.ui_tabs_callback()
    with gr.Blocks(css=css, title=f"stand-in {flavour}", analytics_enabled=False) as demo:
        gr.HTML(f"<div id='standin_banner'>Stand-in {flavour} host (SAU tests), gradio {gr.__version__}</div>")
        with gr.Tabs(elem_id="tabs"):
            with gr.TabItem("txt2img", id="txt2img", elem_id="tab_txt2img"):
                gr.HTML("<p>(the host's own tabs are not part of the stand-in)</p>")
            for interface, label, ifid in tabs:
                with gr.TabItem(label, id=ifid, elem_id=f"tab_{ifid}"):
                    interface.render()
    return demo, tabs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flavour", choices=["a1111", "forge"], required=True)
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    import gradio as gr

    demo, tabs = build_app(args.root, args.flavour)
    if int(gr.__version__.split(".")[0]) >= 4:
        demo.queue(default_concurrency_limit=4)
    else:
        demo.queue(concurrency_count=4)
    from modules import shared

    options = {k: list(v.section) for k, v in shared.opts.data_labels.items() if v.section}
    print(json.dumps({"gradio": gr.__version__, "tabs": [t[1] for t in tabs], "options": options}), flush=True)
    demo.launch(server_name="127.0.0.1", server_port=args.port, prevent_thread_lock=False, show_api=False,
                inbrowser=False)


if __name__ == "__main__":
    main()
