"""The `mod-adapter` command.

Subcommands arrive with the features that need them; `info` describes an
adapter checkpoint, a concept file or a preset. User errors print one line
(`error: ...`) and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List, Optional

from . import __version__
from .modules.errors import ModAdapterError
from .modules.training.command_line import EXIT_INTERRUPTED, add_loop_arguments, finish_training, loop_config
from .modules.world.cli import add_demo_command, add_world_commands

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


def cmd_learn(args: argparse.Namespace, should_stop=None) -> int:
    """Learn concept files (TokenVerse mode). Ctrl-C stops after the current step and saves nothing."""
    import signal
    import threading

    from .modules.learn_concept import LearnConfig
    from .modules.learn_diffusers import learn_concept_files

    # Unset options keep LearnConfig's defaults, which are not repeated here.
    optional = {name: value for name, value in (("relative_lr", args.relative_lr),
                                                ("isolation_probability", args.isolation_probability),
                                                ("negative_probability", args.negative_probability),
                                                ("negative_weight", args.negative_weight))
                if value is not None}
    config = LearnConfig(steps=args.steps, stage1_steps=args.stage1_steps, lr=args.lr, seed=args.seed, **optional,
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
            show_progress=not args.no_progress, should_stop=should_stop or interrupted.is_set,
            isolation=[tuple(pair) for pair in args.isolate_with],
            negatives=[tuple(pair) for pair in args.negative])
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


def cmd_pretrain(args: argparse.Namespace) -> int:
    from .modules.training.pretrain import PretrainSettings, run_pretrain

    settings = PretrainSettings(
        manifest=args.manifest, out=args.out, flux=args.flux, image_encoder=args.image_encoder,
        image_encoder_weights=args.image_encoder_weights, router=args.router, components=args.components,
        clip_l=args.clip_l, image_encoder_config=args.image_encoder_config, preset=args.preset, config=args.config,
        device=args.device, text_dtype=args.text_dtype, base_model=args.base_model,
        target_cache_size=args.target_cache_size, resume=args.resume)
    return finish_training(run_pretrain(settings, loop_config(args)))


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
    return finish_training(run_train(settings, loop_config(args)))


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
    add_loop_arguments(pre, steps=50000, batch_size=32, lr=1e-4)
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
    add_loop_arguments(train, steps=126000, batch_size=1, lr=1e-4)
    train.set_defaults(func=cmd_train)


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
    learn.add_argument("--caption", required=True, nargs="+",
                       help="the caption of the images, or one caption per --image in the same order (the same "
                            "concepts in other settings: each image is denoised under its own caption); every "
                            "caption must contain every --word")
    learn.add_argument("--word", required=True, nargs="+", metavar="WORD",
                       help="concept word(s) of the caption to learn, one concept file each")
    learn.add_argument("--out", required=True, metavar="FILE_OR_FOLDER",
                       help="a .safetensors concept file (one word), or a folder receiving <word>.safetensors")
    learn.add_argument("--steps", type=int, default=1400, help="total steps (default 1400, TokenVerse)")
    learn.add_argument("--stage1-steps", type=int, default=800,
                       help="steps with one global direction per word (default 800, TokenVerse); the rest add "
                            "per-block offsets")
    learn.add_argument("--lr", type=float, default=None,
                       help="Adam learning rate (default: the rule, --relative-lr × the model's rms(vec), measured "
                            "when the run starts; give a number to override it)")
    # The default is LearnConfig's (RELATIVE_LR); it is not imported here, which would load torch for --help.
    learn.add_argument("--relative-lr", type=float, default=None,
                       help="the rule's learning rate per unit of the model's rms(vec), the scale of FLUX's "
                            "modulation vector that Δ is added to (default 0.0125, measured on the toy world)")
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
    learn.add_argument("--isolate-with", nargs=2, action="append", default=[], metavar=("IMAGE", "CAPTION"),
                       help="TokenVerse's concept isolation: another concept image and its caption (repeatable). On "
                            "--isolation-probability of the steps the concept image is composed beside it, under "
                            "'CAPTION_OF_THE_IMAGES and CAPTION', and the learned concepts must leave its half as the "
                            "model draws it")
    learn.add_argument("--isolation-probability", type=float, default=None,
                       help="share of the steps that use an --isolate-with image (default 0.5, TokenVerse's half)")
    learn.add_argument("--negative", nargs=2, action="append", default=[], metavar=("IMAGE", "CAPTION"),
                       help="an image WITHOUT the concept and its caption, which names every --word (repeatable; "
                            "ours, not TokenVerse's): on --negative-probability of the steps the learned concepts "
                            "may not lower its denoising loss, so that they learn the concept and not a correction "
                            "of the model that any image takes (docs/learn_concept.md)")
    learn.add_argument("--negative-probability", type=float, default=None,
                       help="share of the steps that also draw a --negative image (default 0.5)")
    learn.add_argument("--negative-weight", type=float, default=None,
                       help="weight of the --negative term (default 1)")
    learn.add_argument("--eval-draws", type=int, default=8,
                       help="held-out noise draws to report the loss with and without the concepts (default 8; 0 = off)")
    learn.add_argument("--overwrite", action="store_true", help="replace existing concept files")
    learn.add_argument("--no-progress", action="store_true", help="no progress bar")
    learn.set_defaults(func=cmd_learn)
    _add_training_commands(sub)
    add_world_commands(sub)
    add_demo_command(sub)
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
