"""The toy world's CLIP: a CLIP-L-architecture text model and an open_clip ViT, trained together contrastively.

The text model is transformers' ``CLIPTextModel`` with the real CLIP-L
tokenizer (77 tokens, vocabulary 49408), small; its pooled output is what
FLUX.1 feeds to ``vector_in``. The image tower is open_clip's
``VisionTransformer`` at 64 px with 8 px patches (65 tokens); its
penultimate-layer tokens are what the Mod-Adapter reads through CLIP_VISION.

A caption may state only some attributes ("a cone with a surface"), so it is
true of many images in a batch: the contrastive targets are soft, uniform
over every image the caption is true of (and every caption true of an image),
computed from the scenes' exact attributes (:func:`..captions.consistent`).
Trained on the training split with the pack's resumable loop
(``mod-adapter world train-clip``).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..training.image_encoder import clip_preprocess
from .captions import caption, consistent, random_modes
from .checkpoint_file import load_world_checkpoint, save_world_checkpoint
from .judge import images_to_tensor
from .model_task import WorldModelTask
from .paths import IMAGE_ENCODER_NAME
from .scene import render
from .split import TRAIN, random_scene
from .streams import Stream, world_rng

CLIP_FORMAT = "mod-adapter-world-clip"
IMAGE_SIZE = 64
TEXT_LENGTH = 77  # CLIP-L's, as FLUX.1 pads it

# CLIP-L's text config (ComfyUI's sd1_clip_config.json) at a small width and depth.
CLIP_TEXT_CONFIG: Dict[str, Any] = dict(
    vocab_size=49408, hidden_size=64, intermediate_size=256, projection_dim=64, num_hidden_layers=4,
    num_attention_heads=4, max_position_embeddings=TEXT_LENGTH, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    bos_token_id=0, pad_token_id=1, eos_token_id=49407,
)
# The open_clip architecture of the image tower, registered under this name (open_clip.add_model_config). The
# text_cfg only satisfies open_clip's config format: the world's text tower is the CLIPTextModel above.
OPEN_CLIP_NAME = IMAGE_ENCODER_NAME
OPEN_CLIP_CONFIG: Dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 4, "width": 128, "head_width": 64, "patch_size": 8,
                   "mlp_ratio": 4.0},
    "text_cfg": {"context_length": TEXT_LENGTH, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 4},
}
OPEN_CLIP_CONFIG_FILE = OPEN_CLIP_NAME + ".json"
_CONFIGS = {"text_config": CLIP_TEXT_CONFIG, "open_clip_config": OPEN_CLIP_CONFIG}


def write_open_clip_config(folder: str) -> str:
    """Write the image tower's open_clip config into ``folder`` (its file name is the architecture's name)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, OPEN_CLIP_CONFIG_FILE)
    with open(path, "w") as f:
        json.dump(OPEN_CLIP_CONFIG, f, indent=1)
    return path


def register_open_clip_architecture() -> None:
    """Make ``ModAdapter-World-ViT-8`` known to open_clip (idempotent)."""
    import open_clip

    if open_clip.get_model_config(OPEN_CLIP_NAME) is None:
        import tempfile

        open_clip.add_model_config(write_open_clip_config(tempfile.mkdtemp(prefix="mod_adapter_world_")))


class WorldClip(nn.Module):
    """Both towers and the contrastive temperature."""

    def __init__(self):
        super().__init__()
        from open_clip.model import CLIPVisionCfg, _build_vision_tower
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        self.text = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_TEXT_CONFIG))
        self.visual = _build_vision_tower(OPEN_CLIP_CONFIG["embed_dim"], CLIPVisionCfg(**OPEN_CLIP_CONFIG["vision_cfg"]),
                                          quick_gelu=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(input_ids=input_ids).text_embeds, dim=-1)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels``: CLIP-normalised (B, 3, 64, 64), as :func:`clip_preprocess` makes them."""
        return F.normalize(self.visual(pixels), dim=-1)


def load_clip_tokenizer(folder: str):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(folder)


def tokenize(tokenizer, captions: List[str]) -> torch.Tensor:
    """As FluxPipeline tokenizes for CLIP: padded to 77, truncated."""
    return tokenizer(captions, padding="max_length", max_length=TEXT_LENGTH, truncation=True,
                     return_tensors="pt").input_ids


def preprocess(images: np.ndarray) -> torch.Tensor:
    """uint8 renders (B, 64, 64, 3) -> the CLIP-normalised pixels ComfyUI's CLIP_VISION computes from them."""
    return clip_preprocess(images_to_tensor(images).movedim(1, -1), size=IMAGE_SIZE)


