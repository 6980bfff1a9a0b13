"""The example concept images (example_inputs/): shipped small and licensed, copied into ComfyUI's input folder
when the pack loads, never over a file already there, and never stopping the pack from loading.

The copy function is tested without ComfyUI (nodes/example_inputs.py is loaded on its own, as nodes/ needs
ComfyUI); the ComfyUI tier checks a real server's Load Image lists the images.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import re
import sys
from pathlib import Path

import pytest

from comfy_server import copy_pack, running_comfyui

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "example_inputs"
EXAMPLE_NAME = re.compile(r"^mod_adapter_example_[a-z]+\.jpg$")


def load_example_inputs_module():
    """nodes/example_inputs.py by its path: importing mod_adapter.nodes would need ComfyUI."""
    spec = importlib.util.spec_from_file_location("mod_adapter_example_inputs_alone", REPO / "nodes" / "example_inputs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example_inputs():
    return load_example_inputs_module()


def example_files():
    return sorted(p.name for p in EXAMPLES.glob("*.jpg"))


def test_the_example_images_are_small_jpegs_named_apart_from_the_artists_files_with_their_licences():
    from PIL import Image

    names = example_files()
    assert names == ["mod_adapter_example_cat.jpg", "mod_adapter_example_lighting.jpg",
                     "mod_adapter_example_pose.jpg"]
    licences = (EXAMPLES / "LICENSES.md").read_text()
    for name in names:
        assert EXAMPLE_NAME.match(name), name
        assert (EXAMPLES / name).stat().st_size < 80_000, name
        with Image.open(EXAMPLES / name) as image:
            assert image.format == "JPEG" and image.mode == "RGB" and 256 <= max(image.size) <= 512, (name, image.size)
        row = next((line for line in licences.splitlines() if line.startswith(f"| `{name}`")), None)
        assert row and ("CC0" in row or "public domain" in row), f"{name}: no licence row in LICENSES.md"
    assert "scikit-image 0.26.0" in licences


def test_copies_the_missing_files_and_never_overwrites_or_deletes(example_inputs, tmp_path):
    source, target = tmp_path / "examples", tmp_path / "input"
    source.mkdir()
    target.mkdir()
    for name, data in (("a.jpg", b"example a"), ("b.jpg", b"example b"), ("notes.md", b"not an image")):
        (source / name).write_bytes(data)
    (target / "b.jpg").write_bytes(b"the artist's own b")
    (target / "mine.png").write_bytes(b"the artist's image")

    assert example_inputs.copy_missing_files(source, target) == ["a.jpg"]
    assert (target / "a.jpg").read_bytes() == b"example a"
    assert (target / "b.jpg").read_bytes() == b"the artist's own b"  # never overwritten
    assert sorted(p.name for p in target.iterdir()) == ["a.jpg", "b.jpg", "mine.png"]  # nothing else, nothing gone

    (target / "a.jpg").write_bytes(b"edited by the artist")
    assert example_inputs.copy_missing_files(source, target) == []  # the next start changes nothing
    assert (target / "a.jpg").read_bytes() == b"edited by the artist"

    (target / "b.jpg").unlink()
    (target / "a.jpg").unlink()
    (target / "a.jpg").symlink_to(tmp_path / "dangling")  # a link of that name, even a broken one, is left alone
    assert example_inputs.copy_missing_files(source, target) == ["b.jpg"]
    assert (target / "a.jpg").is_symlink()


def test_the_shipped_images_are_what_it_copies(example_inputs, tmp_path):
    assert example_inputs.EXAMPLE_INPUTS == EXAMPLES
    assert example_inputs.copy_missing_files(example_inputs.EXAMPLE_INPUTS, tmp_path) == example_files()
    for name in example_files():
        assert (tmp_path / name).read_bytes() == (EXAMPLES / name).read_bytes()


def test_a_target_it_cannot_write_is_one_warning_line_never_an_error(example_inputs, tmp_path, caplog, monkeypatch):
    source = tmp_path / "examples"
    source.mkdir()
    (source / "a.jpg").write_bytes(b"example a")
    a_file = tmp_path / "a file"
    a_file.write_bytes(b"")
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    real_open = open

    def refusing_open(path, mode="r", *args, **kwargs):
        if Path(path).parent == read_only and "x" in mode:
            raise PermissionError(13, "Permission denied", str(path))  # as a read-only folder refuses a non-root user
        return real_open(path, mode, *args, **kwargs)

    for target in (tmp_path / "missing", a_file, read_only):
        caplog.clear()
        with monkeypatch.context() as patch:
            patch.setattr(example_inputs, "open", refusing_open, raising=False)
            with caplog.at_level(logging.WARNING):
                assert example_inputs.copy_missing_files(source, target) == []
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and "\n" not in warnings[0].getMessage(), target
        message = warnings[0].getMessage()
        assert message.startswith("Mod-Adapter could not copy its example images into") and str(target) in message
        assert str(source) in message  # what to copy by hand
    assert sorted(p.name for p in read_only.iterdir()) == []  # no partial file left behind


def test_a_copy_that_fails_halfway_removes_only_its_own_partial_file(example_inputs, tmp_path, caplog, monkeypatch):
    source, target = tmp_path / "examples", tmp_path / "input"
    source.mkdir()
    target.mkdir()
    (source / "a.jpg").write_bytes(b"example a")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(example_inputs.shutil, "copyfileobj", full_disk)
    with caplog.at_level(logging.WARNING):
        assert example_inputs.copy_missing_files(source, target) == []
    assert list(target.iterdir()) == [] and "No space left on device" in caplog.text


# --- ComfyUI tier ------------------------------------------------------------------------------

def test_a_comfyui_server_lists_the_example_images_in_load_image_and_keeps_the_artists_file(comfyui, tmp_path):
    base = tmp_path / "comfy_base"
    copy_pack(base / "custom_nodes" / "Any pack name")
    (base / "input").mkdir(parents=True)
    artist_file = base / "input" / "mod_adapter_example_pose.jpg"
    artist_file.write_bytes(b"the artist's own file of that name")
    with running_comfyui(base) as server:
        status, info = server.request("/object_info/LoadImage")
        log = server.log_tail(200_000)
    assert status == 200
    choices = info["LoadImage"]["input"]["required"]["image"][0]
    assert set(example_files()) <= set(choices), choices
    assert artist_file.read_bytes() == b"the artist's own file of that name"
    for name in example_files():
        if name != artist_file.name:
            assert (base / "input" / name).read_bytes() == (EXAMPLES / name).read_bytes()
    assert "could not copy its example images" not in log
    assert "ModAdapterLoader" in server.object_info


def test_the_pack_loads_its_nodes_when_the_input_folder_cannot_be_written(comfyui, tmp_path, caplog, monkeypatch):
    """In-process, as ComfyUI loads a custom node folder: the entry point warns once and returns the nodes."""
    import folder_paths
    import nodes as comfy_nodes

    not_a_folder = tmp_path / "input"
    not_a_folder.write_bytes(b"")
    monkeypatch.setattr(folder_paths, "input_directory", str(not_a_folder))
    if not {"ModAdapterLoader"} <= set(comfy_nodes.NODE_CLASS_MAPPINGS):
        assert asyncio.run(comfy_nodes.load_custom_node(str(REPO))) is True
    package = next(m for name, m in sys.modules.items()
                   if name.endswith(".nodes") and hasattr(m, "copy_example_inputs") and hasattr(m, "NODES"))
    caplog.clear()  # loading the folder above already called the entry point once
    with caplog.at_level(logging.WARNING):
        extension = asyncio.run(package.comfy_entrypoint())
    assert asyncio.run(extension.get_node_list())
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(not_a_folder) in warnings[0], warnings
