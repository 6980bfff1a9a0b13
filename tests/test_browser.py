"""The pack in ComfyUI's real web frontend (headless Chromium), as an artist meets it.

A ComfyUI server (COMFYUI_PATH) runs with the pack installed and, in its
models/ folders, a stand-in file for every weight file the example workflows
name (the frontend checks names, not contents); the example images are the
pack's own, copied into input/ when the pack loads. Each workflow is
dropped onto the canvas as a file drop would deliver it; the graph the
frontend built must have every node type registered, every widget value and
every link of the JSON, and no error outline. The node search must find every
pack node. A screenshot of each loaded workflow goes to out/browser/ (or
$MOD_ADAPTER_TEST_ARTIFACTS). Each workflow is also opened as the template browser opens
it, which fits the whole graph into the window (ComfyUI 0.33's frontend): it
must open at a zoom where the canvas still draws text (template-<name>.png).

Needs Playwright for Python and Debian's Chromium (`/usr/bin/chromium`, or
$CHROMIUM); `.ci/run` installs both. Never `playwright install`: nothing is
downloaded at run time.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from comfy_server import REPO, concept_png, copy_pack, running_comfyui
from test_workflows import PACK_NODE_IDS, SINGLE_CONCEPT, WORKFLOW_FILES, WORKFLOWS_DIR, load_workflow

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
PACK_FOLDER = "ComfyUI-Mod-Adapter"  # as `git clone` names it (ComfyUI serves no templates from a folder with spaces)
# As the machine's own probe starts it: no sandbox as root, no GPU, and no background traffic
# to Google's hosts (this machine has no network).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(os.environ.get("MOD_ADAPTER_TEST_ARTIFACTS", REPO / "out" / "browser"))
# Which models/ folder (or input/) each file-naming widget of the example workflows reads.
FILE_FOLDERS = {"UNETLoader": "models/diffusion_models", "DualCLIPLoader": "models/text_encoders",
                "VAELoader": "models/vae", "CLIPVisionLoader": "models/clip_vision",
                "ModAdapterLoader": "models/mod_adapter", "ModAdapterLoadConcept": "models/mod_concepts",
                "LoadImage": "input"}
FILE_SUFFIXES = (".safetensors", ".sft", ".gguf", ".png", ".jpg")
# Below min_font_size_for_lod / NODE_TEXT_SIZE = 8/14 = 0.571 the canvas draws nodes without text ("low quality");
# a template must open clearly above it, at the 1600x1000 window the tests use.
TEMPLATE_MIN_ZOOM = 0.62


def _stand_in_files(base: Path) -> None:
    """Empty stand-ins for the weights the workflows name; the example images are the pack's own, which it copies
    into input/ when ComfyUI loads it (a stand-in there would keep them out)."""
    shipped = {p.name for p in (REPO / "example_inputs").glob("*.jpg")}
    for path in WORKFLOW_FILES:
        for node in load_workflow(path)["nodes"]:
            for value in node.get("widgets_values") or []:
                if isinstance(value, str) and value.endswith(FILE_SUFFIXES) and value not in shipped:
                    target = base / FILE_FOLDERS[node["type"]] / value
                    target.parent.mkdir(parents=True, exist_ok=True)
                    if value.endswith(".png"):
                        concept_png(target, seed=len(value))
                    else:
                        target.write_bytes(b"")


@pytest.fixture(scope="module")
def frontend(comfyui, tmp_path_factory):
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed "
                                   "(pip install playwright; Chromium from Debian's package 'chromium')")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)")
    base = tmp_path_factory.mktemp("comfy_browser")
    copy_pack(base / "custom_nodes" / PACK_FOLDER)
    _stand_in_files(base)
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))  # no first-run template dialog
    if ARTIFACTS.exists():
        shutil.rmtree(ARTIFACTS)
    ARTIFACTS.mkdir(parents=True)
    with running_comfyui(base) as server, sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield server, browser
        finally:
            browser.close()


# Texts the frontend would draw cut off ("Concept image: pose (an abstract con..."): a title needs room for
# the collapse dot and padding, a file-name combo for its label, its value and both arrows. Measured
# with the canvas's own fonts.
CUT_OFF_TEXTS = """(() => {
    const canvas = window.app.canvas, ctx = canvas.ctx, cut = [];
    const width = (font, text) => { ctx.save(); ctx.font = font; const w = ctx.measureText(text).width; ctx.restore(); return w; };
    for (const node of window.app.graph.nodes) {
        const title = node.getTitle ? node.getTitle() : node.title;
        if (width(canvas.title_text_font, title) + 2 * LiteGraph.NODE_TITLE_HEIGHT > node.size[0])
            cut.push(`${node.id} title: ${title}`);
        for (const widget of node.widgets || []) {
            const value = String(widget.value);
            if (widget.type !== 'combo' || !/[.](safetensors|png|jpg)$/.test(value)) continue;
            const label = widget.label || widget.name;
            if (width(canvas.inner_text_font, label) + width(canvas.inner_text_font, value) + 100 > node.size[0])
                cut.push(`${node.id} ${label}: ${value}`);
        }
    }
    return cut;
})()"""


def open_comfyui(frontend):
    server, browser = frontend
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.goto(server.url)
    page.wait_for_function("() => window.app && window.app.graph && window.app.canvas && window.app.vueAppReady",
                           timeout=120_000)
    page.evaluate("() => { window.app.graph.clear(); window.app.canvas.setDirty(true, true); }")
    return page


def drop_workflow(page, path: Path) -> None:
    """What dragging the file from a file manager onto the canvas does: a drop event with the file in it."""
    page.evaluate("""([name, text]) => {
        const transfer = new DataTransfer();
        transfer.items.add(new File([text], name, {type: 'application/json'}));
        const canvas = document.querySelector('#graph-canvas');
        for (const type of ['dragenter', 'dragover', 'drop'])
            canvas.dispatchEvent(new DragEvent(type, {dataTransfer: transfer, bubbles: true, cancelable: true}));
    }""", [path.name, path.read_text()])


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.name)
def test_every_workflow_loads_intact_in_the_frontend(frontend, path):
    workflow = load_workflow(path)
    page = open_comfyui(frontend)
    try:
        drop_workflow(page, path)
        page.wait_for_function("(n) => window.app.graph.nodes.length === n", arg=len(workflow["nodes"]), timeout=30_000)
        page.wait_for_timeout(1500)  # let the frontend draw and validate the graph
        page.screenshot(path=str(ARTIFACTS / f"{path.stem}.png"))
        loaded = page.evaluate("""() => {
            const graph = window.app.graph;
            return {
                unregistered: graph.nodes.filter(n => !LiteGraph.registered_node_types[n.type]).map(n => n.type),
                with_errors: graph.nodes.filter(n => n.has_errors).map(n => `${n.id} ${n.type}`),
                serialized: graph.serialize(),
                page_text: document.body.innerText,
                scale: window.app.canvas.ds.scale,
                cut_off: cutOffTexts(),
            };
        }""".replace("cutOffTexts()", CUT_OFF_TEXTS))
    finally:
        page.close()

    assert loaded["unregistered"] == [], f"missing node types: {loaded['unregistered']}"
    # Below about 0.6 the frontend draws nodes without text: the workflow would open as blank boxes.
    assert loaded["scale"] >= 0.75, f"opens at zoom {loaded['scale']}"
    assert loaded["cut_off"] == [], f"titles or file names cut off: {loaded['cut_off']}"
    assert loaded["with_errors"] == [], f"nodes outlined as errors: {loaded['with_errors']}"
    assert "errors found" not in loaded["page_text"] and "error found" not in loaded["page_text"]
    by_id = {n["id"]: n for n in loaded["serialized"]["nodes"]}
    assert set(by_id) == {n["id"] for n in workflow["nodes"]}
    for node in workflow["nodes"]:
        seen = by_id[node["id"]]
        assert seen["type"] == node["type"]
        # A node without widgets is saved with or without an empty list, depending on the frontend's version.
        assert (seen.get("widgets_values") or []) == (node.get("widgets_values") or []), f"node {node['id']} ({node['type']})"
    links = {tuple(link[:5]) for link in workflow["links"]}
    seen_links = {tuple(link[:5]) for link in loaded["serialized"]["links"]}
    assert seen_links == links


def fitted_zoom(workflow: dict, width=1600, height=1000) -> float:
    """The zoom the template browser opens a workflow at in ComfyUI 0.33's frontend (1.49): fitView() fits the
    nodes' bounds (title bars included, 10 units around, groups not counted) into 3/4 of the window."""
    left = min(n["pos"][0] for n in workflow["nodes"]) - 10
    top = min(n["pos"][1] for n in workflow["nodes"]) - 30 - 10
    right = max(n["pos"][0] + n["size"][0] for n in workflow["nodes"]) + 10
    bottom = max(n["pos"][1] + n["size"][1] for n in workflow["nodes"]) + 10
    return min(0.75 * width / max(right - left, 300), 0.75 * height / max(bottom - top, 300))


