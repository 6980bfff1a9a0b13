"""The toy world's judge: augmentation, its weight file, and exactly resumable training on the pack's loop."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mod_adapter.modules.errors import ModAdapterError
from mod_adapter.modules.safetensors_io import save_safetensors
from mod_adapter.modules.world.judge import (
    AttributeClassifier,
    augment,
    images_to_tensor,
    judge_accuracy,
    load_judge,
    save_judge,
)
from mod_adapter.modules.world.scene import ATTRIBUTES, render
from mod_adapter.modules.world.split import EVAL, scenes


def test_augmentation_is_seeded_mild_and_keeps_the_range():
    images = images_to_tensor([render(s) for s in scenes(0, 6)])
    a = augment(images, torch.Generator().manual_seed(1))
    b = augment(images, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == images.shape and 0 <= a.min() and a.max() <= 1
    difference = (a - images).abs().mean()
    assert 0.003 < difference < 0.08  # visible, but far from another scene


def test_the_judge_file_round_trips_and_refuses_other_files(tmp_path):
    torch.manual_seed(0)
    judge = AttributeClassifier(width=8, hidden=16).eval()
    save_judge(str(tmp_path / "judge.safetensors"), judge, {"steps": 0})
    loaded = load_judge(str(tmp_path / "judge.safetensors"))
    images = images_to_tensor([render(s) for s in scenes(1, 3)])
    for name, logits in judge(images).items():
        torch.testing.assert_close(loaded(images)[name], logits)
    assert set(judge_accuracy(loaded, list(scenes(2, 4, EVAL)))) == set(ATTRIBUTES)
    save_safetensors(str(tmp_path / "other.safetensors"), {"x": torch.zeros(1)}, {"format": "something-else"})
    with pytest.raises(ModAdapterError, match="not a world judge"):
        load_judge(str(tmp_path / "other.safetensors"))


def _train(out, *extra):
    command = [sys.executable, "-m", "mod_adapter.cli", "world", "train-judge", "--out", str(out), "--steps", "4",
               "--batch-size", "8", "--dataset-size", "64", "--width", "8", "--save-every", "2", "--device", "cpu",
               "--no-progress", *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_training_is_resumable_exactly_on_the_packs_loop(tmp_path):
    whole = _train(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    stopped = _train(tmp_path / "parts", "--stop-after-step", "2")
    assert stopped.returncode != 0 and "continue with --resume" in stopped.stderr
    resumed = _train(tmp_path / "parts", "--resume", str(tmp_path / "parts"))
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_file(str(tmp_path / "whole" / "judge.safetensors")), load_file(str(tmp_path / "parts" / "judge.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "whole" / "losses.csv").is_file() and (tmp_path / "whole" / "losses.png").is_file()


SHIPPED_JUDGE = Path(__file__).resolve().parent.parent / "world" / "judge.safetensors"
JUDGE_FLOOR = 0.97  # measured: 100% on 2000 fresh renders (docs/results.md)


def test_the_shipped_judge_reads_every_attribute_of_fresh_held_out_renders():
    """A regression guard on a fixed batch (docs/results.md has the benchmark on 2000 renders)."""
    judge = load_judge(str(SHIPPED_JUDGE))
    batch = list(scenes(2024, 300, EVAL))
    clean = judge_accuracy(judge, batch)
    augmented = judge_accuracy(judge, batch, augmented_seed=2025)
    assert min(clean.values()) >= JUDGE_FLOOR, clean
    assert min(augmented.values()) >= JUDGE_FLOOR - 0.02, augmented
