"""SAU tab for AUTOMATIC1111 / Forge (the extension's only script: the host runs every file in scripts/).

Registers the "SAU" tab with ``script_callbacks.on_ui_tabs`` (the callback returns
``[(gr.Blocks, title, elem_id)]``, the format both hosts read) and its settings with ``on_ui_settings``.
The engine is found as installed (``install.py``) or, when this folder is a link into a SAU checkout, in
that checkout (the folder above ``webui_extension``).
"""
import os
import sys

_EXT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))  # webui_extension/ (links resolved)
for _p in (_EXT, os.path.dirname(_EXT)):  # the tab's package; the checkout holding sau_core
    if os.path.isdir(os.path.join(_p, "sau_webui" if _p == _EXT else "sau_core")) and _p not in sys.path:
        sys.path.append(_p)

from modules import script_callbacks  # noqa: E402

from sau_webui import host as _host  # noqa: E402

HOST = _host.detect()


def on_ui_tabs():
    from sau_webui.ui import build

    return [(build(HOST), "SAU", "sau")]


def on_ui_settings():
    HOST.register_settings()


script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_ui_settings(on_ui_settings)
