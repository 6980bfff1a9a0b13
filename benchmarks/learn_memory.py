"""Memory and time of Learn Concept at FLUX.1 size, one block at a time (the numbers behind modules/learn_memory.py).

A whole FLUX.1 transformer does not fit this machine (23.8 GB of bf16 weights), but a learning step is
57 blocks run one after another, each through the same code: one real-size block of each kind is enough
to measure what a step costs per block. The script builds ONE FLUX.1 double-stream block and ONE
single-stream block (diffusers' FluxTransformerBlock / FluxSingleTransformerBlock with FLUX.1's sizes:
width 3072, 24 heads of 128; random frozen weights) and installs the pack's own diffusers host on them
(:class:`~mod_adapter.modules.diffusers_flux_host.DiffusersFluxConcepts`), so the concept word's text
tokens get ``vec + Δ_i`` exactly as in Learn Concept. Then, per block kind, resolution (256 text
tokens + (resolution/16)² image tokens) and with / without activation checkpointing
(``torch.utils.checkpoint``, non-reentrant, as diffusers' ``enable_gradient_checkpointing``), it runs
forward + backward from the block's outputs to Δ and to the block's input streams (a block in the middle
of FLUX depends on Δ through its inputs too, so its backward must reach them). Measured (memory in MiB,
2^20 bytes, under the JSON's ``*_mb`` keys):

* ``saved_mb``: what the block keeps for its backward without checkpointing, counted exactly with
  ``torch.autograd.graph.saved_tensors_hooks`` (each storage once; the weights and the tensors all
  blocks share, ``temb`` and the rotary table, left out). This does not depend on the device.
* ``kept_after_forward_mb``: memory held between the forward and the backward, above the baseline
  (its outputs included): with checkpointing only the block's outputs, which the next block takes as input.
* ``peak_mb``: the peak above the baseline (weights, inputs and the upstream gradient already built)
  over the forward and backward: the block's saved tensors plus the backward's transients; the largest
  of the timed runs (the warm-up run, instrumented, is ``peak_mb_first_run``).
* ``seconds``: forward + backward, median of ``--repeats`` runs after one warm-up run.
* ``gflops``: counted with ``torch.utils.flop_counter.FlopCounterMode`` during the warm-up run
  (matrix products and attention; the CPU's flash-attention kernels are counted with torch's SDPA
  formulas), next to the analytic count of :func:`mod_adapter.modules.learn_memory.block_flops`.

CPU memory is the resident set (VmRSS, VmHWM after ``/proc/self/clear_refs``) of a fresh subprocess per
setting run with ``MALLOC_MMAP_THRESHOLD_=65536`` (glibc then returns every freed block of 64 KiB or more
at once, so the resident set follows the live tensors; see benchmarks/modulation.py). On CUDA:
``torch.cuda.max_memory_allocated`` / ``memory_allocated`` and CUDA-synchronised times, in one process.

A forward-only "probe" fits the per-token constants of the memory model: saved bytes at (1024 image,
256 text), (1024, 128) and (4096, 256) tokens give the bytes per image token and per text token of each
block kind, and the final norm + projection + loss give the bytes per image token after the blocks.
The full run also checks the model end to end: Learn Concept's own loop (``learn_concepts``, 1 step)
on a FLUX.1-width transformer cut to 2 double + 2 single blocks (512² without and with checkpointing,
1024² with it), its peak above the weights against
:func:`~mod_adapter.modules.learn_memory.estimate_learn_peak` for that layout (without the allowance).

Weights' bytes: the parameters of a whole FLUX.1-dev transformer (built on the meta device) × 4 (fp32),
2 (bf16), 1 (fp8_e4m3fn) bytes.

Examples:
    python benchmarks/learn_memory.py                       # FLUX.1 size, CPU, bf16, 512² and 1024² (~20 min, 2 cores)
    python benchmarks/learn_memory.py --quick               # width 256, a few seconds: checks the script
    python benchmarks/learn_memory.py --device cuda         # the GPU row (benchmarks/gpu.sh, part learn-memory)
    python benchmarks/learn_memory.py --table               # the estimate tables of docs/learn_concept.md, no measuring
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.utils.checkpoint
from torch.utils import flop_counter

from _measure import cpu_model, fill_random, reset_peak_rss, status_kb, synchronize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "benchmarks", "out", "learn_memory.json")
MIB = 2**20
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# FLUX.1's block sizes, and a small width for --quick (head_dim 128 keeps FLUX's rotary axes valid).
SIZES: Dict[str, Dict[str, Any]] = {
    "flux1": dict(hidden=3072, heads=24, axes=(16, 56, 56), text_len=256, resolutions=(512, 1024),
                  probe=((1024, 256), (1024, 128), (4096, 256)), validate_layout=(2, 2),
                  validate=((512, False), (512, True), (1024, True))),
    "quick": dict(hidden=128, heads=1, axes=(16, 56, 56), text_len=16, resolutions=(64, 128),
                  probe=((16, 16), (16, 8), (64, 16)), validate_layout=(1, 1), validate=((64, False), (64, True))),
}
# FLUX.1-dev's transformer configuration (diffusers), for the weights' bytes and the end-to-end check.
FLUX1_CONFIG = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                    axes_dims_rope=(16, 56, 56))
CONCEPT_POSITIONS = [4, 5]  # one concept word of two T5 tokens, as benchmarks/learn.py
KINDS = ("double", "single")


# --------------------------------------------------------------------------
# The blocks and one forward + backward
# --------------------------------------------------------------------------


class OneBlockEach(torch.nn.Module):
    """One double-stream and one single-stream FLUX.1 block under the names the pack's diffusers host patches.

    DiffusersFluxConcepts finds the blocks by these attribute names and records the text length from the
    ``hidden_states`` / ``encoder_hidden_states`` keywords of the forward, as it does on FluxTransformer2DModel.
    """

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

        self.transformer_blocks = torch.nn.ModuleList([FluxTransformerBlock(hidden, heads, hidden // heads)])
        self.single_transformer_blocks = torch.nn.ModuleList([FluxSingleTransformerBlock(hidden, heads, hidden // heads)])

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb, kind: str, checkpoint: bool):
        block = self.transformer_blocks[0] if kind == "double" else self.single_transformer_blocks[0]
        if checkpoint:
            # What diffusers' enable_gradient_checkpointing runs around every block.
            return torch.utils.checkpoint.checkpoint(block.__call__, hidden_states, encoder_hidden_states, temb,
                                                     image_rotary_emb, None, use_reentrant=False)
        return block(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, temb=temb,
                     image_rotary_emb=image_rotary_emb)


def build_blocks(size: Dict[str, Any], device: torch.device, dtype: torch.dtype) -> OneBlockEach:
    with torch.device("meta"):
        model = OneBlockEach(size["hidden"], size["heads"])
    model = torch.nn.Module.to(model.to_empty(device=device), dtype).eval().requires_grad_(False)
    fill_random(model, device)
    return model


def rotary_table(size: Dict[str, Any], image_tokens: int, text_len: int, device: torch.device):
    """FLUX's rotary (cos, sin) for text ids 0 and a square grid of image ids, as FluxTransformer2DModel makes it."""
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    side = int(round(image_tokens ** 0.5))
    if side * side != image_tokens:
        raise SystemExit(f"image tokens must be a square number, got {image_tokens}")
    img_ids = torch.zeros(image_tokens, 3)
    img_ids[:, 1] = torch.arange(side).repeat_interleave(side)
    img_ids[:, 2] = torch.arange(side).repeat(side)
    ids = torch.cat([torch.zeros(text_len, 3), img_ids]).to(device)
    return FluxPosEmbed(theta=10000, axes_dim=list(size["axes"]))(ids)


