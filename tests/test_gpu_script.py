"""benchmarks/gpu.sh, the one prepared GPU run, in its tiny CPU mode: every part runs and is recorded.

The numbers of the tiny mode mean nothing; the test keeps the script working for the rare minutes a
GPU is lent (docs/benchmarks.md, "One prepared GPU run").
"""

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PARTS = ("adapter", "mod-diffusers", "learn", "learn-memory", "train-pretrain", "train-train")


def test_the_gpu_script_runs_every_part_in_tiny_mode(tmp_path):
    out = tmp_path / "gpu_results.md"
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}  # the comfy part is covered elsewhere
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), "--cpu-tiny", str(out)],
                            capture_output=True, text=True, env=env, cwd="/", timeout=600)
    report = out.read_text() if out.exists() else ""
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}\n{report[-3000:]}"
    for part in PARTS:
        assert any(line.startswith(f"| {part} |") and "| ok |" in line for line in report.splitlines()), (part, report)
