"""The example workflows in workflows/: well-formed UI graphs, checked against ComfyUI's own node schemas.

The first tests need nothing but the JSON files. Those taking the `comfyui`
fixture (COMFYUI_PATH) load ComfyUI's node registry and this pack in-process
and compare every node with the schema the frontend would get from
/object_info. The helpers (schema reading, UI -> API prompt conversion with
the frontend's bypass rule) are also used by test_comfy_server.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS_DIR = REPO / "workflows"
WORKFLOW_FILES = sorted(WORKFLOWS_DIR.glob("*.json"))
# File names are the titles ComfyUI's template browser shows (Templates -> the pack's folder).
SINGLE_CONCEPT = "One concept from one photo.json"
MULTI_CONCEPT = "Three concepts in one image - cat pose lighting.json"
SAVED_CONCEPTS = "Reuse saved concepts - no adapter needed.json"
EXPECTED_WORKFLOWS = {SINGLE_CONCEPT, MULTI_CONCEPT, SAVED_CONCEPTS}

FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}  # never sent to the server
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4
APPLY_NODES = {"ModAdapterModulationApply", "ModAdapterModulationApplyAdvanced"}
PACK_NODE_IDS = {"ModAdapterLoader", "ModAdapterConceptEncoder", "ModAdapterPredictor", "ModAdapterModulationApply",
                 "ModAdapterModulationApplyAdvanced", "ModAdapterSaveConcept", "ModAdapterLoadConcept"}

# Combos that pick a file: (node type, input) -> folder_paths folder ("input" = the input directory's images).
FILE_COMBOS = {
    ("UNETLoader", "unet_name"): "diffusion_models",
    ("DualCLIPLoader", "clip_name1"): "text_encoders",
    ("DualCLIPLoader", "clip_name2"): "text_encoders",
    ("VAELoader", "vae_name"): "vae",
    ("CLIPVisionLoader", "clip_name"): "clip_vision",
    ("LoadImage", "image"): "input",
    ("ModAdapterLoader", "adapter_name"): "mod_adapter",
    ("ModAdapterLoadConcept", "concept_name"): "mod_concepts",
}
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp"}
CONCEPT_FILE = re.compile(r"^(?:.*/)?(?P<prefix>[^/]+)_(?P<word>[^_/]+)_\d{5}\.safetensors$")


# --- reading UI workflows ---------------------------------------------------------------------

def load_workflow(path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def nodes_by_id(workflow) -> dict:
    return {node["id"]: node for node in workflow["nodes"]}


def links_by_id(workflow) -> dict:
    return {link[0]: link for link in workflow["links"]}


def socket_inputs(node) -> list:
    """The node's input slots as saved (widget slots the frontend may also save are left out)."""
    return [inp for inp in node.get("inputs") or [] if "widget" not in inp or inp.get("link") is not None]


def input_source(workflow, node, name):
    """(origin node, origin slot) of the link into `node`'s input `name`, or None."""
    for inp in node.get("inputs") or []:
        if inp["name"] == name and inp.get("link") is not None:
            link = links_by_id(workflow)[inp["link"]]
            return nodes_by_id(workflow)[link[1]], link[2]
    return None


def concept_words(workflow) -> list:
    """Concept words of a workflow: the encoders' and Learn Concept's words, and those in loaded concept files' names."""
    words = []
    for node in workflow["nodes"]:
        if node["type"] == "ModAdapterConceptEncoder":
            words.append(node["widgets_values"][0])
        elif node["type"] == "ModAdapterLearnConcept":
            words += [w.strip() for w in node["widgets_values"][1].split(",")]
        elif node["type"] == "ModAdapterLoadConcept":
            match = CONCEPT_FILE.match(node["widgets_values"][0])
            assert match, f"concept file name {node['widgets_values'][0]!r} is not <prefix>_<word>_00001.safetensors"
            words.append(match["word"])
    return words


def apply_texts(workflow) -> list:
    return [node["widgets_values"][0] for node in workflow["nodes"] if node["type"] in APPLY_NODES]


# --- ComfyUI node schemas, as /object_info gives them -------------------------------------------

