"""Where the shipped toy world lies on disk, and nothing else: the nodes and the CLI read this file, so that
finding the world never loads the world's training code (:mod:`.export` writes the folder).

    world/
      flux/            a diffusers FLUX.1 pipeline folder (model_index.json, transformer/, vae/, text_encoder/,
                       text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/): --flux for every mod-adapter command
      image_encoder/   open_clip_model.safetensors (open_clip layout), ModAdapter-World-ViT-8.json (its open_clip
                       architecture) and clip_vision_config.json (the same in the transformers/ComfyUI format)
      judge.safetensors
      adapter/         toy_world_adapter.safetensors, the world's Mod-Adapter (listed by the Loader node)
"""

from __future__ import annotations

import os
from typing import Dict

from ..errors import ModAdapterError

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORLD_FOLDER = os.path.join(PACK_ROOT, "world")
FLUX_FOLDER = "flux"
IMAGE_ENCODER_FOLDER = "image_encoder"
IMAGE_ENCODER_FILE = "open_clip_model.safetensors"
# The open_clip architecture name of the world's image tower (its config file is this name + ".json")
IMAGE_ENCODER_NAME = "ModAdapter-World-ViT-8"
CLIP_VISION_CONFIG_FILE = "clip_vision_config.json"
JUDGE_FILE = "judge.safetensors"
# The world's trained Mod-Adapter (the Loader node lists this folder): docs/results.md
WORLD_ADAPTER_FOLDER = os.path.join(WORLD_FOLDER, "adapter")
WORLD_ADAPTER_FILE = "toy_world_adapter.safetensors"


def world_paths(folder: str = WORLD_FOLDER) -> Dict[str, str]:
    return {
        "flux": os.path.join(folder, FLUX_FOLDER),
        "image_encoder": os.path.join(folder, IMAGE_ENCODER_FOLDER, IMAGE_ENCODER_FILE),
        "image_encoder_config": os.path.join(folder, IMAGE_ENCODER_FOLDER, IMAGE_ENCODER_NAME + ".json"),
        "clip_vision_config": os.path.join(folder, IMAGE_ENCODER_FOLDER, CLIP_VISION_CONFIG_FILE),
        "judge": os.path.join(folder, JUDGE_FILE),
        # FLUX.1's own tokenizer files, as published (CLIP-L's BPE folder, T5 v1.1's tokenizer.json)
        "clip_tokenizer": os.path.join(folder, FLUX_FOLDER, "tokenizer"),
        "t5_tokenizer": os.path.join(folder, FLUX_FOLDER, "tokenizer_2", "tokenizer.json"),
    }


def check_world(folder: str = WORLD_FOLDER) -> Dict[str, str]:
    """The paths of a complete world, or one error that names what is missing."""
    paths = world_paths(folder)
    needed = [paths["image_encoder"], paths["image_encoder_config"], paths["clip_vision_config"], paths["judge"],
              os.path.join(paths["flux"], "model_index.json")]
    missing = [p for p in needed if not os.path.exists(p)]
    if missing:
        raise ModAdapterError(f"the toy world in {folder} is incomplete (missing {', '.join(missing)}); reinstall "
                              f"the pack, or rebuild it with `mod-adapter world export` (docs/results.md)")
    return paths
