import os
import sys

import pytest
import torch

# Test helpers (tiny model builders) live beside the tests.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="module")
def one_cpu_thread():
    """One intra-op thread for the module's tests.

    Models this small run several times faster on one thread, and far faster
    when other processes share the two cores (OpenMP threads then wait on each
    other); one thread is also deterministic.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def comfyui():
    """A real ComfyUI checkout, imported in-process on the CPU.

    Named by COMFYUI_PATH; the test is skipped, with the reason, without it.
    """
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        pytest.skip("COMFYUI_PATH is not set: tests against a real ComfyUI checkout are skipped "
                    "(git clone https://github.com/Comfy-Org/ComfyUI and export COMFYUI_PATH=...)")
    if not os.path.isfile(os.path.join(path, "comfy", "model_patcher.py")):
        pytest.skip(f"COMFYUI_PATH={path} is not a ComfyUI checkout (no comfy/model_patcher.py)")
    if path not in sys.path:
        sys.path.insert(0, path)
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management is imported
    import comfy.model_management  # noqa: F401
    import comfy.model_patcher  # noqa: F401
    import comfy.sample  # noqa: F401
    import comfy.supported_models  # noqa: F401

    return sys.modules["comfy"]


def pytest_collection_modifyitems(config, items):
    """Tests that need a real ComfyUI carry the `comfyui` marker (select them with -m comfyui)."""
    for item in items:
        if "comfyui" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.comfyui)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI (CI=true) a ComfyUI test may not be skipped: CI installs everything they need."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI", "").lower() in ("1", "true") and item.get_closest_marker("comfyui"):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"CI runs every ComfyUI test, but this one was skipped: {reason}"
