"""Model folders of the pack, registered the way IPAdapter_plus does it.

`models/mod_adapter` holds adapter checkpoints, `models/mod_concepts` concept
files; the toy world's adapter (world/adapter/ in the pack) is listed too. Paths a user gave in extra_model_paths.yaml (loaded before custom
nodes) are kept; the default folder is added to them. Only .safetensors is
listed: the pack never loads pickle files.
"""

import os

import folder_paths

ADAPTER_FOLDER = "mod_adapter"
CONCEPT_FOLDER = "mod_concepts"
EXTENSIONS = {".safetensors"}


def register_model_folders() -> None:
    from ..modules.world.paths import WORLD_ADAPTER_FOLDER

    for name in (ADAPTER_FOLDER, CONCEPT_FOLDER):
        default = os.path.join(folder_paths.models_dir, name)
        folder_paths.add_model_folder_path(name, default)
        paths, _ = folder_paths.folder_names_and_paths[name]
        folder_paths.folder_names_and_paths[name] = (paths, set(EXTENSIONS))
        try:  # so that the artist finds where to put the files, as ComfyUI's own models/ folders are there
            os.makedirs(default, exist_ok=True)
        except OSError:  # a read-only models folder: the files can still come from extra_model_paths.yaml
            pass
    # The toy world's adapter ships with the pack: the Loader lists it after the user's own (new files still go
    # to models/mod_adapter, the first path).
    folder_paths.add_model_folder_path(ADAPTER_FOLDER, WORLD_ADAPTER_FOLDER)


def missing_file_error(name: str, filename, what: str):
    """None when `filename` is listed in the pack folder `name`, else the message for queue-time validation
    (ComfyUI outlines the node red and lists the message before anything runs)."""
    if filename is None or filename in folder_paths.get_filename_list(name):
        return None
    return (f"{what} {filename!r} is not in models/{name} (nor in a '{name}' folder of extra_model_paths.yaml). "
            f"Put the file there and refresh (R), or pick one that is there.")


def default_folder(name: str) -> str:
    """Where new files of `name` are written: the first registered path."""
    return folder_paths.get_folder_paths(name)[0]
