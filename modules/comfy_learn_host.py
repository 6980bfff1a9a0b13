"""ComfyUI host of concept learning: a :class:`~.learn_concept.Denoiser` over a ComfyUI FLUX.1 MODEL.

The learning loop hands new Δ tensors (with gradients) to every `velocity`
call. Re-patching a model per step would clone it 1400 times, so this host
patches one clone once with a :class:`LiveTokenModulationPatch` whose concepts
are swapped before each forward; the modulation engine reads them when it
plans the forward, and gradients flow back to Δ through the block's own
modulation layers.

Every block runs through ComfyUI's dit block-replacement slots on our private
clone (blocks another pack already replaces are left alone), with its in-place
stream updates made on copies, optionally under activation checkpointing. The recompute during
backward runs inside a copy of the forward's context, so the engine sees the
same forward state it saw the first time.

Like the sampling host, this file duck-types ComfyUI's ModelPatcher and never
imports ComfyUI; loading the model on its device is the caller's job
(`comfy.model_management.load_models_gpu`).
"""

from __future__ import annotations

import contextvars
import copy
from typing import Iterable, List, Optional, Sequence

import torch
import torch.utils.checkpoint

from .comfy_flux_host import DIFFUSION_MODEL_WRAPPER, FluxTokenModulationPatch, PromptConcepts, install_patch
from .errors import ModAdapterError
from .flux_layout import FluxLayout, comfy_text_modulation_keys
from .token_modulation import TokenConcept


class _ModulationVectorRead(Exception):
    """Ends a forward once the modulation vector has been read (nothing after it is needed)."""


class LiveTokenModulationPatch(FluxTokenModulationPatch):
    """A token-modulation patch whose concepts are replaced between forwards (learning only)."""

    def __init__(self) -> None:
        super().__init__(())

    def set_concepts(self, concepts: Sequence[TokenConcept]) -> None:
        self.prompts = (PromptConcepts(tuple(concepts)),)


def _fresh_copy(weight):
    """A weight wrapper that changes no value: its presence makes ComfyUI's cast ops copy the weight for
    each forward, and a copy made outside inference mode can take part in autograd. Detached, because
    ComfyUI 0.3.x loads weights with requires_grad=True: the copy would carry each weight's gradient back
    (the memory of a second model, and an error on fp8 weights)."""
    return weight.detach()


def make_weights_autograd_safe(patched) -> None:
    """ComfyUI loads models inside torch.inference_mode(), and such tensors cannot be saved for backward.

    On the clone only: layers built from comfy.ops get a no-op weight wrapper (ComfyUI's LoRA trainer
    relies on the same copy), other inference parameters (RMSNorm scales) are object-patched with copies.
    """
    diffusion_model = patched.get_model_object("diffusion_model")
    for module_name, module in diffusion_model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            key = f"diffusion_model.{module_name}.{param_name}" if module_name else f"diffusion_model.{param_name}"
            # The original, not what another loaded clone may have patched in right now.
            original = patched.get_model_object(key)
            if not original.is_inference():
                continue
            if hasattr(module, "weight_function") and param_name in ("weight", "bias"):
                patched.add_weight_wrapper(key, _fresh_copy)
            else:
                patched.add_object_patch(key, torch.nn.Parameter(original.detach().clone(), requires_grad=False))


def _storage_address(tensor: torch.Tensor):
    """Where a tensor's data lives; None for tensors without a plain storage (quantized weight subclasses)."""
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return None


class CopyOnWriteStreams(torch.overrides.TorchFunctionMode):
    """Inside it, an in-place op on a block's stream tensors writes to a copy and returns the copy.

    ComfyUI's FLUX blocks update their streams in place (`txt += ...`, `x += ...`,
    and since 0.3.7x `img += ...`) after a norm layer saved the same tensor for
    backward: autograd refuses that, and activation checkpointing would recompute
    from the already-updated tensor. The blocks update streams only through
    augmented assignments, which rebind the name to what the op returns, so the
    block code runs unchanged on copies; in-place ops on other tensors (an
    attention mask added to scores, RoPE) are left as they are.
    """

    def __init__(self, *streams: torch.Tensor):
        super().__init__()
        self._storages = {_storage_address(t) for t in streams} - {None}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if (name.endswith("_") and not name.endswith("__") and args and isinstance(args[0], torch.Tensor)
                and _storage_address(args[0]) in self._storages):
            copy = args[0].clone()
            self._storages.add(copy.untyped_storage().data_ptr())  # the copy is a stream too: `img +=` comes twice
            func(copy, *args[1:], **kwargs)
            return copy
        return func(*args, **kwargs)


class AutogradBlock:
    """A dit block replacement that makes a block safe to backpropagate through, optionally checkpointed.

    It calls the block module itself rather than `extra["original_block"]`: ComfyUI's
    `block_wrap` closes over the loop variable, so a recompute deferred to the backward pass
    would run whichever block the loop ended on.
    """

    def __init__(self, block: torch.nn.Module, double: bool, checkpoint: bool):
        self.block = block
        self.double = double
        self.checkpoint = checkpoint

    def __deepcopy__(self, memo):  # ModelPatcher.clone deep-copies model_options: never copy the block
        return self

    def _run(self, args):
        with CopyOnWriteStreams(*(args[k] for k in ("img", "txt") if k in args)):
            if self.double:
                img, txt = self.block(img=args["img"], txt=args["txt"], vec=args["vec"], pe=args["pe"],
                                      attn_mask=args.get("attn_mask"), transformer_options=args.get("transformer_options"))
                return {"img": img, "txt": txt}
            return {"img": self.block(args["img"], vec=args["vec"], pe=args["pe"], attn_mask=args.get("attn_mask"),
                                      transformer_options=args.get("transformer_options"))}

    def __call__(self, args, extra):
        if not (self.checkpoint and torch.is_grad_enabled()):
            return self._run(args)
        context = contextvars.copy_context()  # the engine's per-forward state, for the recompute in backward
        return torch.utils.checkpoint.checkpoint(lambda a: context.run(self._run, a), args, use_reentrant=False)


