"""Mod-Adapter Loader: a checkpoint from models/mod_adapter, managed by ComfyUI."""

import os

import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import folder_paths
import torch
from comfy_api.latest import io

from ..modules.checkpoint import load_adapter_checkpoint, read_adapter_header
from .model_folders import ADAPTER_FOLDER, missing_file_error
from .sockets import CATEGORY, ModAdapterSocket


class AdapterRunner:
    """A loaded adapter wrapped in a ModelPatcher, so ComfyUI's model management
    moves it to the GPU for a prediction and offloads it when memory is needed."""

    def __init__(self, path: str, compute_dtype: torch.dtype):
        load_device = mm.get_torch_device()
        # The weights stay in the dtype they were saved in (bf16: 3.2 GB for the paper's adapter, not 6.7 GB
        # of float32); layers from comfy.ops cast them to the compute dtype per forward, as ComfyUI runs its
        # own models, and let it load the adapter partially when VRAM is short.
        header = read_adapter_header(path)  # read once: it says the weights' dtype, and the loader reuses it
        operations = comfy.ops.pick_operations(header.weight_dtype, compute_dtype, load_device=load_device)
        loaded = load_adapter_checkpoint(path, device="cpu", operations=operations, header=header)
        self.compute_dtype = compute_dtype
        self.adapter = loaded.adapter
        self.config = loaded.config
        self.metadata = loaded.metadata
        self.name = os.path.basename(path)
        self.num_double_blocks = self.config.num_double_blocks
        # ModelPatcher writes its own bookkeeping attributes (device, lowvram state) onto the
        # module it manages; a plain holder keeps them off the adapter's own API.
        holder = torch.nn.Module()
        holder.adapter = self.adapter
        self.patcher = comfy.model_patcher.ModelPatcher(
            holder, load_device=load_device, offload_device=mm.unet_offload_device())

    def predict(self, neutral, image_tokens, key_mask):
        mm.load_model_gpu(self.patcher)
        device, dtype = self.patcher.load_device, self.compute_dtype
        # ConceptEmbeds checked the tokens and the word's embedding when they entered the graph.
        delta = self.adapter(neutral.to(device, dtype), image_tokens.to(device, dtype), key_mask.to(device),
                             check_values=False)
        return delta.float().to(mm.intermediate_device())


def adapter_compute_dtype(device) -> torch.dtype:
    """bfloat16 where ComfyUI computes in it (most GPUs), float32 elsewhere (the CPU)."""
    return torch.bfloat16 if mm.should_use_bf16(device) else torch.float32


# Said wherever an artist meets a missing adapter: no FLUX.1 adapter has been published yet.
NO_PUBLIC_FLUX_ADAPTER = ("No public Mod-Adapter for FLUX.1 exists yet: the one shipped adapter is the toy world's. "
                          "To use a concept image with FLUX.1 today, learn the concept with Mod-Adapter Learn Concept "
                          "(no adapter needed), or train an adapter (docs/training.md).")


class ModAdapterLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ModAdapterLoader",
            display_name="Mod-Adapter Loader",
            category=f"{CATEGORY}/loaders",
            description="Loads a Mod-Adapter checkpoint (.safetensors) from models/mod_adapter.",
            inputs=[
                io.Combo.Input("adapter_name", options=folder_paths.get_filename_list(ADAPTER_FOLDER),
                               tooltip="Adapter checkpoint in models/mod_adapter (or a folder named 'mod_adapter' "
                                       "in extra_model_paths.yaml)."),
            ],
            outputs=[ModAdapterSocket.Output(display_name="MOD_ADAPTER", tooltip="The loaded adapter: connect it to every "
                                              "Predictor. ComfyUI loads and offloads it like a model.")],
        )

    @classmethod
    def validate_inputs(cls, adapter_name=None):
        missing = missing_file_error(ADAPTER_FOLDER, adapter_name, "The adapter file")
        return True if missing is None else f"{missing} {NO_PUBLIC_FLUX_ADAPTER}"

    @classmethod
    def execute(cls, adapter_name) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(ADAPTER_FOLDER, adapter_name)
        return io.NodeOutput(AdapterRunner(path, adapter_compute_dtype(mm.get_torch_device())))
