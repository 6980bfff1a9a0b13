"""ComfyUI host of the per-token modulation engine (FLUX.1).

How it hooks in (docs/architecture.md says why):
- an object patch on every block's text modulation module
  (`double_blocks.i.txt_mod`, `single_blocks.j.modulation`) replaces it with
  :class:`PerTokenModulation`, which calls the original module on the distinct
  rows (base + one per concept) and hands every token its row's output. The
  block code itself (`DoubleStreamBlock.forward`, `SingleStreamBlock.forward`)
  is untouched, so the dit block-replacement slots stay free for other packs;
- a DIFFUSION_MODEL wrapper that, for each forward, records what the blocks
  cannot see: the timestep, which batch rows hold the positive prompt, and the
  final text length (a `post_input` patch of ours, appended last, measures it
  after other patches have prepended their tokens).

This file duck-types ComfyUI's ModelPatcher and never imports ComfyUI, so it
stays importable (and its logic testable) without it.
"""

from __future__ import annotations

import contextvars
import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .concept_regions import RegionalTokens, check_region_mask, combine_attention_masks, region_attention_bias, \
    region_tokens
from .errors import ModAdapterError
from .flux_layout import FluxLayout, comfy_text_modulation_keys
from .token_modulation import (
    ModulationPlan,
    TokenConcept,
    build_plan,
    modulation_rows,
    rows_to_tokens,
)

# comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
DIFFUSION_MODEL_WRAPPER = "diffusion_model"
WRAPPER_KEY = "mod_adapter.token_modulation"

# The parameters of FLUX's forward (comfy.ldm.flux.model.Flux._forward) that the wrapper reads or replaces.
_FORWARD_PARAMETERS = ("context", "transformer_options")

# Per forward pass: id(patch) -> _ForwardState. A context variable rather than
# an attribute, so that the patch object stays immutable and can be shared by
# every clone of the model.
_ACTIVE_FORWARDS: contextvars.ContextVar[Dict[int, "_ForwardState"]] = contextvars.ContextVar(
    "mod_adapter_active_forwards", default={}
)


@dataclass
class ComfyConcept:
    """A concept as the ComfyUI nodes hand it over: schedule in percent, like ComfyUI's own nodes."""

    delta: torch.Tensor
    positions: Sequence[int]
    strength: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    name: str = ""
    region: Optional[torch.Tensor] = None  # (H, W) MASK: the word attends to the image inside it only


class _TextLengthRecorder:
    """A post_input patch that only measures: appended after every other one,
    it sees the text and image tokens exactly as the blocks will."""

    def __init__(self, regions_over_tokens: Optional[int] = None) -> None:
        self.text_len: Optional[int] = None
        self.img_len: Optional[int] = None
        self.regions_over_tokens = regions_over_tokens  # the sequence length a region's attention bias was built for

    def __call__(self, args: Dict[str, Any]) -> Dict[str, Any]:
        self.text_len = int(args["txt"].shape[1])
        self.img_len = int(args["img"].shape[1])
        if self.regions_over_tokens is not None and self.text_len + self.img_len != self.regions_over_tokens:
            raise ModAdapterError(
                f"A concept region's attention mask covers {self.regions_over_tokens} tokens, but another patch "
                f"changed the sequence to {self.text_len + self.img_len} (it adds tokens before the blocks): "
                f"regions cannot be combined with it. Remove the Concept Region node or that patch.")
        return args


