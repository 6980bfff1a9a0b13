"""Replacing a file atomically: readers see the old file or the complete new one, never half of one.

Every file the pack writes (adapter checkpoints, concept files, training
state, manifests) goes through :func:`atomic_replace`, so an interrupted save
(Ctrl-C, a preempted job, a full disk) leaves any previous file untouched.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator, Union


@contextlib.contextmanager
def atomic_replace(path: Union[str, os.PathLike]) -> Iterator[str]:
    """Yield a temporary path beside ``path``; once the block has written it, move it over ``path``.

    The temporary file is flushed to disk and given the usual permissions
    (``0666`` less the umask; ``mkstemp`` makes it private) before the
    ``os.replace``. If the block raises, the temporary file is removed and
    ``path`` is left as it was.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    descriptor, temp_path = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(descriptor)
    try:
        yield temp_path
        with open(temp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp_path, 0o666 & ~umask)
        os.replace(temp_path, path)
    except BaseException:
        try:
            os.remove(temp_path)
        except OSError:
            pass
        raise


def atomic_write_text(path: Union[str, os.PathLike], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically, creating its folder if needed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_replace(path) as temp_path:
        with open(temp_path, "w", encoding="utf-8") as handle:
            handle.write(text)
