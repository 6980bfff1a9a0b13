"""Benchmark of the per-token modulation engine: time per denoising step and peak
memory of a FLUX.1 model with concepts applied ("patched") over the stock model
("unpatched"), measured in one run.

Hosts:
* ``--host comfy``: a FLUX.1 built inside a real ComfyUI checkout through its own
  model config (derived by its own detection, as its loader would) and ``ModelPatcher``; patched =
  ``apply_concepts`` (object patches + DIFFUSION_MODEL wrapper). Timed through real
  sampling: ``comfy.sample.sample`` (euler, simple, cfg 1.0) under
  ``torch.inference_mode`` as ComfyUI's executor runs it. s/step = time between the
  sampler's first and last per-step callbacks / (steps - 1), so model loading and
  object patching at the start of each sample call are excluded (with
  ``--steps 1``: the whole call).
* ``--host diffusers``: a diffusers ``FluxTransformer2DModel``; patched =
  ``DiffusersFluxConcepts``. s/step = one transformer forward (inference mode).

Presets:
* ``cpu-mid``: hidden 1024, 8 heads of 128, 1 double + 2 single blocks (FLUX.1's 1:2 ratio),
  MLP ratio 4, context 4096, vec 768, 512x512 image (1024 image tokens) + 256 text tokens,
  float32. The width and the token counts set the relative cost of the modulation
  (per token it is O(D), a block O(D^2)); the block count mainly sets the step time,
  kept near 1-2 s on 2 CPU cores (4 double + 8 single blocks took ~10 s per step there).
* ``flux1-full``: the FLUX.1 configuration (hidden 3072, 24 heads, 19 double + 38
  single blocks, context 4096, vec 768), 1024x1024 (4096 image tokens) + 512 text
  tokens, bfloat16, for a GPU.
* ``tiny``: hidden 256, 2 heads of 128, 1 double + 2 single blocks, context 64, vec 32,
  64x64 image (16 image tokens) + 48 text tokens, float32: a smoke check of the script
  (seconds on a CPU), not a measurement.

Weights are random: built uninitialised (ComfyUI's ops; diffusers on the meta
device), then matrices and biases drawn from N(0, 0.02) and norm scales set to 1.
Time and memory do not depend on the values.

Concepts: concept k has a random Δ table (num_blocks, hidden) * 0.5, strength 1,
the whole schedule, and covers 2 text tokens (positions 4 + 4k, 5 + 4k).

Timing: one process, warm-up of every variant first, then ``--repeats`` rounds; in
each round, for each concept count, one unpatched and one patched run back to back
(order swapped every round: ABBA...), so drift hits both alike. Reported: median
s/step of each side, their ratio, and the median of the paired ratios.

Peak memory:
* CUDA: ``torch.cuda.reset_peak_memory_stats()`` before each timed run and
  ``torch.cuda.max_memory_allocated()`` after it, same process (weights included).
* CPU: the allocator keeps no statistic and glibc keeps freed memory, so each variant
  runs in a fresh subprocess (same model build), which resets the kernel's peak-RSS
  mark (``echo 5 > /proc/self/clear_refs``) after the model is built, runs a
  1-step warm-up run and a 1-step measured run, and reads ``VmHWM`` (peak resident set size) from
  ``/proc/self/status``. The subprocess runs with ``MALLOC_MMAP_THRESHOLD_=65536``: every
  allocation of 64 KiB or more is its own mapping, unmapped on free, so the resident set
  follows the live tensors (without it, glibc keeps freed memory and two identical
  unpatched probes differ by ~30 MB; with it, by ~1 MB). The peak therefore covers resident weights plus the working
  memory of sampling, not the model build. Falls back to ``ru_maxrss`` (whole process
  lifetime) where clear_refs is not writable. The unpatched probe runs twice to show
  the noise floor (once with ``--repeats 1``); ``--probe-jobs`` probes run side by side
  (their peaks are per process).

Examples:
    python benchmarks/modulation.py --host comfy --comfyui /path/to/ComfyUI --preset cpu-mid
    python benchmarks/modulation.py --host diffusers --preset cpu-mid --concepts 1,3,8 --json out.json
    python benchmarks/modulation.py --host comfy --preset flux1-full --device cuda --dtype bfloat16 --resolution 1024
    python benchmarks/modulation.py --preset cpu-mid --steps 1 --repeats 1 --concepts 1   # smoke check
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

import torch

from _measure import fill_random, import_comfyui, reset_peak_rss, status_kb, synchronize

PRESETS: Dict[str, Dict[str, Any]] = {
    # Smoke check of the whole script in seconds (e.g. benchmarks/gpu.sh --cpu-tiny); its numbers mean nothing.
    "tiny": dict(hidden=256, heads=2, double=1, single=2, context_dim=64, vec_dim=32, resolution=64,
                 text_len=48, dtype="float32", device="cpu", steps=2, repeats=2),
    "cpu-mid": dict(hidden=1024, heads=8, double=1, single=2, context_dim=4096, vec_dim=768, resolution=512,
                    text_len=256, dtype="float32", device="cpu", steps=3, repeats=4),
    "flux1-full": dict(hidden=3072, heads=24, double=19, single=38, context_dim=4096, vec_dim=768, resolution=1024,
                       text_len=512, dtype="bfloat16", device="cuda", steps=4, repeats=5),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TARGET_RATIO = {"cpu": 1.02, "cuda": 1.01}
TARGET_EXTRA_MEMORY_PCT = 1.0
LATENT_CHANNELS = 16  # FLUX.1 VAE
AXES_DIM = [16, 56, 56]  # FLUX.1 RoPE axes; they sum to the head dim 128


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", choices=["comfy", "diffusers"], default="comfy")
    p.add_argument("--comfyui", default=None, help="ComfyUI checkout (default: $COMFYUI_PATH); --host comfy only")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-mid")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: the preset's")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the preset's")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (multiple of 16)")
    p.add_argument("--text-len", type=int, default=None, help="text tokens (default: the preset's)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (forwards) per run")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (one unpatched + one patched run each)")
    p.add_argument("--concepts", default="1,3,8", help="comma-separated concept counts; 0 is ignored (unpatched is always run)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the cores this process may use)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak memory measurement")
    p.add_argument("--probe-jobs", type=int, default=2,
                   help="CPU memory probes (one subprocess each, each holding a copy of the model) run side by side")
    p.add_argument("--profile", action="store_true",
                   help="instead of timing: torch.profiler over --repeats ABBA runs of unpatched and patched (largest "
                        "concept count); prints self time per op, patched minus unpatched, per step")
    p.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--_probe", type=int, default=None, help=argparse.SUPPRESS)  # internal: CPU memory subprocess
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    for key in ("device", "dtype", "resolution", "text_len", "steps", "repeats"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.concept_counts = sorted({int(c) for c in args.concepts.split(",") if c.strip() and int(c) > 0})
    if not args.concept_counts and args._probe is None:
        p.error("--concepts needs at least one count > 0")
    if args.resolution % 16:
        p.error("--resolution must be a multiple of 16 (8x VAE, 2x2 patches)")
    if args.steps < 1 or args.repeats < 1:
        p.error("--steps and --repeats must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available (this torch: %s)" % torch.__version__)
    if args.host == "comfy":
        args.comfyui = args.comfyui or os.environ.get("COMFYUI_PATH")
        if not args.comfyui or not os.path.isfile(os.path.join(args.comfyui, "comfy", "model_patcher.py")):
            p.error("--host comfy needs a ComfyUI checkout: --comfyui PATH or COMFYUI_PATH (got %r)" % args.comfyui)
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return args


def model_config(args) -> Dict[str, Any]:
    preset = PRESETS[args.preset]
    latent = args.resolution // 8
    return dict(
        hidden_size=preset["hidden"], num_heads=preset["heads"], head_dim=preset["hidden"] // preset["heads"],
        double_blocks=preset["double"], single_blocks=preset["single"], mlp_ratio=4.0,
        context_dim=preset["context_dim"], vec_dim=preset["vec_dim"], resolution=args.resolution,
        latent=[LATENT_CHANNELS, latent, latent], image_tokens=(latent // 2) ** 2, text_tokens=args.text_len,
        dtype=args.dtype, guidance_embed=True, qkv_bias=True, axes_dim=AXES_DIM,
    )


# --- hosts ---------------------------------------------------------------------------------------------

class ComfyBench:
    """FLUX.1 inside ComfyUI, sampled with comfy.sample.sample."""

    timing_method = ("comfy.sample.sample (euler, simple, cfg 1.0) under torch.inference_mode; s/step = time between "
                     "the sampler's first and last per-step callbacks / (steps - 1), excluding model load/patching "
                     "at the start of each sample call (steps = 1: whole call)")

    def __init__(self, args, device: torch.device, dtype: torch.dtype):
        import_comfyui(args.comfyui, cpu=device.type == "cpu")
        import comfy.model_management  # noqa: F401
        import comfy.model_patcher
        import comfy.sample

        from mod_adapter.modules.comfy_flux_host import ComfyConcept, apply_concepts

        self.comfy = comfy
        self.ComfyConcept, self.apply_concepts = ComfyConcept, apply_concepts
        self.args, self.device, self.dtype = args, device, dtype
        cfg = model_config(args)
        self.cfg = cfg
        # The tests' builder makes the model as this ComfyUI's own loader would (its detection fills
        # every field the version has, e.g. 0.33.0's txt_ids_dims).
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
        from tiny_comfy import comfy_flux_model, flux_unet_config

        comfy_cfg = flux_unet_config(vec_in_dim=cfg["vec_dim"], context_in_dim=cfg["context_dim"],
                                     hidden_size=cfg["hidden_size"], mlp_ratio=cfg["mlp_ratio"],
                                     num_heads=cfg["num_heads"], depth=cfg["double_blocks"],
                                     depth_single_blocks=cfg["single_blocks"], axes_dim=AXES_DIM)
        self.host_config = comfy_cfg
        model = comfy_flux_model(comfy_cfg, dtype, device)  # ComfyUI's ops leave the weights uninitialised
        fill_random(model.diffusion_model, device, args.seed)
        # load and offload device alike: switching between the stock and the patched clone moves no weights.
        self.base = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)
        self.num_blocks = cfg["double_blocks"] + cfg["single_blocks"]

        g = torch.Generator().manual_seed(args.seed + 1)
        context = torch.randn(1, cfg["text_tokens"], cfg["context_dim"], generator=g)
        pooled = torch.randn(1, cfg["vec_dim"], generator=g)
        self.positive = [[context, {"pooled_output": pooled, "guidance": 3.5}]]
        self.latent = torch.zeros(1, *cfg["latent"])
        self.noise = torch.randn(1, *cfg["latent"], generator=g)
        self.variants: Dict[int, Any] = {0: self.base}

    def add_variant(self, count: int, deltas: List[torch.Tensor], positions: List[List[int]]) -> None:
        concepts = [self.ComfyConcept(delta=d, positions=pos, strength=1.0, start_percent=0.0, end_percent=1.0,
                                      name=f"concept{k}") for k, (d, pos) in enumerate(zip(deltas, positions))]
        self.variants[count] = self.apply_concepts(self.base, concepts)

    def run(self, count: int, steps: int):
        stamps: List[tuple] = []

        def callback(step, x0, x, total):
            synchronize(self.device)
            stamps.append((time.perf_counter(), time.process_time()))

        with torch.inference_mode():
            start = (time.perf_counter(), time.process_time())
            out = self.comfy.sample.sample(self.variants[count], self.noise, steps, 1.0, "euler", "simple",
                                           self.positive, [], self.latent, seed=self.args.seed, callback=callback,
                                           disable_pbar=True)
            synchronize(self.device)
            end = (time.perf_counter(), time.process_time())
        first, last, n = (stamps[0], stamps[-1], steps - 1) if steps > 1 else (start, end, 1)
        self.last_steps = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])] or [end[0] - start[0]]
        return (last[0] - first[0]) / n, (last[1] - first[1]) / n, out


class DiffusersBench:
    """A diffusers FluxTransformer2DModel; one step = one transformer forward."""

    timing_method = "FluxTransformer2DModel forward under torch.inference_mode; s/step = mean forward time of a run"

    def __init__(self, args, device: torch.device, dtype: torch.dtype):
        from diffusers import FluxTransformer2DModel

        from mod_adapter.modules.diffusers_flux_host import DiffusersFluxConcepts
        from mod_adapter.modules.token_modulation import TokenConcept

        self.DiffusersFluxConcepts, self.TokenConcept = DiffusersFluxConcepts, TokenConcept
        self.args, self.device, self.dtype = args, device, dtype
        cfg = model_config(args)
        self.cfg = cfg
        host_cfg = dict(patch_size=1, in_channels=LATENT_CHANNELS * 4, num_layers=cfg["double_blocks"],
                        num_single_layers=cfg["single_blocks"], attention_head_dim=cfg["head_dim"],
                        num_attention_heads=cfg["num_heads"], joint_attention_dim=cfg["context_dim"],
                        pooled_projection_dim=cfg["vec_dim"], guidance_embeds=True, axes_dims_rope=tuple(AXES_DIM))
        self.host_config = host_cfg
        with torch.device("meta"):
            model = torch.nn.Module.to(FluxTransformer2DModel(**host_cfg), dtype)  # (diffusers' .to warns about dtype)
        model = model.to_empty(device=device).eval().requires_grad_(False)
        fill_random(model, device, args.seed)
        self.model = model
        self.num_blocks = cfg["double_blocks"] + cfg["single_blocks"]

        g = torch.Generator().manual_seed(args.seed + 1)
        side = cfg["latent"][1] // 2
        img_ids = torch.zeros(side * side, 3)
        img_ids[:, 1] = torch.arange(side).repeat_interleave(side)
        img_ids[:, 2] = torch.arange(side).repeat(side)
        self.inputs = dict(
            hidden_states=torch.randn(1, side * side, LATENT_CHANNELS * 4, generator=g),
            encoder_hidden_states=torch.randn(1, cfg["text_tokens"], cfg["context_dim"], generator=g),
            pooled_projections=torch.randn(1, cfg["vec_dim"], generator=g),
            timestep=torch.full((1,), 0.7),
            guidance=torch.full((1,), 3.5),
            img_ids=img_ids,
            txt_ids=torch.zeros(cfg["text_tokens"], 3),
        )
        self.inputs = {k: v.to(device=device, dtype=dtype if v.is_floating_point() and k.endswith(("states", "projections")) else v.dtype)
                       for k, v in self.inputs.items()}
        self.concepts: Dict[int, list] = {0: []}

    def add_variant(self, count: int, deltas: List[torch.Tensor], positions: List[List[int]]) -> None:
        self.concepts[count] = [self.TokenConcept(delta=d.to(self.device), positions=pos, strength=1.0, name=f"concept{k}")
                                for k, (d, pos) in enumerate(zip(deltas, positions))]

    def run(self, count: int, steps: int):
        host = None
        if count:
            host = self.DiffusersFluxConcepts(self.model)
        try:
            times, cpu_times = [], []
            with torch.inference_mode(), (host.using(self.concepts[count]) if host else contextlib.nullcontext()):
                for _ in range(steps):
                    synchronize(self.device)
                    start, start_cpu = time.perf_counter(), time.process_time()
                    out = self.model(**self.inputs, return_dict=False)[0]
                    synchronize(self.device)
                    times.append(time.perf_counter() - start)
                    cpu_times.append(time.process_time() - start_cpu)
        finally:
            if host is not None:
                host.remove()
        self.last_steps = times
        return statistics.fmean(times), statistics.fmean(cpu_times), out


def build_bench(args):
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    bench = (ComfyBench if args.host == "comfy" else DiffusersBench)(args, device, dtype)
    counts = args.concept_counts if args._probe is None else ([args._probe] if args._probe else [])
    g = torch.Generator().manual_seed(args.seed + 2)
    for count in counts:
        deltas = [torch.randn(bench.num_blocks, bench.cfg["hidden_size"], generator=g) * 0.5 for _ in range(count)]
        positions = [[4 + 4 * k, 5 + 4 * k] for k in range(count)]
        if max(p for pos in positions for p in pos) >= bench.cfg["text_tokens"]:
            raise SystemExit(f"{count} concepts need at least {positions[-1][-1] + 1} text tokens")
        bench.add_variant(count, deltas, positions)
    return bench


# --- memory ---------------------------------------------------------------------------------------------


def probe_main(args) -> None:
    """Subprocess body: peak RSS of one variant (0 = unpatched) on the CPU."""
    bench = build_bench(args)
    rss_built_kb = status_kb("VmRSS")
    reset = reset_peak_rss()
    # Every step of a run has the same peak, so one step per run is enough.
    bench.run(args._probe, 1)  # warm-up
    bench.run(args._probe, 1)  # measured run
    peak_kb = status_kb("VmHWM") if reset else None
    if peak_kb is None:
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("PROBE " + json.dumps(dict(concepts=args._probe, peak_mb=peak_kb / 1024, rss_after_build_mb=(rss_built_kb or 0) / 1024,
                                     method="VmHWM after clear_refs" if reset else "ru_maxrss (process lifetime)")))


def cpu_memory(args, argv: List[str], counts: List[int]) -> Dict[int, Dict[str, Any]]:
    # Unpatched first and last (their spread is the noise floor); once only in a one-repeat smoke run.
    order = [0] + counts + ([0] if args.repeats > 1 else [])
    # Every allocation of 64 KiB or more gets its own mapping, returned to the OS on free: the resident set
    # then follows the live tensors (run-to-run spread ~1 MB instead of ~30 MB with glibc's adaptive threshold).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(64 * 1024))
    results: Dict[int, Dict[str, Any]] = {}
    pending = list(order)
    running: List[tuple] = []
    # Each probe is its own process and its peak RSS its own, so probes may run side by side (--probe-jobs).
    while pending or running:
        while pending and len(running) < max(1, args.probe_jobs):
            count = pending.pop(0)
            cmd = [sys.executable, os.path.abspath(__file__)] + argv + ["--_probe", str(count)]
            running.append((count, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)))
        count, proc = running.pop(0)
        stdout, stderr = proc.communicate()
        lines = [line for line in stdout.splitlines() if line.startswith("PROBE ")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"memory probe for {count} concepts failed:\n{stderr[-3000:]}")
        probe = json.loads(lines[-1][len("PROBE "):])
        slot = results.setdefault(count, {"runs_mb": [], "method": probe["method"], "rss_after_build_mb": []})
        slot["runs_mb"].append(probe["peak_mb"])
        slot["rss_after_build_mb"].append(probe["rss_after_build_mb"])
    return results


# --- profile --------------------------------------------------------------------------------------------

def profile_overhead(bench, args, device: torch.device, count: int) -> Dict[str, Any]:
    """Self time per aten op, patched minus unpatched, per step (median over ABBA runs)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    runs: Dict[int, List[Dict[tuple, tuple]]] = {0: [], count: []}
    for rnd in range(args.repeats):
        for variant in ((0, count) if rnd % 2 == 0 else (count, 0)):
            with profile(activities=activities, record_shapes=True) as prof:
                bench.run(variant, args.steps)
            table = {}
            for e in prof.key_averages(group_by_input_shape=True):
                ms = (e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total) / 1000.0
                table[(e.key, str(e.input_shapes))] = (ms / args.steps, e.count / args.steps)
            runs[variant].append(table)

    def median_of(variant, key_fn):
        merged = []
        for table in runs[variant]:
            acc: Dict[str, List[float]] = {}
            for key, (ms, calls) in table.items():
                slot = acc.setdefault(key_fn(key), [0.0, 0.0])
                slot[0] += ms
                slot[1] += calls
            merged.append(acc)
        keys = set().union(*merged)
        return {k: (statistics.median(m.get(k, [0.0, 0.0])[0] for m in merged), merged[0].get(k, [0.0, 0.0])[1]) for k in keys}

    by_op_u, by_op_p = median_of(0, lambda k: k[0]), median_of(count, lambda k: k[0])
    by_shape_u, by_shape_p = median_of(0, lambda k: k), median_of(count, lambda k: k)
    ops = sorted(set(by_op_u) | set(by_op_p), key=lambda k: by_op_p.get(k, (0, 0))[0] - by_op_u.get(k, (0, 0))[0], reverse=True)
    total_u = sum(v[0] for v in by_op_u.values())
    total_p = sum(v[0] for v in by_op_p.values())
    unit = "device" if device.type == "cuda" else "CPU"
    print(f"\nprofile, {count} concepts, self {unit} ms per step (median of {args.repeats} runs each): "
          f"unpatched {total_u:.1f}, patched {total_p:.1f}, difference {total_p - total_u:+.1f}")
    print("top differences by op (ms/step, calls/step unpatched -> patched):")
    by_op = []
    for op in ops[:12] + ops[-4:]:
        u, p = by_op_u.get(op, (0.0, 0)), by_op_p.get(op, (0.0, 0))
        by_op.append(dict(op=op, unpatched_ms=u[0], patched_ms=p[0], calls=[u[1], p[1]]))
        print(f"  {p[0] - u[0]:+8.2f}  {op:50s} {u[0]:8.2f} -> {p[0]:8.2f}   calls {u[1]:g} -> {p[1]:g}")
    only_patched = sorted(((k, v) for k, v in by_shape_p.items() if k not in by_shape_u), key=lambda kv: -kv[1][0])
    print("ops (with input shapes) that only the patched run has:")
    new_ops = []
    for (op, shapes), (ms, calls) in only_patched[:12]:
        new_ops.append(dict(op=op, shapes=shapes, ms=ms, calls=calls))
        print(f"  {ms:8.2f} ms  {calls:4g} calls  {op} {shapes[:110]}")
    # Ops both runs have can still cost more patched (e.g. a copy of a per-token tensor): largest per-shape changes.
    shared = sorted((k for k in by_shape_p if k in by_shape_u),
                    key=lambda k: by_shape_p[k][0] - by_shape_u[k][0], reverse=True)
    print("largest increases of ops both runs have (ms/step, by input shapes):")
    grown = []
    for op, shapes in shared[:8]:
        (u, cu), (p, cp) = by_shape_u[(op, shapes)], by_shape_p[(op, shapes)]
        grown.append(dict(op=op, shapes=shapes, unpatched_ms=u, patched_ms=p, calls=[cu, cp]))
        print(f"  {p - u:+8.2f}  {op} {shapes[:100]}  {u:.2f} -> {p:.2f} ms, calls {cu:g} -> {cp:g}")
    return dict(concepts=count, unit=unit, unpatched_ms_per_step=total_u, patched_ms_per_step=total_p,
                by_op=by_op, only_patched=new_ops, grown=grown)


