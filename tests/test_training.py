"""Training: fit-router, pretrain and train on tiny random models (CPU).

Everything goes through the `mod-adapter` commands and the real loading code:
a tiny FLUX.1 diffusers folder (transformer, VAE, CLIP-L, T5, the real FLUX
tokenizers), a tiny open_clip ViT, a generated dataset. What is checked:

* the losses fall (pre-training and main training);
* two gloo processes (DDP, env:// rendezvous, micro-batches with no_sync,
  and FSDP-sharded FLUX) end with the weights of one process;
* stopping after step k and resuming ends with the weights, EMA weights and
  losses of the uninterrupted run, exactly;
* a broken manifest is reported line by line before any model is loaded;
* every checkpoint loads with load_adapter_checkpoint and carries the router;
* training state is stored without pickle and restores optimizer, scheduler
  and RNGs exactly.
"""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("open_clip")

import tiny_training as tt  # noqa: E402
from mod_adapter.cli import main  # noqa: E402
from mod_adapter.modules.training import flux as train_flux, pretrain as train_pretrain  # noqa: E402
from mod_adapter.modules.checkpoint import load_adapter_checkpoint  # noqa: E402
from mod_adapter.modules.errors import ModAdapterError  # noqa: E402
from mod_adapter.modules.router import fit_kmeans  # noqa: E402
from mod_adapter.modules.safetensors_io import load_safetensors_checked  # noqa: E402
from mod_adapter.modules.training.features import (  # noqa: E402
    load_router_file,
    load_vector_in,
    neutral_features,
)
from mod_adapter.modules.training.loop import BatchSchedule, LoopConfig, list_checkpoints, read_loss_csv  # noqa: E402
from mod_adapter.modules.training.state import (  # noqa: E402
    capture_rng_state,
    load_state_files,
    restore_rng_state,
    save_state_files,
)

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("training")
    flux = tt.make_flux_folder(base / "flux")
    clip_config, clip_weights = tt.make_open_clip(base / "open_clip")
    manifest = tt.make_dataset(base / "data", count=8)
    config = tt.write_adapter_config(base / "adapter.json")
    router = base / "router.safetensors"
    assert main(["fit-router", "--manifest", str(manifest), "--flux", str(flux), "--experts", "3", "--seed", "0",
                 "--out", str(router)]) == 0
    env = dict(base=base, flux=str(flux), clip_config=str(clip_config), clip_weights=str(clip_weights),
               manifest=str(manifest), config=str(config), router=str(router))
    return env


def image_encoder_args(env):
    return ["--image-encoder", tt.OPEN_CLIP_NAME, "--image-encoder-weights", env["clip_weights"],
            "--image-encoder-config", env["clip_config"]]


def pretrain_argv(env, out, *extra, steps=30, batch=4):
    return ["pretrain", "--manifest", env["manifest"], "--flux", env["flux"], *image_encoder_args(env),
            "--config", env["config"], "--router", env["router"], "--steps", str(steps), "--batch-size", str(batch),
            "--lr", "3e-3", "--out", str(out), "--no-progress", *extra]


def train_argv(env, out, init, *extra, steps=30, batch=4, lr="0.02"):
    return ["train", "--manifest", env["manifest"], "--flux", env["flux"], *image_encoder_args(env),
            "--init", str(init), "--steps", str(steps), "--batch-size", str(batch), "--lr", lr,
            "--max-grad-norm", "0", "--resolution", "16", "--max-sequence-length", "16", "--out", str(out),
            "--no-progress", *extra]


def losses(out):
    return [float(row["loss"]) for row in read_loss_csv(os.path.join(out, "losses.csv"))]


def tensors(path):
    return load_safetensors_checked(path, kind="test", error_cls=ModAdapterError)[0]


@pytest.fixture(scope="module")
def pretrained(env):
    out = env["base"] / "pretrain"
    assert main(pretrain_argv(env, out, "--save-every", "10", "--ema-decay", "0.9")) == 0
    return out


# --------------------------------------------------------------------------
# Features and router
# --------------------------------------------------------------------------


