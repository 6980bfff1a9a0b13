"""CI's script and where ComfyUI comes from: fetched trees in a cache, never the repository."""

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def tracked_files():
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True)
    if listed.returncode != 0:  # an unpacked release rather than a clone: every file is "tracked"
        return [p.relative_to(REPO).as_posix() for p in REPO.rglob("*") if p.is_file() and ".git" not in p.parts]
    return [name for name in listed.stdout.split("\0") if name]


def run_ci(trees: Path) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_PATH", "VIRTUAL_ENV")}
    environment["COMFYUI_TREES"] = str(trees)
    return subprocess.run(["bash", str(REPO / ".ci" / "run")], capture_output=True, text=True, env=environment,
                          timeout=60, stdin=subprocess.DEVNULL)


def test_ci_stops_at_once_naming_the_snapshot_of_each_missing_comfyui_tree(tmp_path):
    trees = tmp_path / "trees"
    (trees / "0.3.64" / "comfy").mkdir(parents=True)  # a tree without model_patcher.py is no tree
    result = run_ci(trees)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stdout == "", "nothing is installed before the trees are checked"
    message = result.stderr
    assert message.startswith("CI: no ComfyUI tree in COMFYUI_TREES=" + str(trees)), message
    assert "ComfyUI 0.33.0: fetch the snapshot github:yzkee/ComfyUI" in message, message
    assert "ComfyUI 0.3.64: fetch the snapshot github:Comfy-Org/ComfyUI" in message, message
    assert str(trees / "0.33.0") in message and str(trees / "0.3.64") in message, message
    assert "ComfyUI-GGUF 795e45156ece99afbc3efef911e63fcb46e6a20d: fetch the snapshot github:city96/ComfyUI-GGUF" \
        in message, message
    assert str(tmp_path / "comfyui-gguf") in message, message  # beside COMFYUI_TREES


def test_a_tree_of_another_version_is_not_taken_for_the_one_ci_needs(tmp_path):
    trees = tmp_path / "trees"
    for version, written in (("0.33.0", "0.33.0"), ("0.3.64", "0.3.65")):
        (trees / version / "comfy").mkdir(parents=True)
        (trees / version / "comfy" / "model_patcher.py").write_text("")
        (trees / version / "comfyui_version.py").write_text(f'__version__ = "{written}"\n')
    result = run_ci(trees)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "ComfyUI 0.3.64:" in result.stderr and "ComfyUI 0.33.0:" not in result.stderr, result.stderr


def test_the_repository_holds_no_comfyui_code_and_no_path_into_shared_trees():
    files = tracked_files()
    comfyui_files = [f for f in files if f.endswith(("comfy/model_patcher.py", "comfy/ldm/flux/model.py",
                                                     "comfyui_version.py"))]
    assert not comfyui_files, f"ComfyUI's own files are committed: {comfyui_files}"
    shared_trees = "shared/" + "comfyui/"  # split, so that this file does not name the path itself
    naming = []
    for name in files:
        path = REPO / name
        if path.suffix in (".safetensors", ".png", ".jpg") or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if shared_trees + "0." in text:
            naming.append(name)
    assert not naming, f"these files point into {shared_trees}<version>, which no longer exists: {naming}"
