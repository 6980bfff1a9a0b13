"""Benchmark of Mod-Adapter training: samples per second and peak memory, plus a FLOP count.

Three modes:

``--mode tiny`` (default; CPU is fine)
    Tiny random models of the real architectures (FLUX.1 with 2 + 4 blocks of
    width 128, a 3-layer ViT, 2-layer CLIP-L / 1-layer T5 text encoders, a
    2-level VAE, the ``tiny`` adapter resized to the FLUX width) and a
    generated dataset. Runs the real pre-training and training tasks through
    the real loop (:func:`mod_adapter.modules.training.loop.run_training`).
``--mode full`` (needs a GPU with ~80 GB)
    The same code with FLUX.1's real sizes (19 + 38 blocks, width 3072, T5-XXL,
    CLIP-L, FLUX's VAE, OpenAI ViT-L/14 vision tower) with random bfloat16
    weights, the ``paper`` adapter (1.67B, float32 master weights, bf16
    autocast), 512×512 training images, 256 T5 tokens.
``--mode flops``
    Counts the floating-point operations of one sample of each stage at the
    full sizes on the meta device (no memory, no GPU), with
    ``torch.utils.flop_counter``: image encoder, text encoders (a caption
    cache miss), VAE encode, adapter forward + backward, FLUX forward +
    backward with gradient checkpointing (its recomputation included). With
    ``--sustained-tflops`` it turns them into an *estimate* of GPU-hours for
    the paper's schedule (50K pre-training steps × 32, 126K training steps ×
    ``--train-batch``).

Each stage of tiny/full runs in its own subprocess, so the peak memory is the
stage's own: CPU peak resident set size (``ru_maxrss``, weights included) or
CUDA ``max_memory_allocated``. Throughput is measured over the steps after
the first (warm-up) step; data loading runs in the loop's prefetch thread, as
in training.

Examples::

    python benchmarks/training.py --mode tiny --steps 12
    python benchmarks/training.py --mode full --device cuda --steps 6
    python benchmarks/training.py --mode flops --sustained-tflops 400
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict

import torch

TINY = dict(
    flux=dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=32, num_attention_heads=4,
              joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(8, 12, 12)),
    clip=dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
              max_position_embeddings=77, projection_dim=32),
    t5=dict(vocab_size=32128, d_model=64, d_kv=16, d_ff=48, num_layers=1, num_heads=2, relative_attention_num_buckets=8),
    vae=dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8),
    vit=dict(image_size=224, layers=3, width=48, head_width=16, patch_size=14),
    adapter=dict(preset="tiny", num_blocks=6, num_double_blocks=2, modulation_dim=128, image_token_dim=48),
    resolution=32, max_sequence_length=32, image_size=64,
)
FULL = dict(
    flux=dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
              num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
              axes_dims_rope=(16, 56, 56)),
    clip=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu"),
    t5=dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
            relative_attention_num_buckets=32),
    vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
    vit="ViT-L-14",
    adapter=dict(preset="paper"),
    resolution=512, max_sequence_length=256, image_size=512,
)
WORDS = ["dog", "cat", "glass", "marble", "sunset", "teapot", "pose", "lighting", "surface", "style", "chair", "fox",
         "robot", "vase", "forest", "jacket"]


def tokenizer_file(name: str) -> str:
    """FLUX.1's real tokenizer files, shipped with the pack in world/flux ("clip_tokenizer" or "t5_tokenizer")."""
    from mod_adapter.modules.world.paths import world_paths

    return world_paths()[name]


# --------------------------------------------------------------------------
# Random models of given sizes (the same code for tiny and full)
# --------------------------------------------------------------------------


