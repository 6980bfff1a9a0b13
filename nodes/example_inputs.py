"""The example concept images the FLUX.1 templates load, copied into ComfyUI's input folder when the pack loads.

Load Image lists only the files in ComfyUI's input directory, and ComfyUI has no
place for a custom node's example inputs (it serves a pack's example workflows,
not the files they load). So when ComfyUI loads the pack, each
`example_inputs/*.jpg` that the input directory lacks is copied there. A file
of that name already there is never overwritten, and nothing is ever deleted.
Any failure (a read-only or missing input folder) is one warning line, never an
error: the nodes load all the same.

`copy_missing_files` needs no ComfyUI (tests/test_example_inputs.py loads this
file on its own); only `copy_example_inputs` asks ComfyUI where its input folder is.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

EXAMPLE_INPUTS = Path(__file__).resolve().parent.parent / "example_inputs"
PATTERN = "*.jpg"

logger = logging.getLogger(__name__)


def _copy_new_file(source: Path, destination: Path) -> bool:
    """Copies `source` to `destination` unless a file of that name exists there; True when it copied.

    The destination is created exclusively ("x"), so a file that appears meanwhile (another ComfyUI sharing the
    input folder) is not overwritten either. A copy that fails halfway removes its own partial file.
    """
    try:
        target = open(destination, "xb")
    except FileExistsError:
        return False
    try:
        with target, open(source, "rb") as data:
            shutil.copyfileobj(data, target)
    except BaseException:
        try:
            os.unlink(destination)  # only the file this call created
        except OSError:
            pass
        raise
    return True


def copy_missing_files(source_dir, target_dir, pattern: str = PATTERN) -> list[str]:
    """Copies each file of `source_dir` matching `pattern` that `target_dir` lacks; returns the names copied.

    Never overwrites, never deletes, never raises an OSError: a folder it cannot read or write is one warning line.
    """
    source_dir, target_dir = Path(source_dir), Path(target_dir)
    copied: list[str] = []
    try:
        names = sorted(p.name for p in source_dir.glob(pattern) if p.is_file())
        for name in names:
            destination = target_dir / name
            if os.path.lexists(destination):  # the artist's own file, or a link: left alone
                continue
            if _copy_new_file(source_dir / name, destination):
                copied.append(name)
    except OSError as e:
        logger.warning("Mod-Adapter could not copy its example images into %s (%s: %s); the FLUX.1 templates' "
                       "Load Image nodes will not find them until you copy %s there yourself.",
                       target_dir, type(e).__name__, e, source_dir)
    return copied


def copy_example_inputs() -> list[str]:
    """The pack's example images into ComfyUI's input directory (when ComfyUI loads the pack). Never raises."""
    try:
        import folder_paths  # ComfyUI's

        return copy_missing_files(EXAMPLE_INPUTS, folder_paths.get_input_directory())
    except Exception as e:  # noqa: BLE001 - an example image must never stop the nodes from loading
        logger.warning("Mod-Adapter could not copy its example images into ComfyUI's input folder (%s: %s).",
                       type(e).__name__, e)
        return []
