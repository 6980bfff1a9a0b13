"""Untrained toy worlds for tests of the plumbing: the real architectures and sizes, random weights, written
in the shipped layout by the pack's own export (mod_adapter.modules.world.export)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import torch

from mod_adapter.modules.world.clip import WorldClip, save_world_clip
from mod_adapter.modules.world.paths import JUDGE_FILE, WORLD_FOLDER
from mod_adapter.modules.world.transformer import WorldFlux, save_world_flux
from mod_adapter.modules.world.vae import build_vae, save_world_vae


def random_world_checkpoints(folder: str, seed: int = 0) -> dict:
    """train-vae / train-clip / train-flux outputs with random weights: {"vae", "clip", "flux_run"}."""
    torch.manual_seed(seed)
    os.makedirs(os.path.join(folder, "flux_run"), exist_ok=True)
    paths = {"vae": os.path.join(folder, "vae.safetensors"), "clip": os.path.join(folder, "clip.safetensors"),
             "flux_run": os.path.join(folder, "flux_run")}
    save_world_vae(paths["vae"], build_vae(), {})
    shutil.copy(paths["vae"], os.path.join(paths["flux_run"], "vae.safetensors"))
    save_world_clip(paths["clip"], WorldClip(), {})
    flux = WorldFlux()
    with torch.no_grad():  # diffusers zero-initialises FLUX's output layers: make every path matter
        for p in flux.transformer.parameters():
            if p.abs().sum() == 0:
                p.normal_(0.0, 0.02)
    save_world_flux(os.path.join(paths["flux_run"], "flux.safetensors"), flux, {})
    return paths


def random_world(folder: str, seed: int = 0) -> str:
    """A complete world folder (flux/, image_encoder/, judge.safetensors) with random base models."""
    checkpoints = random_world_checkpoints(os.path.join(folder, "runs"), seed)
    world = os.path.join(folder, "world")
    os.makedirs(os.path.join(world, "flux"))
    for name in ("tokenizer", "tokenizer_2"):  # the shipped tokenizers, as in the pack's own world/
        shutil.copytree(os.path.join(WORLD_FOLDER, "flux", name), os.path.join(world, "flux", name))
    subprocess.run([sys.executable, "-m", "mod_adapter.cli", "world", "export", "--flux-run", checkpoints["flux_run"],
                    "--clip", checkpoints["clip"], "--out", world], check=True, capture_output=True, timeout=600)
    shutil.copy(os.path.join(WORLD_FOLDER, JUDGE_FILE), os.path.join(world, JUDGE_FILE))
    return world
