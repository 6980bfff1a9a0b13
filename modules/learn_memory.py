"""Peak device memory and compute of a Learn Concept run, estimated before it starts, and the refusal that names a fix.

A learning step (modules/learn_concept.py) runs FLUX.1 forward with the concept modulation, the
flow-matching loss, a backward to Δ through the frozen transformer, and Adam on Δ. Its peak device
memory is the sum of

* the weights on the device (all of them, or with offloading only the parts outside the blocks and
  two blocks: the one computing and the one arriving);
* the activations kept from the forward for the backward: without activation checkpointing, what
  every block saves, measured per token and block kind; with it, only each block's input streams,
  since a block's activations are rebuilt one block at a time during the backward; plus what the
  final norm, projection and loss save;
* Δ, its gradient and Adam's two moments (float32, tiny);
* a workspace: the largest single block's backward transients (with checkpointing also that block's
  rebuilt activations), the per-layer weight copies autograd keeps (weights stored in another dtype
  than the compute dtype, e.g. fp8, are cast layer by layer; ComfyUI's learning host copies every
  weight so that inference-mode weights can take part in autograd), and an allowance for the
  allocator and the CUDA libraries.

The per-token constants were measured on one real-size FLUX.1 block of each kind with the pack's
diffusers host (benchmarks/learn_memory.py; docs/learn_concept.md, "Memory and time at FLUX.1
size"). They scale with the width and the compute dtype's size, so the same functions serve the
tests' tiny models. No ComfyUI import: the node calls :func:`estimate_learn_peak` and
:func:`check_learn_fits` with the numbers it reads from its model and device.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import torch

from .errors import ModAdapterError
from .flux_layout import FluxLayout

FLUX1_LAYOUT = FluxLayout(19, 38, 3072)
FLUX1_TEXT_TOKENS = 256  # ComfyUI pads FLUX prompts to 256 T5 tokens
FLUX1_HEAD_DIM = 128
MLP_RATIO = 4
GIB = 2**30

# Bytes per stored weight, by the names ComfyUI's Load Diffusion Model and the pack's options use.
WEIGHT_DTYPE_BYTES = {
    "float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "half": 2, "bfloat16": 2, "bf16": 2,
    "fp8_e4m3fn": 1, "fp8_e4m3fn_fast": 1, "fp8_e5m2": 1, "float8_e4m3fn": 1, "float8_e5m2": 1,
}
COMPUTE_DTYPE_BYTES = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "half": 2, "bfloat16": 2, "bf16": 2}


@dataclass(frozen=True)
class BlockActivations:
    """What one FLUX.1 block holds for a learning step, in bytes, at width ``width`` and a 2-byte compute dtype.

    ``*_saved_*``: what the block keeps from its forward for its backward without checkpointing (exact:
    counted with saved-tensor hooks), per image token, per text token and fixed. It includes the
    per-token modulation the concept host builds: for the text tokens in double blocks, for every
    token in single blocks.
    ``*_peak_*``: the most the block needs above its inputs and the gradient arriving at its outputs while
    it runs forward and backward, its saved tensors included, = per_token × (image + text tokens) + fixed
    (measured: resident set above the baseline on the CPU, fitted through 512² and 1024²);
    ``*_checkpointed_peak_*`` the same under activation checkpointing, where the backward first rebuilds
    the activations. ``head_saved_per_image_token``: FluxTransformer2DModel's final norm and projection
    and the float32 loss, after the blocks.
    """

    double_saved_per_image_token: float
    double_saved_per_text_token: float
    double_saved_fixed: float
    single_saved_per_image_token: float
    single_saved_per_text_token: float
    single_saved_fixed: float
    double_peak_per_token: float
    double_peak_fixed: float
    single_peak_per_token: float
    single_peak_fixed: float
    double_checkpointed_peak_per_token: float
    double_checkpointed_peak_fixed: float
    single_checkpointed_peak_per_token: float
    single_checkpointed_peak_fixed: float
    head_saved_per_image_token: float
    width: int = 3072

    @classmethod
    def from_measurements(cls, constants: Mapping[str, float]) -> "BlockActivations":
        """From benchmarks/learn_memory.py's JSON ("constants"): the fitted saved bytes and the measured peaks."""
        return cls(**{f.name: (int if f.name == "width" else float)(constants[f.name]) for f in fields(cls)})

    def saved(self, kind: str, image_tokens: int, text_tokens: int) -> float:
        if kind == "double":
            return (self.double_saved_per_image_token * image_tokens + self.double_saved_per_text_token * text_tokens
                    + self.double_saved_fixed)
        return (self.single_saved_per_image_token * image_tokens + self.single_saved_per_text_token * text_tokens
                + self.single_saved_fixed)

    def peak(self, kind: str, tokens: int, checkpointed: bool = False) -> float:
        prefix = f"{kind}_checkpointed" if checkpointed else kind
        return getattr(self, f"{prefix}_peak_per_token") * tokens + getattr(self, f"{prefix}_peak_fixed")