def node_info(node_class) -> dict:
    """What ComfyUI's /object_info gives for a node class (server.py's node_info, V1 and V3 nodes)."""
    from comfy_api.internal import _ComfyNodeInternal

    if issubclass(node_class, _ComfyNodeInternal):
        return node_class.GET_NODE_INFO_V1()
    inputs = node_class.INPUT_TYPES()
    info = {"input": inputs, "input_order": {key: list(value.keys()) for key, value in inputs.items()},
            "output": list(node_class.RETURN_TYPES),
            "output_name": list(getattr(node_class, "RETURN_NAMES", node_class.RETURN_TYPES)),
            "output_node": bool(getattr(node_class, "OUTPUT_NODE", False)),
            "category": getattr(node_class, "CATEGORY", "sd")}
    return json.loads(json.dumps(info, default=str))


def spec_type(spec) -> tuple:
    """(type, options) of one input spec: V1 combos are a list of options, V3 ones 'COMBO' with options."""
    kind = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if isinstance(kind, (list, tuple)):
        return "COMBO", dict(opts, options=list(kind))
    return kind, opts


def ordered_inputs(info) -> list:
    """[(name, type, options, optional)] in the order the frontend builds the node (input_order)."""
    result = []
    order = info.get("input_order") or {}
    for section in ("required", "optional"):
        specs = info["input"].get(section) or {}
        for name in order.get(section) or list(specs):
            kind, opts = spec_type(specs[name])
            result.append((name, kind, opts, section == "optional"))
    return result


def is_widget(kind, opts) -> bool:
    return kind in WIDGET_TYPES and not opts.get("forceInput")


def schema_sockets(info) -> list:
    return [(name, kind, optional) for name, kind, opts, optional in ordered_inputs(info) if not is_widget(kind, opts)]


def widget_slots(info) -> list:
    """Names for each entry of widgets_values: the widget inputs in order, with the extra values the
    frontend saves after them (a seed's control_after_generate, an image combo's upload button)."""
    slots = []
    for name, kind, opts, _ in ordered_inputs(info):
        if not is_widget(kind, opts):
            continue
        slots.append(name)
        # The frontend adds the control to seeds unless the node says control_after_generate=False.
        control = opts["control_after_generate"] if "control_after_generate" in opts else name in ("seed", "noise_seed")
        if kind == "INT" and control:
            slots.append(f"{name}:control_after_generate")
        if opts.get("image_upload") or opts.get("video_upload") or opts.get("audio_upload"):
            slots.append(f"{name}:upload")
    return slots


def types_match(a: str, b: str) -> bool:
    if a == "*" or b == "*":
        return True
    return bool(set(a.split(",")) & set(b.split(",")))


# --- UI workflow -> API prompt ---------------------------------------------------------------

def _bypass_slot(node, slot, wanted_type):
    """The frontend's rule (ExecutableNodeDTO#getBypassSlotIndex): the input with the output's slot index if
    its type fits, else the first input of exactly the wanted type, else the first compatible one."""
    inputs = socket_inputs(node)
    output_type = node["outputs"][slot]["type"]
    if wanted_type in ("*", ""):
        return slot if len(inputs) > slot else 0
    if slot < len(inputs) and types_match(inputs[slot]["type"], output_type) and types_match(inputs[slot]["type"],
                                                                                                 wanted_type):
        return slot
    for index, inp in enumerate(inputs):
        if inp["type"] == wanted_type:
            return index
    for index, inp in enumerate(inputs):
        if types_match(inp["type"], output_type) and types_match(inp["type"], wanted_type):
            return index
    return None


def resolve_link(workflow, link_id, wanted_type):
    """[origin id, slot] as the frontend sends it: bypassed nodes are passed through, muted ones drop the input."""
    nodes, links = nodes_by_id(workflow), links_by_id(workflow)
    seen = set()
    while link_id is not None:
        assert link_id not in seen, f"bypass loop through link {link_id}"
        seen.add(link_id)
        _, origin_id, origin_slot, _, _, _ = links[link_id]
        origin = nodes[origin_id]
        mode = origin.get("mode", MODE_ALWAYS)
        if mode == MODE_NEVER:
            return None
        if mode != MODE_BYPASS:
            return [str(origin_id), origin_slot]
        index = _bypass_slot(origin, origin_slot, wanted_type)
        if index is None:
            return None
        link_id = socket_inputs(origin)[index].get("link")
    return None


