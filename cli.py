"""The `mod-adapter` command.

Subcommands arrive with the features that need them; `info` describes an
adapter checkpoint, a concept file or a preset. User errors print one line
(`error: ...`) and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional

from . import __version__
from .modules.errors import ModAdapterError
from .modules.world.paths import WORLD_FOLDER

EXIT_USER_ERROR = 2


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _file_format(path: str) -> str:
    """The `format` marker of a safetensors file of ours, checked safely."""
    from .modules.safetensors_io import read_safetensors_header

    metadata, _ = read_safetensors_header(path, kind="file", error_cls=ModAdapterError)
    marker = metadata.get("format")
    if marker not in ("mod-adapter", "mod-concept"):
        raise ModAdapterError(
            f"{path} is a safetensors file but not a Mod-Adapter checkpoint or concept file "
            f"(its metadata has format={marker!r}; expected 'mod-adapter' or 'mod-concept')"
        )
    return marker


def _info_for_file(path: str) -> Dict[str, Any]:
    if _file_format(path) == "mod-adapter":
        from .modules.checkpoint import read_adapter_info

        return {"kind": "adapter checkpoint", **read_adapter_info(path)}
    from .modules.concept_file import read_concept_info

    return {"kind": "concept file", **read_concept_info(path)}


def _info_for_preset(name: str) -> Dict[str, Any]:
    import torch

    from .modules.adapter import ModAdapter
    from .modules.config import ModAdapterConfig

    config = ModAdapterConfig.preset(name)
    with torch.device("meta"):  # count parameters without allocating them
        adapter = ModAdapter(config)
    params = adapter.num_parameters()
    return {"kind": "preset", "preset": name, "config": config.to_dict(), "parameter_count": params,
            "size_bf16": _human_bytes(2 * params), "size_fp32": _human_bytes(4 * params)}


def _print_info(info: Dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(info, indent=2, default=str))
        return
    for key, value in info.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k}: {v}")
        else:
            print(f"{key}: {value}")


def cmd_info(args: argparse.Namespace) -> int:
    if bool(args.file) == bool(args.preset):
        raise ModAdapterError("give either a file (adapter checkpoint or concept file) or --preset NAME")
    info = _info_for_file(args.file) if args.file else _info_for_preset(args.preset)
    _print_info(info, args.json)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from .modules.training.manifest import validate_manifest, write_clean_manifest

    report = validate_manifest(args.manifest, check_images=not args.no_image_check,
                               require_attribute_caption=args.require_attribute_caption)
    for line in report.format():
        print(line)
    print(f"{len(report.records)} valid record(s), {len(report.problems)} problem(s), "
          f"{len(report.warnings)} warning(s) in {args.manifest}", file=sys.stderr)
    if args.write_clean:
        count = write_clean_manifest(report, args.write_clean)
        print(f"wrote {count} valid record(s) to {args.write_clean}", file=sys.stderr)
    return 1 if report.problems else 0


def cmd_pack(args: argparse.Namespace) -> int:
    from .modules.training.manifest import write_shards

    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(desc="packing", unit="sample")

    def progress(done: int) -> None:
        bar.update(done - bar.n)

    try:
        summary = write_shards(args.manifest, args.out, max_count=args.max_count, max_bytes=args.max_gb * 1e9,
                               progress=progress if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    for shard in summary.shards:
        print(shard)
    print(f"packed {summary.samples} sample(s) into {len(summary.shards)} shard(s)", file=sys.stderr)
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    from .modules.training.captioner import DEFAULT_PROMPT, VLMCaptioner, caption_manifest

    captioner = VLMCaptioner.load(args.model, device=args.device, dtype=args.dtype, prompt=args.prompt or DEFAULT_PROMPT,
                                  max_new_tokens=args.max_new_tokens, max_image_side=args.max_image_side or None)
    summary = caption_manifest(args.manifest, captioner, out=args.out, batch_size=args.batch_size,
                               overwrite=args.overwrite, limit=args.limit, progress=not args.no_progress)
    for line, message in summary.failures:
        print(f"line {line}: {message}")
    print(f"{summary.captioned} captioned, {summary.reused} reused, {len(summary.failures)} record(s) without "
          f"attribute_caption; wrote {summary.out_path}", file=sys.stderr)
    return 0 if summary.complete else 1


EXIT_INTERRUPTED = 130  # the shell's convention for a run ended by Ctrl-C


def cmd_learn(args: argparse.Namespace, should_stop=None) -> int:
    """Learn concept files (TokenVerse mode). Ctrl-C stops after the current step and saves nothing."""
    import signal
    import threading

    from .modules.learn_concept import LearnConfig
    from .modules.learn_diffusers import learn_concept_files

    config = LearnConfig(steps=args.steps, stage1_steps=args.stage1_steps, lr=args.lr, seed=args.seed,
                         flip_probability=args.flip_probability)
    interrupted = threading.Event()
    previous_handler = None
    if should_stop is None and threading.current_thread() is threading.main_thread():
        def on_interrupt(signum, frame):
            interrupted.set()
            signal.signal(signal.SIGINT, previous_handler)  # a second Ctrl-C aborts at once

        previous_handler = signal.signal(signal.SIGINT, on_interrupt)
    try:
        report = learn_concept_files(
            args.flux, args.image, args.caption, args.word, args.out, config=config, components=args.components,
            resolution=args.resolution, device=args.device, dtype=args.dtype,
            gradient_checkpointing=args.gradient_checkpointing, guidance=args.guidance,
            max_sequence_length=args.max_sequence_length, eval_draws=args.eval_draws, overwrite=args.overwrite,
            show_progress=not args.no_progress, should_stop=should_stop or interrupted.is_set)
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)
    return EXIT_INTERRUPTED if report.stopped else 0


# --------------------------------------------------------------------------
# Training: fit-router, pretrain, train (modules/training/; docs/training.md)
# --------------------------------------------------------------------------


def cmd_fit_router(args: argparse.Namespace) -> int:
    from .modules.training.pretrain import fit_router

    summary = fit_router(args.manifest, flux=args.flux, out=args.out, experts=args.experts, seed=args.seed,
                         components=args.components, clip_l=args.clip_l, device=args.device, dtype=args.dtype,
                         base_model=args.base_model, iterations=args.iterations)
    print(f"fitted {summary['experts']} centroids of width {summary['width']} over {summary['words']} distinct "
          f"word(s) (words per expert: {summary['words_per_expert']}); wrote {summary['out']}", file=sys.stderr)
    return 0


def _loop_config(args: argparse.Namespace):
    from .modules.training.loop import LoopConfig

    return LoopConfig(
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        weight_decay=args.weight_decay, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps,
        warmup_steps=args.warmup_steps,
        lr_schedule=args.lr_schedule, min_lr_ratio=args.min_lr_ratio,
        max_grad_norm=args.max_grad_norm if args.max_grad_norm > 0 else None, ema_decay=args.ema_decay,
        seed=args.seed, save_every=args.save_every, keep_checkpoints=args.keep_checkpoints,
        validate_every=getattr(args, "validate_every", 0), stop_after_step=args.stop_after_step,
        mixed_precision=args.mixed_precision, progress=not args.no_progress)


def _finish_training(result, what: str = "adapter") -> int:
    if not result.stopped_early:
        print(f"trained {result.steps_done} steps; {what}: {result.final_adapter}", file=sys.stderr)
        return 0
    print(f"stopped after step {result.steps_done}; continue with --resume {result.out_dir}", file=sys.stderr)
    return EXIT_INTERRUPTED


def cmd_pretrain(args: argparse.Namespace) -> int:
    from .modules.training.pretrain import PretrainSettings, run_pretrain

    settings = PretrainSettings(
        manifest=args.manifest, out=args.out, flux=args.flux, image_encoder=args.image_encoder,
        image_encoder_weights=args.image_encoder_weights, router=args.router, components=args.components,
        clip_l=args.clip_l, image_encoder_config=args.image_encoder_config, preset=args.preset, config=args.config,
        device=args.device, text_dtype=args.text_dtype, base_model=args.base_model,
        target_cache_size=args.target_cache_size, resume=args.resume)
    return _finish_training(run_pretrain(settings, _loop_config(args)))


def cmd_train(args: argparse.Namespace) -> int:
    from .modules.training.flux import FluxTrainSettings, run_train

    settings = FluxTrainSettings(
        manifest=args.manifest, out=args.out, flux=args.flux, image_encoder=args.image_encoder,
        image_encoder_weights=args.image_encoder_weights, init=args.init, router=args.router, preset=args.preset,
        config=args.config, components=args.components, image_encoder_config=args.image_encoder_config, device=args.device, flux_dtype=args.flux_dtype,
        resolution=args.resolution, max_sequence_length=args.max_sequence_length, guidance=args.guidance,
        timestep_sampling=args.timestep_sampling, timestep_shift=args.timestep_shift,
        gradient_checkpointing=args.gradient_checkpointing, flux_sharding=args.flux_sharding,
        text_cache_size=args.text_cache_size, base_model=args.base_model,
        validation_manifest=args.validation_manifest, validation_samples=args.validation_samples,
        validation_steps=args.validation_steps, validation_resolution=args.validation_resolution,
        validation_seed=args.validation_seed, resume=args.resume)
    return _finish_training(run_train(settings, _loop_config(args)))


def _add_model_arguments(p: argparse.ArgumentParser, *, image_encoder: bool, clip_l: bool = True) -> None:
    p.add_argument("--flux", required=True, metavar="PATH_OR_REPO",
                   help="FLUX.1 as a diffusers folder, a repo id in the local Hugging Face cache, or a single "
                        "transformer .safetensors file (then --components" + (" or --clip-l" if clip_l else "")
                        + " gives the rest); nothing is downloaded")
    p.add_argument("--components", metavar="PATH_OR_REPO",
                   help="diffusers FLUX folder with the text encoders, tokenizers and VAE, for a single transformer file")
    if clip_l:  # train uses the FLUX pipeline's own CLIP-L for captions and neutral features alike
        p.add_argument("--clip-l", metavar="PATH_OR_REPO",
                       help="CLIP-L text encoder folder (transformers CLIPTextModel + tokenizer) for neutral features "
                            "(default: the FLUX folder's text_encoder/ and tokenizer/)")
    p.add_argument("--base-model", default="flux1-dev", help="base model name written into checkpoints (default flux1-dev)")
    if image_encoder:
        p.add_argument("--image-encoder", default="ViT-L-14", metavar="OPEN_CLIP_NAME",
                       help="open_clip architecture of the CLIP vision encoder (default ViT-L-14)")
        p.add_argument("--image-encoder-weights", required=True, metavar="PATH_OR_REPO",
                       help="its safetensors weights (open_clip or transformers layout, e.g. ComfyUI's clip_vision file)")
        p.add_argument("--image-encoder-config", metavar="JSON",
                       help="an open_clip model config file to register first (for architectures open_clip lacks)")


def _add_loop_arguments(p: argparse.ArgumentParser, *, steps: int, batch_size: int, lr: float) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=steps, help=f"optimizer steps (default {steps}, the paper's)")
    g.add_argument("--batch-size", type=int, default=batch_size,
                   help=f"global samples per optimizer step, over all processes and accumulation (default {batch_size})")
    g.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches accumulated per step; batch-size must be divisible by grad-accum × processes")
    g.add_argument("--lr", type=float, default=lr, help=f"AdamW learning rate (default {lr:g})")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default 0.01)")
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8, help="AdamW epsilon (default 1e-8)")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps (default 0)")
    g.add_argument("--lr-schedule", choices=["constant", "cosine", "linear"], default="constant",
                   help="learning rate after warm-up (default constant)")
    g.add_argument("--min-lr-ratio", type=float, default=0.0, help="floor of the cosine/linear decay, × lr")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (default 1.0; 0 = off)")
    g.add_argument("--ema-decay", type=float, default=0.0,
                   help="keep an EMA of the adapter weights with this decay, e.g. 0.9999 (default 0 = off); "
                        "saved as adapter-ema.safetensors")
    g.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and noise (default 0)")
    g.add_argument("--mixed-precision", choices=["auto", "no", "bf16"], default="auto",
                   help="autocast for the adapter (default auto: bf16 on CUDA, none on the CPU)")
    g.add_argument("--device", default="auto",
                   help="auto (this process's GPU under torchrun, else cuda when available, else cpu), cpu, cuda, cuda:N")
    o = p.add_argument_group("output")
    o.add_argument("--out", required=True, metavar="DIR",
                   help="output folder: checkpoint-<step>/, adapter.safetensors, losses.csv, losses.png")
    o.add_argument("--save-every", type=int, default=1000, help="checkpoint every K steps (default 1000)")
    o.add_argument("--keep-checkpoints", type=int, default=3, help="keep the newest N checkpoints (default 3; 0 = all)")
    o.add_argument("--resume", metavar="DIR",
                   help="continue from a checkpoint folder, or from the newest checkpoint of an output folder")
    o.add_argument("--stop-after-step", type=int,
                   help="save a checkpoint and stop after this step (as a preempted job; resume later)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_training_commands(sub) -> None:
    fit = sub.add_parser(
        "fit-router", help="fit the expert router (k-means over neutral features of the training words)",
        description="Compute n = vector_in(CLIP-L pooled(word)) for every distinct concept word of a manifest and "
                    "fit k-means centroids (one per expert); pretrain/train store them in every checkpoint.")
    fit.add_argument("--manifest", required=True, help="training manifest (.jsonl)")
    _add_model_arguments(fit, image_encoder=False)
    fit.add_argument("--experts", type=int, default=12, help="number of experts = centroids (default 12, the paper's)")
    fit.add_argument("--seed", type=int, default=0, help="k-means++ seed (default 0)")
    fit.add_argument("--iterations", type=int, default=100, help="Lloyd iterations at most (default 100)")
    fit.add_argument("--device", default="cpu", help="device of the text encoder (default cpu)")
    fit.add_argument("--dtype", default="float32", help="dtype of CLIP-L and vector_in (default float32)")
    fit.add_argument("--out", required=True, metavar="FILE", help="router file to write (.safetensors)")
    fit.set_defaults(func=cmd_fit_router)

    pre = sub.add_parser(
        "pretrain", help="pre-train the adapter (F+ regression onto attribute captions, no DiT)",
        description="Pre-training: loss (1/N) Σ_i ||Δ_i + n − vector_in(CLIP(p+))||² on records with "
                    "attribute_caption. Runs under torchrun for several GPUs/machines (DDP). See docs/training.md.")
    pre.add_argument("--manifest", required=True, help="training manifest (.jsonl) with attribute_caption on every record")
    _add_model_arguments(pre, image_encoder=True)
    pre.add_argument("--preset", choices=["paper", "tiny", "world"], help="adapter size (default paper)")
    pre.add_argument("--config", metavar="JSON", help="adapter config JSON: a full config or overrides of --preset")
    pre.add_argument("--router", metavar="FILE", help="router file from fit-router (required with more than one expert)")
    pre.add_argument("--text-dtype", default="float32", help="dtype of CLIP-L and vector_in (default float32)")
    pre.add_argument("--target-cache-size", type=int, default=4096,
                     help="attribute-caption targets kept in memory (default 4096)")
    _add_loop_arguments(pre, steps=50000, batch_size=32, lr=1e-4)
    pre.set_defaults(func=cmd_pretrain)

    train = sub.add_parser(
        "train", help="train the adapter with FLUX.1's flow-matching loss",
        description="Main training: the predicted Δ modulates the concept word's tokens in every FLUX block; "
                    "FLUX, CLIP, T5 and the VAE are frozen. Runs under torchrun for several GPUs/machines (DDP; "
                    "--flux-sharding fsdp when FLUX does not fit once per GPU). See docs/training.md.")
    train.add_argument("--manifest", required=True, help="training manifest (.jsonl)")
    _add_model_arguments(train, image_encoder=True, clip_l=False)
    train.add_argument("--init", metavar="ADAPTER", help="pre-training checkpoint to start from (the paper's recipe)")
    train.add_argument("--preset", choices=["paper", "tiny", "world"], help="without --init: adapter size")
    train.add_argument("--config", metavar="JSON", help="without --init: adapter config JSON")
    train.add_argument("--router", metavar="FILE", help="without --init: router file from fit-router")
    train.add_argument("--flux-dtype", default="auto", help="FLUX weights dtype (default auto: bf16 on CUDA, fp32 on CPU)")
    train.add_argument("--resolution", type=int, default=512, help="training image size, multiple of 16 (default 512)")
    train.add_argument("--max-sequence-length", type=int, default=256, help="T5 tokens per caption (default 256)")
    train.add_argument("--guidance", type=float, default=3.5, help="FLUX.1 [dev] guidance value (default 3.5)")
    train.add_argument("--timestep-sampling", choices=["logit_normal", "uniform"], default="logit_normal",
                       help="distribution of σ (default logit_normal)")
    train.add_argument("--timestep-shift", type=float, default=1.0, help="shift s of σ: sσ/(1+(s−1)σ) (default 1)")
    train.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                       help="recompute FLUX block activations in backward (default on)")
    train.add_argument("--flux-sharding", choices=["none", "fsdp"], default="none",
                       help="shard the frozen FLUX transformer over the processes with FSDP2 (default none)")
    train.add_argument("--text-cache-size", type=int, default=1024, help="captions whose T5/CLIP embeddings are kept")
    v = train.add_argument_group("validation")
    v.add_argument("--validate-every", type=int, default=0, help="write validation images every K steps (default 0 = off)")
    v.add_argument("--validation-manifest", metavar="JSONL", help="records to render (default: the training manifest)")
    v.add_argument("--validation-samples", type=int, default=4, help="records rendered (default 4)")
    v.add_argument("--validation-steps", type=int, default=20, help="Euler steps per image (default 20)")
    v.add_argument("--validation-resolution", type=int, help="image size (default --resolution)")
    v.add_argument("--validation-seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    _add_loop_arguments(train, steps=126000, batch_size=1, lr=1e-4)
    train.set_defaults(func=cmd_train)


def cmd_world_train_judge(args: argparse.Namespace) -> int:
    import torch

    from .modules.training.loop import precheck_resume, run_training, setup_distributed
    from .modules.world.judge import AttributeClassifier, JudgeTask, judge_dataset_fingerprint

    loop = _loop_config(args)
    resume = precheck_resume(args.resume, JudgeTask.stage, loop, args.dataset_size,
                             judge_dataset_fingerprint(args.seed, args.dataset_size)) if args.resume else None
    ctx = setup_distributed(args.device)
    torch.manual_seed(args.seed)
    task = JudgeTask(AttributeClassifier(args.width), seed=args.seed, dataset_size=args.dataset_size, device=ctx.device)
    return _finish_training(run_training(task, loop, args.out, ctx, resume=resume), "judge")


def _train_world_task(args: argparse.Namespace, loop, ctx, task, what: str) -> int:
    """Run a toy-world model's task on the pack's loop (resuming when asked, once the run's settings match)."""
    from .modules.training.loop import precheck_resume, run_training

    resume = precheck_resume(args.resume, task.stage, loop, task.dataset_size, task.dataset_fingerprint,
                             task.run_settings()) if args.resume else None
    return _finish_training(run_training(task, loop, args.out, ctx, resume=resume), what)


def cmd_world_train_vae(args: argparse.Namespace) -> int:
    import torch

    from .modules.training.loop import setup_distributed
    from .modules.world.vae import VaeTask, build_vae

    loop = _loop_config(args)
    ctx = setup_distributed(args.device)
    torch.manual_seed(args.seed)
    task = VaeTask(build_vae(), seed=args.seed, dataset_size=args.dataset_size, device=ctx.device)
    return _train_world_task(args, loop, ctx, task, "VAE")


def cmd_world_train_clip(args: argparse.Namespace) -> int:
    import torch

    from .modules.training.loop import setup_distributed
    from .modules.world.clip import ClipTask, WorldClip, load_clip_tokenizer

    loop = _loop_config(args)
    ctx = setup_distributed(args.device)
    torch.manual_seed(args.seed)
    task = ClipTask(WorldClip(), load_clip_tokenizer(args.tokenizer), seed=args.seed, dataset_size=args.dataset_size,
                    device=ctx.device)
    return _train_world_task(args, loop, ctx, task, "CLIP")


def cmd_world_train_flux(args: argparse.Namespace) -> int:
    import torch

    from .modules.training.loop import setup_distributed
    from .modules.world.clip import load_clip_tokenizer, load_world_clip
    from .modules.world.judge import load_judge
    from .modules.world.transformer import (FluxWorldTask, FrozenConditioning, WorldFlux, cached_latents,
                                            load_t5_tokenizer)
    from .modules.world.vae import flux_scaled_vae

    loop = _loop_config(args)
    ctx = setup_distributed(args.device)
    os.makedirs(args.out, exist_ok=True)
    vae = flux_scaled_vae(args.vae, os.path.join(args.out, "vae.safetensors"))
    latents = cached_latents(vae, args.seed, args.dataset_size, os.path.join(args.out, "latents.safetensors"),
                             progress=not args.no_progress)
    clip = load_world_clip(args.clip)
    conditioning = FrozenConditioning(clip.text.text_model, load_clip_tokenizer(args.clip_tokenizer), vae, ctx.device)
    judge = load_judge(args.judge) if args.judge else None
    torch.manual_seed(args.seed)
    task = FluxWorldTask(WorldFlux(), conditioning, load_t5_tokenizer(args.t5_tokenizer), latents, seed=args.seed,
                         device=ctx.device, judge=judge)
    return _train_world_task(args, loop, ctx, task, "FLUX transformer and T5")


def cmd_world_eval_vae(args: argparse.Namespace) -> int:
    from .modules.world.judge import load_judge
    from .modules.world.split import scenes
    from .modules.world.vae import load_world_vae, reconstruction_accuracy

    accuracy = reconstruction_accuracy(load_world_vae(args.vae), load_judge(args.judge),
                                       list(scenes(args.seed, args.count, args.split)))
    print(json.dumps({"count": args.count, "split": args.split, "seed": args.seed, "judge_on_reconstructions": accuracy},
                     indent=1))
    return 0


def _world_pipeline(world: str):
    import torch

    from .modules.flux_diffusers import load_flux_pipeline, resolve_flux_source
    from .modules.world.paths import check_world
    from .modules.world.judge import load_judge

    paths = check_world(world)
    return paths, load_flux_pipeline(resolve_flux_source(paths["flux"]), torch.float32), load_judge(paths["judge"])


def cmd_world_eval_flux(args: argparse.Namespace) -> int:
    import time

    from tqdm.auto import tqdm

    from .modules.world.evaluation import attribute_hits, generated_reads, held_out_pair_accuracy
    from .modules.world.split import scenes

    _, pipe, judge = _world_pipeline(args.world)
    drawn = list(scenes(args.seed, args.count, args.split))
    started = time.perf_counter()
    with tqdm(total=len(drawn), desc="generating", unit="image", disable=args.no_progress) as bar:
        reads = generated_reads(pipe, judge, drawn, seed=args.seed, steps=args.steps, cfg=args.cfg,
                                progress=bar.update)
    print(json.dumps({"count": args.count, "split": args.split, "seed": args.seed, "steps": args.steps, "cfg": args.cfg,
                      "seconds": round(time.perf_counter() - started, 1),
                      "prompt_following": attribute_hits(drawn, reads),
                      "by_held_out_pair": held_out_pair_accuracy(drawn, reads)}, indent=1))
    return 0


def cmd_world_eval_learn(args: argparse.Namespace) -> int:
    from .modules.learn_concept import LearnConfig
    from .modules.world.evaluation import WORLD_LEARN_LR, concept_learning

    paths, pipe, judge = _world_pipeline(args.world)
    learn_lr = WORLD_LEARN_LR if args.learn_lr is None else args.learn_lr
    learn_batch_size = LearnConfig.batch_size if args.learn_batch_size is None else args.learn_batch_size
    rows = []
    for kind in args.kinds:
        scores = concept_learning(paths["flux"], pipe, judge, kind, concepts=args.concepts,
                                  prompts_per_concept=args.prompts, steps=args.learn_steps, lr=learn_lr,
                                  batch_size=learn_batch_size, seed=args.seed,
                                  work_dir=os.path.join(args.work_dir, kind), sample_steps=args.steps, cfg=args.cfg,
                                  log=lambda message: print(message, file=sys.stderr))
        rows.append(scores.summary())
    print(json.dumps({"concepts_per_kind": args.concepts, "prompts_per_concept": args.prompts,
                      "learn_steps": args.learn_steps, "learn_lr": learn_lr,
                      "learn_batch_size": learn_batch_size, "sample_steps": args.steps,
                      "cfg": args.cfg, "seed": args.seed, "rows": rows}, indent=1))
    return 0


def cmd_world_make_pairs(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .modules.world.pairs import write_pairs

    with tqdm(total=args.count, desc="rendering pairs", unit="pair", disable=args.no_progress) as bar:
        counts = write_pairs(args.out, args.seed, args.count, args.split, progress=bar.update)
    print(f"wrote {args.count} pairs ({', '.join(f'{n} {k}' for k, n in counts.items())}) and "
          f"{os.path.join(args.out, 'manifest.jsonl')}", file=sys.stderr)
    return 0


def cmd_world_table(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .modules.world import methods
    from .modules.world.evaluation import WORLD_LEARN_LR
    from .modules.world.table import (MULTI, SINGLE, MethodResult, cp_pf_difference, evaluate, make_cases,
                                      picture_grid, summarise)

    paths, pipe, judge = _world_pipeline(args.world)
    learn_lr = WORLD_LEARN_LR if args.learn_lr is None else args.learn_lr
    grid_results, bare_results = [], {}
    models = methods.WorldModels.load(paths, pipe)
    kind_sets = {"single": list(SINGLE), **{f"multi{n}": list(MULTI[n]) for n in MULTI}}
    rows = []
    for spec in args.rows:
        name, _, checkpoint = spec.partition("=")
        if name in ("adapter", "global", "hybrid") and not checkpoint:
            raise ModAdapterError(f"--rows {name}=ADAPTER.safetensors: the {name} row needs an adapter checkpoint")
        method = {
            "oracle": lambda: methods.text_oracle(models),
            "bare": lambda: methods.bare_word(models),
            "description": lambda: methods.description_only(models),
            "adapter": lambda: methods.adapter_method(models, checkpoint),
            "global": lambda: methods.adapter_method(models, checkpoint, everywhere=True),
            "learn": lambda: methods.learn_concept_method(models, steps=args.learn_steps, lr=learn_lr,
                                                          seed=args.seed),
            "hybrid": lambda: methods.learn_concept_method(models, steps=args.hybrid_steps, init_checkpoint=checkpoint,
                                                           lr=learn_lr, seed=args.seed),
        }.get(name.split(":")[0])
        if method is None:
            raise ModAdapterError(f"unknown row {name!r}; rows are oracle, bare, description, adapter=FILE, "
                                  f"global=FILE, learn, hybrid=FILE (a label may follow, e.g. adapter:no-moe=FILE)")
        method = method()
        count = args.learn_count if name.startswith(("learn", "hybrid")) else args.count
        for set_name in args.sets:
            cases = make_cases(kind_sets[set_name], count, args.seed)
            with tqdm(total=len(cases), desc=f"{name} {set_name}", unit="image", disable=args.no_progress) as bar:
                result = evaluate(name, method, cases, pipe, judge, steps=args.steps, cfg=args.cfg,
                                  keep_images=args.grid_rows if set_name == args.grid_set else 0, progress=bar.update)
            if args.grid and set_name == args.grid_set:
                grid_results.append(result)
            rows.append({"set": set_name, **summarise(result, seed=args.seed)})
            if name == "bare":
                bare_results[set_name] = {case.seed: score for case, score in zip(result.cases, result.scores)}
            elif all(case.seed in bare_results.get(set_name, {}) for case in result.cases):
                # the bare word on the same cases (the learn rows' cases are the first of each kind set's)
                floor = MethodResult("bare", [bare_results[set_name][case.seed] for case in result.cases],
                                     list(result.cases))
                difference, interval = cp_pf_difference(result, floor, seed=args.seed)
                rows[-1].update(cp_pf_minus_bare=difference, cp_pf_minus_bare_95=interval)
            print(json.dumps(rows[-1]), file=sys.stderr)
    output = {"count_per_kind_set": args.count, "learn_count_per_kind_set": args.learn_count, "steps": args.steps,
              "cfg": args.cfg, "seed": args.seed, "learn_steps": args.learn_steps, "hybrid_steps": args.hybrid_steps,
              "learn_lr": learn_lr, "rows": rows}
    if args.grid and grid_results:
        from PIL import Image

        Image.fromarray(picture_grid(grid_results, args.grid_rows)).save(args.grid)
    text = json.dumps(output, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import time

    from PIL import Image
    from tqdm.auto import tqdm

    from .modules.world import methods
    from .modules.world.demo import DEMO_ROWS, demo_grid

    started = time.perf_counter()
    from .modules.world.paths import WORLD_ADAPTER_FILE

    adapter = args.adapter or os.path.join(args.world, "adapter", WORLD_ADAPTER_FILE)
    if not os.path.isfile(adapter):
        raise ModAdapterError(f"no adapter at {adapter}: the demo needs the world's trained adapter (shipped in "
                              f"world/adapter/{WORLD_ADAPTER_FILE}; reinstall the pack, or give --adapter)")
    # a newcomer's first run shows the demo's own bar and its result, not the libraries' loading bars
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    paths, pipe, _ = _world_pipeline(args.world)
    models = methods.WorldModels.load(paths, pipe)
    predictor = methods.AdapterPredictor(models, adapter)
    with tqdm(total=2 * args.steps, desc="demo", unit="step", disable=args.no_progress) as bar:
        grid = demo_grid(models, predictor, DEMO_ROWS, steps=args.steps, progress=bar.update)
    Image.fromarray(grid).save(args.out)
    print(f"wrote {args.out} ({len(DEMO_ROWS)} prompts, {time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return 0


def cmd_world_export(args: argparse.Namespace) -> int:
    from .modules.world.export import export_world

    paths = export_world(args.flux_run, args.clip, args.out, use_ema=args.ema)
    print(f"wrote the world's FLUX.1 folder {paths['flux']} and image encoder {paths['image_encoder']}",
          file=sys.stderr)
    return 0


def cmd_world_eval_judge(args: argparse.Namespace) -> int:
    from .modules.world.judge import judge_accuracy, load_judge
    from .modules.world.split import scenes

    judge = load_judge(args.judge)
    held_out = list(scenes(args.seed, args.count, args.split))
    rows = {"clean": judge_accuracy(judge, held_out),
            "augmented": judge_accuracy(judge, held_out, augmented_seed=args.seed + 1)}
    if args.json:
        print(json.dumps({"count": args.count, "split": args.split, "seed": args.seed, **rows}, indent=1))
        return 0
    names = list(rows["clean"])
    print(f"judge accuracy on {args.count} renders of the {args.split} split (seed {args.seed})\n")
    print("| renders | " + " | ".join(names) + " |\n|" + " --- |" * (len(names) + 1))
    for kind, accuracy in rows.items():
        print(f"| {kind} | " + " | ".join(f"{100 * accuracy[n]:.1f}%" for n in names) + " |")
    return 0


def cmd_world_sheet(args: argparse.Namespace) -> int:
    from PIL import Image

    from .modules.world.scene import Scene, attribute_sheet

    base = Scene("ball", "blue", "plain", "centre", "large", "left", "warm", "sand", seed=args.seed)
    Image.fromarray(attribute_sheet(base)).save(args.out)
    print(f"wrote {args.out}: one row per attribute (shape, colour, pattern, position, size, direction, tint, "
          f"background), each value in turn", file=sys.stderr)
    return 0


_WORLD_TOKENIZER = os.path.join(WORLD_FOLDER, "flux", "tokenizer")


def _add_world_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--world", default=WORLD_FOLDER, help="world folder (default: the shipped one)")
    p.add_argument("--steps", type=int, default=20, help="Euler steps per image (default 20)")
    p.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance (default 4)")


def _add_world_commands(sub) -> None:
    world = sub.add_parser("world", help="the toy world: train and evaluate its models (docs/results.md)")
    commands = world.add_subparsers(dest="world_command", metavar="WORLD_COMMAND", required=True)
    judge = commands.add_parser("train-judge", help="train the attribute classifier (the judge) on rendered scenes")
    judge.add_argument("--dataset-size", type=int, default=200_000, help="distinct training scenes (default 200000)")
    judge.add_argument("--width", type=int, default=32, help="channels of the first convolution stage (default 32)")
    _add_loop_arguments(judge, steps=4000, batch_size=64, lr=2e-3)
    judge.set_defaults(func=cmd_world_train_judge)
    vae = commands.add_parser("train-vae", help="train the world's VAE (diffusers AutoencoderKL, 16 latent channels)")
    vae.add_argument("--dataset-size", type=int, default=200_000, help="distinct training scenes (default 200000)")
    _add_loop_arguments(vae, steps=2000, batch_size=32, lr=1e-3)
    vae.set_defaults(func=cmd_world_train_vae)
    clip = commands.add_parser("train-clip", help="train the world's CLIP text model and open_clip image tower "
                                                   "contrastively")
    clip.add_argument("--dataset-size", type=int, default=200_000, help="distinct training scenes (default 200000)")
    clip.add_argument("--tokenizer", default=_WORLD_TOKENIZER, help="CLIP-L tokenizer folder (default: the shipped one)")
    _add_loop_arguments(clip, steps=3000, batch_size=128, lr=1e-3)
    clip.set_defaults(func=cmd_world_train_clip)
    flux = commands.add_parser("train-flux", help="train the world's FLUX.1 transformer and T5 encoder by flow "
                                                   "matching (VAE and CLIP frozen)")
    flux.add_argument("--vae", required=True, help="the trained world VAE (vae.safetensors of train-vae)")
    flux.add_argument("--clip", required=True, help="the trained world CLIP (clip.safetensors of train-clip)")
    flux.add_argument("--judge", default=os.path.join(WORLD_FOLDER, "judge.safetensors"),
                      help="judge for the validation accuracy (default: the shipped one; '' for none)")
    flux.add_argument("--dataset-size", type=int, default=60_000,
                      help="distinct training scenes, VAE-encoded once (default 60000)")
    flux.add_argument("--clip-tokenizer", default=_WORLD_TOKENIZER, help="CLIP-L tokenizer folder")
    flux.add_argument("--t5-tokenizer", default=os.path.join(WORLD_FOLDER, "flux", "tokenizer_2"),
                      help="T5 tokenizer folder")
    flux.add_argument("--validate-every", type=int, default=0,
                      help="every K steps: generate held-out scenes, write a grid and the judge's accuracy")
    _add_loop_arguments(flux, steps=16000, batch_size=64, lr=5e-4)
    flux.set_defaults(func=cmd_world_train_flux)
    eval_vae = commands.add_parser("eval-vae", help="per-attribute judge accuracy on a world VAE's reconstructions")
    eval_vae.add_argument("vae", help="vae.safetensors (of train-vae or train-flux)")
    eval_vae.add_argument("--judge", default=os.path.join(WORLD_FOLDER, "judge.safetensors"), help="the judge")
    eval_vae.add_argument("--count", type=int, default=1000, help="renders (default 1000)")
    eval_vae.add_argument("--split", choices=["eval", "train"], default="eval", help="scenes (default eval)")
    eval_vae.add_argument("--seed", type=int, default=123, help="seed of the scenes (default 123)")
    eval_vae.set_defaults(func=cmd_world_eval_vae)
    export = commands.add_parser("export", help="write the world's diffusers FLUX.1 folder and image encoder from the "
                                                "training runs (float16)")
    export.add_argument("--flux-run", required=True, help="the train-flux run folder (its weights and its scaled VAE)")
    export.add_argument("--clip", required=True, help="the train-clip checkpoint (clip.safetensors)")
    export.add_argument("--out", default=WORLD_FOLDER, help="world folder (default: the pack's world/)")
    export.add_argument("--ema", action="store_true", help="export the EMA weights of the FLUX run")
    export.set_defaults(func=cmd_world_export)
    eval_flux = commands.add_parser("eval-flux", help="prompt following of the world's FLUX: held-out scenes from "
                                                      "their full captions, read by the judge")
    _add_world_sampling_arguments(eval_flux)
    eval_flux.add_argument("--count", type=int, default=256, help="images (default 256)")
    eval_flux.add_argument("--split", choices=["eval", "train"], default="eval", help="scenes (default eval)")
    eval_flux.add_argument("--seed", type=int, default=123, help="seed of the scenes and the noise (default 123)")
    eval_flux.add_argument("--no-progress", action="store_true", help="no progress bar")
    eval_flux.set_defaults(func=cmd_world_eval_flux)
    eval_learn = commands.add_parser("eval-learn", help="Learn Concept on held-out world images: CP with the learned "
                                                        "Δ against the bare word")
    _add_world_sampling_arguments(eval_learn)
    eval_learn.add_argument("--kinds", nargs="+", default=["surface", "pose", "lighting"],
                            choices=["surface", "pose", "lighting", "background"], help="concept kinds (default surface, pose and lighting)")
    eval_learn.add_argument("--concepts", type=int, default=8, help="concept images per kind (default 8)")
    eval_learn.add_argument("--prompts", type=int, default=8, help="prompts per concept image (default 8)")
    eval_learn.add_argument("--learn-steps", type=int, default=1400, help="Learn Concept steps (default 1400)")
    eval_learn.add_argument("--learn-lr", type=float,
                            help="Learn Concept learning rate (default: the world's, WORLD_LEARN_LR in "
                                 "modules/world/evaluation.py)")
    eval_learn.add_argument("--learn-batch-size", type=int,
                            help="noise draws of the concept image per Learn Concept step (default: Learn Concept's "
                                 "own, 1)")
    eval_learn.add_argument("--seed", type=int, default=7, help="seed (default 7)")
    eval_learn.add_argument("--work-dir", required=True, help="folder for the concept images and learned files")
    eval_learn.set_defaults(func=cmd_world_eval_learn)
    make_pairs = commands.add_parser("make-pairs", help="render the adapter's training pairs (concept image, word, "
                                                         "a target sharing only the concept, p+) as a manifest")
    make_pairs.add_argument("--out", required=True, help="folder for images/ and manifest.jsonl")
    make_pairs.add_argument("--count", type=int, default=20_000, help="pairs, the five kinds in turn (default 20000)")
    make_pairs.add_argument("--split", choices=["train", "eval"], default="train", help="scenes (default train)")
    make_pairs.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    make_pairs.add_argument("--no-progress", action="store_true", help="no progress bar")
    make_pairs.set_defaults(func=cmd_world_make_pairs)
    table = commands.add_parser("table", help="the paper's table on the world: methods x test sets, CP / PF / "
                                              "CP·PF / copy-paste with 95% bootstrap intervals")
    _add_world_sampling_arguments(table)
    table.add_argument("--rows", nargs="+", required=True,
                       help="oracle, bare, description, adapter=FILE, global=FILE, learn, hybrid=FILE; a label after "
                            "a colon names a variant, e.g. adapter:no-moe=FILE")
    table.add_argument("--sets", nargs="+", default=["single", "multi2", "multi3", "multi4"],
                       choices=["single", "multi2", "multi3", "multi4"], help="test sets (default all)")
    table.add_argument("--count", type=int, default=40, help="images per kind set (default 40)")
    table.add_argument("--learn-count", type=int, default=8,
                       help="images per kind set for the learn and hybrid rows (a seeded subset; default 8)")
    table.add_argument("--learn-steps", type=int, default=1400, help="Learn Concept steps (default 1400)")
    table.add_argument("--hybrid-steps", type=int, default=100, help="hybrid refinement steps (default 100)")
    table.add_argument("--learn-lr", type=float,
                       help="learning rate of the learn and hybrid rows (default: the world's, WORLD_LEARN_LR in "
                            "modules/world/evaluation.py)")
    table.add_argument("--seed", type=int, default=11, help="seed of the cases (default 11)")
    table.add_argument("--out", help="also write the JSON here")
    table.add_argument("--grid", metavar="PNG", help="a picture grid: per case, its concept images and every row's "
                                                      "output for the same seed")
    table.add_argument("--grid-set", default="multi3", help="the test set the grid shows (default multi3)")
    table.add_argument("--grid-rows", type=int, default=4, help="cases in the grid (default 4)")
    table.add_argument("--no-progress", action="store_true", help="no progress bar")
    table.set_defaults(func=cmd_world_table)
    evaluate = commands.add_parser("eval-judge", help="per-attribute accuracy of a judge on held-out renders")
    evaluate.add_argument("judge", help="judge.safetensors")
    evaluate.add_argument("--count", type=int, default=2000, help="renders (default 2000)")
    evaluate.add_argument("--split", choices=["eval", "train"], default="eval",
                          help="eval: held-out combinations (default); train: fresh renders of training combinations")
    evaluate.add_argument("--seed", type=int, default=123, help="seed of the scenes and the augmentation (default 123)")
    evaluate.add_argument("--json", action="store_true", help="print JSON")
    evaluate.set_defaults(func=cmd_world_eval_judge)
    sheet = commands.add_parser("sheet", help="a PNG with every value of every attribute (an overview of the world)")
    sheet.add_argument("out", help="the PNG to write")
    sheet.add_argument("--seed", type=int, default=0, help="grain of the background textures")
    sheet.set_defaults(func=cmd_world_sheet)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mod-adapter",
        description="Mod-Adapter for ComfyUI: inspect adapter checkpoints and concept files, learn concepts by "
                    "tuning, and prepare data for and train an adapter (see docs/training.md).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    info = sub.add_parser("info", help="describe an adapter checkpoint, a concept file, or a preset",
                          description="Print the metadata of a Mod-Adapter checkpoint or concept file (validated, "
                                      "without loading weights), or the size of a preset adapter.")
    info.add_argument("file", nargs="?", help="a .safetensors adapter checkpoint or concept file")
    info.add_argument("--preset", choices=["paper", "tiny", "world"], help="describe a preset adapter instead of a file")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=cmd_info)

    validate = sub.add_parser("validate", help="check a training manifest line by line",
                              description="Check a training manifest (JSONL, or WebDataset tar shards) and print every "
                                          "problem as `line N: message`. Exit status 1 when there is a problem, 0 when "
                                          "it is clean.")
    validate.add_argument("manifest", help="a .jsonl manifest, a .tar shard, or a shard pattern (data/shard-{000..009}.tar)")
    validate.add_argument("--write-clean", metavar="OUT", help="write the valid records to OUT (a .jsonl manifest)")
    validate.add_argument("--no-image-check", action="store_true",
                          help="do not open the images (faster; missing or broken images go unnoticed)")
    validate.add_argument("--require-attribute-caption", action="store_true",
                          help="a record without attribute_caption (p+) is a problem (pre-training needs it)")
    validate.set_defaults(func=cmd_validate)

    pack = sub.add_parser("pack", help="pack a manifest into WebDataset tar shards for large-scale training",
                          description="Write the records of a checked manifest into WebDataset tar shards (each "
                                      "sample: KEY.json with the text fields, the concept image, KEY.target.* and "
                                      "KEY.mask.*), for training from sharded storage. Prints the shards written. "
                                      "Caption first: `caption` rewrites JSONL manifests only.")
    pack.add_argument("manifest", help="a .jsonl manifest (or shards to re-pack)")
    pack.add_argument("--out", required=True, metavar="PATTERN",
                      help="shard names with a printf field, e.g. data/shard-%%06d.tar")
    pack.add_argument("--max-count", type=int, default=10_000, help="samples per shard at most (default 10000)")
    pack.add_argument("--max-gb", type=float, default=3.0, help="shard size in GB at most (default 3)")
    pack.add_argument("--no-progress", action="store_true", help="no progress bar")
    pack.set_defaults(func=cmd_pack)

    caption = sub.add_parser("caption", help="write attribute captions (p+) with a vision-language model",
                             description="Fill attribute_caption (p+) of every record of a manifest with a local "
                                         "image-text-to-text model (e.g. Qwen/Qwen2.5-VL-7B-Instruct). Resumable: "
                                         "re-running skips records already captioned. Exit status 1 when some record "
                                         "is left without a caption.")
    caption.add_argument("manifest", help="a .jsonl training manifest")
    caption.add_argument("--model", required=True, metavar="NAME_OR_PATH",
                         help="a local model folder, or a repo id already in the Hugging Face cache")
    caption.add_argument("--out", metavar="MANIFEST_OUT", help="output manifest (default: MANIFEST.captioned.jsonl)")
    caption.add_argument("--batch-size", type=int, default=4, help="images per generate call (default 4)")
    caption.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    caption.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="model dtype (default: bf16 on CUDA, fp32 on CPU)")
    caption.add_argument("--max-new-tokens", type=int, default=48, help="longest caption in tokens (default 48)")
    caption.add_argument("--max-image-side", type=int, default=768,
                         help="downscale larger images to this side first (default 768; 0 keeps them)")
    caption.add_argument("--prompt", help="the question asked per image; {word} is replaced by the concept word")
    caption.add_argument("--overwrite", action="store_true", help="caption again records that already have p+")
    caption.add_argument("--limit", type=int, help="caption at most this many images in this run")
    caption.add_argument("--no-progress", action="store_true", help="no progress bar")
    caption.set_defaults(func=cmd_caption)

    learn = sub.add_parser(
        "learn", help="learn concept files from images by tuning (TokenVerse mode)",
        description="Optimise the modulation directions of concept words of a caption on one or a few images with "
                    "FLUX.1's denoising loss (TokenVerse: stage 1 one global direction per word, stage 2 per-block "
                    "offsets), and save one concept file per word. Images are resized and centre-cropped to "
                    "--resolution. See docs/learn_concept.md.")
    learn.add_argument("--flux", required=True, metavar="PATH_OR_REPO",
                       help="FLUX.1 as a diffusers folder, a repo id in the local Hugging Face cache, or a single "
                            "transformer .safetensors file (then --components gives the rest); nothing is downloaded")
    learn.add_argument("--components", metavar="PATH_OR_REPO",
                       help="diffusers folder or cached repo with the text encoders, tokenizers and VAE, for a single "
                            "transformer file (default: black-forest-labs/FLUX.1-dev)")
    learn.add_argument("--image", required=True, nargs="+", metavar="IMAGE", help="one or more concept images")
    learn.add_argument("--caption", required=True, help="the caption of the images; it must contain every --word")
    learn.add_argument("--word", required=True, nargs="+", metavar="WORD",
                       help="concept word(s) of the caption to learn, one concept file each")
    learn.add_argument("--out", required=True, metavar="FILE_OR_FOLDER",
                       help="a .safetensors concept file (one word), or a folder receiving <word>.safetensors")
    learn.add_argument("--steps", type=int, default=1400, help="total steps (default 1400, TokenVerse)")
    learn.add_argument("--stage1-steps", type=int, default=800,
                       help="steps with one global direction per word (default 800, TokenVerse); the rest add "
                            "per-block offsets")
    learn.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    learn.add_argument("--seed", type=int, default=0, help="seed of noise, timesteps and flips (default 0)")
    learn.add_argument("--resolution", type=int, default=512,
                       help="square training size, a multiple of 16 (default 512); other sizes are resized and "
                            "centre-cropped")
    learn.add_argument("--device", default="auto", help="cuda, cuda:1, cpu or auto (default: cuda when available)")
    learn.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                       help="model dtype (default: bf16 on CUDA, fp32 on CPU); Δ itself is always learned in fp32")
    learn.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                       help="recompute block activations in backward to save memory (default on)")
    learn.add_argument("--guidance", type=float, default=3.5,
                       help="FLUX.1 [dev] guidance value while learning (default 3.5; ignored by schnell)")
    learn.add_argument("--max-sequence-length", type=int, default=256,
                       help="T5 tokens of the caption (default 256, as ComfyUI pads FLUX prompts)")
    learn.add_argument("--flip-probability", type=float, default=0.5,
                       help="horizontal-flip augmentation (default 0.5); 0 for concepts that have a side, such as a "
                            "pose or a light from the left")
    learn.add_argument("--eval-draws", type=int, default=8,
                       help="held-out noise draws to report the loss with and without the concepts (default 8; 0 = off)")
    learn.add_argument("--overwrite", action="store_true", help="replace existing concept files")
    learn.add_argument("--no-progress", action="store_true", help="no progress bar")
    learn.set_defaults(func=cmd_learn)
    _add_training_commands(sub)
    _add_world_commands(sub)
    demo = sub.add_parser("demo", help="compose shipped concept images with the shipped toy world and adapter into a "
                                       "labelled PNG grid (a minute on a CPU)")
    demo.add_argument("--out", default="mod_adapter_demo.png", help="the PNG to write (default mod_adapter_demo.png)")
    demo.add_argument("--world", default=WORLD_FOLDER, help="world folder (default: the shipped one)")
    demo.add_argument("--adapter", help="adapter checkpoint (default: the world's adapter/toy_world_adapter.safetensors)")
    demo.add_argument("--steps", type=int, default=20, help="Euler steps (default 20)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except ModAdapterError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