class ComfyFluxDenoiser:
    """Predicts FLUX's velocity for a fixed caption, with concepts applied through the engine.

    context: (1, L, C) T5 conditioning of the caption; pooled: (1, 768) CLIP-L
    pooled embedding; guidance: FLUX-dev's distilled guidance (ignored by
    models without a guidance embedding).
    """

    def __init__(self, model_patcher, context: torch.Tensor, pooled: torch.Tensor, guidance: Optional[float] = 3.5,
                 *, gradient_checkpointing: bool = True):
        layout = FluxLayout.from_comfy_model(model_patcher)
        self.layout = layout
        self.patch = LiveTokenModulationPatch()
        self.model_patcher = model_patcher.clone()
        install_patch(self.model_patcher, layout, self.patch)
        make_weights_autograd_safe(self.model_patcher)
        taken = self.model_patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
        diffusion_model = self.model_patcher.get_model_object("diffusion_model")
        for kind, blocks in (("double_block", diffusion_model.double_blocks),
                             ("single_block", diffusion_model.single_blocks)):
            for i, block in enumerate(blocks):
                if (kind, i) not in taken:
                    self.model_patcher.set_model_patch_replace(
                        AutogradBlock(block, kind == "double_block", gradient_checkpointing), "dit", kind, i)
        self.context = context
        self.pooled = pooled
        self.guidance = guidance

    def with_caption(self, context: torch.Tensor, pooled: torch.Tensor) -> "ComfyFluxDenoiser":
        """The same patched clone on another caption (an isolation partner's composed caption): nothing is cloned
        or loaded again."""
        other = copy.copy(self)
        other.context, other.pooled = context, pooled
        return other

    @property
    def device(self) -> torch.device:
        return torch.device(self.model_patcher.load_device)

    @property
    def compute_dtype(self) -> torch.dtype:
        base = self.model_patcher.model
        return getattr(base, "manual_cast_dtype", None) or base.get_dtype()

    def model_parameters(self) -> Iterable[torch.Tensor]:
        # Inference tensors included: ComfyUI 0.3.x loads them with requires_grad=True, and the copies its cast
        # ops make for the weight wrappers would then carry every weight's gradient (and fail on fp8 weights).
        return list(self.model_patcher.model.diffusion_model.parameters())

    def velocity(self, noisy_latents: torch.Tensor, sigma: torch.Tensor, deltas: Sequence[torch.Tensor],
                 token_positions: Sequence[Sequence[int]]) -> torch.Tensor:
        if len(deltas) != len(token_positions):
            raise ModAdapterError(f"{len(deltas)} Δ tables for {len(token_positions)} concept words")
        self.patch.set_concepts([TokenConcept(delta=d, positions=list(p), name=f"concept {i}")
                                 for i, (d, p) in enumerate(zip(deltas, token_positions))])
        return self._forward(noisy_latents, sigma).float()

    @torch.no_grad()
    def modulation_vector(self, noisy_latents: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``vec`` as the first block's text modulation receives it, read in a forward that stops there (only the
        input embedders run): ComfyUI builds ``vec`` inside FLUX's forward, which the pack never copies."""
        self.patch.set_concepts([])
        key = comfy_text_modulation_keys(self.layout)[0].split(".", 1)[1]
        first_modulation = self.model_patcher.model.diffusion_model.get_submodule(key)
        seen: List[torch.Tensor] = []

        def stop_at_first_modulation(module, args):
            seen.append(args[0].detach().clone())
            raise _ModulationVectorRead()

        handle = first_modulation.register_forward_pre_hook(stop_at_first_modulation)
        try:
            self._forward(noisy_latents, sigma)
        except _ModulationVectorRead:
            pass
        finally:
            handle.remove()
        if not seen:
            raise ModAdapterError(
                f"Learn Concept could not read this model's modulation vector: its first block's text modulation "
                f"({key}) never ran (another pack replaces that block?). Give Learn Concept an explicit learning rate.")
        return seen[0].float()

    def _forward(self, noisy_latents: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        diffusion_model = self.model_patcher.model.diffusion_model
        dtype, device = self.compute_dtype, self.device
        batch = noisy_latents.shape[0]
        options = dict(self.model_patcher.model_options.get("transformer_options", {}))
        options["wrappers"] = {DIFFUSION_MODEL_WRAPPER: {k: list(v) for k, v in
                                                         self.model_patcher.wrappers.get(DIFFUSION_MODEL_WRAPPER, {}).items()}}
        options["cond_or_uncond"] = [0]
        options["sigmas"] = sigma.to(device)
        extra = {}
        if getattr(diffusion_model.params, "guidance_embed", False) and self.guidance is not None:
            extra["guidance"] = torch.full((batch,), float(self.guidance), device=device, dtype=dtype)
        # ModelSamplingFlux: the transformer's timestep is σ itself and its input is not rescaled.
        return diffusion_model(
            noisy_latents.to(device, dtype),
            sigma.to(device, dtype),
            context=self.context.to(device, dtype).expand(batch, -1, -1),
            y=self.pooled.to(device, dtype).expand(batch, -1),
            transformer_options=options,
            **extra,
        )
