"""A test-only ComfyUI custom node pack (V1 nodes): loaders of tiny random models.

test_comfy_server.py copies this folder into a throw-away ComfyUI base
directory, with a copy of tests/tiny_comfy.py beside this file, so that a real
ComfyUI server runs the example workflows on the CPU in seconds. The loaders
give the same socket types as ComfyUI's own UNETLoader, DualCLIPLoader,
CLIPVisionLoader and VAELoader; every model is built from a fixed seed, so
each prompt gets the same weights. A model is built once per server process
and handed out again (as ComfyUI's own cache would), so that a server started
with --cache-none recomputes every other node of every prompt quickly. Not
part of the published pack.
"""

import functools

try:
    from . import tiny_comfy
except ImportError as e:  # pragma: no cover - only when the folder is used without the copy
    raise ImportError("comfy_test_pack needs a copy of tests/tiny_comfy.py beside its __init__.py "
                      "(test_comfy_server.py places it there)") from e

CATEGORY = "mod_adapter_tests"


@functools.lru_cache(maxsize=None)
def _built(kind: str):
    return getattr(tiny_comfy, kind)()


class _TinyLoader:
    CATEGORY = CATEGORY
    FUNCTION = "load"
    DESCRIPTION = "A tiny random model for tests (fixed seed)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}


class TinyFluxModelLoader(_TinyLoader):
    RETURN_TYPES = ("MODEL",)

    def load(self):
        return (_built("tiny_flux_model"),)


class TinyFluxClipLoader(_TinyLoader):
    RETURN_TYPES = ("CLIP",)

    def load(self):
        return (_built("tiny_flux_clip"),)


class TinyClipVisionLoader(_TinyLoader):
    RETURN_TYPES = ("CLIP_VISION",)

    def load(self):
        return (_built("tiny_clip_vision"),)


class TinyVAELoader(_TinyLoader):
    RETURN_TYPES = ("VAE",)

    def load(self):
        return (_built("tiny_vae"),)


NODE_CLASS_MAPPINGS = {
    "TinyFluxModelLoader": TinyFluxModelLoader,
    "TinyFluxClipLoader": TinyFluxClipLoader,
    "TinyClipVisionLoader": TinyClipVisionLoader,
    "TinyVAELoader": TinyVAELoader,
}
NODE_DISPLAY_NAME_MAPPINGS = {name: f"{name} (tests)" for name in NODE_CLASS_MAPPINGS}