@torch.no_grad()
def randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Normal(0, 0.02) matrices, unit norm weights, zero biases: values never matter for speed, only finiteness.

    CPU parameters are drawn from one CPU generator (the same values as always); parameters on a GPU are
    drawn there, from a generator of their own device: drawing FLUX.1's 12B numbers on the CPU and copying
    them over would take minutes.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    device_generators: Dict[torch.device, torch.Generator] = {}
    for name, p in module.named_parameters():
        if p.device.type == "meta":
            continue
        if p.ndim >= 2 and p.device.type != "cpu":
            if p.device not in device_generators:
                device_generators[p.device] = torch.Generator(device=p.device).manual_seed(seed)
            p.normal_(0.0, 0.02, generator=device_generators[p.device])
        elif p.ndim >= 2:
            p.copy_((torch.randn(p.shape, generator=generator) * 0.02).to(p.dtype))
        elif "norm" in name or name.endswith(("ln.weight", "layernorm.weight")) or "scale" in name:
            p.fill_(1.0 if name.endswith("weight") else 0.0)
        else:
            p.zero_()
    return module


def build_on(device, dtype, factory):
    """Build a module on the meta device, then allocate it on ``device`` and randomise it (fast even at 12B)."""
    with torch.device("meta"):
        module = factory()
    module = module.to_empty(device=device)
    for buffer_owner in module.modules():  # buffers computed at construction (rope tables) are lost by to_empty
        for name, buf in list(buffer_owner.named_buffers(recurse=False)):
            if buf.is_floating_point():
                buf.zero_()
    return randomise(module).to(dtype)


def make_dataset(folder: Path, count: int, size: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        generator = torch.Generator().manual_seed(i)
        pixels = (torch.rand(size // 8, size // 8, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC).save(folder / f"{i:04d}.png")
        word = WORDS[i % len(WORDS)]
        lines.append(json.dumps({"concept_image": f"{i:04d}.png", "concept_word": word,
                                 "caption": f"a photo of a {word}, sample {i}",
                                 "attribute_caption": f"a detailed {word} with texture number {i}"}))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "manifest.jsonl"


def make_image_encoder(sizes, folder: Path, device):
    import open_clip
    from safetensors.torch import save_file

    from mod_adapter.modules.training.image_encoder import OpenClipImageEncoder

    name = sizes["vit"]
    if isinstance(name, dict):
        config_file = folder / "BenchTinyViT.json"
        config_file.write_text(json.dumps({"embed_dim": 32, "vision_cfg": name,
                                           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32,
                                                        "heads": 2, "layers": 1}}))
        open_clip.add_model_config(config_file)
        name = "BenchTinyViT"
    model = open_clip.create_model(name, pretrained=None)
    randomise(model.visual, seed=1)
    weights = folder / "vit.safetensors"
    save_file({f"visual.{k}": v.contiguous() for k, v in model.visual.state_dict().items()}, str(weights))
    del model
    return OpenClipImageEncoder.load(name, weights, device=device)


def make_pipeline(sizes, device, dtype):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    transformer = build_on(device, dtype, lambda: FluxTransformer2DModel(**sizes["flux"]))
    clip, clip_tokenizer = make_clip(sizes, device, dtype)
    t5 = build_on(device, dtype, lambda: T5EncoderModel(T5Config(**sizes["t5"], feed_forward_proj="gated-gelu",
                                                                  dense_act_fn="gelu_new", is_gated_act=True)))
    vae_cfg = sizes["vae"]
    vae = build_on(device, dtype, lambda: AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(vae_cfg["block_out_channels"]),
        up_block_types=("UpDecoderBlock2D",) * len(vae_cfg["block_out_channels"]), latent_channels=16,
        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False, **vae_cfg))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tokenizer, text_encoder_2=t5,
                        tokenizer_2=T5TokenizerFast(tokenizer_file=tokenizer_file("t5_tokenizer")),
                        transformer=transformer)


