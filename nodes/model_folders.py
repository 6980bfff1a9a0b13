"""Model folders of the pack, registered the way IPAdapter_plus does it.

`models/mod_adapter` holds adapter checkpoints, `models/mod_concepts` concept
files. Paths a user gave in extra_model_paths.yaml (loaded before custom
nodes) are kept; the default folder is added to them. Only .safetensors is
listed: the pack never loads pickle files.
"""

import os

import folder_paths

ADAPTER_FOLDER = "mod_adapter"
CONCEPT_FOLDER = "mod_concepts"
EXTENSIONS = {".safetensors"}


def register_model_folders() -> None:
    for name in (ADAPTER_FOLDER, CONCEPT_FOLDER):
        folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name))
        paths, _ = folder_paths.folder_names_and_paths[name]
        folder_paths.folder_names_and_paths[name] = (paths, set(EXTENSIONS))


def default_folder(name: str) -> str:
    """Where new files of `name` are written: the first registered path."""
    return folder_paths.get_folder_paths(name)[0]