# What the canvas shows once a workflow has opened: its zoom and whether it draws nodes without text.
# `low_quality` (a getter in both frontends) follows ds.onChanged, so the zoom is compared with the threshold too.
VIEW_JS = """() => {
    const canvas = window.app.canvas;
    const threshold = canvas._lowQualityZoomThreshold ?? canvas.low_quality_zoom_threshold ?? 0.6;
    return {scale: canvas.ds.scale, low_quality: 'low_quality' in canvas ? canvas.low_quality : null, threshold,
            nodes: window.app.graph.nodes.length, dialogs: document.querySelectorAll('[role=dialog]').length};
}"""


def settle(page) -> None:
    """Lets the frontend fit the view (1.49 does it in an animation frame) and draw it."""
    page.wait_for_timeout(1000)
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.name)
def test_every_workflow_opens_from_the_template_browser_at_a_zoom_that_draws_text(frontend, path):
    """A template card's click, without the dialog: the JSON as ComfyUI serves it from the pack's folder, loaded
    as the template browser loads it. 1.49.6: loadGraphData(json, true, true, name, {openSource: 'template'}),
    which fits the graph into the window; 1.27.10 calls loadGraphData(json, true, true, name), whose fifth
    argument takes no openSource (the same call there), and restores the workflow's saved extra.ds."""
    server, _ = frontend
    workflow = load_workflow(path)
    page = open_comfyui(frontend)
    try:
        page.evaluate("""async ([url, name]) => {
            const json = await (await fetch(url)).json();
            await window.app.loadGraphData(json, true, true, name, {openSource: 'template'});
        }""", [f"{server.url}/api/workflow_templates/{PACK_FOLDER}/{path.stem}.json", path.stem])
        page.wait_for_function("(n) => window.app.graph.nodes.length === n", arg=len(workflow["nodes"]), timeout=30_000)
        settle(page)
        page.screenshot(path=str(ARTIFACTS / f"template-{path.stem}.png"))
        view = page.evaluate(VIEW_JS)
    finally:
        page.close()
    assert view["scale"] >= TEMPLATE_MIN_ZOOM, (
        f"opens from the template browser at zoom {view['scale']:.3f} (fitView's estimate "
        f"{fitted_zoom(workflow):.3f}): make the layout more compact")
    assert view["scale"] >= view["threshold"] and view["low_quality"] in (False, None), view


