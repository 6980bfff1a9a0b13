"""The pack as a library, a command and a ComfyUI custom node folder."""

import asyncio
import os
import re
import shutil
import subprocess
import sys

from pathlib import Path

import pytest
import torch

from command_helpers import mod_adapter_cli

REPO = Path(__file__).resolve().parent.parent
# Every module under modules/, subpackages included (modules.training.flux, ...).
METHOD_MODULES = sorted(".".join(p.relative_to(REPO / "modules").with_suffix("").parts)
                        for p in (REPO / "modules").rglob("*.py") if p.stem != "__init__")


def run_python(code: str, **env):
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    environment.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, cwd="/")


def test_method_modules_never_import_comfyui():
    imports = "; ".join(f"import mod_adapter.modules.{m}" for m in METHOD_MODULES)
    result = run_python(f"import sys; {imports}; "
                        "bad = [m for m in sys.modules if m == 'comfy' or m.startswith(('comfy.', 'comfy_api', 'folder_paths'))]; "
                        "assert not bad, bad; print('ok')")
    assert result.returncode == 0, result.stderr
    assert any("." in m for m in METHOD_MODULES), "the subpackages are covered"
    for path in (REPO / "modules").rglob("*.py"):
        assert not re.search(r"^\s*(import|from)\s+(comfy|comfy_api|folder_paths|nodes)\b", path.read_text(), re.M), path


def test_importing_the_pack_outside_comfyui_gives_a_message_not_a_traceback():
    result = run_python("import asyncio, mod_adapter\n"
                        "try:\n    asyncio.run(mod_adapter.comfy_entrypoint())\n"
                        "except RuntimeError as e:\n    print('MESSAGE:', e)\n")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "MESSAGE: The Mod-Adapter nodes run inside ComfyUI: put this folder in ComfyUI/custom_nodes/" in result.stdout

    nodes = run_python("import mod_adapter.nodes")
    assert nodes.returncode != 0
    assert "mod_adapter.nodes needs ComfyUI" in nodes.stderr


def test_the_library_and_cli_never_import_comfyui_even_where_it_is_importable(comfyui):
    """A venv shared with ComfyUI, or a torchrun worker spawned from a process that had it on sys.path."""
    comfy_root = os.environ["COMFYUI_PATH"]  # the comfyui fixture checked it
    result = run_python("import sys, mod_adapter, mod_adapter.cli, mod_adapter.modules.training.flux; "
                        "bad = [m for m in sys.modules if m == 'comfy' or m.startswith(('comfy.', 'comfy_api', 'folder_paths'))]; "
                        "assert not bad, bad; print('ok')", PYTHONPATH=comfy_root)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def mod_adapter_cli_at_root(*args):
    return mod_adapter_cli(*args, cwd="/")  # not from the checkout: the installed package answers


def test_cli_help_and_preset_info():
    result = mod_adapter_cli_at_root("--help")
    assert result.returncode == 0 and "info" in result.stdout
    tiny = mod_adapter_cli_at_root("info", "--preset", "tiny", "--json")
    assert tiny.returncode == 0, tiny.stderr
    from mod_adapter.modules.adapter import ModAdapter
    from mod_adapter.modules.config import ModAdapterConfig

    assert f'"parameter_count": {ModAdapter(ModAdapterConfig.preset("tiny")).num_parameters()}' in tiny.stdout


