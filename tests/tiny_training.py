"""Tiny random models and a tiny dataset for the training tests (CPU, seconds).

* a FLUX.1 diffusers folder (``model_index.json``, transformer, VAE, CLIP-L and
  T5 text encoders, the real FLUX tokenizers the pack ships in world/flux, scheduler), all
  weights random and tiny, loaded by the same code as a real FLUX folder;
* a tiny open_clip ViT (registered config + safetensors weights);
* a manifest of a few generated images (solid colours, gradients, stripes)
  with concept words, captions, attribute captions and some masks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from tiny_flux import tiny_diffusers_flux

OPEN_CLIP_NAME = "ModAdapterTrainTinyViT"
OPEN_CLIP_VISION = {"image_size": 224, "layers": 3, "width": 48, "head_width": 16, "patch_size": 14}

# Adapter sized for the tiny FLUX of tiny_flux.py: width 128, 2 double + 4 single blocks.
TINY_ADAPTER_CONFIG = {
    "num_blocks": 6, "num_double_blocks": 2, "modulation_dim": 128, "image_token_dim": 48, "hidden_dim": 32,
    "num_heads": 2, "num_cross_attention_blocks": 2, "mlp_ratio": 2.0, "num_experts": 3, "expert_hidden_dim": 48,
}

WORDS = ["dog", "cat", "glass", "marble", "sunset", "teapot"]


def make_flux_folder(folder: Path, seed: int = 0, weight_std: float = 0.1) -> Path:
    """A complete tiny FLUX.1 diffusers folder.

    The transformer's matrices are drawn with std ``weight_std`` (0.1: twice
    tiny_flux's), so that the modulation of one text token moves the
    prediction enough for a few dozen training steps to show.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from flux_tokenizers import load_clip_l_tokenizer, load_t5_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    transformer = tiny_diffusers_flux(seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in transformer.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * (weight_std if p.ndim > 1 else 0.02))
    torch.manual_seed(seed + 1)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=77, projection_dim=32,
                                        eos_token_id=49407, bos_token_id=49406, pad_token_id=49407)).eval()
    t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=64, d_kv=16, d_ff=48, num_layers=1, num_heads=2,
                                 relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                                 dense_act_fn="gelu_new", is_gated_act=True)).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=16, norm_num_groups=8, sample_size=32, scaling_factor=0.3611,
                        shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip,
                        tokenizer=load_clip_l_tokenizer(),
                        text_encoder_2=t5,
                        tokenizer_2=load_t5_tokenizer(),
                        transformer=transformer)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def make_open_clip(folder: Path, seed: int = 0):
    """Register the tiny open_clip config; write its weights. Returns (config file, weights file)."""
    import open_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config_file = folder / f"{OPEN_CLIP_NAME}.json"
    config_file.write_text(json.dumps({
        "embed_dim": 32, "vision_cfg": OPEN_CLIP_VISION,
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }))
    open_clip.add_model_config(config_file)
    torch.manual_seed(seed)
    model = open_clip.create_model(OPEN_CLIP_NAME, pretrained=None)
    state = {k: (v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v).contiguous().clone()
             for k, v in model.state_dict().items() if k.startswith("visual.")}
    weights = folder / "tiny_vit.safetensors"
    save_file(state, str(weights))
    return config_file, weights


def _image(kind: int, size: int = 32):
    from PIL import Image

    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    palette = [(0.9, 0.2, 0.1), (0.1, 0.7, 0.3), (0.2, 0.3, 0.9), (0.9, 0.8, 0.1), (0.6, 0.1, 0.7), (0.1, 0.8, 0.8)]
    r, g, b = palette[kind % len(palette)]
    pattern = [x, y, (x + y) / 2, ((x * 6).floor() % 2), ((y * 5).floor() % 2), torch.ones_like(x)][kind % 6]
    pixels = torch.stack([r * pattern + 0.1, g * (1 - pattern) + 0.1, b * pattern.sqrt()], dim=-1).clamp(0, 1)
    return Image.fromarray((pixels * 255).round().to(torch.uint8).numpy())


def make_dataset(folder: Path, count: int = 8, *, size: int = 32, masks: bool = True) -> Path:
    """``count`` records over the words in WORDS; returns the manifest path."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    lines = []
    for i in range(count):
        word = WORDS[i % len(WORDS)]
        name = f"images/{i:03d}_{word}.png"
        _image(i, size + 8 * (i % 2)).save(folder / name)  # two image sizes: encoding groups by size
        record = {"concept_image": name, "concept_word": word,
                  "caption": f"a photo of a {word} in the garden, number {i}",
                  "attribute_caption": f"a {['red', 'green', 'blue', 'yellow', 'purple', 'cyan'][i % 6]} {word} "
                                       f"with {['stripes', 'dots', 'waves'][i % 3]}"}
        if masks and i % 3 == 0:
            mask_name = f"images/{i:03d}_mask.png"
            side = size + 8 * (i % 2)
            mask = Image.new("L", (side, side), 0)
            mask.paste(255, (0, 0, side * 3 // 4, side * 3 // 4))
            mask.save(folder / mask_name)
            record["mask"] = mask_name
        lines.append(json.dumps(record))
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def write_adapter_config(path: Path, **overrides) -> Path:
    path.write_text(json.dumps({**TINY_ADAPTER_CONFIG, **overrides}))
    return path


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli_worker(rank: int, world_size: int, port: int, runs, open_clip_config: str) -> None:
    """One torchrun-like process (env:// rendezvous) running ``mod-adapter`` commands in order."""
    import open_clip

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    open_clip.add_model_config(open_clip_config)
    from mod_adapter.cli import main

    for argv in runs:
        code = main(list(argv))
        if code != 0:
            raise RuntimeError(f"rank {rank}: `mod-adapter {' '.join(argv)}` exited with {code}")