def test_the_template_browser_lists_the_pack_and_opens_its_templates_readable(frontend):
    """Workflow -> Browse Templates (the command the menu runs), the pack's category, then a card: the dialog lists
    every workflow by its title, and the card opens its workflow at the zoom the direct load gives."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    titles = sorted(p.stem for p in WORKFLOW_FILES)
    # the tightest layout, as the fit computes it
    tightest = min(WORKFLOW_FILES, key=lambda p: fitted_zoom(load_workflow(p)))
    page = open_comfyui(frontend)
    try:
        page.evaluate("() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
        dialog = page.get_by_role("dialog").first
        dialog.wait_for(timeout=30_000)
        category = dialog.get_by_text(PACK_FOLDER, exact=True).first  # "Extensions" (1.49) / "Custom Nodes" (1.27)
        category.wait_for(timeout=30_000)
        category.click()
        try:  # the cards come in as the thumbnails load
            page.wait_for_function("""(titles) => { const d = document.querySelector('[role=dialog]');
                                       return !!d && titles.every(t => d.innerText.includes(t)); }""",
                                   arg=titles, timeout=30_000)
        except PlaywrightTimeout:
            pass  # the assertion below says what was listed
        page.wait_for_timeout(1000)
        page.screenshot(path=str(ARTIFACTS / "template-browser.png"))
        listed = dialog.inner_text()
        missing = [t for t in titles if t not in listed]
        assert not missing, f"not in the template browser's {PACK_FOLDER} category: {missing}\n{listed[-2000:]}"
        dialog.get_by_text(tightest.stem, exact=True).first.click()
        page.wait_for_function("(n) => window.app.graph.nodes.length === n",
                               arg=len(load_workflow(tightest)["nodes"]), timeout=30_000)
        settle(page)
        view = page.evaluate(VIEW_JS)
        # the direct load of the test above, on the same page: it must give what the card gave
        page.evaluate("""async ([pack, name]) => {
            const json = await (await fetch(`api/workflow_templates/${pack}/${name}.json`)).json();
            window.app.graph.clear();
            window.app.canvas.ds.scale = 1;
            await window.app.loadGraphData(json, true, true, name, {openSource: 'template'});
        }""", [PACK_FOLDER, tightest.stem])
        settle(page)
        direct = page.evaluate(VIEW_JS)
    finally:
        page.close()
    assert view["dialogs"] == 0, "the template browser stayed open after a card was clicked"
    assert view["scale"] >= TEMPLATE_MIN_ZOOM and view["low_quality"] in (False, None), (tightest.stem, view)
    assert direct["scale"] == pytest.approx(view["scale"], abs=1e-6), (tightest.stem, view, direct)


def test_the_node_search_finds_every_pack_node(frontend):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    server, _ = frontend
    names = {server.object_info[node_id]["display_name"] for node_id in PACK_NODE_IDS}
    page = open_comfyui(frontend)
    try:
        search_box_open = "() => !!(document.activeElement && document.activeElement.closest('.p-dialog'))"
        for _ in range(10):  # a double click on the empty canvas opens ComfyUI's node search box
            page.wait_for_timeout(500)  # the canvas takes its first clicks only once it has settled
            page.mouse.dblclick(800, 600)
            try:  # on a busy machine the box opens a moment after the click
                page.wait_for_function(search_box_open, timeout=2000)
                break
            except PlaywrightTimeout:
                continue
        assert page.evaluate(search_box_open), "a double click on the canvas did not open the node search box"
        page.keyboard.type("Mod-Adapter", delay=10)
        titles_js = ("() => Array.from(document.querySelectorAll('[role=option]'))"
                     ".map(e => e.innerText.trim().split('\\n')[0].trim()).filter(t => t)")
        try:  # the list shows every node at first, then the matches as the search catches up with the typing
            page.wait_for_function(f"(names) => {{ const titles = ({titles_js})(); "
                                   f"return names.every(n => titles.includes(n)); }}", arg=sorted(names),
                                   timeout=30_000)
        except PlaywrightTimeout:
            pass  # the assertion below says what was found
        page.screenshot(path=str(ARTIFACTS / "node_search.png"))
        titles = page.evaluate(titles_js)
    finally:
        page.close()
    found = names & set(titles)
    assert found == names, f"not found by the search: {sorted(names - found)}; options: {titles}"


def test_the_template_browser_shows_every_workflow_with_its_thumbnail(frontend):
    """Templates -> the pack's folder: a card per workflow, titled by its file name, with its .jpg."""
    server, _ = frontend
    status, templates = server.request("/workflow_templates")
    assert status == 200 and sorted(templates[PACK_FOLDER]) == sorted(p.stem for p in WORKFLOW_FILES)
    page = open_comfyui(frontend)
    try:
        for name in templates[PACK_FOLDER]:
            for suffix, kind in ((".json", "application/json"), (".jpg", "image/jpeg")):
                # what a template card fetches (ComfyUI serves them by the pack's folder name)
                response = page.request.get(f"{server.url}/api/workflow_templates/{PACK_FOLDER}/{name}{suffix}")
                assert response.ok and response.headers["content-type"].startswith(kind), (name, suffix, response.status)
    finally:
        page.close()