def soft_targets(matches: torch.Tensor) -> torch.Tensor:
    return matches / matches.sum(dim=1, keepdim=True)


class ClipTask(WorldModelTask):
    name = "clip"

    def __init__(self, clip: WorldClip, tokenizer, *, seed: int, dataset_size: int, device: torch.device):
        super().__init__(clip, seed=seed, dataset_size=dataset_size, device=device)
        self.tokenizer = tokenizer

    def load_items(self, items: List[Tuple[int, int]], step: int) -> Any:
        scenes, texts, modes = [], [], []
        for _, index in items:
            rng = world_rng(Stream.CLIP, self.seed, index, step)  # a new caption each time a scene comes back
            scene = random_scene(world_rng(Stream.CLIP, self.seed, index), TRAIN)
            scene_modes = random_modes(rng)
            scenes.append(scene)
            modes.append(scene_modes)
            texts.append(caption(scene, scene_modes, rng))
        matches = torch.tensor([[consistent(s, m, other) for other in scenes] for s, m in zip(scenes, modes)],
                               dtype=torch.float32)
        pixels = preprocess(np.stack([render(s, IMAGE_SIZE) for s in scenes]))
        return tokenize(self.tokenizer, texts), pixels, matches

    def per_sample_losses(self, model: torch.nn.Module, prepared: Any, step: int) -> torch.Tensor:
        input_ids, pixels, matches = (t.to(self.device) for t in prepared)
        text = model.encode_text(input_ids)
        image = model.encode_image(pixels)
        logits = model.logit_scale.clamp(max=math.log(100.0)).exp() * text @ image.t()
        text_to_image = F.cross_entropy(logits, soft_targets(matches), reduction="none")
        image_to_text = F.cross_entropy(logits.t(), soft_targets(matches.t()), reduction="none")
        return 0.5 * (text_to_image + image_to_text)

    def run_settings(self) -> Dict[str, Any]:
        return {name: json.dumps(config, sort_keys=True) for name, config in _CONFIGS.items()}

    def save_model(self, path: str, model: torch.nn.Module, summary: Dict[str, Any]) -> None:
        save_world_clip(path, model, summary)

    def load_model(self, path: str) -> torch.nn.Module:
        return load_world_clip(path)


def save_world_clip(path: str, clip: WorldClip, summary: Dict[str, Any]) -> None:
    save_world_checkpoint(path, clip, CLIP_FORMAT, _CONFIGS, summary)


def load_world_clip(path: str) -> WorldClip:
    tensors, _ = load_world_checkpoint(path, CLIP_FORMAT, "world CLIP", _CONFIGS)
    clip = WorldClip()
    clip.load_state_dict(tensors, strict=True)
    return clip.eval()


@torch.no_grad()
def retrieval_accuracy(clip: WorldClip, tokenizer, scenes, groups=("surface", "pose", "lighting", "background")):
    """Per attribute group: how often the image's own full description is the best of the captions that differ
    from it in that group only (a zero-shot read-out of the attribute from the image embedding)."""
    from .captions import STATED, GROUPS
    from .scene import ATTRIBUTES, CONCEPT_ATTRIBUTES

    clip.eval()
    image = clip.encode_image(preprocess(np.stack([render(s, IMAGE_SIZE) for s in scenes])))
    results = {}
    for group in groups:
        correct = 0
        for i, scene in enumerate(scenes):
            names = CONCEPT_ATTRIBUTES[group]
            variants = [scene]
            for name in names:
                for value in ATTRIBUTES[name]:
                    if value != getattr(scene, name):
                        variants.append(scene.replace(**{name: value}))
            texts = [caption(v, {g: STATED for g in GROUPS}) for v in variants]
            scores = clip.encode_text(tokenize(tokenizer, texts)) @ image[i]
            correct += int(scores.argmax()) == 0
        results[group] = correct / len(scenes)
    return results