def ui_to_api(workflow, object_info) -> dict:
    """The API prompt the frontend would POST for a UI workflow: widget values become named inputs (in
    /object_info order), links become [node id, output slot]; bypassed and muted nodes are left out."""
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY or node.get("mode", MODE_ALWAYS) in (MODE_NEVER, MODE_BYPASS):
            continue
        info = object_info[node["type"]]
        inputs = {}
        values = list(node.get("widgets_values") or [])
        for name, value in zip(widget_slots(info), values):
            if ":" not in name:
                inputs[name] = value
        for inp in node.get("inputs") or []:
            if inp.get("link") is None:
                continue
            source = resolve_link(workflow, inp["link"], inp["type"])
            if source is None:
                inputs.pop(inp["name"], None)
            else:
                inputs[inp["name"]] = source
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                   "_meta": {"title": node.get("title", node["type"])}}
    return prompt


# --- always: the JSON files themselves ---------------------------------------------------------

def test_the_three_example_workflows_are_there():
    assert EXPECTED_WORKFLOWS <= {p.name for p in WORKFLOW_FILES}


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.name)
def test_every_workflow_has_a_thumbnail_for_the_template_browser(path):
    from PIL import Image

    thumbnail = path.with_suffix(".jpg")  # ComfyUI's template browser asks for <name>.jpg beside <name>.json
    assert thumbnail.is_file(), f"no thumbnail {thumbnail.name}"
    with Image.open(thumbnail) as image:
        assert image.format == "JPEG" and image.width >= 320 and image.height >= 160
        assert max(image.convert("L").getextrema()) > 100  # not a blank card


@pytest.fixture(params=WORKFLOW_FILES, ids=[p.name for p in WORKFLOW_FILES])
def workflow(request):
    return load_workflow(request.param)


def test_workflow_is_a_ui_graph_the_frontend_loads(workflow):
    assert workflow["version"] == 0.4
    for key in ("last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra"):
        assert key in workflow, key
    ids = [node["id"] for node in workflow["nodes"]]
    assert len(ids) == len(set(ids)), "node ids are not unique"
    link_ids = [link[0] for link in workflow["links"]]
    assert len(link_ids) == len(set(link_ids)), "link ids are not unique"
    assert workflow["last_node_id"] >= max(ids) and workflow["last_link_id"] >= max(link_ids)
    for node in workflow["nodes"]:
        for key in ("type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "properties",
                    "widgets_values"):
            assert key in node, f"node {node['id']} ({node['type']}) has no {key!r}"
        assert node["mode"] == MODE_ALWAYS, f"node {node['id']} is muted or bypassed in the example"
    assert sorted(node["order"] for node in workflow["nodes"]) == list(range(len(ids)))


def test_every_link_joins_existing_slots_of_one_type_both_ways(workflow):
    nodes = nodes_by_id(workflow)
    for link_id, origin_id, origin_slot, target_id, target_slot, link_type in workflow["links"]:
        where = f"link {link_id} ({origin_id}:{origin_slot} -> {target_id}:{target_slot})"
        assert origin_id in nodes and target_id in nodes, where
        origin, target = nodes[origin_id], nodes[target_id]
        assert 0 <= origin_slot < len(origin["outputs"]), where
        assert 0 <= target_slot < len(target["inputs"]), where
        output, inp = origin["outputs"][origin_slot], target["inputs"][target_slot]
        assert link_type == output["type"] == inp["type"], f"{where}: {link_type} / {output['type']} / {inp['type']}"
        assert link_id in (output.get("links") or []), f"{where} is not in the output's links"
        assert inp["link"] == link_id, f"{where}: the input names link {inp['link']}"
    listed = {link[0] for link in workflow["links"]}
    for node in workflow["nodes"]:
        for inp in node["inputs"]:
            assert inp["link"] is None or inp["link"] in listed, (node["id"], inp["name"])
        for output in node["outputs"]:
            assert set(output.get("links") or []) <= listed, (node["id"], output["name"])
    # the order the frontend saved runs every node after the nodes it reads from
    for _, origin_id, _, target_id, _, _ in workflow["links"]:
        assert nodes[origin_id]["order"] < nodes[target_id]["order"]