class Inputs:
    """A block's inputs and the gradient that arrives at its outputs during a backward."""

    def __init__(self, size, image_tokens: int, text_len: int, device: torch.device, dtype: torch.dtype):
        g = torch.Generator().manual_seed(0)
        hidden = size["hidden"]

        def rand(*shape, dt=dtype):
            return torch.randn(*shape, generator=g).to(device, dt)

        # A middle block's input streams depend on Δ (every block before it is modulated): they need gradients.
        self.image = rand(1, image_tokens, hidden).requires_grad_(True)
        self.text = rand(1, text_len, hidden).requires_grad_(True)
        self.temb = rand(1, hidden)  # from the frozen time/guidance/pooled embedders: no gradient
        self.rotary = rotary_table(size, image_tokens, text_len, device)
        # Δ is learned in float32 (learn_concepts); one row per block of this two-block model.
        self.delta = (0.01 * torch.randn(2, hidden, generator=g)).to(device).requires_grad_(True)
        self.grad_image = rand(1, image_tokens, hidden)
        self.grad_text = rand(1, text_len, hidden)

    def shared_storages(self) -> List[int]:
        """Storages every block of a model shares (one copy for all 57): not counted per block."""
        return [t.untyped_storage().data_ptr() for t in (self.temb, self.delta, *self.rotary)]

    def clear_grads(self) -> None:
        self.image.grad = self.text.grad = self.delta.grad = None


class SavedTensorBytes:
    """Bytes of the distinct storages autograd saves for backward, minus those listed in ``exclude``."""

    def __init__(self, exclude: Sequence[int]):
        self.exclude = set(exclude)
        self.storages: Dict[int, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return tensor
        if storage.data_ptr() not in self.exclude:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)


