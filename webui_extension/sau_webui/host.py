"""The host's services behind one small interface, for AUTOMATIC1111 1.10 (gradio 3.41) and Forge (gradio 4.40).

Contracts followed (read from the hosts' sources, not copied):

* ``modules.sd_models`` (both hosts): ``list_models()`` rescans the checkpoint folders;
  ``checkpoints_list`` maps a title (``"name.safetensors [shorthash]"``) to a ``CheckpointInfo`` with
  ``.filename`` (absolute path), ``.name`` (path relative to the folder), ``.title``, ``.model_name``;
  ``get_closet_checkpoint_match(search_string)``; ``model_path`` (``models/Stable-diffusion``) and
  ``shared.cmd_opts.ckpt_dir`` (``--ckpt-dir``) are where checkpoints live.
* Loading a checkpoint: A1111 ``sd_models.reload_model_weights(sd_model=None, info=None)``; Forge
  ``modules_forge.main_entry.checkpoint_change(ckpt_name)`` (sets ``sd_model_checkpoint``; Forge loads the
  model on the next generation).
* ``modules.call_queue.queue_lock``: held around GPU work (``wrap_gradio_gpu_call``).
* ``modules.shared.state`` (``modules/shared_state.py``): ``begin(job=...)``, ``end()``, ``interrupt()``,
  fields ``interrupted``, ``job_count``, ``job_no``, ``sampling_step``, ``sampling_steps``, ``textinfo``.
* Settings: ``script_callbacks.on_ui_settings(fn)``; inside it ``shared.opts.add_option(key,
  shared.OptionInfo(default, label, component, component_args, section=(id, label)))``; values read as
  ``shared.opts.<key>`` (``shared.opts.data``).
* LoRA folder: ``shared.cmd_opts.lora_dir`` (the built-in Lora extension's ``--lora-dir``), else
  ``modules.paths.models_path``/Lora.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path

SECTION = ("sau", "SAU")
#: option key -> (default, label, component name, component args)
OPTIONS = {
    "sau_default_preset": ("fast", "SAU: default preset", "Radio", {"choices": ["fast", "standard", "thorough"]}),
    "sau_output_dir": ("", "SAU: output folder for sanitized checkpoints (empty: next to the input)", "Textbox", {}),
}


class Host:
    """What the tab needs from A1111 or Forge. Subclasses differ only in how a checkpoint is loaded."""

    name = "AUTOMATIC1111"

    def __init__(self):
        self.shared = importlib.import_module("modules.shared")
        self.sd_models = importlib.import_module("modules.sd_models")

    # checkpoints -------------------------------------------------------------------------------------------
    def checkpoint_titles(self) -> list[str]:
        return sorted(self.sd_models.checkpoints_list, key=str.lower)

    def refresh_checkpoints(self) -> list[str]:
        self.sd_models.list_models()
        return self.checkpoint_titles()

    def checkpoint_info(self, title: str):
        info = self.sd_models.checkpoints_list.get(title) or self.sd_models.get_closet_checkpoint_match(title)
        if info is None:
            raise LookupError(f"checkpoint {title!r} is not in the list (press refresh)")
        return info

    def checkpoint_path(self, title: str) -> Path:
        return Path(self.checkpoint_info(title).filename)

    def title_of(self, path: Path) -> str | None:
        path = Path(path).resolve()
        for title, info in self.sd_models.checkpoints_list.items():
            if Path(info.filename).resolve() == path:
                return title
        return None

    def checkpoint_dirs(self) -> list[Path]:
        dirs = [Path(self.sd_models.model_path)]
        extra = getattr(self.shared.cmd_opts, "ckpt_dir", None)
        if extra:
            dirs.append(Path(extra))
        return dirs

    def lora_dir(self) -> Path:
        d = getattr(self.shared.cmd_opts, "lora_dir", None)
        if d:
            return Path(d)
        paths = importlib.import_module("modules.paths")
        return Path(paths.models_path) / "Lora"

    def load_checkpoint(self, title: str) -> str:
        info = self.checkpoint_info(title)
        self.sd_models.reload_model_weights(info=info)
        self.shared.opts.data["sd_model_checkpoint"] = info.title
        return info.title

    # progress and interruption -----------------------------------------------------------------------------
    @property
    def state(self):
        return self.shared.state

    def queue_lock(self):
        """``modules.call_queue.queue_lock``, the lock A1111 holds around every GPU job (``wrap_gradio_gpu_call``),
        so a clean never runs beside a generation; a no-op where the host has none."""
        try:
            lock = getattr(importlib.import_module("modules.call_queue"), "queue_lock", None)
        except ImportError:
            lock = None
        return lock if lock is not None else nullcontext()

    @contextmanager
    def job(self, name: str, job_count: int = 1):
        with self.queue_lock():
            st = self.state
            st.begin(job=name)
            st.job_count = job_count
            try:
                yield st
            finally:
                st.end()

    def interrupted(self) -> bool:
        return bool(self.state.interrupted)

    def interrupt(self) -> None:
        self.state.interrupt()

    # settings ----------------------------------------------------------------------------------------------
    def register_settings(self) -> None:
        import gradio as gr

        for key, (default, label, component, args) in OPTIONS.items():
            self.shared.opts.add_option(key, self.shared.OptionInfo(default, label, getattr(gr, component), dict(args),
                                                                    section=SECTION))

    def option(self, key: str):
        value = self.shared.opts.data.get(key)
        return OPTIONS[key][0] if value is None else value


class ForgeHost(Host):
    name = "Forge"

    def load_checkpoint(self, title: str) -> str:
        info = self.checkpoint_info(title)
        main_entry = importlib.import_module("modules_forge.main_entry")
        main_entry.checkpoint_change(info.title)
        return info.title


def is_forge() -> bool:
    """Forge ships the ``modules_forge`` package next to ``modules``; A1111 does not."""
    try:
        return importlib.util.find_spec("modules_forge") is not None
    except (ImportError, ValueError):
        return False


def detect() -> Host:
    return ForgeHost() if is_forge() else Host()


def repo_root() -> Path:
    """The SAU checkout this extension folder belongs to (``webui_extension``'s parent, links resolved)."""
    return Path(os.path.realpath(__file__)).parents[2]
