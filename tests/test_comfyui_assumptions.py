"""What the pack assumes of ComfyUI's internals, one guard per assumption (docs/architecture.md, "What the pack
assumes of ComfyUI").

Each test checks one assumption directly against the ComfyUI at COMFYUI_PATH and fails with a message that
starts with the assumption's id (C1, C2, ...) and says what broke, so that a new ComfyUI version that breaks one
says which. The behaviour built on them is tested elsewhere (test_comfy_host.py, test_learn_node.py, ...); the
table in docs/architecture.md maps each id to both.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest
import torch

from tiny_flux import COMFY_TINY_BLOCKS, COMFY_TINY_WIDTH, comfy_conditioning, comfy_sample, tiny_comfy_flux

REPO = Path(__file__).resolve().parent.parent
ARCHITECTURE = REPO / "docs" / "architecture.md"

# id -> the test that guards it (the table in docs/architecture.md lists the same pairs)
GUARDS = {
    "C1": "test_c1_flux_blocks_have_per_block_text_modulation_layers",
    "C2": "test_c2_modulation_takes_rows_and_returns_modulation_outs",
    "C3": "test_c3_blocks_call_their_text_modulation_once_with_one_vec_row_per_prompt",
    "C4": "test_c4_per_token_modulation_survives_a_fused_adaln_prenorm",
    "C5": "test_c5_the_diffusion_model_wrapper_wraps_flux_forward_with_context_and_options",
    "C6": "test_c6_sampling_tells_the_forward_its_sigmas_and_cond_or_uncond",
    "C7": "test_c7_post_input_patches_see_the_final_text_and_image_tokens",
    "C8": "test_c8_dit_block_replacements_get_the_blocks_inputs_by_name",
    "C9": "test_c9_model_patcher_clones_share_object_patches_and_wrappers",
    "C10": "test_c10_object_patches_apply_on_load_and_keep_weight_keys_resolvable",
    "C11": "test_c11_the_training_switch_exists_where_kitchen_kernels_do",
    "C12": "test_c12_loader_and_conversion_functions_keep_their_parameters",
    "C13": "test_c13_comfy_api_latest_gives_the_v3_node_api",
}


def broken(assumption: str, what: str) -> str:
    return f"ComfyUI assumption {assumption} no longer holds (docs/architecture.md): {what}"


def parameters_of(function):
    return list(inspect.signature(function).parameters)


@pytest.fixture
def flux(comfyui):
    return tiny_comfy_flux()


@pytest.fixture(scope="module")
def observed(comfyui):
    """One sampling run (positive and negative batched) through recorders at every place the pack hooks in,
    on a model of its own (ComfyUI leaves a sampled model patched until it loads another)."""
    import comfy.patcher_extension

    seen = {"modulation_calls": [], "wrapper": [], "post_input": [], "dit": []}
    flux = tiny_comfy_flux()
    model = flux.clone()

    def wrapper(executor, *args, **kwargs):
        original = getattr(executor, "original", None)
        bound = inspect.signature(original).bind(*args, **kwargs)
        seen["wrapper"].append((original, dict(bound.arguments)))
        return executor(*args, **kwargs)

    def post_input(args):
        seen["post_input"].append({k: getattr(v, "shape", v) for k, v in args.items()})
        return args

    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "assumptions", wrapper)
    model.set_model_patch(post_input, "post_input")

    class Recorder(torch.nn.Module):
        def __init__(self, original, key):
            super().__init__()
            self.original, self.key = original, key

        def forward(self, vec, *args, **kwargs):
            seen["modulation_calls"].append((self.key, tuple(vec.shape)))
            return self.original(vec, *args, **kwargs)

    for i in range(2):
        key = f"diffusion_model.double_blocks.{i}.txt_mod"
        model.add_object_patch(key, Recorder(flux.get_model_object(key), key))
    for j in range(COMFY_TINY_BLOCKS - 2):
        key = f"diffusion_model.single_blocks.{j}.modulation"
        model.add_object_patch(key, Recorder(flux.get_model_object(key), key))

    def replacement(kind, index):
        def replace(args, extra):
            seen["dit"].append((kind, index, set(args), set(extra)))
            return extra["original_block"](args)
        return replace

    for i in range(2):
        model.set_model_patch_replace(replacement("double_block", i), "dit", "double_block", i)
    for j in range(COMFY_TINY_BLOCKS - 2):
        model.set_model_patch_replace(replacement("single_block", j), "dit", "single_block", j)

    with torch.no_grad():
        comfy_sample(model, comfy_conditioning(1), comfy_conditioning(2), cfg=2.0, steps=1)
    return seen


# ----------------------------------------------------------------------------- the FLUX model


def test_c1_flux_blocks_have_per_block_text_modulation_layers(flux):
    from comfy.ldm.flux.layers import Modulation

    diffusion_model = flux.get_model_object("diffusion_model")
    for name in ("double_blocks", "single_blocks"):
        assert isinstance(getattr(diffusion_model, name, None), torch.nn.ModuleList), broken(
            "C1", f"FLUX has no `{name}` ModuleList")
    for i in range(len(diffusion_model.double_blocks)):
        layer = flux.get_model_object(f"diffusion_model.double_blocks.{i}.txt_mod")
        assert isinstance(layer, Modulation), broken("C1", f"double_blocks.{i}.txt_mod is {type(layer).__name__}")
        assert layer.lin.in_features == COMFY_TINY_WIDTH, broken("C1", "txt_mod.lin does not take the model width")
    for j in range(len(diffusion_model.single_blocks)):
        layer = flux.get_model_object(f"diffusion_model.single_blocks.{j}.modulation")
        assert isinstance(layer, Modulation), broken("C1", f"single_blocks.{j}.modulation is {type(layer).__name__}")


@torch.no_grad()
def test_c2_modulation_takes_rows_and_returns_modulation_outs(flux):
    from comfy.ldm.flux.layers import ModulationOut

    assert dataclasses.is_dataclass(ModulationOut), broken("C2", "ModulationOut is not a dataclass")
    fields = [f.name for f in dataclasses.fields(ModulationOut)]
    assert fields == ["shift", "scale", "gate"], broken("C2", f"ModulationOut's fields are {fields}")
    rows = torch.randn(2, 3, COMFY_TINY_WIDTH)
    for key, double in (("diffusion_model.double_blocks.0.txt_mod", True),
                        ("diffusion_model.single_blocks.0.modulation", False)):
        out = flux.get_model_object(key)(rows)
        assert isinstance(out, tuple) and len(out) == 2, broken("C2", f"{key}(vec) does not return a pair")
        assert (out[1] is not None) == double, broken("C2", f"{key}: the second ModulationOut is wrong")
        for part in out[: 2 if double else 1]:
            assert isinstance(part, ModulationOut), broken("C2", f"{key} returns {type(part).__name__}")
            for name in fields:
                shape = tuple(getattr(part, name).shape)
                assert shape == (2, 3, COMFY_TINY_WIDTH), broken(
                    "C2", f"{key} maps (batch, rows, width) rows to {name} of shape {shape}, not one per row")


def test_c3_blocks_call_their_text_modulation_once_with_one_vec_row_per_prompt(observed):
    calls = observed["modulation_calls"]
    keys = {key for key, _ in calls}
    assert len(keys) == COMFY_TINY_BLOCKS, broken("C3", f"only {sorted(keys)} of the text modulation layers were called")
    per_forward = len(calls) // len(observed["wrapper"])
    assert per_forward == COMFY_TINY_BLOCKS, broken("C3", f"{per_forward} text modulation calls per forward, "
                                                          f"not one per block")
    shapes = {shape for _, shape in calls}
    assert all(len(s) == 2 and s[1] == COMFY_TINY_WIDTH for s in shapes), broken(
        "C3", f"the blocks pass their modulation layer vec of shapes {shapes}, not (batch, width)")


@torch.no_grad()
def test_c4_per_token_modulation_survives_a_fused_adaln_prenorm(flux, monkeypatch):
    """ComfyUI 0.36+ runs every pre-norm through `modulated_norm` → comfy_kitchen.adaln(x, scale, shift, eps),
    falling back to `apply_mod` only under `modulation_dims` or `in_training`. The pack's per-token scale/shift
    must reach that kernel. Emulated here on the trees we have: `apply_mod` with a shift goes through the same
    kernel (adaln of a normalised tensor is the normalised tensor modulated, up to eps), and the patched output
    must equal the one through the stock path."""
    ck = pytest.importorskip("comfy_kitchen", reason="comfy_kitchen (ComfyUI 0.3.7x and newer) is not installed")
    import comfy.ldm.flux.layers as layers
    import comfy.model_management as mm

    from mod_adapter.modules.comfy_flux_host import ComfyConcept, apply_concepts

    assert hasattr(ck, "adaln"), broken("C4", "comfy_kitchen has no adaln kernel")
    delta = torch.randn(COMFY_TINY_BLOCKS, COMFY_TINY_WIDTH, generator=torch.Generator().manual_seed(3)) * 0.5
    patched = apply_concepts(flux, [ComfyConcept(delta, positions=[2, 3], name="dog")])
    positive, negative = comfy_conditioning(1), comfy_conditioning(2)
    stock = comfy_sample(patched, positive, negative, cfg=2.0)

    stock_apply_mod, per_token_calls = layers.apply_mod, []

    def fused_prenorm(tensor, m_mult, m_add=None, modulation_dims=None):
        if m_add is None or modulation_dims is not None or getattr(mm, "in_training", False):
            return stock_apply_mod(tensor, m_mult, m_add, modulation_dims)
        if m_mult.ndim == 3 and m_mult.shape[1] > 1:
            per_token_calls.append(tuple(m_mult.shape))
        return ck.adaln(tensor, m_mult - 1, m_add, 1e-6)

    monkeypatch.setattr(layers, "apply_mod", fused_prenorm)
    fused = comfy_sample(patched, positive, negative, cfg=2.0)
    assert per_token_calls, broken("C4", "no per-token scale/shift reached the fused pre-norm")
    torch.testing.assert_close(fused, stock, rtol=2e-3, atol=2e-3, msg=lambda m: broken(
        "C4", f"the fused adaln pre-norm does not apply the per-token modulation: {m}"))
    plain = comfy_sample(flux, positive, negative, cfg=2.0)
    assert (fused - plain).abs().max() > 1e-2, broken("C4", "through the fused pre-norm the concept has no effect")


# ----------------------------------------------------------------------------- the forward and its options


def test_c5_the_diffusion_model_wrapper_wraps_flux_forward_with_context_and_options(observed):
    import comfy.patcher_extension
    from comfy.ldm.flux.model import Flux

    from mod_adapter.modules.comfy_flux_host import DIFFUSION_MODEL_WRAPPER

    assert comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL == DIFFUSION_MODEL_WRAPPER, broken(
        "C5", f"WrappersMP.DIFFUSION_MODEL is {comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL!r}")
    assert observed["wrapper"], broken("C5", "the DIFFUSION_MODEL wrapper was never called while sampling")
    original, arguments = observed["wrapper"][0]
    assert getattr(original, "__func__", original) is Flux._forward, broken(
        "C5", f"the wrapper's executor.original is {original!r}, not Flux._forward")
    for name in ("context", "transformer_options"):
        assert name in parameters_of(Flux._forward), broken("C5", f"Flux._forward has no `{name}` parameter")
    assert arguments["context"].ndim == 3, broken("C5", "context is not (batch, tokens, channels)")


def test_c6_sampling_tells_the_forward_its_sigmas_and_cond_or_uncond(observed):
    _, arguments = observed["wrapper"][0]
    options = arguments.get("transformer_options") or {}
    assert isinstance(options.get("sigmas"), torch.Tensor), broken("C6", "transformer_options has no `sigmas` tensor")
    cond_or_uncond = options.get("cond_or_uncond")
    assert cond_or_uncond and set(cond_or_uncond) <= {0, 1}, broken(
        "C6", f"transformer_options['cond_or_uncond'] is {cond_or_uncond!r}, not a list of 0 (positive) / 1")
    assert len(arguments["context"]) % len(cond_or_uncond) == 0, broken(
        "C6", "the batch is not cond_or_uncond's chunks of equal size")


def test_c7_post_input_patches_see_the_final_text_and_image_tokens(observed):
    assert observed["post_input"], broken("C7", "post_input patches were never called")
    first = observed["post_input"][0]
    for name in ("txt", "img"):
        assert name in first and len(first[name]) == 3, broken("C7", f"post_input's args have no (B, L, C) `{name}`")


def test_c8_dit_block_replacements_get_the_blocks_inputs_by_name(observed):
    kinds = {(kind, index) for kind, index, _, _ in observed["dit"]}
    assert len(kinds) == COMFY_TINY_BLOCKS, broken("C8", f"only {sorted(kinds)} dit replacements were called")
    for kind, index, args, extra in observed["dit"]:
        needed = {"img", "vec", "pe", "transformer_options"} | ({"txt"} if kind == "double_block" else set())
        assert needed <= args, broken("C8", f"({kind!r}, {index}) replacement got {sorted(args)}")
        assert "original_block" in extra, broken("C8", f"({kind!r}, {index}) replacement got no original_block")


# ----------------------------------------------------------------------------- ModelPatcher and model management


def test_c9_model_patcher_clones_share_object_patches_and_wrappers(flux):
    import comfy.model_patcher

    for name in ("clone", "get_model_object", "add_object_patch", "add_wrapper_with_key", "remove_wrappers_with_key",
                 "add_weight_wrapper", "set_model_patch_replace"):
        assert callable(getattr(flux, name, None)), broken("C9", f"ModelPatcher has no {name}()")
    init = parameters_of(comfy.model_patcher.ModelPatcher.__init__)
    assert init[1:2] == ["model"] and {"load_device", "offload_device"} <= set(init), broken(
        "C9", f"ModelPatcher.__init__ takes {init}")
    marker = object()
    base = flux.clone()
    base.add_object_patch("diffusion_model.double_blocks.0.txt_mod", torch.nn.Identity())
    base.add_wrapper_with_key("diffusion_model", "assumptions", marker)
    clone = base.clone()
    assert isinstance(clone.get_model_object("diffusion_model.double_blocks.0.txt_mod"), torch.nn.Identity), broken(
        "C9", "a clone does not carry its parent's object patches")
    assert isinstance(flux.get_model_object("diffusion_model.double_blocks.0.txt_mod"),
                      type(flux.model.diffusion_model.double_blocks[0].txt_mod)), broken(
        "C9", "an object patch on a clone reached the shared model")
    assert marker in clone.wrappers.get("diffusion_model", {}).get("assumptions", []), broken(
        "C9", "a clone does not carry its parent's wrappers")
    clone.remove_wrappers_with_key("diffusion_model", "assumptions")
    assert marker in base.wrappers["diffusion_model"]["assumptions"], broken(
        "C9", "removing a clone's wrappers removed its parent's")


@torch.no_grad()
def test_c10_object_patches_apply_on_load_and_keep_weight_keys_resolvable(flux):
    import comfy.model_management
    import comfy.utils

    key = "diffusion_model.double_blocks.0.txt_mod"
    original = flux.get_model_object(key)

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self._modules["lin"] = original.lin  # as PerTokenModulation re-registers the original's children

        def forward(self, vec):
            return original(vec)

    patched = flux.clone()
    holder = Holder()
    patched.add_object_patch(key, holder)
    comfy.model_management.load_models_gpu([patched])
    try:
        assert patched.model.diffusion_model.double_blocks[0].txt_mod is holder, broken(
            "C10", "loading the model did not set the object patch on the module tree")
        weight = comfy.utils.get_attr(patched.model, key + ".lin.weight")
        assert weight is original.lin.weight, broken("C10", f"{key}.lin.weight no longer resolves under the patch")
    finally:
        patched.unpatch_model()
        comfy.model_management.unload_all_models()
    assert flux.model.diffusion_model.double_blocks[0].txt_mod is original, broken(
        "C10", "unpatching did not restore the original module")


def test_c11_the_training_switch_exists_where_kitchen_kernels_do(comfyui):
    import comfy.ldm.flux.math as flux_math
    import comfy.model_management as mm

    source = inspect.getsource(flux_math)
    uses_kitchen = "comfy_kitchen" in source or re.search(r"\bck\.", source) is not None
    if uses_kitchen:
        assert hasattr(mm, "in_training"), broken(
            "C11", "FLUX's math runs comfy_kitchen kernels but model_management has no `in_training` switch")
        assert "in_training" in source, broken("C11", "FLUX's RoPE no longer falls back under `in_training`")
    else:
        assert not hasattr(mm, "in_training") or mm.in_training is False, broken(
            "C11", "in_training is on outside the learning loop")


def test_c12_loader_and_conversion_functions_keep_their_parameters(comfyui):
    import comfy.clip_vision
    import comfy.model_detection
    import comfy.model_management as mm
    import comfy.ops
    import comfy.utils

    expected = {
        comfy.ops.pick_operations: ["weight_dtype", "compute_dtype", "load_device"],
        comfy.model_detection.detect_unet_config: ["state_dict", "key_prefix"],
        comfy.model_detection.model_config_from_unet_config: ["unet_config"],
        comfy.model_detection.convert_diffusers_mmdit: ["state_dict", "output_prefix"],
        comfy.clip_vision.clip_preprocess: ["image", "size", "mean", "std", "crop"],
        comfy.clip_vision.convert_to_transformers: ["sd", "prefix"],
        comfy.utils.common_upscale: ["samples", "width", "height", "upscale_method", "crop"],
    }
    for function, names in expected.items():
        found = parameters_of(function)
        assert found[: len(names)] == names, broken("C12", f"{function.__module__}.{function.__name__} takes {found}")
    for name in ("load_models_gpu", "get_torch_device", "unet_offload_device", "intermediate_device",
                 "processing_interrupted", "throw_exception_if_processing_interrupted"):
        assert callable(getattr(mm, name, None)), broken("C12", f"comfy.model_management has no {name}()")
    assert callable(getattr(comfy.utils, "ProgressBar", None)), broken("C12", "comfy.utils has no ProgressBar")
    required = [p for p in list(inspect.signature(comfy.clip_vision.ClipVisionModel.__init__).parameters.values())[1:]
                if p.default is inspect.Parameter.empty]
    assert len(required) == 1, broken("C12", f"ClipVisionModel is no longer built from one config (file): {required}")


def test_c13_comfy_api_latest_gives_the_v3_node_api(comfyui):
    from comfy_api.latest import ComfyExtension, io

    for name in ("ComfyNode", "Schema", "NodeOutput", "Custom", "Model", "Clip", "ClipVision", "Image", "Mask",
                 "Conditioning", "Vae", "String", "Float", "Int", "Boolean", "Combo", "Hidden"):
        assert hasattr(io, name), broken("C13", f"comfy_api.latest.io has no {name}")
    assert inspect.iscoroutinefunction(ComfyExtension.get_node_list), broken(
        "C13", "ComfyExtension.get_node_list is no longer async")


# ----------------------------------------------------------------------------- the table and the guards agree


def test_every_assumption_has_its_guard_and_a_row_in_the_architecture_table():
    module = inspect.getmodule(test_every_assumption_has_its_guard_and_a_row_in_the_architecture_table)
    for assumption, test in GUARDS.items():
        assert callable(getattr(module, test, None)), f"{assumption}: no test named {test}"
    rows = re.findall(r"^\| (C\d+) \|.*?`(test_\w+)`", ARCHITECTURE.read_text(), re.M)
    assert dict(rows) == GUARDS, "docs/architecture.md's assumptions table and GUARDS differ"