def test_neutral_feature_is_vector_in_of_the_clip_pooled_word(env, tmp_path):
    from diffusers import FluxPipeline
    from safetensors.torch import save_file

    pipe = FluxPipeline.from_pretrained(env["flux"])
    words = ["dog", "golden hour"]
    expected = pipe.transformer.time_text_embed.text_embedder(pipe._get_clip_prompt_embeds(words, device="cpu"))
    got = neutral_features(words, pipe.text_encoder, pipe.tokenizer, pipe.transformer.time_text_embed.text_embedder)
    torch.testing.assert_close(got, expected.float())
    # vector_in read alone from the folder, and from a single BFL-layout file, is the transformer's own.
    pooled = torch.randn(3, 32)
    reference = pipe.transformer.time_text_embed.text_embedder(pooled)
    torch.testing.assert_close(load_vector_in(env["flux"])(pooled), reference)
    embedder = pipe.transformer.time_text_embed.text_embedder
    bfl = {"model.diffusion_model.vector_in.in_layer.weight": embedder.linear_1.weight.detach().clone(),
           "model.diffusion_model.vector_in.in_layer.bias": embedder.linear_1.bias.detach().clone(),
           "model.diffusion_model.vector_in.out_layer.weight": embedder.linear_2.weight.detach().clone(),
           "model.diffusion_model.vector_in.out_layer.bias": embedder.linear_2.bias.detach().clone(),
           "model.diffusion_model.img_in.weight": torch.zeros(2, 2)}
    save_file(bfl, str(tmp_path / "flux_bfl.safetensors"))
    torch.testing.assert_close(load_vector_in(str(tmp_path / "flux_bfl.safetensors"))(pooled), reference)


def test_fit_router_clusters_the_distinct_words(env, tmp_path):
    from diffusers import FluxPipeline

    centroids, info = load_router_file(env["router"])
    assert centroids.shape == (3, tt.TINY_ADAPTER_CONFIG["modulation_dim"])
    assert info["words"] == tt.WORDS and info["num_words"] == len(tt.WORDS) and info["fitted"] and info["seed"] == 0
    pipe = FluxPipeline.from_pretrained(env["flux"])
    features = neutral_features(tt.WORDS, pipe.text_encoder, pipe.tokenizer, pipe.transformer.time_text_embed.text_embedder)
    torch.testing.assert_close(centroids, fit_kmeans(features, 3, seed=0))
    # The summary counts each word under its nearest centroid: every word once, every expert used.
    summary = train_pretrain.fit_router(env["manifest"], flux=env["flux"], out=str(tmp_path / "again.safetensors"),
                                        experts=3, seed=0)
    assert sum(summary["words_per_expert"]) == len(tt.WORDS) and min(summary["words_per_expert"]) >= 1
    # More experts than words is refused with the count.
    code = main(["fit-router", "--manifest", env["manifest"], "--flux", env["flux"], "--experts", "9",
                 "--out", str(tmp_path / "r.safetensors")])
    assert code == 2 and not (tmp_path / "r.safetensors").exists()


# --------------------------------------------------------------------------
# Pre-training
# --------------------------------------------------------------------------


def test_pretrain_loss_is_the_paper_formula():
    delta, neutral, target = torch.randn(2, 5, 7), torch.randn(2, 7), torch.randn(2, 7)
    expected = torch.stack([
        sum(((delta[b, i] + neutral[b]) - target[b]).square().sum() for i in range(5)) / 5 for b in range(2)])
    torch.testing.assert_close(train_pretrain.pretrain_loss(delta, neutral, target), expected)


def test_pretrain_loss_falls_and_logs(pretrained):
    values = losses(pretrained)
    assert len(values) == 30
    first, last = np.mean(values[:5]), np.mean(values[-5:])
    assert last < 0.5 * first, (first, last)
    from PIL import Image

    with Image.open(pretrained / "losses.png") as plot:
        assert plot.size == (900, 620)
    rows = read_loss_csv(str(pretrained / "losses.csv"))
    assert [int(r["step"]) for r in rows] == list(range(1, 31)) and float(rows[0]["lr"]) == pytest.approx(3e-3)