def test_cli_info_on_files_and_on_bad_input(tmp_path):
    from mod_adapter.modules.adapter import ModAdapter
    from mod_adapter.modules.checkpoint import save_adapter_checkpoint
    from mod_adapter.modules.concept import Concept
    from mod_adapter.modules.concept_file import save_concept
    from mod_adapter.modules.config import ModAdapterConfig

    concept_path = tmp_path / "dog.safetensors"
    save_concept(concept_path, Concept("dog", torch.randn(57, 3072) * 0.1, strength=0.8,
                                       source={"kind": "learned", "steps": 10}))
    result = mod_adapter_cli_at_root("info", str(concept_path))
    assert result.returncode == 0, result.stderr
    assert "kind: concept file" in result.stdout and "word: dog" in result.stdout

    adapter_path = tmp_path / "adapter.safetensors"
    adapter = ModAdapter(ModAdapterConfig.preset("tiny"))
    save_adapter_checkpoint(adapter_path, adapter, base_model="flux1-dev",
                            image_encoder={"name": "test", "layer": "penultimate", "tokens": 5, "width": 32})
    result = mod_adapter_cli_at_root("info", str(adapter_path))
    assert result.returncode == 0, result.stderr
    assert "kind: adapter checkpoint" in result.stdout and "flux1-dev" in result.stdout

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(300))
    for args in (["info", str(junk)], ["info", str(tmp_path / "missing.safetensors")], ["info"]):
        result = mod_adapter_cli_at_root(*args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr


def test_requirements_never_pin_torch_and_registry_metadata_is_there():
    requirements = [line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
    assert not [r for r in requirements if re.match(r"torch\b(?!_|vision)", r)], requirements
    for needed in ("safetensors", "numpy", "einops", "huggingface_hub", "open_clip_torch"):
        assert any(r.startswith(needed) for r in requirements), needed
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    comfy = project["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] and "Icon" in comfy
    assert not any(d.startswith("torch") for d in project["project"]["dependencies"])
    assert project["project"]["scripts"]["mod-adapter"] == "mod_adapter.cli:main"


def test_loads_as_a_custom_node_folder_under_any_name_without_the_training_code(comfyui, tmp_path):
    """ComfyUI's own loader imports the pack from a folder with an arbitrary name, and loading the nodes
    imports nothing of the training pipeline (modules/training), which only the CLI needs."""
    import nodes as comfy_nodes  # ComfyUI's top-level nodes.py

    folder = tmp_path / "My Mod-Adapter pack.v2"
    shutil.copytree(REPO, folder, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info"))
    assert asyncio.run(comfy_nodes.load_custom_node(str(folder))) is True
    package = str(folder).replace(".", "_x_")
    module = sys.modules[package]
    extension = asyncio.run(module.comfy_entrypoint())
    node_list = asyncio.run(extension.get_node_list())
    assert isinstance(node_list, list) and node_list
    loaded = sorted(name for name in sys.modules if name.startswith(package + "."))
    assert f"{package}.nodes.toy_world" in loaded, loaded
    assert not [name for name in loaded if name.startswith(f"{package}.modules.training")], loaded
    import folder_paths  # the comfyui fixture made its input folder a temporary one

    examples = sorted(p.name for p in (folder / "example_inputs").glob("*.jpg"))
    assert examples and set(examples) <= set(os.listdir(folder_paths.get_input_directory())), \
        "loading the pack copies the FLUX.1 templates' example images into ComfyUI's input folder"


def test_comfy_registry_reads_the_pyproject(comfyui):
    """ComfyUI's own parser of the [tool.comfy] section (what the registry and Manager read)."""
    from comfy_config.config_parser import extract_node_configuration

    config = extract_node_configuration(str(REPO))
    assert config.tool_comfy.publisher_id == "mod-adapter"
    readme_title = (REPO / "README.md").read_text().splitlines()[0].lstrip("# ").strip()
    assert config.tool_comfy.display_name == readme_title == "Mod-Adapter for ComfyUI"  # one name for the pack
    assert config.project.name == "comfyui-mod-adapter" and config.project.urls.repository
    names = {re.split(r"[<>=!~\[ ;]", d, maxsplit=1)[0].lower() for d in config.project.dependencies}
    assert "open_clip_torch" in names and not names & {"torch", "torchvision", "torchaudio"}
    icon = config.tool_comfy.icon
    assert icon.endswith("docs/icon.png") and (REPO / "docs" / "icon.png").is_file()


def test_comfyignore_keeps_development_files_out_of_the_published_archive():
    ignored = {line.strip() for line in (REPO / ".comfyignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {"tests/", "benchmarks/", ".ci/"} <= ignored
    assert not ignored & {"nodes/", "modules/", "workflows/", "world/", "example_inputs/", "__init__.py",
                          "requirements.txt"}
    assert not [i for i in ignored if i.endswith(".jpg")], ignored  # the example images and template cards ship


def test_the_installed_package_ships_the_templates_and_their_example_images():
    """pyproject's package-data names every file of the folders the nodes read at run time."""
    import fnmatch

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["mod_adapter"]
    for folder in ("workflows", "example_inputs"):
        files = [p.relative_to(REPO).as_posix() for p in (REPO / folder).iterdir() if p.is_file()]
        assert files, folder
        for file in files:
            assert any(fnmatch.fnmatch(file, pattern) for pattern in patterns), f"{file} is not in package-data"
