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


COMFYUI_TREES_HINT = (
    "a ComfyUI checkout: your own (git clone https://github.com/Comfy-Org/ComfyUI), or a tree from the cache "
    ".ci/run reads (COMFYUI_TREES, default ~/.cache/mod-adapter/comfyui/<version>)"
)


@pytest.fixture(scope="session")
def comfyui(tmp_path_factory):
    """A real ComfyUI checkout, imported in-process on the CPU.

    Named by COMFYUI_PATH; the test is skipped, with the reason, without it.
    Its input folder is a temporary one: loading the pack copies the example
    images there (nodes/example_inputs.py), never into the checkout.
    """
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        pytest.skip(f"COMFYUI_PATH is not set: the ComfyUI tier is skipped. Point COMFYUI_PATH at {COMFYUI_TREES_HINT}")
    if not os.path.isfile(os.path.join(path, "comfy", "model_patcher.py")):
        pytest.skip(f"COMFYUI_PATH={path} is not a ComfyUI checkout (no comfy/model_patcher.py): point it at "
                    f"{COMFYUI_TREES_HINT}")
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
    import folder_paths

    folder_paths.set_input_directory(str(tmp_path_factory.mktemp("comfyui_input")))
    return sys.modules["comfy"]


def pytest_collection_modifyitems(config, items):
    """Tests that need a real ComfyUI carry the `comfyui` marker (select them with -m comfyui)."""
    for item in items:
        if "comfyui" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.comfyui)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true")


def fail_the_skip(report, message: str) -> None:
    reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
    report.outcome = "failed"
    report.longrepr = f"{message}: {reason}"


def skip_is_allowed_in_ci(is_comfyui_tier: bool) -> bool:
    """In CI (CI=true) nothing may be skipped, except the ComfyUI tier where no COMFYUI_PATH is set: CI's run
    of README's test command in a bare clone has none, and its only skips must be that tier's."""
    return is_comfyui_tier and not os.environ.get("COMFYUI_PATH")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or not in_ci():
        return
    is_comfyui_tier = item.get_closest_marker("comfyui") is not None
    if skip_is_allowed_in_ci(is_comfyui_tier):
        return
    fail_the_skip(report, "CI runs every ComfyUI test when COMFYUI_PATH is set, but this one was skipped"
                  if is_comfyui_tier else "CI runs every test outside the ComfyUI tier, but this one was skipped")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """The same rule for a whole module skipped at import (a missing test dependency): never silent in CI."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and in_ci():
        fail_the_skip(report, f"CI runs every test module, but {collector.nodeid} was skipped whole")