def test_every_concept_word_is_in_the_prompt_of_modulation_apply(workflow):
    words, texts = concept_words(workflow), apply_texts(workflow)
    if not words:
        pytest.skip("no concepts in this workflow")
    assert len(set(texts)) == 1, "one prompt per example workflow (its Modulation Apply nodes all get it)"
    for word in words:
        assert re.search(rf"\b{re.escape(word)}\b", texts[0], re.IGNORECASE), f"{word!r} is not in {texts[0]!r}"


def test_apply_gets_the_same_prompt_and_clip_as_the_text_encoder_so_bypass_gives_the_plain_graph(workflow):
    nodes = nodes_by_id(workflow)
    for apply in (n for n in workflow["nodes"] if n["type"] in APPLY_NODES):
        encoder, _ = input_source(workflow, apply, "conditioning")
        assert encoder["type"] == "CLIPTextEncode"
        assert encoder["widgets_values"][0] == apply["widgets_values"][0], "Apply's text is not the prompt's"
        assert input_source(workflow, encoder, "clip") == input_source(workflow, apply, "clip")
        # Apply's outputs are what its passed-through inputs would be: model -> sampler, conditioning -> positive
        consumers = [(nodes[l[3]], l[4], l[2]) for l in workflow["links"] if l[1] == apply["id"]]
        assert {slot for _, _, slot in consumers} == {0, 1}
    toy_world = any(n["type"] == "ModAdapterToyWorld" for n in workflow["nodes"])
    for sampler in (n for n in workflow["nodes"] if n["type"] == "KSampler"):
        cfg, sampler_name, scheduler = sampler["widgets_values"][3:6]
        if toy_world:  # no guidance embedding (like schnell): classifier-free guidance against the empty prompt
            negative, _ = input_source(workflow, sampler, "negative")
            assert (negative["type"], negative["widgets_values"][0]) == ("CLIPTextEncode", "")
            assert (cfg, sampler_name, scheduler) == (4.0, "euler", "simple")
        else:
            assert (cfg, sampler_name, scheduler) == (1.0, "euler", "simple")  # FLUX dev: guidance, not cfg


def test_every_load_image_names_an_example_image_the_pack_ships():
    """No Load Image is red because of us: each one names a file of example_inputs/, which the pack copies into
    ComfyUI's input folder when it loads (nodes/example_inputs.py)."""
    shipped = {p.name for p in (REPO / "example_inputs").glob("*.jpg")}
    named = {node["widgets_values"][0] for path in WORKFLOW_FILES for node in load_workflow(path)["nodes"]
             if node["type"] == "LoadImage"}
    assert named and named <= shipped, named - shipped


def test_example_specifics():
    single, multi, saved = (load_workflow(WORKFLOWS_DIR / name) for name in
                            (SINGLE_CONCEPT, MULTI_CONCEPT, SAVED_CONCEPTS))
    assert concept_words(single) == ["cat"] and apply_texts(single) == ["a photo of a cat playing in the snow"]
    assert concept_words(multi) == ["cat", "pose", "lighting"]
    predictors = [n for n in multi["nodes"] if n["type"] == "ModAdapterPredictor"]
    chained = [input_source(multi, p, "concepts") for p in predictors]
    assert sum(source is None for source in chained) == 1, "the Predictors form one chain"
    assert [n["widgets_values"][0] for n in multi["nodes"] if n["type"] == "ModAdapterSaveConcept"] == ["my_concepts"]
    for workflow in (single, multi):
        assert [n["type"] for n in workflow["nodes"]].count("Note") == 1
    loaded = [n for n in saved["nodes"] if n["type"] == "ModAdapterLoadConcept"]
    assert len(loaded) == 2
    assert {CONCEPT_FILE.match(n["widgets_values"][0])["prefix"] for n in loaded} == {"my_concepts"}
    assert not {"ModAdapterLoader", "ModAdapterConceptEncoder", "LoadImage", "CLIPVisionLoader"} & {
        n["type"] for n in saved["nodes"]}
    (advanced,) = [n for n in saved["nodes"] if n["type"] == "ModAdapterModulationApplyAdvanced"]
    assert advanced["widgets_values"][1:] == [0.0, 1.0, 0]


def test_pack_nodes_name_the_pack_for_the_manager(workflow):
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["name"]
    for node in workflow["nodes"]:
        if node["type"] in PACK_NODE_IDS and "cnr_id" in node["properties"]:
            assert node["properties"]["cnr_id"] == project


# --- against ComfyUI's own registry -------------------------------------------------------------