def test_checkpoints_load_with_the_router_and_a_training_summary(env, pretrained):
    centroids, _ = load_router_file(env["router"])
    found = list_checkpoints(str(pretrained))
    assert [step for step, _ in found] == [10, 20, 30]  # --keep-checkpoints 3
    files = [os.path.join(folder, name) for _, folder in found for name in ("adapter.safetensors", "adapter-ema.safetensors")]
    files += [str(pretrained / "adapter.safetensors"), str(pretrained / "adapter-ema.safetensors")]
    for path in files:
        loaded = load_adapter_checkpoint(path)
        assert torch.equal(loaded.adapter.router_centroids, centroids), path
        assert loaded.metadata["router"]["fitted"] and loaded.metadata["router"]["num_words"] == len(tt.WORDS)
        assert loaded.metadata["image_encoder"]["name"] == tt.OPEN_CLIP_NAME
        training = loaded.metadata["training"]
        assert training["stage"] == "pretrain" and training["lr"] == 3e-3 and training["dataset"]["records"] == 8
    assert load_adapter_checkpoint(found[0][1] + "/adapter.safetensors").metadata["training"]["steps"] == 10
    final = load_adapter_checkpoint(str(pretrained / "adapter.safetensors"))
    assert final.metadata["training"]["loss"] == pytest.approx(losses(pretrained)[-1], rel=1e-6)
    ema = load_adapter_checkpoint(str(pretrained / "adapter-ema.safetensors"))
    assert not torch.equal(ema.adapter.image_proj.weight, final.adapter.image_proj.weight)


# --------------------------------------------------------------------------
# Main training
# --------------------------------------------------------------------------


def test_train_loss_falls_and_writes_validation_images(env, pretrained):
    out = env["base"] / "train"
    code = main(train_argv(env, out, pretrained / "adapter.safetensors", "--save-every", "30", "--validate-every", "30",
                           "--validation-samples", "1", "--validation-steps", "2"))
    assert code == 0
    values = losses(out)
    first, last = np.mean(values[:5]), np.mean(values[-5:])
    assert last < 0.8 * first, (first, last)
    from PIL import Image

    for step in ("step-00000000", "step-00000030", "reference"):
        with Image.open(out / "validation" / step / "00-dog.png") as image:
            assert image.size == (16, 16)
    loaded = load_adapter_checkpoint(str(out / "adapter.safetensors"))
    assert loaded.metadata["training"]["stage"] == "train"
    assert loaded.metadata["training"]["init"].endswith("adapter.safetensors")
    assert torch.equal(loaded.adapter.router_centroids, load_router_file(env["router"])[0])
    # The adapter moved away from its initialisation: Δ on the validation image changed.
    before = Image.open(out / "validation" / "step-00000000" / "00-dog.png")
    after = Image.open(out / "validation" / "step-00000030" / "00-dog.png")
    assert np.abs(np.asarray(before, dtype=float) - np.asarray(after, dtype=float)).max() > 0


