"""Stopping the engine's work from a host: ComfyUI's Cancel, A1111 / Forge's Interrupt (``shared.state``).

The engine reports progress between stages and steps, and a localisation pass or a grid can run a while
between two reports, so a host's check also runs before every UNet and text-encoder forward of the work on
a handle. The check raises (the host's own exception, or :class:`Cancelled`); exports are atomic, so an
interrupted clean leaves no output behind.
"""
from __future__ import annotations

from typing import Callable

from .errors import SauError


class Cancelled(SauError):
    """The user stopped the work; nothing was written."""


def check_before_forward(handle, check: Callable[[], None]) -> Callable[[], None]:
    """Call ``check()`` before every forward of ``handle``'s UNet and text encoder(s). Returns a function that
    removes the hooks again."""
    hooks = [m.register_forward_pre_hook(lambda _mod, _args: check())
             for m in (handle.unet, handle.text_encoder, handle.text_encoder_2) if m is not None]

    def remove() -> None:
        for h in hooks:
            h.remove()

    return remove