# Measured on 2026-12-03 with
#     python benchmarks/learn_memory.py
# (FLUX.1 width 3072, 24 heads of 128, bf16, CPU, diffusers 0.42.1, torch 2.14.1; its JSON's "constants",
# rounded to the byte; the per-block numbers are in docs/learn_concept.md, "Memory and time at FLUX.1 size"). Saved
# bytes: fitted exactly (three unknowns, three points) from forward-only runs at (1024 image, 256 text),
# (1024, 128) and (4096, 256) tokens; they repeat to the byte at 512² and 1024². Peaks: the line
# through the 512² (1280 tokens) and 1024² (4352 tokens) runs of each block kind and setting.
FLUX1_BLOCK_ACTIVATIONS = BlockActivations(
    double_saved_per_image_token=86_312,
    double_saved_per_text_token=160_048,
    double_saved_fixed=61_440,
    single_saved_per_image_token=117_036,
    single_saved_per_text_token=117_036,
    single_saved_fixed=12_288,
    double_peak_per_token=135_383,
    double_peak_fixed=23_232_171,
    single_peak_per_token=190_856,
    single_peak_fixed=25_946_112,
    double_checkpointed_peak_per_token=134_696,
    double_checkpointed_peak_fixed=33_159_168,
    single_checkpointed_peak_per_token=190_963,
    single_checkpointed_peak_fixed=29_377_195,
    head_saved_per_image_token=6_660,
)

# Assumed, not measured: what the CUDA caching allocator loses to fragmentation and the CUDA libraries
# (cuBLAS/cuDNN workspaces, flash-attention scratch) take beyond the tensors counted here.
ALLOWANCE_BYTES = 512 * 2**20
ALLOWANCE_FRACTION = 0.10  # of the activations and the workspace


# --------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------


def dtype_bytes(dtype: Union[str, torch.dtype, int], table: Mapping[str, int] = WEIGHT_DTYPE_BYTES,
                what: str = "weight dtype") -> int:
    """Bytes per element of a dtype given by name (``bf16``, ``fp8_e4m3fn``, ...), as a torch dtype, or as its size."""
    if isinstance(dtype, int) and not isinstance(dtype, bool):
        if dtype not in set(table.values()):
            raise ModAdapterError(f"a {what} of {dtype} bytes per element is not one of {sorted(set(table.values()))}")
        return dtype
    if isinstance(dtype, torch.dtype):
        name = str(dtype).replace("torch.", "")
    else:
        name = str(dtype).lower()
    if name not in table:
        raise ModAdapterError(f"unknown {what} {dtype!r}; use one of {', '.join(sorted(table))}")
    return table[name]


def _dtype_name(dtype: Union[str, torch.dtype, int]) -> str:
    if isinstance(dtype, int) and not isinstance(dtype, bool):
        return f"{dtype}-byte"
    return str(dtype).replace("torch.", "") if isinstance(dtype, torch.dtype) else str(dtype)


def double_block_parameters(hidden: int, head_dim: int = FLUX1_HEAD_DIM) -> int:
    """diffusers FluxTransformerBlock: two modulation layers, the joint attention of both streams, two MLPs."""
    modulation = 2 * (hidden * 6 * hidden + 6 * hidden)
    attention = 8 * (hidden * hidden + hidden) + 4 * head_dim  # q, k, v, out per stream; q/k RMSNorm scales
    mlp = 2 * (hidden * MLP_RATIO * hidden + MLP_RATIO * hidden + MLP_RATIO * hidden * hidden + hidden)
    return modulation + attention + mlp


