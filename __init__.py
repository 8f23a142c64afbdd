"""ComfyUI entry point when this repository is cloned into ``ComfyUI/custom_nodes/`` (or installed from the
Comfy Registry): the node pack itself is ``sau_nodes/`` (V3 schema), the engine ``sau_core/``."""
import os
import sys

_HERE = os.path.dirname(os.path.realpath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from sau_nodes import comfy_entrypoint  # noqa: E402

WEB_DIRECTORY = "./sau_nodes/web"

__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
