"""The toy world's base models: their training tasks, weight files, the VAE's latent scale and the export."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mod_adapter.modules.errors import ModAdapterError
from mod_adapter.modules.world.captions import GROUPS, STATED, WORD_ONLY, caption, consistent
from mod_adapter.modules.world.clip import ClipTask, WorldClip, load_clip_tokenizer, load_world_clip, save_world_clip
from mod_adapter.modules.world.paths import WORLD_FOLDER, check_world
from mod_adapter.modules.world.scene import ATTRIBUTES, Scene
from mod_adapter.modules.world.transformer import (
    MAX_SEQUENCE_LENGTH,
    load_t5_tokenizer,
    t5_tokenize,
)
from mod_adapter.modules.world.vae import (
    FLUX_SCALING_FACTOR,
    VaeTask,
    build_vae,
    latent_statistics,
    match_flux_latent_scale,
    pixels_of,
    vae_scene_of,
)

from command_helpers import mod_adapter_cli
from world_builders import random_world, random_world_checkpoints

TOKENIZERS = os.path.join(WORLD_FOLDER, "flux")
BALL = Scene("ball", "blue", "dots", "left", "small", "left", "warm", "brick")


def test_a_caption_is_consistent_with_exactly_the_scenes_it_describes():
    modes = {"surface": STATED, "pose": WORD_ONLY}
    assert consistent(BALL, modes, BALL.replace(position="right", background="sand"))  # pose only named
    assert not consistent(BALL, modes, BALL.replace(colour="red"))  # stated surface differs
    assert not consistent(BALL, modes, BALL.replace(shape="cone"))  # the object is always stated
    assert consistent(BALL, {}, BALL.replace(colour="red", size="large"))


def test_the_vae_latent_scale_is_folded_in_exactly():
    torch.manual_seed(0)
    vae = build_vae().eval()
    scenes = [vae_scene_of(0, i) for i in range(16)]
    pixels = pixels_of(scenes[:4])
    with torch.no_grad():
        before = vae.decode(vae.encode(pixels).latent_dist.mean).sample
        stats = match_flux_latent_scale(vae, scenes)
        after = vae.decode(vae.encode(pixels).latent_dist.mean).sample
    torch.testing.assert_close(after, before, atol=2e-5, rtol=1e-4)
    assert stats["std_after"] == pytest.approx(1 / FLUX_SCALING_FACTOR, rel=1e-3)
    assert latent_statistics(vae, scenes)[1] == pytest.approx(1 / FLUX_SCALING_FACTOR, rel=1e-3)


def test_the_vae_task_gives_one_finite_loss_per_sample():
    torch.manual_seed(0)
    task = VaeTask(build_vae(), seed=0, dataset_size=8, device=torch.device("cpu"))
    prepared = task.load_items([(0, 3), (1, 5)], step=0)
    losses = task.per_sample_losses(task.model, prepared, step=0)
    assert losses.shape == (2,) and torch.isfinite(losses).all()
    losses.sum().backward()
    assert all(p.grad is not None for p in task.model.encoder.parameters())


def test_clip_targets_are_soft_over_every_image_a_caption_is_true_of():
    torch.manual_seed(0)
    task = ClipTask(WorldClip(), load_clip_tokenizer(os.path.join(TOKENIZERS, "tokenizer")), seed=0,
                    dataset_size=64, device=torch.device("cpu"))
    ids, pixels, matches = task.load_items([(i, i) for i in range(12)], step=0)
    assert ids.shape == (12, 77) and pixels.shape == (12, 3, 64, 64)
    assert torch.equal(torch.diagonal(matches), torch.ones(12))  # a caption is true of its own image
    losses = task.per_sample_losses(task.model, (ids, pixels, matches), step=0)
    assert losses.shape == (12,) and torch.isfinite(losses).all()


def test_world_checkpoints_refuse_other_files(tmp_path):
    torch.manual_seed(0)
    save_world_clip(str(tmp_path / "clip.safetensors"), WorldClip(), {})
    assert isinstance(load_world_clip(str(tmp_path / "clip.safetensors")), WorldClip)
    with pytest.raises(ModAdapterError, match="not a world CLIP"):
        from mod_adapter.modules.world.vae import save_world_vae

        save_world_vae(str(tmp_path / "vae.safetensors"), build_vae(), {})
        load_world_clip(str(tmp_path / "vae.safetensors"))


def test_every_world_caption_fits_the_t5_length_and_a_longer_one_is_refused():
    tokenizer = load_t5_tokenizer(os.path.join(TOKENIZERS, "tokenizer_2"))
    longest = caption(Scene("cone", "green", "checks", "left", "large", "bottom", "cool", "sand"),
                      {g: STATED for g in GROUPS}, np.random.default_rng(3))
    assert t5_tokenize(tokenizer, [longest, ""]).shape == (2, MAX_SEQUENCE_LENGTH)
    with pytest.raises(ModAdapterError, match="longer than"):
        t5_tokenize(tokenizer, [" ".join([longest] * 2)])


def _train_flux(out, checkpoints, *extra):
    command = [sys.executable, "-m", "mod_adapter.cli", "world", "train-flux", "--out", str(out),
               "--vae", checkpoints["vae"], "--clip", checkpoints["clip"], "--judge", "", "--steps", "4",
               "--batch-size", "4", "--dataset-size", "16", "--save-every", "2", "--device", "cpu", "--no-progress",
               *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_flux_training_resumes_exactly_on_the_packs_loop(tmp_path):
    checkpoints = random_world_checkpoints(str(tmp_path / "base"))
    whole = _train_flux(tmp_path / "whole", checkpoints)
    assert whole.returncode == 0, whole.stderr
    stopped = _train_flux(tmp_path / "parts", checkpoints, "--stop-after-step", "2")
    assert stopped.returncode != 0 and "continue with --resume" in stopped.stderr
    resumed = _train_flux(tmp_path / "parts", checkpoints, "--resume", str(tmp_path / "parts"))
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(str(tmp_path / "whole" / "flux.safetensors"))
    b = load_file(str(tmp_path / "parts" / "flux.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = (tmp_path / "whole" / "losses.csv").read_text().splitlines()
    assert len(losses) == 5 and (tmp_path / "whole" / "losses.png").is_file()


def test_the_exported_world_is_a_diffusers_flux_folder_the_pack_loads(tmp_path):
    world = random_world(str(tmp_path))
    paths = check_world(world)
    index = json.loads(open(os.path.join(paths["flux"], "model_index.json")).read())
    assert {"transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"} <= set(index)
    from mod_adapter.modules.flux_diffusers import load_flux_pipeline, resolve_flux_source

    pipe = load_flux_pipeline(resolve_flux_source(paths["flux"]), torch.float32)
    assert pipe.vae.config.latent_channels == 16 and not pipe.transformer.config.guidance_embeds
    from mod_adapter.modules.training.image_encoder import OpenClipImageEncoder
    from mod_adapter.modules.world.clip import register_open_clip_architecture

    register_open_clip_architecture()
    encoder = OpenClipImageEncoder.load("ModAdapter-World-ViT-8", paths["image_encoder"])
    assert encoder.encode(torch.rand(1, 64, 64, 3)).shape == (1, 65, 128)
    evaluated = _cli("world", "eval-flux", "--world", world, "--count", "6", "--steps", "2", "--no-progress")
    report = json.loads(evaluated.stdout)
    assert set(report["prompt_following"]) == {"shape", "colour", "pattern", "position", "size", "direction", "tint",
                                               "background"}
    assert sum(pair["scenes"] for pair in report["by_held_out_pair"].values()) >= 6  # every scene is held out
    with pytest.raises(ModAdapterError, match="incomplete"):
        os.remove(paths["clip_vision_config"])
        check_world(world)


def test_held_out_pairs_are_scored_on_the_scenes_that_contain_them():
    from mod_adapter.modules.world.evaluation import attribute_hits, held_out_pair_accuracy
    from mod_adapter.modules.world.split import EVAL, scenes

    drawn = list(scenes(0, 40, EVAL))
    truth = [{name: getattr(s, name) for name in ATTRIBUTES} for s in drawn]
    mirrored = [dict(t, position="right") if t["position"] == "left" else t for t in truth]
    assert attribute_hits(drawn, truth) == {name: 1.0 for name in ATTRIBUTES}
    pairs = held_out_pair_accuracy(drawn, mirrored)
    assert pairs["position=left, direction=right"]["position"] == 0.0
    assert pairs["position=left, direction=right"]["direction"] == 1.0
    assert all(pair["shape"] == 1.0 for key, pair in pairs.items() if key.startswith("shape"))
    assert sum(pair["scenes"] for pair in pairs.values()) >= len(drawn)


def test_a_training_pair_shares_only_its_concept_and_its_manifest_validates(tmp_path):
    from mod_adapter.modules.training.manifest import validate_manifest
    from mod_adapter.modules.world.pairs import CONCEPT_KINDS, pairs, write_pairs
    from mod_adapter.modules.world.scene import CONCEPT_ATTRIBUTES
    from mod_adapter.modules.world.split import TRAIN, split_of

    drawn = list(pairs(0, 20))
    assert {p.kind for p in drawn} == set(CONCEPT_KINDS)
    for pair in drawn:
        kept = CONCEPT_ATTRIBUTES[pair.kind]
        for name, value in pair.concept.attributes().items():
            assert (getattr(pair.target, name) == value) == (name in kept), (pair, name)
        assert split_of(pair.concept) == split_of(pair.target) == TRAIN
        assert pair.word in pair.caption.split()
        assert pair.attribute_caption not in pair.caption  # the adapter has to bring the concept's values
        if pair.kind == "object":
            assert pair.concept.colour not in pair.caption.split()
    write_pairs(str(tmp_path), 0, 5)
    report = validate_manifest(tmp_path / "manifest.jsonl", require_attribute_caption=True)
    assert len(report.records) == 5 and not report.problems and not report.warnings


def _cli(*args):
    result = mod_adapter_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_the_packs_commands_run_on_a_world_folder_through_flux(tmp_path):
    """learn, fit-router, pretrain and train on the exported world, with the world preset and nothing else special."""
    from mod_adapter.modules.world.pairs import write_pairs

    world = random_world(str(tmp_path / "world"))
    paths = check_world(world)
    write_pairs(str(tmp_path / "pairs"), 0, 6)
    manifest = str(tmp_path / "pairs" / "manifest.jsonl")
    flux = ["--flux", paths["flux"], "--base-model", "toy-world"]
    encoder = ["--image-encoder", "ModAdapter-World-ViT-8", "--image-encoder-weights", paths["image_encoder"],
               "--image-encoder-config", paths["image_encoder_config"]]
    loop = ["--steps", "2", "--batch-size", "2", "--no-progress", "--device", "cpu"]
    _cli("fit-router", "--manifest", manifest, *flux, "--experts", "4", "--out", str(tmp_path / "router.safetensors"))
    _cli("pretrain", "--manifest", manifest, *flux, *encoder, "--router", str(tmp_path / "router.safetensors"),
         "--preset", "world", "--out", str(tmp_path / "pretrain"), *loop)
    _cli("train", "--manifest", manifest, *flux, *encoder, "--init", str(tmp_path / "pretrain" / "adapter.safetensors"),
         "--resolution", "64", "--max-sequence-length", "48", "--out", str(tmp_path / "train"), *loop)
    image = str(tmp_path / "pairs" / "images" / "0000001-concept.png")
    _cli("learn", "--flux", paths["flux"], "--image", image, "--caption", "a cone with a surface", "--word", "surface",
         "--out", str(tmp_path / "learned"), "--steps", "2", "--stage1-steps", "1", "--resolution", "64",
         "--max-sequence-length", "48", "--flip-probability", "0", "--eval-draws", "0", "--no-progress")
    assert (tmp_path / "train" / "adapter.safetensors").is_file()
    assert list((tmp_path / "learned").glob("*.safetensors"))
