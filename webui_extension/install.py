"""Run by AUTOMATIC1111 / Forge when the extension is installed or the UI starts (``launch.py`` imports it
with the host's ``launch`` module available). Installs only what the host lacks, through the host's own
helpers (``launch.is_installed(package)``, ``launch.run_pip(command, desc)``): never torch, gradio, numpy,
huggingface_hub or pillow, whose versions the host pins, and never an upgrade of something installed.
"""
import os

import launch

# The engine's requirements (requirements.txt of the SAU checkout) minus what the host pins and owns, with
# lower bounds that accept the host's huggingface_hub (A1111: < 0.26; Forge: 0.26.2).
NEEDS = {
    "diffusers": "diffusers>=0.32,<0.33",
    "transformers": "transformers>=4.45,<5",
    "safetensors": "safetensors>=0.4",
    "peft": "peft>=0.13",
    "accelerate": "accelerate>=0.34",
    "click": "click>=8.1",
}

for module, spec in NEEDS.items():
    if not launch.is_installed(module):
        launch.run_pip(f'install "{spec}"', f"{spec} for SAU")

_here = os.path.dirname(os.path.realpath(__file__))
_checkout = os.path.dirname(_here)
if not launch.is_installed("sau_core") and not os.path.isdir(os.path.join(_checkout, "sau_core")):
    print("SAU: the engine (sau_core) was not found. Link this folder from a SAU checkout "
          "(ln -s /path/to/sau/webui_extension extensions/sau) or run: pip install --no-deps /path/to/sau")