def single_block_parameters(hidden: int, head_dim: int = FLUX1_HEAD_DIM) -> int:
    """diffusers FluxSingleTransformerBlock: modulation, q/k/v, the MLP input and the joint output projection."""
    modulation = hidden * 3 * hidden + 3 * hidden
    attention = 3 * (hidden * hidden + hidden) + 2 * head_dim
    mlp_in = hidden * MLP_RATIO * hidden + MLP_RATIO * hidden
    out = (1 + MLP_RATIO) * hidden * hidden + hidden
    return modulation + attention + mlp_in + out


def outside_blocks_parameters(hidden: int, in_channels: int = 64, context_dim: int = 4096, pooled_dim: int = 768,
                              guidance_embeds: bool = True) -> int:
    """Embedders of the image, the T5 context, the timestep, guidance and pooled CLIP; final norm and projection."""
    def mlp(inputs: int) -> int:
        return inputs * hidden + hidden + hidden * hidden + hidden

    embedders = mlp(256) * (2 if guidance_embeds else 1) + mlp(pooled_dim)
    return (embedders + context_dim * hidden + hidden + in_channels * hidden + hidden
            + hidden * 2 * hidden + 2 * hidden + hidden * in_channels + in_channels)


def flux_parameter_count(layout: Optional[FluxLayout] = None, *, head_dim: int = FLUX1_HEAD_DIM, in_channels: int = 64,
                         context_dim: int = 4096, pooled_dim: int = 768, guidance_embeds: bool = True) -> int:
    """Parameters of a FLUX.1 transformer (11,901,408,320 for FLUX.1-dev; schnell has no guidance embedder)."""
    layout = layout or FLUX1_LAYOUT
    hidden = layout.hidden_size
    return (layout.num_double_blocks * double_block_parameters(hidden, head_dim)
            + layout.num_single_blocks * single_block_parameters(hidden, head_dim)
            + outside_blocks_parameters(hidden, in_channels, context_dim, pooled_dim, guidance_embeds))


