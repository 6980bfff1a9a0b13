"""A real ComfyUI server for tests: started from COMFYUI_PATH on a free loopback port, driven over HTTP.

`running_comfyui(base)` runs `main.py --cpu` with `base` as its base
directory (custom_nodes/, models/, input/, output/, user/ all live there), so
the ComfyUI checkout itself is only read: in CI it is read-only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SERVER_START_TIMEOUT = 150
PROMPT_TIMEOUT = 300  # the toy world's Learn Concept workflow runs its 1,400 steps (about a minute on 2 cores)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def concept_png(path: Path, seed: int, size=(96, 80)) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]]
    base = np.stack([x / size[0], y / size[1], 0.5 + 0.5 * np.sin(x / 7.0 + seed)], axis=-1)
    pixels = np.clip(base * 200 + rng.integers(0, 55, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)


def copy_pack(destination: Path) -> None:
    """This repository as an installed custom node folder (what `git clone` into custom_nodes/ gives)."""
    shutil.copytree(REPO, destination, ignore=shutil.ignore_patterns(
        ".git", "__pycache__", "*.egg-info", ".pytest_cache", "tests", "benchmarks", "out"))


class ComfyServer:
    def __init__(self, base: Path, port: int, process: subprocess.Popen, log: Path):
        self.base, self.port, self.process, self.log = base, port, process, log
        self.url = f"http://127.0.0.1:{port}"
        self.object_info: dict = {}

    def log_tail(self, chars=6000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no server log)"

    def request(self, path, body=None, timeout=30):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def run(self, prompt: dict) -> dict:
        """Queues an API prompt and waits for its /history entry; fails with ComfyUI's own error."""
        status, answer = self.request("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
        assert status == 200, f"POST /prompt refused ({status}): {json.dumps(answer, indent=1)[:4000]}"
        prompt_id = answer["prompt_id"]
        deadline = time.monotonic() + PROMPT_TIMEOUT
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"the server died:\n{self.log_tail()}"
            _, history = self.request(f"/history/{prompt_id}")
            entry = (history or {}).get(prompt_id)
            status = (entry or {}).get("status") or {}
            if status.get("completed") or status.get("status_str") == "error":
                errors = [m for m in status.get("messages", []) if m[0] == "execution_error"]
                assert status.get("status_str") == "success" and not errors, \
                    f"prompt failed: {json.dumps(errors or status, indent=1)[:4000]}\n{self.log_tail(3000)}"
                return entry
            time.sleep(0.2)
        pytest.fail(f"prompt {prompt_id} did not finish in {PROMPT_TIMEOUT} s\n{self.log_tail()}")

    def image_files(self, entry: dict, node_id: str) -> list:
        folders = {"output": self.base / "output", "temp": self.base / "temp"}
        images = entry["outputs"][node_id]["images"]
        return [folders[i["type"]] / i.get("subfolder", "") / i["filename"] for i in images]


@contextlib.contextmanager
def running_comfyui(base: Path):
    """`main.py --cpu` of COMFYUI_PATH with `base` as its base directory, until the block ends."""
    comfy_path = Path(os.environ["COMFYUI_PATH"]).resolve()
    (base / "tmp").mkdir(exist_ok=True)
    port = free_port()
    log = base / "server.log"
    env = dict(os.environ)
    env["TMPDIR"] = str(base / "tmp")  # tiny_comfy writes its configs to a temporary folder
    command = [sys.executable, str(comfy_path / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--base-directory", str(base), "--disable-auto-launch",
               "--disable-api-nodes",  # no network nodes: faster start
               "--cache-none",  # every prompt recomputes every node: equal images are not cache hits
               "--database-url", "sqlite:///:memory:"]  # nothing written into the ComfyUI checkout
    with open(log, "wb") as log_file:
        process = subprocess.Popen(command, cwd=comfy_path, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    instance = ComfyServer(base, port, process, log)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if process.poll() is not None:
                pytest.fail(f"ComfyUI exited with {process.returncode} while starting:\n{instance.log_tail()}")
            try:
                status, info = instance.request("/object_info", timeout=10)
                if status == 200 and info:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"ComfyUI did not answer /object_info in {SERVER_START_TIMEOUT} s:\n{instance.log_tail()}")
            time.sleep(0.5)
        instance.object_info = info
        yield instance
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)