# --- main -----------------------------------------------------------------------------------------------

def environment(args, device: torch.device) -> Dict[str, Any]:
    cpu = platform.processor()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next((l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name")), cpu)
    except OSError:
        pass
    env = dict(date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"), cpu=cpu,
               cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
               torch_threads=torch.get_num_threads(), torch=torch.__version__, python=platform.python_version(),
               load_average=os.getloadavg() if hasattr(os, "getloadavg") else None)
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    if args.host == "comfy":
        try:
            from comfyui_version import __version__ as comfy_version  # the checkout is on sys.path by now
            env["comfyui"] = comfy_version
        except ImportError:
            env["comfyui"] = "unknown"
    else:
        import diffusers

        env["diffusers"] = diffusers.__version__
    return env


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args._probe is not None:
        probe_main(args)
        return {}
    started = time.perf_counter()
    load_at_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    bench = build_bench(args)
    device = torch.device(args.device)
    counts = args.concept_counts
    print(f"host={args.host} preset={args.preset} device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} "
          f"config={json.dumps(bench.cfg)}", flush=True)

    # Warm-up, and a check that each variant is what it claims: unpatched twice gives the same output, patched differs.
    reference = bench.run(0, args.steps)[-1]
    for count in counts:
        out = bench.run(count, args.steps)[-1]
        if not torch.isfinite(out).all():
            raise RuntimeError(f"non-finite output with {count} concepts")
        if torch.equal(out, reference):
            raise RuntimeError(f"the {count}-concept variant gave the unpatched output: the concepts were not applied")
    again = bench.run(0, args.steps)[-1]
    if not torch.equal(again, reference):
        raise RuntimeError("the unpatched model changed after running a patched clone")
    print(f"warm-up and variant check done in {time.perf_counter() - started:.1f} s", flush=True)
    if args.profile:
        result = dict(host=args.host, preset=args.preset, device=args.device, dtype=args.dtype, steps=args.steps,
                      model=bench.cfg, environment=environment(args, device),
                      profile=profile_overhead(bench, args, device, max(counts)),
                      command="python benchmarks/modulation.py " + " ".join(argv))
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(result, handle, indent=2)
        return result

    times: Dict[int, Dict[str, List[float]]] = {c: {"unpatched": [], "patched": []} for c in counts}
    cpu_times: Dict[int, Dict[str, List[float]]] = {c: {"unpatched": [], "patched": []} for c in counts}
    step_times: Dict[int, Dict[str, List[float]]] = {c: {"unpatched": [], "patched": []} for c in counts}
    gpu_peak: Dict[int, List[float]] = {c: [] for c in [0] + counts}
    for rnd in range(args.repeats):
        for count in counts:
            order = [0, count] if rnd % 2 == 0 else [count, 0]
            for variant in order:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                per_step, per_step_cpu, _ = bench.run(variant, args.steps)
                if device.type == "cuda":
                    gpu_peak[variant].append(torch.cuda.max_memory_allocated(device) / 2**20)
                times[count]["patched" if variant else "unpatched"].append(per_step)
                cpu_times[count]["patched" if variant else "unpatched"].append(per_step_cpu)
                step_times[count]["patched" if variant else "unpatched"].extend(bench.last_steps)
        print(f"round {rnd + 1}/{args.repeats}: " + ", ".join(
            f"{c}: {times[c]['unpatched'][-1]:.4f}/{times[c]['patched'][-1]:.4f} s" for c in counts), flush=True)

    memory: Dict[int, Dict[str, Any]] = {}
    memory_method = None
    if not args.no_memory:
        if device.type == "cuda":
            memory_method = ("torch.cuda.max_memory_allocated after reset_peak_memory_stats, per timed run, same process "
                             "(weights included); mean over the timed runs")
            memory = {c: {"runs_mb": v} for c, v in gpu_peak.items()}
        else:
            memory = cpu_memory(args, [a for a in argv if a != "--no-memory"], counts)
            memory_method = ("peak resident set size (VmHWM) of a fresh subprocess per variant (MALLOC_MMAP_THRESHOLD_=65536), "
                             "mark reset with /proc/self/clear_refs after the model build, over a 1-step warm-up + a 1-step measured run "
                             "(weights included); unpatched probed twice (first and last; once when --repeats 1), mean taken, "
                             "their spread is the noise floor; probes run --probe-jobs at a time")
            if any(m["method"] != "VmHWM after clear_refs" for m in memory.values()):
                memory_method = memory_method.replace("VmHWM", "ru_maxrss (process lifetime: clear_refs not writable)")

    target_ratio = TARGET_RATIO[device.type]
    rows = []
    for count in counts:
        u, p = times[count]["unpatched"], times[count]["patched"]
        row = dict(concepts=count, unpatched_s_per_step=statistics.median(u), patched_s_per_step=statistics.median(p),
                   paired_ratio_median=statistics.median(b / a for a, b in zip(u, p)), unpatched_runs=u, patched_runs=p)
        row["ratio"] = row["patched_s_per_step"] / row["unpatched_s_per_step"]
        su, sp = step_times[count]["unpatched"], step_times[count]["patched"]
        # Other processes only ever add time: the fastest single step of each side is the least disturbed.
        row["unpatched_min_s_per_step"], row["patched_min_s_per_step"] = min(su), min(sp)
        row["min_ratio"] = min(sp) / min(su)
        row["unpatched_steps"], row["patched_steps"] = su, sp
        cu, cp = cpu_times[count]["unpatched"], cpu_times[count]["patched"]
        # process CPU time (all threads): less sensitive than wall time to other processes taking the cores
        row["cpu_time_ratio"] = statistics.median(cp) / statistics.median(cu)
        row["unpatched_cpu_s_per_step"], row["patched_cpu_s_per_step"] = statistics.median(cu), statistics.median(cp)
        if memory:
            row["peak_mb_unpatched"] = statistics.fmean(memory[0]["runs_mb"])
            row["peak_mb_patched"] = statistics.fmean(memory[count]["runs_mb"])
            row["unpatched_probe_spread_pct"] = 100.0 * (max(memory[0]["runs_mb"]) - min(memory[0]["runs_mb"])) / row["peak_mb_unpatched"]
            row["extra_memory_pct"] = 100.0 * (row["peak_mb_patched"] - row["peak_mb_unpatched"]) / row["peak_mb_unpatched"]
            built = statistics.fmean(memory[0]["rss_after_build_mb"]) if "rss_after_build_mb" in memory[0] else None
            if built:  # CPU: the peak includes the libraries (torch, diffusers/ComfyUI) and the weights
                row["rss_after_build_mb"] = built
                row["extra_pct_of_working_memory"] = 100.0 * (row["peak_mb_patched"] - row["peak_mb_unpatched"]) / (
                    row["peak_mb_unpatched"] - built)
            row["memory_target_met"] = row["extra_memory_pct"] <= TARGET_EXTRA_MEMORY_PCT
        row["ratio_target_met"] = row["ratio"] <= target_ratio
        rows.append(row)

    result = dict(host=args.host, preset=args.preset, device=args.device, dtype=args.dtype, steps=args.steps,
                  repeats=args.repeats, model=bench.cfg, host_config=bench.host_config,
                  concept_layout="concept k: random delta (num_blocks, hidden) * 0.5, strength 1, whole schedule, "
                                 "text tokens 4+4k and 5+4k",
                  timing_method=bench.timing_method, memory_method=memory_method,
                  memory_probes={str(c): v for c, v in memory.items()} if memory else None,
                  environment=environment(args, device), targets=dict(ratio=target_ratio,
                                                                      extra_memory_pct=TARGET_EXTRA_MEMORY_PCT),
                  load_average_at_start=load_at_start, results=rows, command="python benchmarks/modulation.py " + " ".join(argv),
                  wall_s=round(time.perf_counter() - started, 1))

    print(f"\ntiming: {bench.timing_method}\nmemory: {memory_method}")
    if memory:
        print("memory probes (MB): " + ", ".join(f"{c}: {[round(x, 1) for x in v['runs_mb']]}" for c, v in memory.items()))
    print("\n| concepts | unpatched s/step | patched s/step | ratio (paired median) | peak MB unpatched / patched | extra MB | extra % |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        mem = (f"{r['peak_mb_unpatched']:.1f} / {r['peak_mb_patched']:.1f} | {r['peak_mb_patched'] - r['peak_mb_unpatched']:+.1f} | "
               f"{r['extra_memory_pct']:+.2f}" + (f" ({r['extra_pct_of_working_memory']:+.1f} of working memory)"
                                                  if "extra_pct_of_working_memory" in r else "")
               if memory else "not measured | - | -")
        print(f"| {r['concepts']} | {r['unpatched_s_per_step']:.4f} | {r['patched_s_per_step']:.4f} | "
              f"{r['ratio']:.4f} ({r['paired_ratio_median']:.4f}) | {mem} |")
    print("fastest step, unpatched / patched (ratio): " + ", ".join(
        f"{r['concepts']}: {r['unpatched_min_s_per_step']:.4f} / {r['patched_min_s_per_step']:.4f} ({r['min_ratio']:.4f})" for r in rows))
    print("process CPU time ratio (all threads): "
          + ", ".join(f"{r['concepts']}: {r['cpu_time_ratio']:.4f}" for r in rows))
    print(f"targets: ratio <= {target_ratio}: " + ", ".join(f"{r['concepts']}: {'met' if r['ratio_target_met'] else 'MISSED'}" for r in rows)
          + (f"; extra peak memory <= {TARGET_EXTRA_MEMORY_PCT}%: " + ", ".join(
              f"{r['concepts']}: {'met' if r['memory_target_met'] else 'MISSED'}" for r in rows) if memory else ""))
    print(f"wall time {result['wall_s']} s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main()