def test_learn_concept_keeps_its_seed_and_a_small_learning_rate_in_the_frontend(frontend):
    page = open_comfyui(frontend)
    try:
        seen = page.evaluate("""() => {
            const node = LiteGraph.createNode('ModAdapterLearnConcept');
            window.app.graph.add(node);
            const rate = node.widgets.find(w => w.name === 'learning_rate');
            const shown = [];
            for (const typed of [0.00005, 0.000001]) {   // what typing the value into the widget does
                rate.value = typed;
                rate.callback?.call(rate, typed, window.app.canvas, node);
                shown.push(rate.value);
            }
            return {names: node.widgets.map(w => w.name), rates: shown, precision: rate.options.precision};
        }""")
    finally:
        page.close()
    # No "control after generate" widget: the frontend would otherwise re-seed, and so re-learn, on every Run.
    assert "control_after_generate" not in seen["names"] and "seed" in seen["names"]
    assert seen["rates"] == [0.00005, 0.000001]
    assert seen["precision"] >= 6  # drawn as 0.000050, not 0.0001


def test_the_missing_models_panel_offers_the_clip_vision_download(frontend):
    server, _ = frontend
    stand_in = server.base / "models" / "clip_vision" / "clip-vit-large-patch14.safetensors"
    stand_in.unlink()
    page = open_comfyui(frontend)
    try:
        drop_workflow(page, WORKFLOWS_DIR / SINGLE_CONCEPT)
        page.wait_for_timeout(2000)
        details = page.get_by_text("View details")  # ComfyUI 0.33's error overlay; 0.3.64 opens a dialog at once
        if details.count():
            details.first.click()
            page.wait_for_timeout(1000)
        page.screenshot(path=str(ARTIFACTS / "missing_models.png"))
        text = page.evaluate("() => document.body.innerText")
    finally:
        page.close()
        stand_in.write_bytes(b"")
    assert "Missing Models" in text and "clip-vit-large-patch14.safetensors" in text and "Download" in text, text[-2000:]
