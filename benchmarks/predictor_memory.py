"""Memory of one Predictor run inside ComfyUI: the adapter loaded by the pack's Loader, one prediction,
then what stays resident, and what is left after ComfyUI unloads its models.

    COMFYUI_PATH=~/.cache/mod-adapter/comfyui/0.33.0 python benchmarks/predictor_memory.py --preset paper --dtype bfloat16

Random weights (speed and memory do not depend on their values). The checkpoint is written to a
temporary folder first (for `paper` in bf16, 3.3 GB), then a fresh process imports ComfyUI on the
CPU (or --device cuda), loads it through `ModAdapterLoader` (comfy.ops layers in a ModelPatcher) and
predicts one concept from 257 image tokens, as the Predictor does. CPU memory is the process's
resident set (VmRSS, and VmHWM for the peak, Linux); on CUDA, torch's allocator statistics too.
Prints a Markdown table; --json writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from _measure import import_comfyui, reset_peak_rss, status_kb
from adapter import IMAGE_TOKENS, build_random_adapter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_checkpoint(preset: str, dtype: torch.dtype, folder: str) -> str:
    from mod_adapter.modules.checkpoint import save_adapter_checkpoint
    from mod_adapter.modules.config import ModAdapterConfig

    config = ModAdapterConfig.preset(preset)
    adapter = build_random_adapter(config, torch.device("cpu"), dtype)
    path = os.path.join(folder, f"random_{preset}.safetensors")
    save_adapter_checkpoint(path, adapter, base_model="random",
                            image_encoder={"name": "random", "layer": "penultimate", "tokens": IMAGE_TOKENS,
                                           "width": config.image_token_dim})
    return path


def mib(kib) -> float:
    return round(kib / 1024, 1) if kib is not None else float("nan")


def measure_in_comfyui(args) -> dict:
    """Runs in the child process: ComfyUI imported fresh, so the numbers are the pack's and ComfyUI's alone."""
    import_comfyui(args.comfyui, cpu=args.device == "cpu")
    import comfy.model_management as mm
    import folder_paths

    import mod_adapter.nodes as pack_nodes

    folder_paths.add_model_folder_path("mod_adapter", os.path.dirname(args.checkpoint), is_default=True)
    cuda = args.device == "cuda"
    phases = {"start": status_kb("VmRSS")}
    reset_peak_rss()
    started = time.perf_counter()
    runner = pack_nodes.ModAdapterLoader.execute(os.path.basename(args.checkpoint)).result[0]
    phases["after load"] = status_kb("VmRSS")
    config = runner.config
    g = torch.Generator().manual_seed(0)
    neutral = torch.randn(1, config.modulation_dim, generator=g)
    tokens = torch.randn(1, IMAGE_TOKENS, config.image_token_dim, generator=g)
    mask = torch.ones(1, IMAGE_TOKENS, dtype=torch.bool)
    with torch.no_grad():
        delta = runner.predict(neutral, tokens, mask)
    elapsed = time.perf_counter() - started
    assert torch.isfinite(delta).all() and delta.shape == (1, config.num_blocks, config.modulation_dim)
    phases["peak (load + predict)"] = status_kb("VmHWM")
    phases["after predict (adapter loaded)"] = status_kb("VmRSS")
    cuda_stats = {}
    if cuda:
        cuda_stats = {"peak allocated MiB": round(torch.cuda.max_memory_allocated() / 2**20, 1),
                      "allocated after predict MiB": round(torch.cuda.memory_allocated() / 2**20, 1)}
    mm.unload_all_models()
    mm.soft_empty_cache()
    phases["after unload_all_models"] = status_kb("VmRSS")
    if cuda:
        cuda_stats["allocated after unload MiB"] = round(torch.cuda.memory_allocated() / 2**20, 1)
    del runner
    import gc

    gc.collect()
    phases["after the adapter is dropped"] = status_kb("VmRSS")
    return {"phases_mib": {k: mib(v) for k, v in phases.items()}, "cuda": cuda_stats,
            "load_and_predict_s": round(elapsed, 2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="paper", choices=["paper", "tiny"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI checkout (default $COMFYUI_PATH)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)  # the child process's input
    args = p.parse_args()
    if not args.comfyui or not os.path.isdir(args.comfyui):
        p.error("needs a ComfyUI checkout: --comfyui PATH or COMFYUI_PATH")
    if args.checkpoint:  # the child
        print("RESULT " + json.dumps(measure_in_comfyui(args)))
        return 0

    from mod_adapter.modules.dtypes import resolve_dtype

    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        path = write_checkpoint(args.preset, resolve_dtype(args.dtype), folder)
        size = os.path.getsize(path)
        print(f"checkpoint: {size / 2**30:.2f} GiB written in {time.perf_counter() - started:.0f} s", flush=True)
        child = subprocess.run([sys.executable, os.path.abspath(__file__), "--preset", args.preset, "--dtype", args.dtype,
                                "--device", args.device, "--comfyui", args.comfyui, "--checkpoint", path],
                               capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
    if child.returncode != 0 or not lines:
        print(child.stdout[-3000:], child.stderr[-3000:], sep="\n", file=sys.stderr)
        return 1
    result = json.loads(lines[-1][len("RESULT "):])
    result.update(preset=args.preset, dtype=args.dtype, device=args.device, checkpoint_gib=round(size / 2**30, 2),
                  torch=torch.__version__, comfyui=os.path.basename(os.path.normpath(args.comfyui)))
    print(f"\nPredictor memory, preset {args.preset} in {args.dtype} on {args.device} "
          f"(checkpoint {result['checkpoint_gib']} GiB; load + predict {result['load_and_predict_s']} s)\n")
    print("| phase | process RSS (MiB) |\n| --- | --- |")
    for phase, value in result["phases_mib"].items():
        print(f"| {phase} | {value} |")
    for name, value in result["cuda"].items():
        print(f"| CUDA {name} | {value} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
