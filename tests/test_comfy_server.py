"""The pack inside a real ComfyUI server (COMFYUI_PATH), driven over HTTP like the frontend drives it.

One server is started for the module: `main.py --cpu` with a throw-away base
directory whose custom_nodes/ holds a copy of this repository under an odd
folder name and tests/comfy_test_pack (loaders of tiny random models, built
by a copy of tests/tiny_comfy.py). The example workflows are converted to API
prompts the way the frontend converts them (test_workflows.ui_to_api), their
model loaders swapped for the tiny ones, queued with POST /prompt and followed
on /history. Skipped, with the reason, when COMFYUI_PATH is not set.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from comfy_server import concept_png, copy_pack, running_comfyui
from test_workflows import (MULTI_CONCEPT, PACK_NODE_IDS, SAVED_CONCEPTS, SINGLE_CONCEPT, WORKFLOWS_DIR, load_workflow,
                            ui_to_api)

PACK_FOLDER = "Mod Adapter-pack"  # spaces and a dash: ComfyUI must cope with any folder name
TEST_PACK = Path(__file__).resolve().parent / "comfy_test_pack"
ADAPTER = "tiny_adapter.safetensors"
LEARN_FLUX = "Learn a concept from one photo - FLUX.1.json"
TINY_LOADERS = {  # ComfyUI's loader -> the test pack's loader of a tiny model with the same output type
    "UNETLoader": "TinyFluxModelLoader",
    "DualCLIPLoader": "TinyFluxClipLoader",
    "CLIPVisionLoader": "TinyClipVisionLoader",
    "VAELoader": "TinyVAELoader",
}


@pytest.fixture(scope="module")
def server(comfyui, tmp_path_factory):
    import tiny_comfy

    base = tmp_path_factory.mktemp("comfy_base")
    custom_nodes = base / "custom_nodes"
    copy_pack(custom_nodes / PACK_FOLDER)
    shutil.copytree(TEST_PACK, custom_nodes / "comfy_test_pack", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(Path(tiny_comfy.__file__), custom_nodes / "comfy_test_pack" / "tiny_comfy.py")
    (base / "models" / "mod_adapter").mkdir(parents=True)
    tiny_comfy.tiny_adapter_checkpoint(str(base / "models" / "mod_adapter" / ADAPTER))
    (base / "input").mkdir()
    concept_png(base / "input" / "concept.png", 0)  # the FLUX.1 templates' own images the pack copies in
    with running_comfyui(base) as instance:
        yield instance


def read_png(path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB")).copy()


def tiny_workflow(name, *, seed=7, steps=2, size=64, prefix="test", image="concept.png") -> dict:
    """An example workflow with tiny models, a small image, few steps and a fixed seed."""
    workflow = copy.deepcopy(load_workflow(WORKFLOWS_DIR / name))
    for node in workflow["nodes"]:
        kind = node["type"]
        if kind in TINY_LOADERS:
            node["type"], node["widgets_values"] = TINY_LOADERS[kind], []
        elif kind == "LoadImage":
            node["widgets_values"][0] = image if image else node["widgets_values"][0]
        elif kind == "ModAdapterLoader":
            node["widgets_values"] = [ADAPTER]
        elif kind == "EmptySD3LatentImage":
            node["widgets_values"] = [size, size, 1]
        elif kind == "KSampler":
            node["widgets_values"][:3] = [seed, "fixed", steps]
        elif kind == "SaveImage":
            node["widgets_values"] = [prefix]
        elif kind == "ModAdapterLearnConcept":  # a few steps at the tiny models' 64²
            node["widgets_values"][2:4] = [4, 2]
            node["widgets_values"][6] = size
    return workflow


def node_of(workflow, kind) -> dict:
    (node,) = [n for n in workflow["nodes"] if n["type"] == kind]
    return node


def plain_flux_prompt(text, *, seed=7, steps=2, size=64, prefix="plain") -> dict:
    """A plain FLUX text-to-image graph, written out by hand: no Mod-Adapter node at all."""
    return {
        "model": {"class_type": "TinyFluxModelLoader", "inputs": {}},
        "clip": {"class_type": "TinyFluxClipLoader", "inputs": {}},
        "vae": {"class_type": "TinyVAELoader", "inputs": {}},
        "text": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["clip", 0]}},
        "guidance": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["text", 0], "guidance": 3.5}},
        "negative": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["text", 0]}},
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": ["model", 0], "seed": seed, "steps": steps, "cfg": 1.0, "sampler_name": "euler",
            "scheduler": "simple", "positive": ["guidance", 0], "negative": ["negative", 0],
            "latent_image": ["latent", 0], "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["vae", 0]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": prefix}},
    }


def saved_image(server, prompt, entry) -> np.ndarray:
    (save_id,) = [i for i, n in prompt.items() if n["class_type"] == "SaveImage"]
    (path,) = server.image_files(entry, save_id)
    assert path.is_file(), path
    return read_png(path)


# --- the tests --------------------------------------------------------------------------------

def test_object_info_lists_the_pack_beside_comfyui_core_nodes(server):
    info = server.object_info
    assert {"KSampler", "CLIPTextEncode", "UNETLoader", "CLIPVisionLoader"} <= set(info)
    assert set(TINY_LOADERS.values()) <= set(info)
    assert PACK_NODE_IDS <= set(info), sorted(PACK_NODE_IDS - set(info))
    from_pack = {name for name, node in info.items() if node.get("python_module") == f"custom_nodes.{PACK_FOLDER}"}
    assert PACK_NODE_IDS <= from_pack  # loaded from the oddly named folder
    for node_id in from_pack:
        node = info[node_id]
        assert node_id.startswith("ModAdapter"), node_id
        assert node["category"] == "mod_adapter" or node["category"].startswith("mod_adapter/"), node_id
        assert node["display_name"].startswith("Mod-Adapter") and node["description"], node_id

    loader = info["ModAdapterLoader"]
    # models/mod_adapter is listed, and the toy world's adapter that ships with the pack
    assert loader["input"]["required"]["adapter_name"][1]["options"] == [ADAPTER, "toy_world_adapter.safetensors"]
    assert loader["output"] == ["MOD_ADAPTER"]
    encoder = info["ModAdapterConceptEncoder"]
    required = encoder["input"]["required"]
    assert [required[k][0] for k in ("image", "word", "clip_vision", "clip", "crop")] == [
        "IMAGE", "STRING", "CLIP_VISION", "CLIP", "COMBO"]
    assert required["crop"][1]["options"] == ["center", "none"]
    assert encoder["input"]["optional"]["mask"][0] == "MASK"
    assert encoder["output"] == ["CONCEPT_EMBEDS", "IMAGE"] and encoder["output_name"][1] == "encoder_view"
    predictor = info["ModAdapterPredictor"]
    assert predictor["input_order"] == {"required": ["mod_adapter", "model", "concept_embeds", "strength"],
                                        "optional": ["concepts"]}
    assert predictor["input"]["optional"]["concepts"][0] == "CONCEPTS" and predictor["output"] == ["CONCEPTS"]
    for apply_id in ("ModAdapterModulationApply", "ModAdapterModulationApplyAdvanced"):
        apply = info[apply_id]
        assert apply["output"] == ["MODEL", "CONDITIONING"]
        assert apply["input"]["required"]["text"][1]["multiline"] is True
        assert apply["input"]["optional"]["conditioning"][0] == "CONDITIONING"
    advanced = info["ModAdapterModulationApplyAdvanced"]["input"]["required"]
    assert advanced["start_percent"][1]["min"] == 0.0 and advanced["end_percent"][1]["max"] == 1.0
    assert advanced["occurrence"][0] == "INT"
    assert info["ModAdapterSaveConcept"]["output_node"] is True
    learn = info["ModAdapterLearnConcept"]["input"]["required"]
    assert learn["seed"][1]["control_after_generate"] is False  # the frontend would re-seed on every Run
    assert learn["learning_rate"][1]["min"] <= 1e-6 and learn["learning_rate"][1]["round"] <= 1e-6
    assert info["ModAdapterLoadConcept"]["input"]["required"]["concept_name"][0] == "COMBO"


def test_single_concept_workflow_runs_end_to_end(server):
    workflow = tiny_workflow(SINGLE_CONCEPT, prefix="single/concept")
    prompt = ui_to_api(workflow, server.object_info)
    assert {n["class_type"] for n in prompt.values()} >= {"ModAdapterLoader", "ModAdapterConceptEncoder",
                                                          "ModAdapterPredictor", "ModAdapterModulationApply"}
    started = time.monotonic()
    entry = server.run(prompt)
    image = saved_image(server, prompt, entry)
    assert image.shape == (64, 64, 3) and image.std() > 0
    (preview_id,) = [i for i, n in prompt.items() if n["class_type"] == "PreviewImage"]
    (preview,) = server.image_files(entry, preview_id)
    assert read_png(preview).shape == (224, 224, 3)  # what the tiny CLIP vision model saw
    print(f"{SINGLE_CONCEPT} ran in {time.monotonic() - started:.1f} s")


def test_flux_learn_concept_workflow_runs_end_to_end(server):
    """The template an artist with FLUX.1 can run today: Learn Concept, then Modulation Apply and the sampler."""
    workflow = tiny_workflow(LEARN_FLUX, prefix="learn/concept")
    prompt = ui_to_api(workflow, server.object_info)
    entry = server.run(prompt)
    assert saved_image(server, prompt, entry).shape == (64, 64, 3)
    (curve_id,) = [i for i, n in prompt.items() if n["class_type"] == "PreviewImage"]
    (curve,) = server.image_files(entry, curve_id)
    assert read_png(curve).shape[1] == 900  # the loss curve
    learned = list((server.base / "models" / "mod_concepts").rglob("learned_cat_*.safetensors"))
    assert learned, "the template saves the learned concept for 'Reuse saved concepts'"
    for path in learned:  # the saved-concepts test below lists that folder
        path.unlink()


def test_bypassing_modulation_apply_gives_exactly_the_plain_flux_image(server):
    text = node_of(load_workflow(WORKFLOWS_DIR / SINGLE_CONCEPT), "ModAdapterModulationApply")[
        "widgets_values"][0]

    with_apply = tiny_workflow(SINGLE_CONCEPT, prefix="bypass/with_apply")
    node_of(with_apply, "ModAdapterPredictor")["widgets_values"] = [3.0]  # a random tiny model reacts weakly
    prompt_a = ui_to_api(with_apply, server.object_info)

    bypassed = tiny_workflow(SINGLE_CONCEPT, prefix="bypass/bypassed")
    apply = node_of(bypassed, "ModAdapterModulationApply")
    apply["mode"] = 4  # Ctrl+B in the frontend
    prompt_b = ui_to_api(bypassed, server.object_info)
    ids = {n["type"]: str(n["id"]) for n in bypassed["nodes"]}
    assert ids["ModAdapterModulationApply"] not in prompt_b
    assert prompt_b[ids["KSampler"]]["inputs"]["model"] == [ids["TinyFluxModelLoader"], 0]
    assert prompt_b[ids["FluxGuidance"]]["inputs"]["conditioning"] == [ids["CLIPTextEncode"], 0]

    prompt_c = plain_flux_prompt(text, prefix="bypass/plain")

    # plain first, bypassed last: a patch that leaked from (a) into the shared model would show in (b)
    c, a, b = (saved_image(server, p, server.run(p)) for p in (prompt_c, prompt_a, prompt_b))
    assert np.array_equal(b, c), f"bypassed Apply differs from plain FLUX by up to {np.abs(b.astype(int) - c).max()}"
    changed = int((a != c).sum())
    assert changed > 10, f"Modulation Apply changed only {changed} pixel values"
    print(f"Modulation Apply changed {changed} of {a.size} pixel values "
          f"(mean |diff| {np.abs(a.astype(int) - c).mean():.4f})")


def test_multi_concept_workflow_saves_the_files_that_saved_concepts_workflow_loads(server):
    multi = tiny_workflow(MULTI_CONCEPT, prefix="multi/concepts", image=None)
    assert sorted(n["widgets_values"][0] for n in multi["nodes"] if n["type"] == "LoadImage") == [
        "mod_adapter_example_cat.jpg", "mod_adapter_example_lighting.jpg", "mod_adapter_example_pose.jpg"]
    prompt = ui_to_api(multi, server.object_info)
    entry = server.run(prompt)
    concepts = server.base / "models" / "mod_concepts"
    assert sorted(os.listdir(concepts)) == ["my_concepts_cat_00001.safetensors",
                                            "my_concepts_lighting_00001.safetensors",
                                            "my_concepts_pose_00001.safetensors"]
    (save_id,) = [i for i, n in prompt.items() if n["class_type"] == "ModAdapterSaveConcept"]
    assert sorted(entry["outputs"][save_id]["text"]) == sorted(os.listdir(concepts))  # what the node shows

    status, info = server.request("/object_info/ModAdapterLoadConcept")
    assert status == 200
    options = info["ModAdapterLoadConcept"]["input"]["required"]["concept_name"][1]["options"]
    saved = tiny_workflow(SAVED_CONCEPTS, prefix="saved/concepts")
    names = [n["widgets_values"][0] for n in saved["nodes"] if n["type"] == "ModAdapterLoadConcept"]
    assert set(names) <= set(options), (names, options)
    prompt = ui_to_api(saved, server.object_info)
    image = saved_image(server, prompt, server.run(prompt))
    text = node_of(saved, "ModAdapterModulationApplyAdvanced")["widgets_values"][0]
    plain = plain_flux_prompt(text, prefix="saved/plain")
    assert not np.array_equal(image, saved_image(server, plain, server.run(plain)))


def test_missing_adapter_and_concept_files_are_refused_when_queued(server):
    single = tiny_workflow(SINGLE_CONCEPT)
    node_of(single, "ModAdapterLoader")["widgets_values"] = ["not_there.safetensors"]
    saved = tiny_workflow(SAVED_CONCEPTS)
    for node in saved["nodes"]:
        if node["type"] == "ModAdapterLoadConcept":
            node["widgets_values"][0] = "not_there_cat_00001.safetensors"
    for workflow, kind in ((single, "ModAdapterLoader"), (saved, "ModAdapterLoadConcept")):
        # 400 when nothing can run; 200 when other outputs (the encoder's preview) still can: either way the
        # node carries the error, which the frontend outlines in red before anything runs.
        status, answer = server.request("/prompt", {"prompt": ui_to_api(workflow, server.object_info)})
        assert status in (200, 400), answer
        errors = [e for node in answer["node_errors"].values() if node["class_type"] == kind for e in node["errors"]]
        assert errors and all("is not in models/mod_" in (e["message"] + e.get("details", "")) for e in errors), answer



def test_comfyui_still_checks_the_other_inputs_of_nodes_that_validate_their_files(server):
    """A node's validate_inputs must name only its file input: ComfyUI skips its own checks of the inputs
    validate_inputs takes (a **kwargs would switch them off for every input)."""
    saved = tiny_workflow(SAVED_CONCEPTS)
    for node in saved["nodes"]:
        if node["type"] == "ModAdapterLoadConcept":
            node["widgets_values"][1] = 99.0  # strength above its max
    status, answer = server.request("/prompt", {"prompt": ui_to_api(saved, server.object_info)})
    errors = [e for node in (answer.get("node_errors") or {}).values() if node["class_type"] == "ModAdapterLoadConcept"
              for e in node["errors"]]
    assert status == 400 and any(e["type"] == "value_bigger_than_max" for e in errors), answer