def _image_tokens_of_latents(x: Any, ref_latents: Any, patch_size: int) -> Optional[int]:
    """How many image tokens FLUX's `_forward` makes of the latent and the reference latents (Kontext) it appends:
    each latent padded to the patch size, one token per patch. Only the fallback when the post_input recorder did
    not run."""
    latents = [x] + (list(ref_latents) if isinstance(ref_latents, (list, tuple)) else [])
    if not all(isinstance(t, torch.Tensor) and t.ndim == 4 for t in latents):
        return None
    return sum(-(-t.shape[-2] // patch_size) * -(-t.shape[-1] // patch_size) for t in latents)


class _ForwardState:
    def __init__(self, concepts: List[TokenConcept], context_len: int, batch_size: int, sigma: Optional[float],
                 recorder: _TextLengthRecorder, latent_image_tokens: Optional[int] = None):
        self.concepts = concepts  # each with the batch rows of its prompt
        self.context_len = context_len
        self.latent_image_tokens = latent_image_tokens
        self.batch_size = batch_size
        self.sigma = sigma
        self.recorder = recorder
        self._plan: Optional[ModulationPlan] = None
        self._planned = False

    @property
    def text_len(self) -> int:
        return self.recorder.text_len if self.recorder.text_len is not None else self.context_len

    @property
    def img_len(self) -> Optional[int]:
        # Packs that replace FLUX's forward_orig with a copy (PuLID-style) may not run post_input patches: then
        # the image tokens are counted from the latents, as FLUX's _forward makes them.
        return self.recorder.img_len if self.recorder.img_len is not None else self.latent_image_tokens

    def plan(self, device: torch.device) -> Optional[ModulationPlan]:
        # Built on first use: only then has post_input told us the final text length.
        if not self._planned:
            self._plan = build_plan(
                self.concepts,
                batch_size=self.batch_size,
                text_len=self.text_len,
                text_offset=self.text_len - self.context_len,  # tokens prepended by post_input patches
                sigma=self.sigma,
                device=device,
            )
            self._planned = True
        return self._plan


@dataclass(frozen=True)
class PromptConcepts:
    """The concepts of one prompt, and the fingerprint that finds that prompt's rows in a batch (None: every
    positive row)."""

    concepts: Tuple[TokenConcept, ...]
    fingerprint: Optional[torch.Tensor] = None
    regions: Tuple[Optional[torch.Tensor], ...] = ()  # per concept, its region MASK or None (missing ones: None)

    def __post_init__(self) -> None:
        object.__setattr__(self, "regions", tuple(self.regions) + (None,) * (len(self.concepts) - len(self.regions)))

    def same_prompt(self, fingerprint: Optional[torch.Tensor]) -> bool:
        if self.fingerprint is None or fingerprint is None:
            return self.fingerprint is None and fingerprint is None
        return self.fingerprint.shape == fingerprint.shape and torch.allclose(self.fingerprint, fingerprint)


class FluxTokenModulationPatch:
    """The concepts of the Modulation Apply nodes a MODEL went through, as a DIFFUSION_MODEL wrapper.

    One :class:`PromptConcepts` per prompt: two prompts combined (ConditioningCombine), each with its own Modulation
    Apply, reach the sampler as one MODEL, and each prompt's rows get only that prompt's concepts.

    Immutable once built, and shared (not copied) by clones of the model:
    `ModelPatcher.clone` copies wrapper lists shallowly and object patches by
    reference, and `__deepcopy__` keeps any deep copy light as well.
    """

    def __init__(self, concepts: Sequence[TokenConcept], prompt_fingerprint: Optional[torch.Tensor] = None,
                 regions: Sequence[Optional[torch.Tensor]] = ()):
        # Mean over channels of each token of the prompt's conditioning: lets the
        # wrapper pick the batch rows that carry this prompt when ComfyUI batches
        # several positive conditionings together.
        fingerprint = None if prompt_fingerprint is None else prompt_fingerprint.detach().float().cpu()
        self.prompts: Tuple[PromptConcepts, ...] = (PromptConcepts(tuple(concepts), fingerprint, tuple(regions)),)

    def with_prompt(self, concepts: Sequence[TokenConcept], prompt_fingerprint: Optional[torch.Tensor],
                    regions: Sequence[Optional[torch.Tensor]] = ()):
        """A new patch: these concepts added to their prompt's (the same fingerprint), or as another prompt's."""
        added = FluxTokenModulationPatch(concepts, prompt_fingerprint, regions).prompts[0]
        prompts = list(self.prompts)
        for i, prompt in enumerate(prompts):
            if prompt.same_prompt(added.fingerprint):
                prompts[i] = PromptConcepts(prompt.concepts + added.concepts, prompt.fingerprint,
                                            prompt.regions + added.regions)
                break
        else:
            prompts.append(added)
        patch = FluxTokenModulationPatch(())
        patch.prompts = tuple(prompts)
        return patch

    @property
    def concepts(self) -> Tuple[TokenConcept, ...]:
        return tuple(c for prompt in self.prompts for c in prompt.concepts)

    def __deepcopy__(self, memo):
        return self

    def current(self) -> Optional[_ForwardState]:
        return _ACTIVE_FORWARDS.get().get(id(self))

    @staticmethod
    def _positive_rows(context: torch.Tensor, transformer_options: Dict[str, Any]) -> List[int]:
        batch = context.shape[0]
        cond_or_uncond = transformer_options.get("cond_or_uncond")
        if cond_or_uncond:
            chunk = batch // len(cond_or_uncond)
            return [c * chunk + r for c, kind in enumerate(cond_or_uncond) if kind == 0 for r in range(chunk)]
        return list(range(batch))

    @staticmethod
    def _rows_of_prompt(context: torch.Tensor, rows: List[int], fingerprint: Optional[torch.Tensor]) -> List[int]:
        if fingerprint is None or not rows:
            return rows
        length = min(fingerprint.shape[0], context.shape[1])
        seen = context[rows, :length].float().mean(dim=-1).cpu()
        match = torch.isclose(seen, fingerprint[:length][None], rtol=2e-2, atol=2e-3).all(dim=1)
        return [r for r, ok in zip(rows, match.tolist()) if ok]

    def forward_concepts(self, context: torch.Tensor, transformer_options: Dict[str, Any]
                         ) -> Tuple[List[TokenConcept], List[Optional[torch.Tensor]]]:
        """This forward's concepts, each restricted to the batch rows of its prompt (positive rows only), and
        their regions (None: the whole image)."""
        positive = self._positive_rows(context, transformer_options)
        concepts, regions = [], []
        for prompt in self.prompts:
            rows = self._rows_of_prompt(context, positive, prompt.fingerprint)
            for c, region in zip(prompt.concepts, prompt.regions):
                concepts.append(dataclasses.replace(c, batch_rows=rows if c.batch_rows is None else
                                                    sorted(set(rows).intersection(int(b) for b in c.batch_rows))))
                regions.append(region)
        return concepts, regions

    @staticmethod
    def region_bias(concepts: Sequence[TokenConcept], regions: Sequence[Optional[torch.Tensor]], sigma: Optional[float],
                    latent: Any, patch_size: int, text_len: int, image_len: Optional[int]) -> Optional[torch.Tensor]:
        """The attention bias of the regions of the concepts acting in this forward (None: no region acts)."""
        acting = [(c, r) for c, r in zip(concepts, regions)
                  if r is not None and c.batch_rows and (sigma is None or c.is_active(sigma))]
        if not acting:
            return None
        if not isinstance(latent, torch.Tensor) or latent.ndim != 4 or image_len is None:
            raise ModAdapterError("A concept region needs FLUX's latent image (batch, channels, height, width) to "
                                  f"place its mask, got {getattr(latent, 'shape', type(latent).__name__)}")
        grid = (-(-latent.shape[-2] // patch_size), -(-latent.shape[-1] // patch_size))
        tokens = [RegionalTokens(c.positions, c.batch_rows, region_tokens(r, *grid)) for c, r in acting]
        return region_attention_bias(tokens, latent.shape[0], text_len, image_len, dtype=latent.dtype,
                                     device=latent.device)

    def __call__(self, executor, *args, **kwargs):
        bound = _bind_forward_arguments(executor, args, kwargs)
        context = bound.arguments["context"]
        transformer_options = bound.arguments.get("transformer_options") or {}
        if not isinstance(context, torch.Tensor) or context.ndim != 3:
            raise ModAdapterError(
                f"Mod-Adapter expected FLUX's text conditioning as a (batch, tokens, channels) tensor, got "
                f"{getattr(context, 'shape', type(context).__name__)}: its concepts cannot be placed on the prompt's "
                f"tokens. Is this MODEL run by a wrapper that replaces FLUX.1's text input?"
            )

        sigmas = transformer_options.get("sigmas")
        sigma = float(sigmas.max()) if isinstance(sigmas, torch.Tensor) and sigmas.numel() else None
        patch_size = getattr(getattr(executor, "class_obj", None), "patch_size", 2)
        patch_size = patch_size if isinstance(patch_size, int) else 2
        latent = bound.arguments.get("x")
        latent_image_tokens = _image_tokens_of_latents(latent, bound.arguments.get("ref_latents"), patch_size)
        concepts, regions = self.forward_concepts(context, transformer_options)
        bias = self.region_bias(concepts, regions, sigma, latent, patch_size, context.shape[1], latent_image_tokens)
        if bias is not None:  # FLUX's _forward hands `attention_mask` to every block as attn_mask
            extra = dict(bound.arguments.get("kwargs") or {})
            extra["attention_mask"] = combine_attention_masks(extra.get("attention_mask"), bias)
            bound.arguments["kwargs"] = extra
        recorder = _TextLengthRecorder(None if bias is None else bias.shape[-1])
        options = dict(transformer_options)
        patches = dict(options.get("patches", {}))
        patches["post_input"] = list(patches.get("post_input", [])) + [recorder]
        options["patches"] = patches
        bound.arguments["transformer_options"] = options

        state = _ForwardState(concepts, context.shape[1], context.shape[0], sigma, recorder, latent_image_tokens)
        token = _ACTIVE_FORWARDS.set({**_ACTIVE_FORWARDS.get(), id(self): state})
        try:
            return executor(*bound.args, **bound.kwargs)
        finally:
            _ACTIVE_FORWARDS.reset(token)


def _bind_forward_arguments(executor, args, kwargs) -> inspect.BoundArguments:
    """The arguments of FLUX's forward by name, checked against its real signature.

    A DIFFUSION_MODEL wrapper receives `Flux._forward`'s arguments as the caller
    passed them, positionally or by keyword; ComfyUI adds parameters over time
    (all accepted through **kwargs), so nothing here depends on their order.
    """
    forward = getattr(executor, "original", None)
    name = getattr(forward, "__qualname__", type(forward).__name__)
    try:
        signature = inspect.signature(forward)
    except (TypeError, ValueError) as e:
        raise ModAdapterError(f"Mod-Adapter cannot read the signature of this FLUX forward ({name}): {e}") from e
    missing = [p for p in _FORWARD_PARAMETERS if p not in signature.parameters]
    if missing:
        raise ModAdapterError(
            f"This ComfyUI's FLUX forward ({name}{signature}) has no {' or '.join(missing)} parameter, so "
            f"Mod-Adapter cannot find the prompt's tokens. This ComfyUI version is not supported yet: update the pack."
        )
    try:
        return signature.bind(*args, **kwargs)
    except TypeError as e:
        raise ModAdapterError(f"FLUX's forward ({name}) was called with arguments its signature does not accept: {e}") from e


class PerTokenModulation(torch.nn.Module):
    """Stands in for a block's text modulation module (ComfyUI's `Modulation`).

    The original module is called, never re-implemented, so quantized (GGUF,
    fp8) and cast layers work as they do in the stock model. Its children are
    re-registered under their own names (`lin`) so that weight keys such as
    `double_blocks.0.txt_mod.lin.weight` still resolve while the patch is in
    place (ComfyUI applies LoRA weight patches after object patches).
    """

    def __init__(self, original: torch.nn.Module, patch: FluxTokenModulationPatch, block_index: int, single_stream: bool):
        super().__init__()
        object.__setattr__(self, "original", original)  # not a child: keeps state-dict names unchanged
        for name, child in original.named_children():
            self._modules[name] = child  # not add_module: __getattr__ below already finds it on the original
        self.patch = patch
        self.block_index = block_index
        self.single_stream = single_stream

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "original"), name)

    def forward(self, vec, *args, **kwargs):
        state = self.patch.current()
        if state is None:
            raise ModAdapterError(
                "Mod-Adapter's modulation patch ran outside its FLUX forward wrapper, so its concepts cannot be "
                "applied. Something calls FLUX.1's blocks without ComfyUI's DIFFUSION_MODEL wrappers (a model "
                "wrapper from another pack?): run this MODEL without it, or apply the concepts to a plain FLUX.1 MODEL."
            )
        plan = state.plan(vec.device if isinstance(vec, torch.Tensor) else None)
        if plan is None:  # no concept acts in this forward (only negative rows, or outside its schedule)
            return self.original(vec, *args, **kwargs)
        if not isinstance(vec, torch.Tensor) or vec.ndim != 2 or vec.shape[0] != state.batch_size:
            found = tuple(vec.shape) if isinstance(vec, torch.Tensor) else type(vec).__name__
            raise ModAdapterError(
                f"Mod-Adapter cannot apply its concepts in this forward: block {self.block_index} was given a "
                f"modulation vector of shape {found}, but FLUX.1 gives one (batch, width) row per prompt "
                f"(batch {state.batch_size}). FLUX.1 Kontext with the 'index_timestep_zero' reference method stacks "
                f"two timesteps into it, which ComfyUI's FLUX.1 blocks do not support either: use the 'offset' or "
                f"'index' method."
            )
        trailing = 0
        if self.single_stream:
            if state.img_len is None:
                raise ModAdapterError(
                    "Mod-Adapter could not count the image tokens of this FLUX forward: ComfyUI's post_input patches "
                    "did not run (another pack replaces FLUX's forward_orig?) and the latent was not a 4-D tensor. "
                    "Run this MODEL without that pack's node, or apply the concepts to a plain FLUX.1 MODEL.")
            trailing = state.img_len
        outputs = self.original(modulation_rows(vec, plan, self.block_index), *args, **kwargs)
        return tuple(_spread_to_tokens(out, plan, trailing) for out in outputs)


def _spread_to_tokens(out, plan: ModulationPlan, trailing: int):
    if out is None:
        return None
    if isinstance(out, torch.Tensor):
        return rows_to_tokens(out, plan, trailing)
    # ComfyUI's ModulationOut(shift, scale, gate): a dataclass of (B, rows, D)
    # tensors. Spread them together, one index_select and one allocation, and
    # hand the block views of it, as ComfyUI's own chunk() does.
    names = [f.name for f in dataclasses.fields(out)]
    parts = [getattr(out, name) for name in names]
    if any(not isinstance(p, torch.Tensor) for p in parts) or len({p.shape for p in parts}) != 1:
        return dataclasses.replace(out, **{n: _spread_to_tokens(p, plan, trailing) for n, p in zip(names, parts)})
    spread = rows_to_tokens(torch.cat(parts, dim=-1), plan, trailing).chunk(len(parts), dim=-1)
    return dataclasses.replace(out, **dict(zip(names, spread)))


def apply_concepts(model_patcher, concepts: Sequence[ComfyConcept], prompt_fingerprint: Optional[torch.Tensor] = None):
    """Return a clone of `model_patcher` whose concept tokens use `vec + s·Δ_i`.

    The input MODEL is not changed. Applying again to an already patched clone
    adds the new concepts to the ones there (one patch): to the same prompt's,
    or, for another prompt (another fingerprint), on that prompt's rows only.
    """
    layout = FluxLayout.from_comfy_model(model_patcher)
    model_sampling = model_patcher.get_model_object("model_sampling")
    token_concepts = [
        TokenConcept(
            delta=c.delta.detach(),
            positions=list(c.positions),
            strength=float(c.strength),
            sigma_start=float(model_sampling.percent_to_sigma(c.start_percent)),
            sigma_end=float(model_sampling.percent_to_sigma(c.end_percent)),
            name=c.name,
        )
        for c in concepts
    ]
    for concept in token_concepts:
        layout.check_delta(concept.delta.shape, concept.name)
    regions = [None if c.region is None else check_region_mask(c.region, c.name) for c in concepts]

    patched = model_patcher.clone()
    first = patched.get_model_object(comfy_text_modulation_keys(layout)[0])
    previous = first.patch if isinstance(first, PerTokenModulation) else None
    if previous is None:
        patch = FluxTokenModulationPatch(token_concepts, prompt_fingerprint, regions)
    else:  # one patch for every Modulation Apply the MODEL went through, each prompt's concepts on its own rows
        patch = previous.with_prompt(token_concepts, prompt_fingerprint, regions)
    install_patch(patched, layout, patch)
    return patched


def install_patch(patched, layout: FluxLayout, patch: FluxTokenModulationPatch) -> None:
    """Put `patch` on every text modulation module of the clone `patched` (replacing ours if there)."""
    for block_index, key in enumerate(comfy_text_modulation_keys(layout)):
        original = patched.get_model_object(key)
        if isinstance(original, PerTokenModulation):
            original = original.original
        patched.add_object_patch(
            key, PerTokenModulation(original, patch, block_index, single_stream=block_index >= layout.num_double_blocks)
        )
    patched.remove_wrappers_with_key(DIFFUSION_MODEL_WRAPPER, WRAPPER_KEY)
    patched.add_wrapper_with_key(DIFFUSION_MODEL_WRAPPER, WRAPPER_KEY, patch)


def prompt_fingerprint(conditioning_tensor: torch.Tensor) -> torch.Tensor:
    """Per-token channel mean of a prompt's conditioning (1, L, C) -> (L,)."""
    if conditioning_tensor.ndim != 3 or conditioning_tensor.shape[0] != 1:
        raise ModAdapterError(f"Expected one prompt's conditioning (1, tokens, channels), got {tuple(conditioning_tensor.shape)}")
    return conditioning_tensor[0].float().mean(dim=-1).cpu()
