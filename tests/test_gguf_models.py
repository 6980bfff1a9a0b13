"""GGUF-quantized FLUX.1 (city96's ComfyUI-GGUF, COMFYUI_GGUF_PATH) with the pack's nodes, on tiny models.

The file is a real GGUF (Q8_0 matrices) loaded by ComfyUI-GGUF's own loader node; the reference is ComfyUI's
ordinary FLUX.1 holding the same weights, dequantized as ComfyUI-GGUF's layers dequantize them. Both tests run
on both ComfyUI versions.
"""

import torch

from comfyui_gguf import dequantized_state_dict, load_gguf_flux, write_gguf


def reference_model(unet_config, weights):
    """ComfyUI's own FLUX.1, float32, holding ``weights``."""
    import comfy.model_patcher

    from tiny_comfy import flux_model_holding

    with torch.inference_mode():
        model = flux_model_holding(unet_config, weights)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def gguf_and_reference(tmp_path, monkeypatch, model_patcher, sizes):
    """(the model written as GGUF and loaded by ComfyUI-GGUF, ComfyUI's FLUX.1 with the same dequantized weights)."""
    from mod_adapter.nodes.comfy_flux_config import flux_unet_config

    path = tmp_path / f"{tmp_path.name}.gguf"  # unique: ComfyUI finds a name in the first folder that has it
    write_gguf(model_patcher.model.diffusion_model.state_dict(), str(path))
    config = flux_unet_config(**sizes)
    quantized = load_gguf_flux(str(tmp_path), path.name, config, monkeypatch)
    matrices = [p for p in quantized.model.diffusion_model.parameters() if len(p.shape) == 2]
    # really ComfyUI-GGUF's quantized tensors (its loader keeps the file's quantization on each)
    assert {(type(p).__name__, getattr(p.tensor_type, "name", None)) for p in matrices} == {("GGMLTensor", "Q8_0")}
    return quantized, reference_model(config, dequantized_state_dict(quantized))


def test_concepts_act_on_a_gguf_model_as_on_its_dequantized_weights(comfyui, tmp_path, monkeypatch):
    from mod_adapter.modules.comfy_flux_host import ComfyConcept, apply_concepts

    from tiny_flux import COMFY_TINY_BLOCKS, COMFY_TINY_SIZES, COMFY_TINY_WIDTH, comfy_conditioning, comfy_sample, \
        tiny_comfy_flux

    quantized, reference = gguf_and_reference(tmp_path, monkeypatch, tiny_comfy_flux(), COMFY_TINY_SIZES)
    delta = torch.randn(COMFY_TINY_BLOCKS, COMFY_TINY_WIDTH, generator=torch.Generator().manual_seed(1)) * 0.5
    concepts = [ComfyConcept(delta=delta, positions=[2, 3], strength=1.0, name="dog")]
    cond = comfy_conditioning(0)
    images = {name: comfy_sample(apply_concepts(model, concepts), cond) for name, model in
              (("gguf", quantized), ("reference", reference))}
    bare = comfy_sample(quantized, cond)
    effect = (images["gguf"] - bare).abs().max()
    assert effect > 1e-3  # the concept acts on the quantized model
    torch.testing.assert_close(images["gguf"], images["reference"], rtol=1e-5, atol=1e-5)


def test_learns_on_a_gguf_model_as_on_its_dequantized_weights(comfyui, tmp_path, monkeypatch):
    """Learn Concept on ComfyUI-GGUF's quantized weights: the gradient reaches Δ through its dequantizing layers
    and the concept learned is the one learned on the same weights dequantized."""
    import mod_adapter.nodes as pack_nodes
    import tiny_comfy

    with torch.inference_mode():
        model, clip, vae = tiny_comfy.tiny_flux_model(), tiny_comfy.tiny_flux_clip(), tiny_comfy.tiny_vae()
    quantized, reference = gguf_and_reference(tmp_path, monkeypatch, model, tiny_comfy.FLUX_SIZES)
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    learned = []
    for flux in (quantized, reference):
        with torch.inference_mode():  # as ComfyUI's executor calls nodes
            concepts, _ = pack_nodes.ModAdapterLearnConcept.execute(
                flux, clip, vae, image, "a photo of a dog", "dog", 6, 3, 5e-2, 0, 64, 0.8, 0.8, True, False,
                "learned").result
        learned.append(concepts.items[0].delta)
    assert learned[0].abs().max() > 0
    torch.testing.assert_close(learned[0], learned[1], rtol=1e-5, atol=1e-7)
