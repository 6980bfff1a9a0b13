"""The engine beside a LoRA and a FLUX ControlNet (issue #27, items 1 and 5), in a real ComfyUI, on a tiny FLUX.1.

LoRA: a small random LoRA in kohya's key format, loaded by ComfyUI's own LoraLoaderModelOnly before or after the
concepts are applied, must give the image of the same LoRA merged into the weights by hand with the concepts on
top; and the concepts must keep acting when ComfyUI patches, unpatches and re-patches the LoRA weights between runs.

ControlNet: a tiny XLabs-style FLUX ControlNet, built from ComfyUI's own classes and applied by
ControlNetApplyAdvanced, must give the image of the independent NaiveReference (test_comfy_host.py) with the same
ControlNet: FLUX's forward adds the ControlNet residuals after each block, outside the block replacements the
reference is made of.

Every test also checks that the LoRA, the ControlNet and the concepts each change the image, so that it can fail.
"""

import pytest
import torch

from mod_adapter.modules.comfy_flux_host import ComfyConcept, apply_concepts

from test_comfy_host import NaiveReference, random_delta
from tiny_flux import comfy_conditioning, comfy_sample, tiny_comfy_flux

pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # several times faster for models this small


@pytest.fixture
def flux(comfyui):
    return tiny_comfy_flux()


def concepts():
    # Twice the usual Δ scale: the concepts' effect stays far above the tolerances beside a LoRA and a ControlNet
    # that change the image much more.
    return [ComfyConcept(random_delta(41, scale=2.0), positions=[2, 3], strength=1.1, name="dog"),
            ComfyConcept(random_delta(42, scale=2.0), positions=[7], strength=0.7, name="hat")]


# --- LoRA ------------------------------------------------------------------------------------------

# Layers the LoRA trains, as named in the FLUX.1 state dict: the text and image modulation of a double block and the
# modulation of a single block (the layers whose output the concepts change per token), attention and MLP layers
# of both block kinds, and the T5 input projection outside the blocks.
LORA_LAYERS = ("double_blocks.0.txt_mod.lin", "double_blocks.1.img_mod.lin", "single_blocks.0.modulation.lin",
               "double_blocks.0.img_attn.qkv", "double_blocks.1.txt_attn.proj", "double_blocks.0.txt_mlp.0",
               "single_blocks.2.linear1", "single_blocks.3.linear2", "txt_in")
LORA_RANK, LORA_ALPHA, LORA_STRENGTH = 4, 2.0, 0.8


def kohya_name(layer):
    """kohya/sd-scripts' name for a FLUX.1 layer, as most published FLUX.1 LoRAs store it."""
    return "lora_unet_" + layer.replace(".", "_")


def tiny_lora(flux):
    """A random rank-4 LoRA on LORA_LAYERS, in kohya's format (lora_up, lora_down, alpha)."""
    weights = flux.model.diffusion_model.state_dict()
    generator = torch.Generator().manual_seed(8)
    lora = {}
    for layer in LORA_LAYERS:
        out_features, in_features = weights[f"{layer}.weight"].shape
        lora[f"{kohya_name(layer)}.lora_up.weight"] = torch.randn(out_features, LORA_RANK, generator=generator) * 0.1
        lora[f"{kohya_name(layer)}.lora_down.weight"] = torch.randn(LORA_RANK, in_features, generator=generator) * 0.1
        lora[f"{kohya_name(layer)}.alpha"] = torch.tensor(LORA_ALPHA)
    return lora


@pytest.fixture
def load_lora(flux, tmp_path, monkeypatch):
    """ComfyUI's LoraLoaderModelOnly node on the tiny LoRA, saved as a file in a `loras` folder of its own."""
    import folder_paths
    import nodes
    from safetensors.torch import save_file

    lora = tiny_lora(flux)
    save_file(lora, str(tmp_path / "tiny_lora.safetensors"))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(tmp_path)], {".safetensors"}))

    def load(model):
        (with_lora,) = nodes.LoraLoaderModelOnly().load_lora_model_only(model, "tiny_lora.safetensors", LORA_STRENGTH)
        # ComfyUI skips a LoRA key it cannot map with only a "NOT LOADED" log line: every layer must be patched.
        unmapped = {f"diffusion_model.{layer}.weight" for layer in LORA_LAYERS} - set(with_lora.patches)
        assert not unmapped, f"ComfyUI did not map these LoRA layers onto the model: {sorted(unmapped)}"
        return with_lora

    return load


def lora_merged_by_hand(lora):
    """The same tiny FLUX.1 (same seed) with W + strength · alpha/rank · (up @ down) written into its weights."""
    merged = tiny_comfy_flux()
    weights = merged.model.diffusion_model.state_dict()  # shares storage with the parameters
    for layer in LORA_LAYERS:
        up, down = lora[f"{kohya_name(layer)}.lora_up.weight"], lora[f"{kohya_name(layer)}.lora_down.weight"]
        weights[f"{layer}.weight"] += LORA_STRENGTH * LORA_ALPHA / LORA_RANK * (up @ down)
    return merged


def with_lora_and_concepts(flux, load_lora, order):
    if order == "lora_then_concepts":
        return apply_concepts(load_lora(flux), concepts())
    return load_lora(apply_concepts(flux, concepts()))