def image_tokens_for(resolution: int) -> int:
    """FLUX.1 image tokens of a square image: 8× VAE downsampling, then 2×2 patches."""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 16 or resolution % 16:
        raise ModAdapterError(f"The resolution must be a multiple of 16 (at least 16), got {resolution!r}")
    return (resolution // 16) ** 2


# --------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------


def _block_passes(kind: str, image_tokens: int, text_tokens: int, hidden: int, concepts: int):
    """(forward, backward) FLOPs of one block; see :func:`block_flops`."""
    if kind not in ("double", "single"):
        raise ValueError(f"kind must be 'double' or 'single', got {kind!r}")
    tokens = image_tokens + text_tokens
    linear = 2 * 12 * hidden * hidden * tokens
    rows = 1 + concepts
    if kind == "double":  # image stream: one per-sample row (no gradient); text stream: the concept host's rows
        modulation_forward = 2 * hidden * 6 * hidden * (1 + rows)
        modulation_backward = 2 * hidden * 6 * hidden * rows
    else:
        modulation_forward = modulation_backward = 2 * hidden * 3 * hidden * rows
    return (linear + 4 * tokens * tokens * hidden + modulation_forward,
            linear + 10 * tokens * tokens * hidden + modulation_backward)


def block_flops(kind: str, image_tokens: int, text_tokens: int, hidden: int, *, gradient_checkpointing: bool,
                concepts: int = 1, batch_size: int = 1) -> float:
    """Floating-point operations of one block in one learning step: forward, backward to its inputs and Δ
    (no weight gradients: the model is frozen) and, with checkpointing, the forward again.

    Both kinds apply 12·hidden² multiply-adds per token (double: q, k, v, out and a 4× MLP per stream;
    single: q, k, v, the 4× MLP input and the 5·hidden → hidden output); attention is 2 products of
    tokens² · hidden forward and 5 backward (flash attention recomputes the scores), as torch's
    FlopCounterMode counts them. The modulation layers act on 1 + concepts rows only (the concept host).
    """
    forward, backward = _block_passes(kind, image_tokens, text_tokens, hidden, concepts)
    return float(batch_size * (forward + backward + (forward if gradient_checkpointing else 0)))


def _model_flops(image: int, text_tokens: int, layout: FluxLayout, concepts: int, in_channels: int, context_dim: int,
                 *, gradient_checkpointing: bool, backward: bool) -> float:
    hidden = layout.hidden_size
    blocks = 0.0
    for kind, count in (("double", layout.num_double_blocks), ("single", layout.num_single_blocks)):
        if backward:
            blocks += count * block_flops(kind, image, text_tokens, hidden,
                                          gradient_checkpointing=gradient_checkpointing, concepts=concepts)
        else:
            blocks += count * _block_passes(kind, image, text_tokens, hidden, concepts)[0]
    embed = 2 * in_channels * hidden * image + 2 * context_dim * hidden * text_tokens  # no backward: inputs are fixed
    head = (2 if backward else 1) * 2 * hidden * in_channels * image  # final projection (and backward to its input)
    return blocks + embed + head


def learn_step_flops(resolution: int, *, gradient_checkpointing: bool = True, layout: Optional[FluxLayout] = None,
                     text_tokens: int = FLUX1_TEXT_TOKENS, concepts: int = 1, batch_size: int = 1,
                     isolation_probability: float = 0.0, in_channels: int = 64, context_dim: int = 4096) -> float:
    """FLOPs of one learning step of the whole transformer (the blocks, the embedders, the final projection),
    averaged over the steps: on ``isolation_probability`` of them (TokenVerse's concept-isolation loss) the
    concept image sits beside an isolation image (twice the image tokens) and the model also runs once
    without Δ and without gradients."""
    layout = layout or FLUX1_LAYOUT
    image = image_tokens_for(resolution)
    args = (text_tokens, layout, concepts, in_channels, context_dim)
    plain = _model_flops(image, *args, gradient_checkpointing=gradient_checkpointing, backward=True)
    composed = (_model_flops(2 * image, *args, gradient_checkpointing=gradient_checkpointing, backward=True)
                + _model_flops(2 * image, *args, gradient_checkpointing=False, backward=False))
    return float(batch_size * ((1 - isolation_probability) * plain + isolation_probability * composed))


# --------------------------------------------------------------------------
# The estimate
# --------------------------------------------------------------------------


@dataclass
class LearnMemoryEstimate:
    """Peak device memory of a Learn Concept run (bytes), its parts, and the compute of one step.

    ``total_bytes`` = weights + activations + Δ/Adam + workspace. ``host_bytes``: CPU RAM the
    offloaded weights occupy (0 without offloading). ``options`` holds the arguments it was made from,
    so :func:`check_learn_fits` can re-estimate with one of them changed.
    """

    resolution: int
    image_tokens: int
    text_tokens: int
    weight_dtype: str
    compute_dtype: str
    gradient_checkpointing: bool
    offload_weights: bool
    weight_bytes: int
    host_bytes: int
    activation_bytes: int
    delta_bytes: int
    workspace_bytes: int
    block_peak_bytes: int  # the part of the workspace for the block running: its measured peak, the gradient arriving
    weight_copy_bytes: int  # the part of the workspace that is per-layer weight copies kept for the backward
    isolation: bool  # image_tokens are those of the concept image beside an isolation image
    flops_per_step: float  # the average step's
    options: Dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes + self.delta_bytes + self.workspace_bytes

    def describe(self) -> str:
        def gb(n: int) -> str:
            return f"{n / GIB:.1f} GiB"

        side = f"{2 * self.resolution}×{self.resolution} (beside an isolation image)" if self.isolation else \
            f"{self.resolution}×{self.resolution}"
        setting = (f"{side}, {self.weight_dtype} weights"
                   f"{' offloaded to CPU RAM' if self.offload_weights else ''}, gradient checkpointing "
                   f"{'on' if self.gradient_checkpointing else 'off'}")
        return (f"{gb(self.total_bytes)} at {setting} (weights {gb(self.weight_bytes)}, activations "
                f"{gb(self.activation_bytes)}, workspace {gb(self.workspace_bytes)})")

    def with_options(self, **changes) -> "LearnMemoryEstimate":
        """The same estimate with some of :func:`estimate_learn_peak`'s arguments changed."""
        return estimate_learn_peak(**{**self.options, **changes})


def estimate_learn_peak(
    resolution: int = 512,
    weight_dtype: Union[str, torch.dtype, int] = "bf16",
    compute_dtype: Union[str, torch.dtype, int] = "bf16",
    gradient_checkpointing: bool = True,
    offload_weights: bool = False,
    *,
    layout: Optional[FluxLayout] = None,
    text_tokens: int = FLUX1_TEXT_TOKENS,
    head_dim: int = FLUX1_HEAD_DIM,
    concepts: int = 1,
    batch_size: int = 1,
    weights_copied: bool = False,
    isolation: bool = False,
    isolation_probability: float = 0.5,
    parameters: Optional[int] = None,
    constants: Optional[BlockActivations] = None,
) -> LearnMemoryEstimate:
    """Peak device memory of Learn Concept on a FLUX.1 transformer (FLUX.1-dev's layout by default).

    resolution: the square training image side in pixels (image tokens = (resolution/16)²).
    weight_dtype: how the weights are stored on the device (``bf16``, ``fp16``, ``fp32``,
        ``fp8_e4m3fn``, ``fp8_e5m2``, a torch dtype, or the bytes per weight: 4, 2, 1); compute_dtype: the
        dtype the blocks compute in (activations; fp8 weights are cast to it layer by layer).
    offload_weights: the weights stay in CPU RAM and reach the device a block at a time (ComfyUI's
        low-VRAM loading); the device then holds the parts outside the blocks and two blocks.
    layout: the model's blocks and width (a :class:`FluxLayout`, e.g. from ``FluxLayout.from_comfy_model``);
        text_tokens: the T5 sequence length; head_dim: attention head size (norm scales only).
    concepts: words learned at once (Δ tables); batch_size: samples per step (LearnConfig.batch_size).
    weights_copied: the host copies every weight for each forward and autograd keeps the copies until
        the backward. ComfyUI's learning host does (modules/comfy_learn_host.py,
        make_weights_autograd_safe); the diffusers host (the CLI) does not. Weights stored in another
        dtype than ``compute_dtype`` are always cast, i.e. copied.
    isolation: the run has isolation images (TokenVerse's concept-isolation loss: LearnConfig's isolation
        partners). On ``isolation_probability`` of the steps the concept image sits beside an isolation
        image, twice the image tokens: the memory is that of those steps, the FLOPs the average step's.
    parameters: the model's parameter count, when known (default: counted from the layout).
    constants: per-token activation bytes (default: :data:`FLUX1_BLOCK_ACTIVATIONS`, measured).
    """
    options = dict(resolution=resolution, weight_dtype=weight_dtype, compute_dtype=compute_dtype,
                   gradient_checkpointing=gradient_checkpointing, offload_weights=offload_weights, layout=layout,
                   text_tokens=text_tokens, head_dim=head_dim, concepts=concepts, batch_size=batch_size,
                   weights_copied=weights_copied, isolation=isolation, isolation_probability=isolation_probability,
                   parameters=parameters, constants=constants)
    layout = layout or FLUX1_LAYOUT
    constants = constants or FLUX1_BLOCK_ACTIVATIONS
    # The largest step decides the peak: with isolation images, the concept image beside one (width × 2).
    image = image_tokens_for(resolution) * (2 if isolation else 1)
    if text_tokens < 1 or concepts < 1 or batch_size < 1:
        raise ModAdapterError("text_tokens, concepts and batch_size must be positive")
    if not 0.0 <= isolation_probability <= 1.0:
        raise ModAdapterError(f"isolation_probability must be between 0 and 1, got {isolation_probability!r}")
    tokens = image + text_tokens
    hidden = layout.hidden_size
    weight_size = dtype_bytes(weight_dtype)
    compute_size = dtype_bytes(compute_dtype, COMPUTE_DTYPE_BYTES, "compute dtype")
    # The constants were measured at width constants.width in a 2-byte dtype; activations are tokens × width tensors.
    scale = (hidden / constants.width) * (compute_size / 2) * batch_size

    # Weights.
    double_params = double_block_parameters(hidden, head_dim)
    single_params = single_block_parameters(hidden, head_dim)
    block_params = layout.num_double_blocks * double_params + layout.num_single_blocks * single_params
    total_params = parameters if parameters is not None else flux_parameter_count(layout, head_dim=head_dim)
    largest_block = max(double_params if layout.num_double_blocks else 0, single_params if layout.num_single_blocks else 0)
    if offload_weights:
        # Outside the blocks stays; of the blocks, the one computing and the one being copied in.
        device_params = max(total_params - block_params, 0) + min(2, layout.num_blocks) * largest_block
        weight_bytes, host_bytes = device_params * weight_size, total_params * weight_size
    else:
        weight_bytes, host_bytes = total_params * weight_size, 0

    # Activations kept from the forward for the backward.
    head = constants.head_saved_per_image_token * image * scale
    if gradient_checkpointing:
        kept_per_block = tokens * hidden * compute_size * batch_size  # each block's input streams (text + image)
        activations = layout.num_blocks * kept_per_block + head
    else:
        activations = (layout.num_double_blocks * constants.saved("double", image, text_tokens) * scale
                       + layout.num_single_blocks * constants.saved("single", image, text_tokens) * scale + head)

    # Δ (global direction + per-block offsets), their gradients and Adam's two moments, float32; plus the
    # per-step sum and the copy the modulation plan stacks.
    delta_elements = concepts * (layout.num_blocks + 1) * hidden
    delta_bytes = delta_elements * 4 * 4 + 2 * concepts * layout.num_blocks * hidden * 4

    # Workspace: the gradient arriving at the block being backpropagated (the measured peaks sit above it), and
    # that block's peak: its transients on top of its saved tensors, or with checkpointing its rebuilt activations too.
    kinds = [k for k, n in (("double", layout.num_double_blocks), ("single", layout.num_single_blocks)) if n]
    if gradient_checkpointing:
        block_peak = max(constants.peak(k, tokens, checkpointed=True) for k in kinds)
    else:
        block_peak = max(max(constants.peak(k, tokens) - constants.saved(k, image, text_tokens), 0.0) for k in kinds)
    transient = block_peak * scale + tokens * hidden * compute_size * batch_size
    copies = weights_copied or weight_size != compute_size
    if not copies:
        copy_bytes = 0
    elif gradient_checkpointing:
        copy_bytes = largest_block * compute_size  # the block being rebuilt and backpropagated
    else:
        copy_bytes = block_params * compute_size  # every layer's copy is saved by its matmul until the backward
    allowance = ALLOWANCE_BYTES + ALLOWANCE_FRACTION * (activations + transient + copy_bytes)
    workspace = transient + copy_bytes + allowance

    return LearnMemoryEstimate(
        resolution=resolution, image_tokens=image, text_tokens=text_tokens, weight_dtype=_dtype_name(weight_dtype),
        compute_dtype=_dtype_name(compute_dtype), gradient_checkpointing=gradient_checkpointing,
        offload_weights=offload_weights, weight_bytes=int(weight_bytes), host_bytes=int(host_bytes),
        activation_bytes=int(activations), delta_bytes=int(delta_bytes), workspace_bytes=int(workspace),
        block_peak_bytes=int(transient), weight_copy_bytes=int(copy_bytes),
        isolation=isolation,
        flops_per_step=learn_step_flops(resolution, gradient_checkpointing=gradient_checkpointing, layout=layout,
                                        text_tokens=text_tokens, concepts=concepts, batch_size=batch_size,
                                        isolation_probability=isolation_probability if isolation else 0.0),
        options=options)


def estimate_learn_seconds(estimate: LearnMemoryEstimate, *, peak_tflops: float, utilisation: float = 0.4,
                           steps: int = 1400, offload_gb_per_s: float = 25.0) -> float:
    """Seconds for ``steps`` learning steps at ``utilisation`` × ``peak_tflops`` (dense bf16), an estimate.

    With offloading, every step also copies the weights to the device twice (forward; rebuild + backward),
    at ``offload_gb_per_s`` (PCIe 4.0 ×16 moves about 25 GB/s), not overlapped with compute.
    """
    if peak_tflops <= 0 or not 0 < utilisation <= 1:
        raise ValueError("peak_tflops must be positive and utilisation in (0, 1]")
    per_step = estimate.flops_per_step / (peak_tflops * 1e12 * utilisation)
    if estimate.offload_weights:
        per_step += 2 * estimate.host_bytes / (offload_gb_per_s * 1e9)
    return per_step * steps


# --------------------------------------------------------------------------
# The refusal
# --------------------------------------------------------------------------

FP8_WEIGHTS = "fp8_e4m3fn"
OFFLOAD_HINT = "offload the weights to CPU RAM"  # a host that can offload passes its own instructions


def _remedies(estimate: LearnMemoryEstimate, resolutions: Sequence[int], can_offload: bool, offload_hint: str):
    """Groups of (what to tell the user, the changed arguments) in the order the message prefers them; the first
    candidate of a group that fits stands for the group (the largest resolution that fits, say)."""
    ckpt = {} if estimate.gradient_checkpointing else {"gradient_checkpointing": True}
    also = "" if estimate.gradient_checkpointing else "turn on gradient_checkpointing and "
    if ckpt:
        yield [("turn on gradient_checkpointing", ckpt)]
    lower = sorted((r for r in resolutions if r < estimate.resolution), reverse=True)
    if lower:
        yield [(f"{also}lower the resolution to {r}", dict(ckpt, resolution=r)) for r in lower]
    fp8_helps = dtype_bytes(estimate.weight_dtype) > 1
    if fp8_helps:
        yield [(f"{also}load the model with weight_dtype {FP8_WEIGHTS}", dict(ckpt, weight_dtype=FP8_WEIGHTS))]
    if can_offload and not estimate.offload_weights:
        yield [(f"{also}{offload_hint}", dict(ckpt, offload_weights=True))]
        if fp8_helps:
            yield [(f"{also}load the model with weight_dtype {FP8_WEIGHTS} and offload its weights too",
                    dict(ckpt, weight_dtype=FP8_WEIGHTS, offload_weights=True))]


def check_learn_fits(estimate: LearnMemoryEstimate, available_bytes: int, *,
                     resolutions: Sequence[int] = (1024, 896, 768, 640, 512),
                     device_name: str = "the GPU", can_offload: bool = False,
                     offload_hint: str = OFFLOAD_HINT) -> LearnMemoryEstimate:
    """Return ``estimate`` when it fits in ``available_bytes``; otherwise raise :class:`ModAdapterError` naming
    the first of these that would fit, each checked with :func:`estimate_learn_peak`: turn on gradient
    checkpointing; lower the resolution to the largest of ``resolutions`` below the requested one that fits
    (checkpointing on); load the weights as fp8_e4m3fn; with ``can_offload``, offload the weights to CPU RAM,
    then fp8 and offloading.
    The other remedies that fit follow in the same message; when none does, it says what the smallest
    setting would need.

    available_bytes: device memory the run may use in all, the model's weights included: free memory
        plus what the model already occupies on the device (e.g. ``torch.cuda.mem_get_info()[0]`` plus
        the loaded model's bytes there).
    resolutions: the resolutions a refusal may propose (never below 512 by default: TokenVerse learns at 512).
    can_offload: whether the host can keep the weights in CPU RAM and stream them in (the ComfyUI node can, with
        its offload_weights; the diffusers CLI cannot); offload_hint: how the message tells the user to do it.
    """
    if estimate.total_bytes <= available_bytes:
        return estimate
    needed = (f"Learn Concept needs about {estimate.describe()}, but {device_name} has "
              f"{available_bytes / GIB:.1f} GiB available.")
    fits = []
    for group in _remedies(estimate, resolutions, can_offload, offload_hint):
        for what, changes in group:
            if fits and changes.get("weight_dtype") and changes.get("offload_weights"):
                break  # fp8 and offloading together: only worth naming when nothing before it fits
            candidate = estimate.with_options(**changes)
            if candidate.total_bytes <= available_bytes:
                fits.append((what, candidate))
                break
    if fits:
        (first, candidate), others = fits[0], fits[1:]
        message = f"{needed} To make it fit, {first}: it then needs about {candidate.total_bytes / GIB:.1f} GiB."
        if others:
            message += " Other settings that also fit: " + "; ".join(what for what, _ in others) + "."
        raise ModAdapterError(message)
    smallest = estimate.with_options(
        gradient_checkpointing=True, offload_weights=can_offload or estimate.offload_weights,
        resolution=min([estimate.resolution, *resolutions]),
        weight_dtype=FP8_WEIGHTS if dtype_bytes(estimate.weight_dtype) > 1 else estimate.weight_dtype)
    offloaded = " offloaded to CPU RAM" if smallest.offload_weights else ""
    raise ModAdapterError(
        f"{needed} Even with gradient checkpointing, {smallest.weight_dtype} weights{offloaded} and a "
        f"{smallest.resolution}×{smallest.resolution} image it would need about {smallest.total_bytes / GIB:.1f} GiB: "
        f"free memory on {device_name} (close other programs, unload other models) or use a larger GPU.")


__all__ = [
    "BlockActivations", "FLUX1_BLOCK_ACTIVATIONS", "FLUX1_LAYOUT", "LearnMemoryEstimate", "block_flops",
    "check_learn_fits", "estimate_learn_peak", "estimate_learn_seconds", "flux_parameter_count", "learn_step_flops",
]
