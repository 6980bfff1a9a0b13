"""Mod-Adapter for ComfyUI: tuning-free multi-concept personalization for FLUX.1.

This file is both the entry point ComfyUI loads from `custom_nodes/<any name>/`
and the top of the installable `mod_adapter` library. Inside ComfyUI it exposes
`comfy_entrypoint` (V3 nodes). Outside ComfyUI the library (`mod_adapter.modules`)
and the `mod-adapter` command work on their own; the nodes need ComfyUI.
"""

import importlib.util

__version__ = "0.1.0"

NODES_NEED_COMFYUI = (
    "The Mod-Adapter nodes run inside ComfyUI: put this folder in ComfyUI/custom_nodes/ and start ComfyUI. "
    "Outside ComfyUI, use the library (mod_adapter.modules) or the `mod-adapter` command."
)


def _inside_comfyui() -> bool:
    # ComfyUI puts its own root on sys.path; its V3 node API is the part we need.
    try:
        return importlib.util.find_spec("comfy_api") is not None
    except (ImportError, ValueError):
        return False


async def comfy_entrypoint():
    """ComfyUI's V3 entry point: the extension with the Mod-Adapter nodes.

    The nodes, and with them ComfyUI's own modules, are imported here, when
    ComfyUI loads the pack, not when the package is imported. So `import
    mod_adapter` (the library, the `mod-adapter` command, its torchrun workers)
    never imports ComfyUI, even in an environment where ComfyUI is importable:
    importing `comfy.model_management` outside a running ComfyUI would probe
    the GPU with ComfyUI's command-line defaults and fail on a CPU-only machine.
    """
    if not _inside_comfyui():
        raise RuntimeError(NODES_NEED_COMFYUI)
    from .nodes import comfy_entrypoint as nodes_entrypoint

    return await nodes_entrypoint()