def make_clip(sizes, device, dtype):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    clip = build_on(device, dtype, lambda: CLIPTextModel(CLIPTextConfig(**sizes["clip"], eos_token_id=49407,
                                                                          bos_token_id=49406, pad_token_id=49407)))
    embeddings = clip.text_model.embeddings if hasattr(clip, "text_model") else clip.embeddings
    embeddings.position_ids = torch.arange(77, device=device)[None]  # to_empty left it undefined
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_file("clip_tokenizer"), model_max_length=77)
    return clip.eval(), tokenizer


def adapter_config(sizes):
    from mod_adapter.modules.config import ModAdapterConfig

    spec = dict(sizes["adapter"])
    base = ModAdapterConfig.preset(spec.pop("preset")).to_dict()
    return ModAdapterConfig.from_dict({**base, **spec})


def build_adapter(config, device):
    from mod_adapter.modules.adapter import ModAdapter

    adapter = build_on(device, torch.float32, lambda: ModAdapter(config))
    adapter.reset_expert_outputs()
    with torch.no_grad():
        adapter.router_centroids.normal_()
    return adapter


# --------------------------------------------------------------------------
# One stage, measured (runs in a subprocess)
# --------------------------------------------------------------------------


def run_stage(mode: str, stage: str, device: str, steps: int, batch: int) -> Dict[str, Any]:
    from mod_adapter.modules.diffusers_flux_host import DiffusersFluxConcepts
    from mod_adapter.modules.training.features import TextFeatureCache, vector_in_of
    from mod_adapter.modules.training.flux import FluxTrainSettings, FluxTrainTask, TextEmbeddingCache, concept_positions, tokenizer_t5_layout
    from mod_adapter.modules.training.loop import DistributedContext, LoopConfig, run_training
    from mod_adapter.modules.training.manifest import read_manifest
    from mod_adapter.modules.training.pretrain import PretrainTask
    from mod_adapter.modules.training.stages import compute_neutral_table

    sizes = TINY if mode == "tiny" else FULL
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    flux_dtype = torch.bfloat16 if cuda else torch.float32
    work = Path(tempfile.mkdtemp(prefix="mod-adapter-bench-"))
    manifest = make_dataset(work / "data", count=max(4 * batch, 16), size=sizes["image_size"])
    records = read_manifest(manifest)
    encoder = make_image_encoder(sizes, work, dev)
    config = adapter_config(sizes)
    adapter = build_adapter(config, dev).train()
    words = [r.concept_word for r in records]
    metadata = {"base_model": "random", "image_encoder": encoder.metadata(), "manifest": str(manifest),
                "router_info": {"num_centroids": config.num_experts, "fitted": True, "seed": 0, "num_words": len(WORDS)}}
    if stage == "pretrain":  # CLIP-L and vector_in only: pre-training never holds the DiT, T5 or the VAE
        clip, clip_tokenizer = make_clip(sizes, dev, flux_dtype)
        vector_in = neutral_module(sizes, dev, flux_dtype)
        neutral = compute_neutral_table(words, clip, clip_tokenizer, vector_in)
        targets = TextFeatureCache(clip, clip_tokenizer, vector_in, max_items=0)  # a target computed per sample
        task = PretrainTask(records, adapter, encoder, neutral, targets, dev, metadata)
    else:
        pipe = make_pipeline(sizes, dev, flux_dtype)
        neutral = compute_neutral_table(words, pipe.text_encoder, pipe.tokenizer, vector_in_of(pipe.transformer))
        settings = FluxTrainSettings(manifest=str(manifest), out="", flux="", image_encoder="", image_encoder_weights="",
                                     resolution=sizes["resolution"], max_sequence_length=sizes["max_sequence_length"])
        positions = concept_positions(records, tokenizer_t5_layout(pipe.tokenizer_2, settings.max_sequence_length), str(manifest))
        pipe.transformer.requires_grad_(False).enable_gradient_checkpointing()
        pipe.transformer.train()
        for m in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            m.requires_grad_(False).eval()
        host = DiffusersFluxConcepts(pipe.transformer)
        texts = TextEmbeddingCache(pipe, dev, settings.max_sequence_length, max_items=0)  # every caption encoded
        task = FluxTrainTask(records, positions, adapter, encoder, pipe, host, neutral, texts, settings, 0, dev, metadata)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    stamps = []
    loop = LoopConfig(steps=steps, batch_size=batch, lr=1e-4, save_every=10 ** 9, progress=False, keep_checkpoints=1)

    def on_step(step, loss):
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    run_training(task, loop, str(work / "out"), DistributedContext(device=dev), on_step=on_step)
    timed = stamps[1:] if len(stamps) > 2 else stamps
    seconds = (timed[-1] - timed[0]) / max(1, len(timed) - 1) if len(timed) > 1 else float("nan")
    import resource

    result = {"mode": mode, "stage": stage, "device": str(dev), "batch": batch, "steps_timed": max(0, len(timed) - 1),
              "seconds_per_step": seconds, "samples_per_second": batch / seconds,
              "adapter_parameters": adapter.num_parameters(), "torch_threads": torch.get_num_threads(),
              "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}
    if cuda:
        result["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        result["gpu"] = torch.cuda.get_device_name()
    return result


def neutral_module(sizes, device, dtype):
    """vector_in alone (pre-training drops the transformer): a PixArtAlphaTextProjection of FLUX's sizes."""
    from diffusers.models.embeddings import PixArtAlphaTextProjection

    width = sizes["flux"]["num_attention_heads"] * sizes["flux"]["attention_head_dim"]
    return build_on(device, dtype, lambda: PixArtAlphaTextProjection(sizes["flux"]["pooled_projection_dim"], width,
                                                                      act_fn="silu"))


# --------------------------------------------------------------------------
# FLOP count at full size (meta device)
# --------------------------------------------------------------------------


def count_flops() -> Dict[str, float]:
    import open_clip
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from mod_adapter.modules.adapter import ModAdapter

    meta = torch.device("meta")
    bf16 = torch.bfloat16

    def flops(fn) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    out: Dict[str, float] = {}
    with meta:
        vit = open_clip.create_model("ViT-L-14", pretrained=None, device="meta").visual
    out["image_encoder_forward"] = flops(lambda: vit(torch.randn(1, 3, 224, 224, device=meta)))
    with meta:
        clip = CLIPTextModel(CLIPTextConfig(**FULL["clip"]))
        t5 = T5EncoderModel(T5Config(**FULL["t5"], feed_forward_proj="gated-gelu", is_gated_act=True))
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, **FULL["vae"])
    ids77 = torch.zeros(1, 77, dtype=torch.long, device=meta)
    out["clip_text_forward"] = flops(lambda: clip(ids77))
    out["t5_forward_256"] = flops(lambda: t5(torch.zeros(1, 256, dtype=torch.long, device=meta)))
    out["vae_encode_512"] = flops(lambda: vae.encode(torch.randn(1, 3, 512, 512, device=meta)))

    config = adapter_config(FULL)
    with meta:
        adapter = ModAdapter(config)

    def adapter_step():
        neutral = torch.randn(1, config.modulation_dim, device=meta, requires_grad=False)
        tokens = torch.randn(1, 257, config.image_token_dim, device=meta)
        features = adapter.block_features(neutral, tokens, None)  # what forward runs before its one expert
        adapter.experts[0](features).float().square().mean().backward()

    out["adapter_forward_backward"] = flops(adapter_step)

    with meta:
        transformer = FluxTransformer2DModel(**FULL["flux"]).to(bf16)
    transformer.requires_grad_(False).enable_gradient_checkpointing()
    transformer.train()
    # The per-token host cannot run on the meta device (it reads σ); its own cost is one more row of
    # each block's modulation layer (negligible). A gradient-carrying input that reaches every block's
    # modulation (as Δ does) makes backward traverse every block, as in training.
    delta = torch.randn(1, 768, device=meta, requires_grad=True)

    def flux_step():
        result = transformer(hidden_states=torch.randn(1, 1024, 64, device=meta, dtype=bf16),
                             encoder_hidden_states=torch.randn(1, 256, 4096, device=meta, dtype=bf16),
                             pooled_projections=delta.to(bf16),
                             timestep=torch.ones(1, device=meta, dtype=bf16), guidance=torch.ones(1, device=meta),
                             img_ids=torch.zeros(1024, 3, device=meta), txt_ids=torch.zeros(256, 3, device=meta),
                             return_dict=False)[0]
        result.float().square().mean().backward()

    out["flux_forward_backward_checkpointed_512"] = flops(flux_step)
    out["pretrain_sample"] = (out["image_encoder_forward"] + out["clip_text_forward"] + out["adapter_forward_backward"])
    out["train_sample"] = (out["image_encoder_forward"] + out["clip_text_forward"] + out["t5_forward_256"]
                           + out["vae_encode_512"] + out["adapter_forward_backward"]
                           + out["flux_forward_backward_checkpointed_512"])
    return out


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["tiny", "full", "flops"], default="tiny")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--steps", type=int, default=8, help="training steps per stage (the first is not timed)")
    parser.add_argument("--pretrain-batch", type=int, default=None, help="default: 8 tiny, 32 full (the paper's)")
    parser.add_argument("--train-batch", type=int, default=None, help="default: 4 tiny, 1 full (the paper's, per step)")
    parser.add_argument("--stages", default="pretrain,train")
    parser.add_argument("--sustained-tflops", type=float, default=0.0,
                        help="flops mode: assumed sustained bf16 TFLOP/s per GPU, to turn FLOPs into GPU-hours")
    parser.add_argument("--json-out", help="also write the results as JSON")
    parser.add_argument("--_stage", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    if args._stage:  # subprocess: one stage
        batch = {"pretrain": args.pretrain_batch, "train": args.train_batch}[args._stage]
        print("RESULT " + json.dumps(run_stage(args.mode, args._stage, device, args.steps, batch)), flush=True)
        return

    if args.mode == "flops":
        counts = count_flops()
        result: Dict[str, Any] = {"gflops_per_sample": {k: v / 1e9 for k, v in counts.items()}}
        if args.sustained_tflops > 0:
            train_batch = args.train_batch or 1
            pre = 50_000 * 32 * counts["pretrain_sample"]
            train = 126_000 * train_batch * counts["train_sample"]
            rate = args.sustained_tflops * 1e12
            result["estimate"] = {"assumed_sustained_tflops": args.sustained_tflops, "train_batch": train_batch,
                                  "pretrain_gpu_hours": pre / rate / 3600, "train_gpu_hours": train / rate / 3600}
        print(json.dumps(result, indent=2))
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(result, indent=2))
        return

    defaults = {"tiny": (8, 4), "full": (32, 1)}[args.mode]
    results = []
    for stage in args.stages.split(","):
        batch = args.pretrain_batch or defaults[0] if stage == "pretrain" else args.train_batch or defaults[1]
        command = [sys.executable, __file__, "--mode", args.mode, "--device", device, "--steps", str(args.steps),
                   "--_stage", stage, f"--{stage}-batch", str(batch)]
        done = subprocess.run(command, capture_output=True, text=True)
        lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
        if done.returncode or not lines:
            sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
            raise SystemExit(f"stage {stage} failed (exit {done.returncode})")
        results.append(json.loads(lines[-1][len("RESULT "):]))
    print("| mode | stage | device | batch | samples/s | s/step | peak memory |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        memory = f"{r['peak_cuda_gib']:.2f} GiB CUDA" if "peak_cuda_gib" in r else f"{r['peak_rss_gib']:.2f} GiB RSS"
        print(f"| {r['mode']} | {r['stage']} | {r['device']} ({r['torch_threads']} threads) | {r['batch']} | "
              f"{r['samples_per_second']:.2f} | {r['seconds_per_step']:.3f} | {memory} |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