@torch.no_grad()
@pytest.mark.parametrize("order", ["lora_then_concepts", "concepts_then_lora"])
def test_lora_and_concepts_in_either_order_equal_the_lora_merged_by_hand_with_the_concepts(flux, load_lora, order):
    positive = comfy_conditioning(1)
    # Sampled first, so that the LoRA is loaded while a concepts MODEL is the one ComfyUI has patched in: the shared
    # model then holds the engine's modulation layers when ComfyUI maps the LoRA keys onto its state dict.
    concepts_only = comfy_sample(apply_concepts(flux, concepts()), positive)
    result = comfy_sample(with_lora_and_concepts(flux, load_lora, order), positive)

    expected = comfy_sample(apply_concepts(lora_merged_by_hand(tiny_lora(flux)), concepts()), positive)
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-4)
    lora_only = comfy_sample(load_lora(flux), positive)
    assert (result - lora_only).abs().max() > 1e-2  # the concepts act on the LoRA model
    assert (result - concepts_only).abs().max() > 1e-2  # and the LoRA acts beside the concepts


@torch.no_grad()
@pytest.mark.parametrize("order", ["lora_then_concepts", "concepts_then_lora"])
def test_concepts_keep_acting_when_comfyui_repatches_the_lora_weights(flux, load_lora, order):
    import comfy.model_management as mm

    positive = comfy_conditioning(1)
    plain_before = comfy_sample(flux, positive)
    lora_model = load_lora(flux)
    combined = with_lora_and_concepts(flux, load_lora, order)
    first = comfy_sample(combined, positive)
    # Each switch between MODELs that share the weights makes ComfyUI unpatch the LoRA (and the concepts' layers)
    # and patch the next MODEL's in: the combined MODEL must come back the same every time.
    runs = [comfy_sample(combined, positive)]  # again at once: ComfyUI keeps the patched weights
    lora_only = comfy_sample(lora_model, positive)
    runs.append(comfy_sample(combined, positive))
    plain = comfy_sample(flux, positive)
    runs.append(comfy_sample(combined, positive))
    mm.unload_all_models()  # the weights moved back to the offload device, unpatched, and loaded again
    runs.append(comfy_sample(combined, positive))
    for run in runs:
        torch.testing.assert_close(run, first, rtol=0, atol=0)
    assert (first - lora_only).abs().max() > 1e-2
    assert (lora_only - plain).abs().max() > 1e-2
    torch.testing.assert_close(plain, plain_before, rtol=0, atol=0)  # no LoRA or concept left behind on the base
    mm.unload_all_models()


# --- ControlNet ------------------------------------------------------------------------------------

def tiny_flux_controlnet(flux):
    """An XLabs-style FLUX ControlNet (hint image encoder, 2 double + 4 single blocks) of the tiny FLUX.1's sizes,
    with random weights, built as ComfyUI's XLabs loader (comfy.controlnet.load_controlnet_flux_xlabs_mistoline)
    builds one. The loader itself cannot be used: it detects the config from the state dict, and ComfyUI 0.3.64's
    detection hard-codes FLUX.1's full width (3072) instead of reading it."""
    import comfy.controlnet
    import comfy.ldm.flux.controlnet
    import comfy.ops

    config = {k: v for k, v in flux.model.model_config.unet_config.items() if k != "dtype"}
    operations = comfy.ops.pick_operations(torch.float32, None, disable_fast_fp8=True)
    control_model = comfy.ldm.flux.controlnet.ControlNetFlux(operations=operations, dtype=torch.float32, **config)
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():  # comfy's ops leave weights uninitialised
        for name, p in control_model.named_parameters():
            scale = 0.05 if p.ndim > 1 else 0.02
            if name.startswith("controlnet_"):  # the projections to the residuals, zero-initialised in training
                scale /= 10
            p.copy_(torch.randn(p.shape, generator=generator) * scale)
    cpu = torch.device("cpu")
    return comfy.controlnet.ControlNet(control_model, load_device=cpu, manual_cast_dtype=None,
                                      extra_conds=["y", "guidance"])


@torch.no_grad()
def test_controlnet_residuals_with_concepts_equal_the_naive_reference(flux):
    import nodes

    positive, negative = comfy_conditioning(1), comfy_conditioning(2)
    hint = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(10))  # an IMAGE: (B, H, W, C) in [0, 1]
    controlled = nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, tiny_flux_controlnet(flux), hint,
                                                                  1.0, 0.0, 1.0)

    # Positive and negative in one batch (cfg 2), both with the ControlNet. The reference is made of dit block
    # replacements; FLUX adds the residuals after each replaced block, so the reference gets them too.
    reference_model = flux.clone()
    NaiveReference(concepts()).install(reference_model, num_double=2)
    expected = comfy_sample(reference_model, *controlled, cfg=2.0)
    result = comfy_sample(apply_concepts(flux, concepts()), *controlled, cfg=2.0)
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-4)

    controlnet_only = comfy_sample(flux, *controlled, cfg=2.0)
    assert (result - controlnet_only).abs().max() > 1e-2  # the concepts act
    concepts_only = comfy_sample(apply_concepts(flux, concepts()), positive, negative, cfg=2.0)
    assert (result - concepts_only).abs().max() > 1e-2  # and so does the ControlNet, in the reference too
