"""SAU for ComfyUI: find and remove backdoors in Stable Diffusion models (V3 schema node pack).

ComfyUI loads this package (or the repository root's ``__init__.py``, which forwards here) and calls
:func:`comfy_entrypoint`. Only the V3 entry point is exported: a module that also exported
``NODE_CLASS_MAPPINGS`` would be loaded as V1.
"""
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import SauExtension

    return SauExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
