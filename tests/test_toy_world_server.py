"""The toy world's example workflow in a real ComfyUI server (COMFYUI_PATH), queued as the frontend queues it.

The pack is copied into custom_nodes/ as a user installs it; its world/ holds an untrained world of the shipped
architecture and layout (written by the pack's own export), so the test checks the workflow's plumbing, not the
trained weights. The workflow runs as saved, except for fewer steps (Learn Concept and the samplers).
"""

from __future__ import annotations

import copy
import shutil
import time

import numpy as np
import pytest

from comfy_server import copy_pack, running_comfyui
from test_comfy_server import read_png
from test_workflows import WORKFLOWS_DIR, load_workflow, ui_to_api

TOY_WORLD_WORKFLOW = "toy_world_learn_concept.json"


@pytest.fixture(scope="module")
def server(comfyui, tmp_path_factory):
    from world_builders import random_world

    base = tmp_path_factory.mktemp("comfy_base")
    pack = base / "custom_nodes" / "ComfyUI-Mod-Adapter"
    copy_pack(pack)
    world = random_world(str(tmp_path_factory.mktemp("world")))
    for part in ("flux", "image_encoder"):
        shutil.rmtree(pack / "world" / part, ignore_errors=True)
        shutil.copytree(f"{world}/{part}", pack / "world" / part)
    (base / "input").mkdir()
    with running_comfyui(base) as instance:
        yield instance


def short_workflow(learn_steps=8, sample_steps=5) -> dict:
    workflow = copy.deepcopy(load_workflow(WORKFLOWS_DIR / TOY_WORLD_WORKFLOW))
    for node in workflow["nodes"]:
        if node["type"] == "ModAdapterLearnConcept":
            node["widgets_values"][2:4] = [learn_steps, learn_steps // 2]
        elif node["type"] == "KSampler":
            node["widgets_values"][2] = sample_steps
    return workflow


def test_the_toy_world_workflow_learns_a_concept_and_composes_it(server):
    prompt = ui_to_api(short_workflow(), server.object_info)
    started = time.monotonic()
    entry = server.run(prompt)
    saves = {n["inputs"]["filename_prefix"]: i for i, n in prompt.items() if n["class_type"] == "SaveImage"}
    learned = read_png(server.image_files(entry, saves["mod_adapter/toy_world_learned"])[0])
    bare = read_png(server.image_files(entry, saves["mod_adapter/toy_world_bare_word"])[0])
    assert learned.shape == bare.shape == (64, 64, 3)
    assert np.abs(learned.astype(int) - bare.astype(int)).max() > 0  # the learned surface changed the image
    print(f"{TOY_WORLD_WORKFLOW} ran in {time.monotonic() - started:.1f} s")
