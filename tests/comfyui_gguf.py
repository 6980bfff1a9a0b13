"""city96's ComfyUI-GGUF, the pack most artists load quantized FLUX.1 with, for the ComfyUI tier.

Its code is never committed here: like ComfyUI, it is checked out into a cache outside the repository
(COMFYUI_GGUF_PATH; .ci/run names the commit) and imported from there as a custom node pack. Tiny FLUX.1
models are written as real GGUF files (Q8_0 weights, F32 norms and biases, with the `gguf` package) and
loaded by its own Unet Loader (GGUF) node. Its loader detects a FLUX.1's config the way ComfyUI does, which
hard-codes FLUX.1's full width in older versions, so the tests hand it the tiny model's config instead.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

PACK_NAME = "comfyui_gguf_under_test"
GGUF_HINT = ("a checkout of https://github.com/city96/ComfyUI-GGUF (the tree .ci/run reads: "
             "~/.cache/mod-adapter/comfyui-gguf/<commit>, see README's Test section)")


def import_comfyui_gguf():
    """The pack, imported as ComfyUI imports a custom node folder (its relative imports need a package)."""
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    path = os.environ.get("COMFYUI_GGUF_PATH")
    if not path:
        pytest.skip(f"COMFYUI_GGUF_PATH is not set: the GGUF tests are skipped. Point it at {GGUF_HINT}")
    if not os.path.isfile(os.path.join(path, "loader.py")):
        pytest.skip(f"COMFYUI_GGUF_PATH={path} is not a ComfyUI-GGUF checkout (no loader.py): point it at {GGUF_HINT}")
    pytest.importorskip("gguf", reason="ComfyUI-GGUF needs the gguf package (pip install -e '.[test]')")
    spec = importlib.util.spec_from_file_location(PACK_NAME, os.path.join(path, "__init__.py"),
                                                  submodule_search_locations=[path])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = pack
    spec.loader.exec_module(pack)
    return pack


def write_gguf(state_dict, path: str) -> None:
    """A FLUX.1 GGUF file as city96's converter writes one: Q8_0 for the matrices it can quantize, F32 else."""
    import gguf

    writer = gguf.GGUFWriter(path, "flux")
    for key, value in state_dict.items():
        array = value.float().numpy()
        if array.ndim == 2 and array.shape[-1] % 32 == 0:
            writer.add_tensor(key, gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(key, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def dequantized_state_dict(model_patcher):
    """The weights of a model ComfyUI-GGUF loaded, as its layers dequantize them for a forward (by default, Q8_0
    in float16), in float32: the same numbers, in ordinary tensors."""
    dequantize_tensor = sys.modules[f"{PACK_NAME}.dequant"].dequantize_tensor
    return {name: torch.Tensor(dequantize_tensor(tensor, torch.float32)).clone()
            for name, tensor in model_patcher.model.diffusion_model.named_parameters()}


def load_gguf_flux(folder: str, name: str, unet_config: dict, monkeypatch):
    """Load ``folder/name`` with ComfyUI-GGUF's Unet Loader (GGUF) node, as ComfyUI's executor runs nodes."""
    import comfy.model_detection
    import folder_paths

    pack = import_comfyui_gguf()
    folder_paths.add_model_folder_path("unet", folder)
    with monkeypatch.context() as patch, torch.inference_mode():
        patch.setattr(comfy.model_detection, "model_config_from_unet",
                      lambda *args, **kwargs: comfy.model_detection.model_config_from_unet_config(dict(unet_config)))
        (model,) = pack.NODE_CLASS_MAPPINGS["UnetLoaderGGUF"]().load_unet(name)
    return model
