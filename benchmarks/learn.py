"""Benchmark of Learn Concept (TokenVerse mode): seconds per learning step and peak memory.

One learning step = one FluxTransformer2DModel forward with the concept
modulation installed (diffusers host), the flow-matching loss, the backward
pass to Δ (the model is frozen), gradient clipping and an Adam step on Δ —
exactly :func:`mod_adapter.modules.learn_concept.learn_concepts`, which the
benchmark runs. The text encoders and the VAE are not part of a step (the CLI
encodes the caption and the images once before learning), so they are left out.

Presets:
* ``tiny``: the tests' toy FLUX.1 (2 double + 4 single blocks, width 128),
  512×512 image (64×64 latent, 1024 image tokens) + 256 text tokens, float32,
  CPU. It shows the loop's overhead and the token-count cost at toy width.
* ``flux1``: the FLUX.1 configuration (19 double + 38 single blocks, width 3072,
  24 heads, context 4096, pooled 768), 512×512 + 256 text tokens, bfloat16,
  CUDA, gradient checkpointing on (as the CLI's default).

Weights are random (built on the meta device, then N(0, 0.02), norm scales 1):
time and memory do not depend on their values. Δ is learned in float32 as in
the CLI.

Time: the progress callback's timestamps (CUDA synchronised); the median of
the step times after ``--warmup`` steps. The estimate for the default run is
median × 1400 steps.

Peak memory:
* CUDA: ``torch.cuda.max_memory_allocated()`` over the timed run (weights
  included), and the same minus the allocation before the run (activations,
  Δ, optimiser state);
* CPU: the process's peak resident set size (VmHWM, reset through
  ``/proc/self/clear_refs`` before the run), and the same minus the RSS before.

Examples:
    python benchmarks/learn.py --preset tiny
    python benchmarks/learn.py --preset flux1            # needs a GPU with ~30 GB
    python benchmarks/learn.py --preset flux1 --no-gradient-checkpointing
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any, Dict, List, Optional

import torch

from _measure import cpu_model, fill_random, reset_peak_rss, status_kb, synchronize
from mod_adapter.modules.learn_concept import LearnConfig, learn_concepts
from mod_adapter.modules.learn_diffusers import DiffusersDenoiser

LATENT_CHANNELS = 16  # FLUX.1 VAE
DEFAULT_STEPS = 1400  # TokenVerse: 800 + 600

PRESETS: Dict[str, Dict[str, Any]] = {
    "tiny": dict(config=dict(num_layers=2, num_single_layers=4, attention_head_dim=32, num_attention_heads=4,
                             joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(8, 12, 12)),
                 resolution=512, text_len=256, dtype="float32", device="cpu", steps=8, warmup=2),
    "flux1": dict(config=dict(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                              joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56)),
                  resolution=512, text_len=256, dtype="bfloat16", device="cuda", steps=20, warmup=3),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--device", help="default: the preset's (tiny: cpu, flux1: cuda)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: the preset's")
    p.add_argument("--resolution", type=int, help="image side in pixels (default 512)")
    p.add_argument("--text-len", type=int, help="T5 tokens (default 256)")
    p.add_argument("--steps", type=int, help="timed steps")
    p.add_argument("--warmup", type=int, help="untimed steps first")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    for key in ("device", "dtype", "resolution", "text_len", "steps", "warmup"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    return args


def build_transformer(args, device: torch.device, dtype: torch.dtype):
    from diffusers import FluxTransformer2DModel

    config = dict(PRESETS[args.preset]["config"], patch_size=1, in_channels=LATENT_CHANNELS * 4, guidance_embeds=True)
    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    model = torch.nn.Module.to(model.to_empty(device=device), dtype).eval().requires_grad_(False)
    fill_random(model, device)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model, config


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--preset {args.preset} needs a CUDA GPU (or pass --device cpu, which will be very slow)")
    if args.resolution % 16:
        raise SystemExit("--resolution must be a multiple of 16")

    model, config = build_transformer(args, device, dtype)
    num_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    latent_side = args.resolution // 8
    latents = torch.randn(1, LATENT_CHANNELS, latent_side, latent_side, generator=g)
    prompt_embeds = torch.randn(1, args.text_len, config["joint_attention_dim"], generator=g)
    pooled = torch.randn(1, config["pooled_projection_dim"], generator=g)
    positions = [[4, 5]]  # one concept word of two T5 tokens

    total_steps = args.warmup + args.steps
    learn_config = LearnConfig(steps=total_steps, stage1_steps=total_steps // 2, log_every=0)
    stamps: List[float] = []

    def progress(step: int, total: int, loss: float) -> None:
        if device.type == "cuda":
            synchronize(device)
        stamps.append(time.perf_counter())

    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        memory_before = torch.cuda.memory_allocated(device)
    else:
        peak_resettable = reset_peak_rss()
        memory_before = (status_kb("VmRSS") or 0) * 1024

    with DiffusersDenoiser(model, prompt_embeds, pooled, device=device) as denoiser:
        start = time.perf_counter()
        if device.type == "cuda":
            synchronize(device)
        result = learn_concepts(denoiser, latents, positions, learn_config, words=["concept"], progress=progress)

    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        memory_note = "torch.cuda.max_memory_allocated (weights included)"
    else:
        peak = (status_kb("VmHWM") or 0) * 1024
        memory_note = ("peak RSS (VmHWM" + (", reset before the run)" if peak_resettable else
                                            ", NOT reset: includes model building)"))
    step_times = [b - a for a, b in zip([start] + stamps[:-1], stamps)][args.warmup:]
    median = statistics.median(step_times)
    results = {
        "preset": args.preset,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "dtype": args.dtype,
        "parameters": num_params,
        "blocks": config["num_layers"] + config["num_single_layers"],
        "width": config["num_attention_heads"] * config["attention_head_dim"],
        "resolution": args.resolution,
        "image_tokens": (latent_side // 2) ** 2,
        "text_tokens": args.text_len,
        "gradient_checkpointing": args.gradient_checkpointing,
        "timed_steps": len(step_times),
        "median_s_per_step": median,
        "min_s_per_step": min(step_times),
        "max_s_per_step": max(step_times),
        "estimate_minutes_default_run": median * DEFAULT_STEPS / 60,
        "peak_memory_mib": peak / 2**20,
        "peak_extra_memory_mib": (peak - memory_before) / 2**20,
        "memory_method": memory_note,
        "final_loss": result.losses[-1],
    }
    print(f"preset {args.preset}: {results['blocks']} blocks × {results['width']}, {num_params / 1e6:.1f}M parameters, "
          f"{args.dtype} on {results['device_name']} ({results['threads']} threads, load {results['load_average']})")
    print(f"{args.resolution}×{args.resolution} ({results['image_tokens']} image tokens) + {args.text_len} text tokens, "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}")
    print(f"s/step: median {median:.4f} (min {min(step_times):.4f}, max {max(step_times):.4f}) over "
          f"{len(step_times)} steps after {args.warmup} warm-up")
    print(f"estimate for the default {DEFAULT_STEPS} steps: {results['estimate_minutes_default_run']:.1f} min")
    print(f"peak memory: {results['peak_memory_mib']:.0f} MiB, {results['peak_extra_memory_mib']:.0f} MiB above the "
          f"start of the run ({memory_note})")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