@pytest.fixture(scope="module")
def object_info(comfyui):
    """/object_info as the server would give it: ComfyUI's built-in nodes plus this pack, loaded in-process."""
    import nodes as comfy_nodes

    if "FluxGuidance" not in comfy_nodes.NODE_CLASS_MAPPINGS:
        asyncio.run(comfy_nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    if not PACK_NODE_IDS <= set(comfy_nodes.NODE_CLASS_MAPPINGS):
        assert asyncio.run(comfy_nodes.load_custom_node(str(REPO))) is True
    return {name: node_info(cls) for name, cls in comfy_nodes.NODE_CLASS_MAPPINGS.items()
            if name in PACK_NODE_IDS or name in _used_types()}


def _used_types():
    return {node["type"] for path in WORKFLOW_FILES for node in load_workflow(path)["nodes"]}


def test_every_node_matches_its_comfyui_schema(workflow, object_info):
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        where = f"node {node['id']} ({node['type']})"
        assert node["type"] in object_info, f"{where}: no such node in ComfyUI or the pack"
        info = object_info[node["type"]]
        sockets = schema_sockets(info)
        saved = socket_inputs(node)
        schema_by_name = {name: (kind, optional) for name, kind, optional in sockets}
        widgets = {name: kind for name, kind, opts, _ in ordered_inputs(info) if is_widget(kind, opts)}
        plain = [inp for inp in saved if "widget" not in inp]
        assert [(i["name"], i["type"]) for i in plain] == [(n, k) for n, k, _ in sockets], where
        for inp in saved:
            if "widget" in inp:  # a widget converted to an input
                assert inp["widget"]["name"] in widgets and types_match(inp["type"], widgets[inp["widget"]["name"]])
            elif schema_by_name[inp["name"]][1]:
                assert inp.get("shape") == 7, f"{where}: optional input {inp['name']} is not drawn hollow"
            else:
                assert inp["link"] is not None, f"{where}: required input {inp['name']} is not connected"
        outputs = list(zip(info["output_name"], info["output"]))
        saved_outputs = [(o["name"], o["type"]) for o in node["outputs"]]
        if node["type"] in PACK_NODE_IDS:
            assert saved_outputs == outputs, where
        else:  # newer ComfyUI appends outputs to core nodes (0.33.0's SaveImage passes its images on)
            assert saved_outputs == outputs[:len(saved_outputs)], where


def test_every_link_joins_types_comfyui_accepts(workflow, object_info):
    nodes = nodes_by_id(workflow)
    for link_id, origin_id, origin_slot, target_id, target_slot, _ in workflow["links"]:
        origin, target = nodes[origin_id], nodes[target_id]
        output_type = object_info[origin["type"]]["output"][origin_slot]
        inp = target["inputs"][target_slot]
        name = inp["widget"]["name"] if "widget" in inp else inp["name"]
        input_type = {n: k for n, k, _, _ in ordered_inputs(object_info[target["type"]])}[name]
        assert types_match(output_type, input_type), \
            f"link {link_id}: {output_type} -> {target['type']}.{name} {input_type}"


def test_widget_values_are_valid_for_comfyui(workflow, object_info):
    import folder_paths

    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        info = object_info[node["type"]]
        slots, values = widget_slots(info), node["widgets_values"]
        where = f"node {node['id']} ({node['type']})"
        assert len(values) == len(slots), f"{where}: {len(values)} widget values for {slots}"
        specs = {name: (kind, opts) for name, kind, opts, _ in ordered_inputs(info)}
        for slot, value in zip(slots, values):
            if slot.endswith(":control_after_generate"):
                assert value in ("fixed", "increment", "decrement", "randomize"), (where, slot, value)
                continue
            if slot.endswith(":upload"):
                assert value == "image", (where, slot, value)
                continue
            kind, opts = specs[slot]
            what = f"{where}.{slot} = {value!r}"
            if kind == "INT":
                assert isinstance(value, int) and not isinstance(value, bool), what
                assert opts.get("min", -2**63) <= value <= opts.get("max", 2**64), what
            elif kind == "FLOAT":
                assert isinstance(value, (int, float)) and not isinstance(value, bool), what
                assert opts.get("min", float("-inf")) <= value <= opts.get("max", float("inf")), what
            elif kind == "STRING":
                # an empty text is only the toy world's negative prompt: what its FLUX was trained with for cfg
                empty_negative = node["type"] == "CLIPTextEncode" and slot == "text" and value == ""
                # or a text whose own default is empty (an optional one, as Learn Concept's isolation_captions)
                empty_by_default = value == "" and opts.get("default") == ""
                assert isinstance(value, str) and (value.strip() or empty_negative or empty_by_default), what
            elif kind == "BOOLEAN":
                assert isinstance(value, bool), what
            elif (node["type"], slot) in FILE_COMBOS:
                folder = FILE_COMBOS[node["type"], slot]
                assert isinstance(value, str) and value == os.path.basename(value) and value.strip() == value, what
                extensions = IMAGE_EXTENSIONS if folder == "input" else folder_paths.folder_names_and_paths[folder][1]
                assert os.path.splitext(value)[1].lower() in extensions, f"{what}: not one of {sorted(extensions)}"
            else:
                assert kind == "COMBO" and value in opts["options"], f"{what}: not one of {opts.get('options')}"


def test_the_api_prompt_of_each_workflow_has_every_input_comfyui_needs(workflow, object_info):
    prompt = ui_to_api(workflow, object_info)
    assert prompt and all(node["class_type"] not in FRONTEND_ONLY for node in prompt.values())
    for node_id, node in prompt.items():
        info = object_info[node["class_type"]]
        for name, _, _, optional in ordered_inputs(info):
            assert optional or name in node["inputs"], f"{node_id} ({node['class_type']}) lacks {name}"
        for value in node["inputs"].values():
            if isinstance(value, list):
                assert value[0] in prompt


def test_the_pack_finds_every_concept_word_in_the_prompt_as_flux_tokenizes_it(workflow, comfyui):
    """The pack's own matcher on FLUX's real T5 tokenizer (ComfyUI's tokenizer files)."""
    from comfy.text_encoders.flux import FluxTokenizer

    from mod_adapter.modules.token_positions import ConceptQuery, TextSequenceLayout, find_concept_positions

    words = concept_words(workflow)
    if not words:
        pytest.skip("no concepts in this workflow")
    layout = TextSequenceLayout.from_comfy_tokenizer(FluxTokenizer().t5xxl)
    (text,) = set(apply_texts(workflow))
    positions = find_concept_positions(layout, text, [ConceptQuery(w) for w in words])
    assert all(positions) and len({p for ps in positions for p in ps}) == sum(map(len, positions))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


# Loader -> the models/ folder its files live in (what ComfyUI's Missing Models dialog downloads into).
MODEL_FOLDERS = {"UNETLoader": "diffusion_models", "DualCLIPLoader": "text_encoders", "VAELoader": "vae",
                 "CLIPVisionLoader": "clip_vision"}


def test_every_model_file_carries_its_download_source(workflow):
    """As ComfyUI's own templates do (node properties.models), so the Missing Models dialog offers each file."""
    for node in workflow["nodes"]:
        if node["type"] not in MODEL_FOLDERS:
            continue
        files = [v for v in node["widgets_values"] if isinstance(v, str) and v.endswith(".safetensors")]
        sources = {m["name"]: m for m in node["properties"].get("models", [])}
        assert files and set(files) == set(sources), f"node {node['id']} ({node['type']}): {files} vs {sources}"
        for name in files:
            assert sources[name]["directory"] == MODEL_FOLDERS[node["type"]]
            assert sources[name]["url"].startswith("https://huggingface.co/") and "/resolve/" in sources[name]["url"]



def uses_a_flux_adapter(path) -> bool:
    types = {n["type"] for n in load_workflow(path)["nodes"]}
    return "ModAdapterLoader" in types and "ModAdapterToyWorld" not in types


@pytest.mark.parametrize("path", [p for p in WORKFLOW_FILES if uses_a_flux_adapter(p)], ids=lambda p: p.name)
def test_flux_adapter_templates_say_that_no_flux_adapter_is_published_yet(path):
    """An artist who opens an adapter template learns from its Note, before anything turns red, that no FLUX.1
    adapter exists yet and what to use instead."""
    workflow = load_workflow(path)
    notes = " ".join(n["widgets_values"][0] for n in workflow["nodes"] if n["type"] in ("Note", "MarkdownNote"))
    assert "none has been published yet" in notes and "Learn Concept" in notes, notes
