"""What several test files need to drive the pack from outside: the `mod-adapter` command in a fresh process, and a
pickle that would act if anything unpickled it."""

import subprocess
import sys


def mod_adapter_cli(*args, cwd=None, timeout=600):
    """Run `python -m mod_adapter.cli ARGS` (what the `mod-adapter` command runs); the finished process."""
    return subprocess.run([sys.executable, "-m", "mod_adapter.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)


class PickleMarker:
    """Unpickling this object would create a marker file (as hostile pickles run code)."""

    def __init__(self, marker_path):
        self.marker_path = str(marker_path)

    def __reduce__(self):
        return (open, (self.marker_path, "w"))