def test_stop_and_resume_equals_the_uninterrupted_run(env, pretrained, monkeypatch, capsys):
    init = pretrained / "adapter.safetensors"
    common = ("--save-every", "3", "--ema-decay", "0.8", "--grad-accum", "2", "--lr-schedule", "cosine",
              "--warmup-steps", "2")
    whole, parts = env["base"] / "whole", env["base"] / "parts"
    assert main(train_argv(env, whole, init, *common, steps=6, batch=4)) == 0
    assert main(train_argv(env, parts, init, *common, "--stop-after-step", "3", steps=6, batch=4)) == 130
    assert not (parts / "adapter.safetensors").exists() and len(losses(parts)) == 3
    assert main(train_argv(env, parts, init, *common, "--resume", str(parts), steps=6, batch=4)) == 0
    for name in ("adapter.safetensors", "adapter-ema.safetensors"):
        a, b = tensors(whole / name), tensors(parts / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    assert losses(parts) == losses(whole)
    # Resuming with other settings is refused, naming them, before any model is loaded.
    _forbid_model_loading(monkeypatch)
    capsys.readouterr()
    code = main(train_argv(env, parts, init, *common, "--resume", str(parts / "checkpoint-00000003"), steps=6, batch=2))
    assert code == 2 and "--batch-size was 4, now 2" in capsys.readouterr().err


def test_training_from_packed_shards_equals_training_from_the_manifest(env, pretrained):
    """`pack` then train on the tar shards: the images are read lazily from the shards and give the same run."""
    shards = env["base"] / "shards"
    assert main(["pack", env["manifest"], "--out", str(shards / "part-%03d.tar"), "--max-count", "3",
                 "--no-progress"]) == 0
    init = pretrained / "adapter.safetensors"
    from_manifest, from_shards = env["base"] / "from_manifest", env["base"] / "from_shards"
    assert main(train_argv(env, from_manifest, init, steps=3, batch=4)) == 0
    assert main(train_argv(dict(env, manifest=str(shards / "part-*.tar")), from_shards, init, steps=3, batch=4)) == 0
    assert losses(from_shards) == losses(from_manifest)
    a, b = tensors(from_manifest / "adapter.safetensors"), tensors(from_shards / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_give_the_weights_of_one(env, pretrained):
    import torch.multiprocessing as mp

    base = env["base"] / "ddp"
    init = pretrained / "adapter.safetensors"
    # Adam divides by sqrt(v) + eps: where the exact gradient is zero (e.g. a key bias under softmax)
    # it turns float rounding noise into full-size steps that differ between any two summation
    # orders. A larger eps keeps such noise negligible; real gradients here are far above 1e-4.
    eps = ("--adam-eps", "1e-4")
    single = [pretrain_argv(env, base / "pre1", *eps, steps=3, batch=4),
              train_argv(env, base / "train1", init, *eps, steps=3, batch=4)]
    # Pre-training: DDP with 2 micro-batches of 1 per process (no_sync, then a synchronised one).
    # Training: DDP on the adapter and the frozen FLUX sharded over both processes (FSDP2), 2 samples each.
    double = [pretrain_argv(env, base / "pre2", *eps, "--grad-accum", "2", steps=3, batch=4),
              train_argv(env, base / "train2", init, *eps, "--flux-sharding", "fsdp", steps=3, batch=4)]
    for argv in single:
        assert main(argv) == 0
    mp.spawn(tt.cli_worker, args=(2, tt.free_port(), double, env["clip_config"]), nprocs=2, join=True)
    for one, two in (("pre1", "pre2"), ("train1", "train2")):
        a, b = tensors(base / one / "adapter.safetensors"), tensors(base / two / "adapter.safetensors")
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-5, msg=f"{two} {key}")
        np.testing.assert_allclose(losses(base / two), losses(base / one), rtol=1e-6)
        # The gradient norm after the DDP all-reduce equals the single process's: the loss scaling is right.
        norms = [[float(r["grad_norm"]) for r in read_loss_csv(str(base / run / "losses.csv"))] for run in (one, two)]
        np.testing.assert_allclose(norms[1], norms[0], rtol=1e-5)
    start = tensors(pretrained / "adapter.safetensors")
    moved = tensors(base / "train1" / "adapter.safetensors")
    assert max(float((moved[k] - start[k]).abs().max()) for k in start) > 1e-3  # the runs compared did train
    state = json.loads((base / "train2" / "checkpoint-00000003" / "training_state.json").read_text())
    assert state["world_size"] == 2 and state["samples_seen"] == 12
    assert (base / "train2" / "checkpoint-00000003" / "rng-rank1.json").is_file()


# --------------------------------------------------------------------------
# Refusals before any model is loaded
# --------------------------------------------------------------------------


def _forbid_model_loading(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the manifest was checked")

    for module, name in ((train_pretrain, "load_image_encoder"), (train_pretrain, "load_text_side"),
                         (train_flux, "load_image_encoder"), (train_flux, "load_pipeline"),
                         (train_flux, "load_adapter_checkpoint")):
        monkeypatch.setattr(module, name, forbidden)


def test_a_broken_manifest_is_reported_line_by_line_before_loading_models(env, pretrained, tmp_path, monkeypatch, capsys):
    _forbid_model_loading(monkeypatch)
    good = json.loads(open(env["manifest"]).readline())
    good["concept_image"] = os.path.join(os.path.dirname(env["manifest"]), good["concept_image"])
    lines = [good, {**good, "caption": "a photo of a cat"}, "{not json", {**good, "concept_word": ""},
             {**{k: v for k, v in good.items() if k != "attribute_caption"}, "caption": "a dog at night"}]
    manifest = tmp_path / "broken.jsonl"
    manifest.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    env = dict(env, manifest=str(manifest))

    assert main(pretrain_argv(env, tmp_path / "p")) == 2
    err = capsys.readouterr().err
    for line in ("line 2:", "line 3:", "line 4:", "line 5:"):
        assert line in err, err
    assert "line 1:" not in err and "attribute_caption" in err

    assert main(train_argv(env, tmp_path / "t", pretrained / "adapter.safetensors")) == 2
    err = capsys.readouterr().err
    assert "line 2:" in err and "line 3:" in err and "line 4:" in err and "line 5:" not in err
    assert not (tmp_path / "p").exists() and not (tmp_path / "t").exists()


def test_concept_word_past_the_t5_window_is_refused_before_loading_models(env, pretrained, tmp_path, monkeypatch, capsys):
    _forbid_model_loading(monkeypatch)
    good = json.loads(open(env["manifest"]).readline())
    good["concept_image"] = os.path.join(os.path.dirname(env["manifest"]), good["concept_image"])
    late = {**good, "caption": "a very long caption with many many words before the word we want, which is dog"}
    manifest = tmp_path / "late.jsonl"
    manifest.write_text(json.dumps(good) + "\n" + json.dumps(late) + "\n")
    assert main(train_argv(dict(env, manifest=str(manifest)), tmp_path / "t", pretrained / "adapter.safetensors")) == 2
    err = capsys.readouterr().err
    assert "line 2:" in err and "line 1:" not in err


# --------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------


def test_batch_schedule_splits_each_global_batch_over_ranks_and_micro_batches():
    parts = [BatchSchedule(10, 4, 2, 2, rank, seed=5) for rank in range(2)]
    whole = BatchSchedule(10, 4, 1, 1, 0, seed=5)
    for step in range(7):
        slots = sorted(item for s in parts for micro in s.micro_batches(step) for item in micro)
        assert slots == sorted(whole.micro_batches(step)[0])
        assert [i for _, i in slots] == [whole.global_batch(step)[j] for j, _ in slots]
    epoch0 = whole.global_batch(0) + whole.global_batch(1)
    assert len(set(epoch0)) == 8 and whole.global_batch(2) != whole.global_batch(0)
    assert [BatchSchedule(10, 4, 1, 1, 0, seed=5).global_batch(s) for s in range(5)] == \
        [whole.global_batch(s) for s in range(5)]  # a function of (seed, step) only
    with pytest.raises(ModAdapterError, match="divisible"):
        BatchSchedule(10, 4, 3, 1, 0, seed=0)
    with pytest.raises(ModAdapterError, match="fewer than --batch-size"):
        BatchSchedule(3, 4, 1, 1, 0, seed=0)


def test_training_state_round_trips_without_pickle(tmp_path):
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 ** s)
    for _ in range(3):
        model(torch.randn(2, 4)).square().sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    generator = torch.Generator().manual_seed(7)
    save_state_files(tmp_path, "state", {"step": 3}, {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                                      "rng": capture_rng_state({"g": generator})})
    expected = (torch.rand(3), random.random(), np.random.rand(2), torch.rand(2, generator=generator))

    raw = (tmp_path / "state.safetensors").read_bytes()
    assert raw[8:9] == b"{" and b"\x80\x04" not in raw[:2]  # a safetensors header, not a pickle
    info, tree = load_state_files(tmp_path, "state")
    assert info["step"] == 3 and json.loads((tmp_path / "state.json").read_text())["format"] == "mod-adapter-training-state"
    fresh = torch.optim.AdamW(torch.nn.Linear(4, 3).parameters(), lr=1e-2)
    fresh.load_state_dict(tree["optimizer"])
    a, b = optimizer.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for pid in a["state"]:
        for key, value in a["state"][pid].items():
            assert torch.equal(value, b["state"][pid][key])
    assert tree["scheduler"] == scheduler.state_dict()
    restore_rng_state(tree["rng"], {"g": generator})
    again = (torch.rand(3), random.random(), np.random.rand(2), torch.rand(2, generator=generator))
    assert torch.equal(again[0], expected[0]) and again[1] == expected[1]
    assert np.array_equal(again[2], expected[2]) and torch.equal(again[3], expected[3])


def test_loop_settings_are_checked():
    with pytest.raises(ModAdapterError, match="--lr must be a positive number"):
        LoopConfig(steps=1, batch_size=1, lr=-1.0).validate()
    with pytest.raises(ModAdapterError, match="--ema-decay"):
        LoopConfig(steps=1, batch_size=1, ema_decay=1.5).validate()


def test_only_the_k_means_design_needs_a_fitted_router():
    import dataclasses

    from mod_adapter.modules.config import ModAdapterConfig
    from mod_adapter.modules.errors import ModAdapterError
    from mod_adapter.modules.training.stages import build_adapter

    tiny = ModAdapterConfig.preset("tiny")
    with pytest.raises(ModAdapterError, match="fit-router"):
        build_adapter(tiny, None, seed=0)
    assert build_adapter(dataclasses.replace(tiny, router="linear"), None, seed=0).config.router == "linear"
    assert build_adapter(dataclasses.replace(tiny, num_experts=1), None, seed=0).config.num_experts == 1