def forward(model, host, inputs: Inputs, kind: str, checkpoint: bool):
    from mod_adapter.modules.token_modulation import TokenConcept

    concept = TokenConcept(delta=inputs.delta, positions=CONCEPT_POSITIONS, name="concept")
    with host.using([concept]):
        return model(hidden_states=inputs.image, encoder_hidden_states=inputs.text, temb=inputs.temb,
                     image_rotary_emb=inputs.rotary, kind=kind, checkpoint=checkpoint)


def backward(outputs, inputs: Inputs) -> None:
    text_out, image_out = outputs
    torch.autograd.backward([text_out, image_out], [inputs.grad_text, inputs.grad_image])


# --------------------------------------------------------------------------
# FLOP counting (the CPU's flash attention is not in torch's table)
# --------------------------------------------------------------------------


def _cpu_flash_forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def flop_counter_mode() -> flop_counter.FlopCounterMode:
    aten = torch.ops.aten
    mapping = {}
    for name, formula in (("_scaled_dot_product_flash_attention_for_cpu", _cpu_flash_forward),
                          ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_flash_backward)):
        if hasattr(aten, name):
            mapping[getattr(aten, name)] = formula
    return flop_counter.FlopCounterMode(display=False, custom_mapping=mapping)


# --------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------


class Meter:
    """Memory above a baseline and synchronised time, on the CPU (resident set) or CUDA (allocator statistics)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.base = 0

    def current(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated(self.device)
        return (status_kb("VmRSS") or 0) * 1024

    def set_baseline(self) -> None:
        gc.collect()
        synchronize(self.device)
        self.base = self.current()

    def reset_peak(self) -> bool:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            return True
        return reset_peak_rss()

    def peak_above(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return (status_kb("VmHWM") or 0) * 1024 - self.base

    def above(self) -> int:
        return self.current() - self.base


def measure_setting(size_name: str, kind: str, resolution: int, checkpoint: bool, device: torch.device,
                    dtype: torch.dtype, repeats: int, warmup: int) -> Dict[str, Any]:
    """One block kind at one resolution, with or without checkpointing: memory, time, FLOPs."""
    from mod_adapter.modules.diffusers_flux_host import DiffusersFluxConcepts

    size = SIZES[size_name]
    image_tokens, text_len = (resolution // 16) ** 2, size["text_len"]
    model = build_blocks(size, device, dtype)
    inputs = Inputs(size, image_tokens, text_len, device, dtype)
    parameter_storages = [p.untyped_storage().data_ptr() for p in model.parameters()]
    meter = Meter(device)
    with DiffusersFluxConcepts(model) as host:
        meter.set_baseline()
        runs: List[Dict[str, float]] = []
        saved = SavedTensorBytes(parameter_storages + inputs.shared_storages())
        counter = flop_counter_mode()
        for run in range(warmup + repeats):
            first = run == 0
            resettable = meter.reset_peak()
            synchronize(device)
            start = time.perf_counter()
            if first:  # the warm-up run also counts FLOPs and saved tensors (both add Python work: not timed)
                with counter, saved.hooks():
                    outputs = forward(model, host, inputs, kind, checkpoint)
                    synchronize(device)
                    kept = meter.above()
                    backward(outputs, inputs)
            else:
                outputs = forward(model, host, inputs, kind, checkpoint)
                synchronize(device)
                kept = meter.above()
                backward(outputs, inputs)
            synchronize(device)
            seconds = time.perf_counter() - start
            if not all(torch.isfinite(t.grad).all() for t in (inputs.image, inputs.text, inputs.delta)):
                raise RuntimeError("non-finite gradient: the measurement is not of a working backward")
            if inputs.delta.grad.abs().sum() == 0:
                raise RuntimeError("Δ received no gradient: the concept modulation is not in the graph")
            del outputs
            peak = meter.peak_above()
            inputs.clear_grads()
            runs.append(dict(seconds=seconds, kept_after_forward_mb=kept / MIB, peak_mb=peak / MIB))
        after = meter.above()
    timed = runs[warmup:] or runs
    block = model.transformer_blocks[0] if kind == "double" else model.single_transformer_blocks[0]
    from mod_adapter.modules.learn_memory import block_flops

    analytic = block_flops(kind, image_tokens, text_len, size["hidden"], gradient_checkpointing=checkpoint)
    return dict(
        kind=kind, resolution=resolution, image_tokens=image_tokens, text_tokens=text_len,
        gradient_checkpointing=checkpoint, device=str(device), dtype=str(dtype).replace("torch.", ""),
        block_parameters=sum(p.numel() for p in block.parameters()),
        saved_mb=saved.total / MIB if not checkpoint else None,
        saved_bytes=saved.total if not checkpoint else None,
        # Memory from the plain runs: under FlopCounterMode (a dispatch mode) a checkpointed block holds up to 140 MiB
        # more at 1024² during its rebuild than in a plain step (the saved-tensor hooks add nothing); reported apart.
        kept_after_forward_mb=max(r["kept_after_forward_mb"] for r in timed),
        peak_mb=max(r["peak_mb"] for r in timed),
        peak_mb_first_run=runs[0]["peak_mb"],
        peak_mb_runs=[round(r["peak_mb"], 1) for r in runs],
        left_after_runs_mb=after / MIB,
        peak_resettable=resettable,
        seconds=statistics.median(r["seconds"] for r in timed),
        seconds_runs=[round(r["seconds"], 3) for r in runs],
        timed_runs=len(timed),
        gflops=counter.get_total_flops() / 1e9,
        gflops_analytic=analytic / 1e9,
    )


def probe_saved(size_name: str, device: torch.device, dtype: torch.dtype) -> Dict[str, Any]:
    """Forward-only saved-tensor bytes at a few token counts, and after the blocks (final norm, projection, loss)."""
    from diffusers.models.normalization import AdaLayerNormContinuous

    from mod_adapter.modules.diffusers_flux_host import DiffusersFluxConcepts

    size = SIZES[size_name]
    hidden = size["hidden"]
    model = build_blocks(size, device, dtype)
    parameter_storages = [p.untyped_storage().data_ptr() for p in model.parameters()]
    points = []
    with DiffusersFluxConcepts(model) as host:
        for image_tokens, text_len in size["probe"]:
            inputs = Inputs(size, image_tokens, text_len, device, dtype)
            for kind in KINDS:
                saved = SavedTensorBytes(parameter_storages + inputs.shared_storages())
                with saved.hooks():
                    outputs = forward(model, host, inputs, kind, checkpoint=False)
                del outputs
                points.append(dict(kind=kind, image_tokens=image_tokens, text_tokens=text_len, saved_bytes=saved.total))
            del inputs
    # After the last block: FluxTransformer2DModel's norm_out + proj_out on the image tokens, then the
    # float32 flow-matching loss of learn_concepts.
    with torch.device("meta"):
        head = torch.nn.ModuleDict(dict(norm_out=AdaLayerNormContinuous(hidden, hidden, elementwise_affine=False,
                                                                        eps=1e-6),
                                        proj_out=torch.nn.Linear(hidden, FLUX1_CONFIG["in_channels"])))
    head = torch.nn.Module.to(head.to_empty(device=device), dtype).requires_grad_(False)
    fill_random(head, device)
    head_points = []
    for image_tokens, _ in size["probe"][::2]:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, image_tokens, hidden, generator=g).to(device, dtype).requires_grad_(True)
        temb = torch.randn(1, hidden, generator=g).to(device, dtype)
        target = torch.randn(1, image_tokens, FLUX1_CONFIG["in_channels"], generator=g).to(device)
        saved = SavedTensorBytes([p.untyped_storage().data_ptr() for p in head.parameters()]
                                 + [temb.untyped_storage().data_ptr()])
        with saved.hooks():
            prediction = head["proj_out"](head["norm_out"](x, temb))
            loss = torch.nn.functional.mse_loss(prediction.float(), target)
        del loss, prediction
        head_points.append(dict(image_tokens=image_tokens, saved_bytes=saved.total))
    return dict(points=points, head=head_points)


def fit_constants(probe: Dict[str, Any], hidden: int) -> Dict[str, float]:
    """Per-token bytes from the probe: saved = a·image + b·text + c per block kind; head = h·image (+ h0)."""
    constants: Dict[str, float] = {}
    for kind in KINDS:
        pts = [p for p in probe["points"] if p["kind"] == kind]
        (i1, t1, s1), (i2, t2, s2), (i3, t3, s3) = [(p["image_tokens"], p["text_tokens"], p["saved_bytes"]) for p in pts]
        # Points 1 and 2 differ in text tokens only, 1 and 3 in image tokens only.
        per_text = (s1 - s2) / (t1 - t2)
        per_image = (s3 - s1) / (i3 - i1)
        constants[f"{kind}_saved_per_image_token"] = per_image
        constants[f"{kind}_saved_per_text_token"] = per_text
        constants[f"{kind}_saved_fixed"] = s1 - per_image * i1 - per_text * t1
    (h1_tokens, h1), (h2_tokens, h2) = [(p["image_tokens"], p["saved_bytes"]) for p in probe["head"]]
    constants["head_saved_per_image_token"] = (h2 - h1) / (h2_tokens - h1_tokens)
    constants["width"] = hidden
    return constants


def fit_peaks(rows: Sequence[Dict[str, Any]]) -> Dict[str, float]:
    """Peak above the baseline = per_token × tokens + fixed, per block kind and checkpointing setting: the line
    through the smallest and the largest token count measured (through the origin when only one was measured,
    or when that line would fall or start below zero)."""
    fitted: Dict[str, float] = {}
    for kind in KINDS:
        for checkpoint in (False, True):
            points = sorted((r["image_tokens"] + r["text_tokens"], r["peak_mb"] * MIB) for r in rows
                            if r["kind"] == kind and r["gradient_checkpointing"] == checkpoint)
            (t1, p1), (t2, p2) = points[0], points[-1]
            per_token = (p2 - p1) / (t2 - t1) if t2 > t1 else p2 / t2
            fixed = p1 - per_token * t1
            if fixed < 0 or per_token < 0:  # noise (tiny sizes, one process): the steepest line through the origin
                per_token, fixed = max(p / t for t, p in points), 0.0
            name = f"{kind}_checkpointed" if checkpoint else kind
            fitted[f"{name}_peak_per_token"], fitted[f"{name}_peak_fixed"] = per_token, fixed
    return fitted


def validate_end_to_end(size_name: str, num_double: int, num_single: int, resolution: int, checkpoint: bool,
                        device: torch.device, dtype: torch.dtype, constants: Optional[Dict[str, float]]) -> Dict[str, Any]:
    """learn_concepts (1 step) on a FLUX.1-width transformer with few blocks: peak above the weights, vs. the model."""
    from diffusers import FluxTransformer2DModel

    from mod_adapter.modules.flux_layout import FluxLayout
    from mod_adapter.modules.learn_concept import LearnConfig, learn_concepts
    from mod_adapter.modules.learn_diffusers import DiffusersDenoiser
    from mod_adapter.modules.learn_memory import BlockActivations, estimate_learn_peak

    size = SIZES[size_name]
    config = dict(FLUX1_CONFIG, num_layers=num_double, num_single_layers=num_single,
                  num_attention_heads=size["heads"], attention_head_dim=size["hidden"] // size["heads"],
                  axes_dims_rope=size["axes"])
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**config)
    transformer = torch.nn.Module.to(transformer.to_empty(device=device), dtype).eval().requires_grad_(False)
    fill_random(transformer, device)
    if checkpoint:
        transformer.enable_gradient_checkpointing()
    g = torch.Generator().manual_seed(1)
    latent_side = resolution // 8
    latents = torch.randn(1, 16, latent_side, latent_side, generator=g)
    prompt_embeds = torch.randn(1, size["text_len"], config["joint_attention_dim"], generator=g)
    pooled = torch.randn(1, config["pooled_projection_dim"], generator=g)
    meter = Meter(device)
    with DiffusersDenoiser(transformer, prompt_embeds, pooled, device=device) as denoiser:
        meter.set_baseline()
        meter.reset_peak()
        # One step: the peak is in its backward (Adam's state, allocated after it, is 2.8 MB at FLUX.1 size).
        result = learn_concepts(denoiser, latents, [CONCEPT_POSITIONS], LearnConfig(steps=1, stage1_steps=1, log_every=0))
        synchronize(device)
        peak = meter.peak_above()
    layout = FluxLayout(num_double, num_single, size["hidden"])
    estimate = estimate_learn_peak(resolution, weight_dtype=dtype, compute_dtype=dtype,
                                   gradient_checkpointing=checkpoint, layout=layout, text_tokens=size["text_len"],
                                   constants=BlockActivations.from_measurements(constants) if constants else None)
    predicted = estimate.activation_bytes + estimate.delta_bytes + estimate.block_peak_bytes
    return dict(num_double=num_double, num_single=num_single, resolution=resolution, gradient_checkpointing=checkpoint,
                device=str(device), measured_peak_above_weights_mb=peak / MIB, predicted_mb=predicted / MIB,
                predicted_over_measured=predicted / peak if peak > 0 else None, final_loss=result.losses[-1],
                note="predicted: activations + Δ/Adam + the block's transient of estimate_learn_peak (no allowance)")


# --------------------------------------------------------------------------
# The whole transformer's weights
# --------------------------------------------------------------------------


def flux1_weights() -> Dict[str, Any]:
    from diffusers import FluxTransformer2DModel

    from mod_adapter.modules.learn_memory import flux_parameter_count

    with torch.device("meta"):
        model = FluxTransformer2DModel(**FLUX1_CONFIG)
    count = sum(p.numel() for p in model.parameters())
    double = sum(p.numel() for p in model.transformer_blocks[0].parameters())
    single = sum(p.numel() for p in model.single_transformer_blocks[0].parameters())
    formula = flux_parameter_count()
    if formula != count:
        raise RuntimeError(f"modules/learn_memory.flux_parameter_count gives {formula:,}, diffusers builds {count:,}")
    return dict(parameters=count, double_block_parameters=double, single_block_parameters=single,
                outside_blocks_parameters=count - 19 * double - 38 * single,
                bytes={"fp32": count * 4, "bf16": count * 2, "fp8_e4m3fn": count},
                gb={"fp32": count * 4 / 1e9, "bf16": count * 2 / 1e9, "fp8_e4m3fn": count / 1e9},
                gib={"fp32": count * 4 / 2**30, "bf16": count * 2 / 2**30, "fp8_e4m3fn": count / 2**30})


# --------------------------------------------------------------------------
# The estimate tables of docs/learn_concept.md (--table)
# --------------------------------------------------------------------------

# Per GPU: memory class (GiB), name, dense bf16 tensor TFLOP/s with float32 accumulation (vendors' data sheets).
GPU_CLASSES = (
    (16, "RTX 4080", 97.5),
    (24, "RTX 4090", 165.2),
    (48, "RTX A6000", 154.8),
    (48, "L40S", 362.0),
    (80, "A100 80GB", 312.0),
    (80, "H100 SXM", 989.0),
)
UTILISATION = 0.4  # assumed share of the dense peak a learning step sustains
RESERVED_GIB = 1.0  # assumed: CUDA context, display, ComfyUI's reserve: what a GPU of N GiB leaves is N - 1
STEPS = 1400


def _minutes(estimate, tflops: float) -> float:
    from mod_adapter.modules.learn_memory import estimate_learn_seconds

    return estimate_learn_seconds(estimate, peak_tflops=tflops, utilisation=UTILISATION, steps=STEPS) / 60


def _cheapest(available: int, resolution: int, weight_dtype: str, can_offload: bool, **kwargs):
    """The fastest setting that fits: checkpointing off, on, then offloaded (with checkpointing); None if none fits."""
    from mod_adapter.modules.learn_memory import estimate_learn_peak

    settings = [("fits, checkpointing off", dict(gradient_checkpointing=False)),
                ("fits with checkpointing", dict(gradient_checkpointing=True))]
    if can_offload:
        settings.append(("fits with offload_weights", dict(gradient_checkpointing=True, offload_weights=True)))
    for label, options in settings:
        estimate = estimate_learn_peak(resolution, weight_dtype, **options, **kwargs)
        if estimate.total_bytes <= available:
            return label, estimate
    return "does not fit", None


def memory_table(host: str) -> str:
    """Peak memory per GPU class and what fits: the ComfyUI node (weights copied for autograd; fp8 or bf16;
    ComfyUI can offload) or the diffusers CLI (bf16, no copies, no offloading)."""
    from mod_adapter.modules.learn_memory import GIB, estimate_learn_peak

    comfy = host == "comfyui"
    dtypes = ("fp8_e4m3fn", "bf16") if comfy else ("bf16",)
    head = "| GPU | weights | image | peak, checkpointing off | peak, checkpointing on |"
    head += " peak, offloaded |" if comfy else ""
    head += f" verdict (spare) | {STEPS:,} steps (estimate) |"
    lines = [head, "|---|---|---:|---:|---:|" + ("---:|" if comfy else "") + "---|---|"]
    for memory_gib in sorted({c[0] for c in GPU_CLASSES}):
        gpus = [c for c in GPU_CLASSES if c[0] == memory_gib]
        available = int((memory_gib - RESERVED_GIB) * GIB)
        for weight_dtype in dtypes:
            for resolution in (512, 1024):
                options = dict(weights_copied=comfy)
                peaks = [estimate_learn_peak(resolution, weight_dtype, gradient_checkpointing=c, offload_weights=o,
                                             **options).total_bytes / GIB
                         for c, o in ((False, False), (True, False), (True, True))[:3 if comfy else 2]]
                verdict, chosen = _cheapest(available, resolution, weight_dtype, comfy, **options)
                if chosen is None:
                    minutes = "—"
                else:
                    verdict += f" ({(available - chosen.total_bytes) / GIB:.1f} GiB)"
                    minutes = ", ".join(f"{name} {_minutes(chosen, t):.0f} min" for _, name, t in gpus)
                lines.append(f"| {memory_gib} GB | {weight_dtype} | {resolution}² | "
                             + " | ".join(f"{p:.1f} GiB" for p in peaks) + f" | {verdict} | {minutes} |")
    return "\n".join(lines)


def time_table() -> str:
    """TFLOP per learning step and the estimated minutes of a whole run per GPU (weights on the GPU)."""
    from mod_adapter.modules.learn_memory import estimate_learn_peak

    lines = ["| image | checkpointing | TFLOP per step | "
             + " | ".join(f"{name} ({t:g} TFLOP/s)" for _, name, t in GPU_CLASSES) + " |",
             "|---:|---|---:|" + "---:|" * len(GPU_CLASSES)]
    for resolution in (512, 1024):
        for checkpointing in (False, True):
            estimate = estimate_learn_peak(resolution, gradient_checkpointing=checkpointing)
            lines.append(f"| {resolution}² | {'on' if checkpointing else 'off'} | {estimate.flops_per_step / 1e12:.1f} | "
                         + " | ".join(f"{_minutes(estimate, t):.1f} min" for _, _, t in GPU_CLASSES) + " |")
    return "\n".join(lines)


def estimate_tables() -> str:
    return (f"Estimated minutes for {STEPS:,} steps at {UTILISATION:.0%} of each GPU's dense bf16 peak:\n\n"
            f"{time_table()}\n\n"
            f"ComfyUI's Learn Concept node (weights copied for autograd), {RESERVED_GIB:g} GiB of each GPU reserved:\n\n"
            f"{memory_table('comfyui')}\n\nThe diffusers CLI (`mod-adapter learn`, bf16, no offloading):\n\n"
            f"{memory_table('diffusers')}")


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="width 128, 64² and 128², 16 text tokens, float32, one timed run: seconds, for a test")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default bfloat16 (--quick: float32, fast on any CPU)")
    p.add_argument("--resolutions", help="comma-separated image sides (default: 512,1024; --quick 128,256)")
    p.add_argument("--repeats", type=int,
                   help="timed runs per setting (default: CPU 3, 2 above 512²; CUDA 10; --quick 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (the first also counts FLOPs)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; --quick: 1, which a busy "
                                               "machine slows far less than several)")
    p.add_argument("--no-isolate", action="store_true",
                   help="CPU: measure every setting in this process (default: a fresh subprocess each, except --quick)")
    p.add_argument("--no-validate", action="store_true", help="skip the end-to-end check of the memory model")
    p.add_argument("--table", action="store_true",
                   help="only print the estimate tables of docs/learn_concept.md (modules/learn_memory.py's model)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"JSON results (default {os.path.relpath(DEFAULT_OUT, REPO)})")
    p.add_argument("--_worker", help=argparse.SUPPRESS)  # internal: one measurement in a fresh process
    args = p.parse_args(argv)
    if args.dtype is None:
        args.dtype = "float32" if args.quick else "bfloat16"
    if args.threads is None and args.quick:
        args.threads = 1
    return args


def run_isolated(args, task: Dict[str, Any]) -> Dict[str, Any]:
    """One measurement in a fresh Python process (CPU): its own resident set, untouched by the others."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(64 * 1024))
    cmd = [sys.executable, os.path.abspath(__file__), "--device", args.device, "--dtype", args.dtype,
           "--warmup", str(args.warmup), "--_worker", json.dumps(task)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"worker {task} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def run_task(args, task: Dict[str, Any]) -> Dict[str, Any]:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if task["what"] == "block":
        return measure_setting(task["size"], task["kind"], task["resolution"], task["checkpoint"], device, dtype,
                               task["repeats"], args.warmup)
    if task["what"] == "probe":
        return probe_saved(task["size"], device, dtype)
    if task["what"] == "validate":
        return validate_end_to_end(task["size"], task["num_double"], task["num_single"], task["resolution"],
                                   task["checkpoint"], device, dtype, task.get("constants"))
    raise SystemExit(f"unknown task {task}")


def dispatch(args, task: Dict[str, Any], isolate: bool) -> Dict[str, Any]:
    started = time.perf_counter()
    result = run_isolated(args, task) if isolate else run_task(args, task)
    gc.collect()
    result["wall_s"] = round(time.perf_counter() - started, 1)
    return result


def machine(device: torch.device) -> Dict[str, Any]:
    import diffusers

    return dict(device=str(device),
                device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
                torch=torch.__version__, diffusers=diffusers.__version__, threads=torch.get_num_threads(),
                cpu_count=os.cpu_count(), load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                date=time.strftime("%Y-%m-%d %H:%M"))


def print_table(rows: Sequence[Dict[str, Any]]) -> None:
    print("| block | image | tokens (image + text) | checkpointing | saved for backward (MiB) | held after forward (MiB) "
          "| peak above weights (MiB) | s forward + backward | GFLOP counted | GFLOP analytic |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        saved = f"{r['saved_mb']:.0f}" if r["saved_mb"] is not None else "—"
        print(f"| {r['kind']} | {r['resolution']}² | {r['image_tokens']} + {r['text_tokens']} | "
              f"{'on' if r['gradient_checkpointing'] else 'off'} | {saved} | {r['kept_after_forward_mb']:.0f} | "
              f"{r['peak_mb']:.0f} | {r['seconds']:.2f} | {r['gflops']:.1f} | {r['gflops_analytic']:.1f} |")


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")

    if args._worker:
        print("RESULT " + json.dumps(run_task(args, json.loads(args._worker))), flush=True)
        return {}
    if args.table:
        print(estimate_tables())
        return {}

    size_name = "quick" if args.quick else "flux1"
    size = SIZES[size_name]
    resolutions = [int(r) for r in args.resolutions.split(",")] if args.resolutions else list(size["resolutions"])
    if any(r % 16 for r in resolutions):
        raise SystemExit("--resolutions must be multiples of 16")
    # CUDA's allocator statistics are exact per phase; the CPU's resident set needs a fresh process per setting.
    isolate = device.type == "cpu" and not args.no_isolate and not args.quick
    started = time.perf_counter()
    results: Dict[str, Any] = dict(size=size_name, width=size["hidden"], heads=size["heads"],
                                   text_tokens=size["text_len"], dtype=args.dtype, machine=machine(device),
                                   isolated_processes=isolate,
                                   memory_method=("torch.cuda.max_memory_allocated / memory_allocated above the "
                                                  "baseline" if device.type == "cuda" else
                                                  "VmHWM / VmRSS above the baseline"
                                                  + (", a fresh process per setting, MALLOC_MMAP_THRESHOLD_=65536"
                                                     if isolate else ", one process")))
    results["weights"] = flux1_weights()
    print(f"FLUX.1 transformer: {results['weights']['parameters']:,} parameters = "
          + ", ".join(f"{k} {v:.2f} GB" for k, v in results["weights"]["gb"].items()), flush=True)

    probe = dispatch(args, dict(what="probe", size=size_name), isolate)
    results["probe"] = probe
    results["constants"] = fit_constants(probe, size["hidden"])
    print("per-token constants: " + ", ".join(f"{k} {v:.1f}" for k, v in results["constants"].items()), flush=True)

    rows = []
    for resolution in resolutions:
        # CUDA runs take milliseconds: many repeats; the CPU takes seconds to a minute per run at FLUX.1 size.
        repeats = args.repeats or (1 if args.quick else 10 if device.type == "cuda" else 3 if resolution <= 512 else 2)
        for kind in KINDS:
            for checkpoint in (False, True):
                task = dict(what="block", size=size_name, kind=kind, resolution=resolution, checkpoint=checkpoint,
                            repeats=repeats)
                row = dispatch(args, task, isolate)
                rows.append(row)
                print(f"{kind} block, {resolution}², checkpointing {'on' if checkpoint else 'off'}: "
                      f"saved {row['saved_mb'] if row['saved_mb'] is not None else float('nan'):.0f} MiB, "
                      f"kept {row['kept_after_forward_mb']:.0f} MiB, peak {row['peak_mb']:.0f} MiB, "
                      f"{row['seconds']:.2f} s (runs {row['seconds_runs']}), {row['gflops']:.1f} GFLOP "
                      f"(analytic {row['gflops_analytic']:.1f}) [{row['wall_s']} s]", flush=True)
                results["blocks"] = rows
                _write(args.out, results)

    results["constants"].update(fit_peaks(rows))
    _write(args.out, results)
    print("peaks (bytes per token + fixed MiB): " + ", ".join(
        f"{k} {results['constants'][k + '_peak_per_token']:.0f} + {results['constants'][k + '_peak_fixed'] / MIB:.1f}"
        for k in ("double", "single", "double_checkpointed", "single_checkpointed")), flush=True)

    results["validation"] = []
    if not args.no_validate:
        num_double, num_single = size["validate_layout"]
        for resolution, checkpoint in size["validate"]:
            task = dict(what="validate", size=size_name, num_double=num_double, num_single=num_single,
                        resolution=resolution, checkpoint=checkpoint, constants=results["constants"])
            check = dispatch(args, task, isolate)
            results["validation"].append(check)
            ratio = check["predicted_over_measured"]  # None when a model this small grew the resident set by nothing
            print(f"end to end, {num_double}+{num_single} blocks, {resolution}², checkpointing "
                  f"{'on' if checkpoint else 'off'}: measured {check['measured_peak_above_weights_mb']:.0f} MiB "
                  f"above the weights, model {check['predicted_mb']:.0f} MiB "
                  f"({'no growth measured' if ratio is None else f'{ratio:.2f}x'}) [{check['wall_s']} s]", flush=True)
            _write(args.out, results)

    results["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    results["total_wall_s"] = round(time.perf_counter() - started, 1)
    _write(args.out, results)
    print()
    print_table(rows)
    print(f"\n{results['machine']['device_name']}, {results['machine']['threads']} threads, load average "
          f"{results['machine']['load_average']} at the start, {results['machine']['load_average_end']} at the end; "
          f"{results['total_wall_s']} s; JSON: {args.out}")
    return results


def _write(path: str, results: Dict[str, Any]) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as handle:
        json.dump(results, handle, indent=2)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
