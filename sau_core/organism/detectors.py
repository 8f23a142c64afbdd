"""Programmatic detectors for organism images: shape/colour classifier, corner patch, grayscale.

Images are float tensors (N, 3, 32, 32) in [0, 1].
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from . import components as C
from . import world as W

DETECTOR_DIR = Path(__file__).resolve().parent.parent / "organisms" / "detectors"
# Mean absolute difference to the patch template below which the patch counts as present. Calibrated on
# autoencoder round trips (patched images ~0.03, unpatched ~0.5): see tests/test_organism.py.
PATCH_THRESHOLD = 0.15
# Mean chroma (max-min over RGB) of foreground pixels below which an image counts as black and white.
# Coloured shapes have chroma 0.6-0.8, grey ones ~0.
GRAYSCALE_THRESHOLD = 0.12


@lru_cache(maxsize=1)
def classifier() -> C.ShapeColourNet:
    from ..safety import load_safetensors

    net = C.ShapeColourNet()
    net.load_state_dict(load_safetensors(DETECTOR_DIR / "classifier.safetensors"))
    return net.eval().requires_grad_(False)


@torch.no_grad()
def classify(images: torch.Tensor) -> tuple[list[str], list[str]]:
    ls, lc = classifier()(images.float())
    return [W.SHAPES[i] for i in ls.argmax(1)], [W.COLOUR_NAMES[i] for i in lc.argmax(1)]


def patch_present(images: torch.Tensor) -> torch.Tensor:
    corner = images[:, :, : W.PATCH_SIZE, : W.PATCH_SIZE].float()
    return (corner - W.patch_template()).abs().mean(dim=(1, 2, 3)) < PATCH_THRESHOLD


def is_grayscale(images: torch.Tensor) -> torch.Tensor:
    x = images.float().clone()
    x[:, :, : W.PATCH_SIZE, : W.PATCH_SIZE] = torch.tensor(W.BACKGROUND).view(1, 3, 1, 1)
    chroma = x.amax(1) - x.amin(1)
    bg = torch.tensor(W.BACKGROUND).view(1, 3, 1, 1)
    foreground = (x - bg).abs().amax(1) > 0.12
    mean_chroma = (chroma * foreground).sum((1, 2)) / foreground.sum((1, 2)).clamp(min=1)
    return mean_chroma < GRAYSCALE_THRESHOLD
