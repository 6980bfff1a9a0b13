"""The `mod-adapter world ...` commands (train, evaluate and export the toy world; the paper's table on it) and
`mod-adapter demo`. The top-level `mod-adapter` command (cli.py) adds them to its parser."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List

from ..errors import ModAdapterError
from ..training.command_line import add_loop_arguments, finish_training, loop_config
from .paths import WORLD_FOLDER


def cmd_world_train_judge(args: argparse.Namespace) -> int:
    import torch

    from ..training.loop import precheck_resume, run_training, setup_distributed
    from .judge import AttributeClassifier, JudgeTask, judge_dataset_fingerprint

    loop = loop_config(args)
    resume = precheck_resume(args.resume, JudgeTask.stage, loop, args.dataset_size,
                             judge_dataset_fingerprint(args.seed, args.dataset_size)) if args.resume else None
    ctx = setup_distributed(args.device)
    torch.manual_seed(args.seed)
    task = JudgeTask(AttributeClassifier(args.width), seed=args.seed, dataset_size=args.dataset_size, device=ctx.device)
    return finish_training(run_training(task, loop, args.out, ctx, resume=resume), "judge")


def _train_world_task(args: argparse.Namespace, loop, ctx, task, what: str) -> int:
    """Run a toy-world model's task on the pack's loop (resuming when asked, once the run's settings match)."""
    from ..training.loop import precheck_resume, run_training

    resume = precheck_resume(args.resume, task.stage, loop, task.dataset_size, task.dataset_fingerprint,
                             task.run_settings()) if args.resume else None
    return finish_training(run_training(task, loop, args.out, ctx, resume=resume), what)


def cmd_world_train_vae(args: argparse.Namespace) -> int:
    import torch

    from ..training.loop import setup_distributed
    from .vae import VaeTask, build_vae

    loop = loop_config(args)
    ctx = setup_distributed(args.device)
    torch.manual_seed(args.seed)
    task = VaeTask(build_vae(), seed=args.seed, dataset_size=args.dataset_size, device=ctx.device)
    return _train_world_task(args, loop, ctx, task, "VAE")


def cmd_world_train_clip(args: argparse.Namespace) -> int:
    import torch

    from ..training.loop import setup_distributed
    from .clip import ClipTask, WorldClip, load_clip_tokenizer

    loop = loop_config(args)
    ctx = setup_distributed(args.device)
    torch.manual_seed(args.seed)
    task = ClipTask(WorldClip(), load_clip_tokenizer(args.tokenizer), seed=args.seed, dataset_size=args.dataset_size,
                    device=ctx.device)
    return _train_world_task(args, loop, ctx, task, "CLIP")


def cmd_world_train_flux(args: argparse.Namespace) -> int:
    import torch

    from ..training.loop import setup_distributed
    from .clip import load_clip_tokenizer, load_world_clip
    from .judge import load_judge
    from .transformer import (FluxWorldTask, FrozenConditioning, WorldFlux, cached_latents,
                                            load_t5_tokenizer)
    from .vae import flux_scaled_vae

    loop = loop_config(args)
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
    from .judge import load_judge
    from .split import scenes
    from .vae import load_world_vae, reconstruction_accuracy

    accuracy = reconstruction_accuracy(load_world_vae(args.vae), load_judge(args.judge),
                                       list(scenes(args.seed, args.count, args.split)))
    print(json.dumps({"count": args.count, "split": args.split, "seed": args.seed, "judge_on_reconstructions": accuracy},
                     indent=1))
    return 0


def world_pipeline(world: str):
    import torch

    from ..flux_diffusers import load_flux_pipeline, resolve_flux_source
    from .paths import check_world
    from .judge import load_judge

    paths = check_world(world)
    return paths, load_flux_pipeline(resolve_flux_source(paths["flux"]), torch.float32), load_judge(paths["judge"])


def cmd_world_eval_flux(args: argparse.Namespace) -> int:
    import time

    from tqdm.auto import tqdm

    from .evaluation import attribute_hits, generated_reads, held_out_pair_accuracy
    from .split import scenes

    _, pipe, judge = world_pipeline(args.world)
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


def learn_config_settings(pairs: List[str]) -> Dict[str, object]:
    """``NAME=VALUE`` pairs (VALUE in JSON) as LearnConfig fields; lists become tuples (the σ ranges)."""
    import dataclasses

    from ..learn_concept import LearnConfig

    names = {f.name for f in dataclasses.fields(LearnConfig)}
    settings = {}
    for pair in pairs:
        name, _, text = pair.partition("=")
        if name not in names or not text:
            raise ModAdapterError(f"--learn-config {pair!r}: give NAME=VALUE with NAME one of {', '.join(sorted(names))}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise ModAdapterError(f"--learn-config {pair!r}: VALUE must be JSON ({error})") from None
        settings[name] = tuple(value) if isinstance(value, list) else value
    return settings


def cmd_world_eval_learn(args: argparse.Namespace) -> int:
    from ..learn_concept import LearnConfig
    from .evaluation import concept_learning

    paths, pipe, judge = world_pipeline(args.world)
    predict = None
    if args.adapter:  # the reference: the adapter's prediction on the same concepts, prompts and seeds
        from .methods import AdapterPredictor, WorldModels

        predict = AdapterPredictor(WorldModels.load(paths, pipe), args.adapter).delta
    learn_lr = args.learn_lr  # None: Learn Concept's learning-rate rule
    learn_batch_size = LearnConfig.batch_size if args.learn_batch_size is None else args.learn_batch_size
    learn_settings = learn_config_settings(args.learn_config)
    rows = []
    for kind in args.kinds:
        scores = concept_learning(paths["flux"], pipe, judge, kind, concepts=args.concepts,
                                  prompts_per_concept=args.prompts, steps=args.learn_steps, lr=learn_lr,
                                  batch_size=learn_batch_size, stage1_steps=args.learn_stage1_steps,
                                  scale=args.scale, reuse_learned=args.reuse_learned, settings=learn_settings,
                                  every_word=args.learn_every_word, views=args.learn_views,
                                  negatives=args.learn_negatives, concept_split=args.concept_split,
                                  predict=predict,
                                  seed=args.seed,
                                  work_dir=os.path.join(args.work_dir, kind), sample_steps=args.steps, cfg=args.cfg,
                                  log=lambda message: print(message, file=sys.stderr))
        rows.append(scores.summary())
    print(json.dumps({"concepts_per_kind": args.concepts, "prompts_per_concept": args.prompts,
                      "learn_steps": args.learn_steps, "learn_lr": learn_lr if learn_lr is not None else "rule",
                      "learn_batch_size": learn_batch_size, "learn_stage1_steps": "4/7" if args.learn_stage1_steps is None else args.learn_stage1_steps,
                      "learn_config": learn_settings, "learn_every_word": args.learn_every_word,
                      "learn_views": args.learn_views, "learn_negatives": args.learn_negatives,
                      "concept_split": args.concept_split, "adapter": args.adapter,
                      "scale": args.scale, "reused": args.reuse_learned,
                      "sample_steps": args.steps,
                      "cfg": args.cfg, "seed": args.seed, "rows": rows}, indent=1))
    return 0


def cmd_world_make_pairs(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .pairs import write_pairs

    with tqdm(total=args.count, desc="rendering pairs", unit="pair", disable=args.no_progress) as bar:
        counts = write_pairs(args.out, args.seed, args.count, args.split, progress=bar.update)
    print(f"wrote {args.count} pairs ({', '.join(f'{n} {k}' for k, n in counts.items())}) and "
          f"{os.path.join(args.out, 'manifest.jsonl')}", file=sys.stderr)
    return 0


def cmd_world_table(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from . import methods
    from .table import picture_grid, table_rows

    paths, pipe, judge = world_pipeline(args.world)
    learn_lr = args.learn_lr  # None: Learn Concept's learning-rate rule
    models = methods.WorldModels.load(paths, pipe)
    rows, grid_results = table_rows(
        args.rows, args.sets, lambda name, checkpoint: methods.row_method(
            models, name, checkpoint, learn_steps=args.learn_steps, hybrid_steps=args.hybrid_steps, lr=learn_lr,
            seed=args.seed),
        pipe, judge, count=args.count, learn_count=args.learn_count, seed=args.seed, steps=args.steps, cfg=args.cfg,
        grid_set=args.grid_set if args.grid else None, grid_rows=args.grid_rows, versus=args.versus,
        progress=lambda desc, total: tqdm(total=total, desc=desc, unit="image", disable=args.no_progress),
        on_row=lambda row: print(json.dumps(row), file=sys.stderr))
    output = {"count_per_kind_set": args.count, "learn_count_per_kind_set": args.learn_count, "steps": args.steps,
              "cfg": args.cfg, "seed": args.seed, "learn_steps": args.learn_steps, "hybrid_steps": args.hybrid_steps,
              "learn_lr": learn_lr if learn_lr is not None else "rule", "rows": rows}
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

    from . import methods
    from .demo import DEMO_ROWS, demo_grid

    started = time.perf_counter()
    from .paths import WORLD_ADAPTER_FILE

    adapter = args.adapter or os.path.join(args.world, "adapter", WORLD_ADAPTER_FILE)
    if not os.path.isfile(adapter):
        raise ModAdapterError(f"no adapter at {adapter}: the demo needs the world's trained adapter (shipped in "
                              f"world/adapter/{WORLD_ADAPTER_FILE}; reinstall the pack, or give --adapter)")
    # a newcomer's first run shows the demo's own bar and its result, not the libraries' loading bars
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    paths, pipe, _ = world_pipeline(args.world)
    models = methods.WorldModels.load(paths, pipe)
    predictor = methods.AdapterPredictor(models, adapter)
    with tqdm(total=2 * args.steps, desc="demo", unit="step", disable=args.no_progress) as bar:
        grid = demo_grid(models, predictor, DEMO_ROWS, steps=args.steps, progress=bar.update)
    Image.fromarray(grid).save(args.out)
    print(f"wrote {args.out} ({len(DEMO_ROWS)} prompts, {time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return 0


def cmd_world_export(args: argparse.Namespace) -> int:
    from .export import export_world

    paths = export_world(args.flux_run, args.clip, args.out, use_ema=args.ema)
    print(f"wrote the world's FLUX.1 folder {paths['flux']} and image encoder {paths['image_encoder']}",
          file=sys.stderr)
    return 0


def cmd_world_eval_judge(args: argparse.Namespace) -> int:
    from .judge import judge_accuracy, load_judge
    from .split import scenes

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

    from .scene import Scene, attribute_sheet

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


def add_world_commands(sub) -> None:
    world = sub.add_parser("world", help="the toy world: train and evaluate its models (docs/results.md)")
    commands = world.add_subparsers(dest="world_command", metavar="WORLD_COMMAND", required=True)
    judge = commands.add_parser("train-judge", help="train the attribute classifier (the judge) on rendered scenes")
    judge.add_argument("--dataset-size", type=int, default=200_000, help="distinct training scenes (default 200000)")
    judge.add_argument("--width", type=int, default=32, help="channels of the first convolution stage (default 32)")
    add_loop_arguments(judge, steps=4000, batch_size=64, lr=2e-3)
    judge.set_defaults(func=cmd_world_train_judge)
    vae = commands.add_parser("train-vae", help="train the world's VAE (diffusers AutoencoderKL, 16 latent channels)")
    vae.add_argument("--dataset-size", type=int, default=200_000, help="distinct training scenes (default 200000)")
    add_loop_arguments(vae, steps=2000, batch_size=32, lr=1e-3)
    vae.set_defaults(func=cmd_world_train_vae)
    clip = commands.add_parser("train-clip", help="train the world's CLIP text model and open_clip image tower "
                                                   "contrastively")
    clip.add_argument("--dataset-size", type=int, default=200_000, help="distinct training scenes (default 200000)")
    clip.add_argument("--tokenizer", default=_WORLD_TOKENIZER, help="CLIP-L tokenizer folder (default: the shipped one)")
    add_loop_arguments(clip, steps=3000, batch_size=128, lr=1e-3)
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
    add_loop_arguments(flux, steps=16000, batch_size=64, lr=5e-4)
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
                            help="Learn Concept learning rate (default: Learn Concept's rule, 0.0125 × the model's "
                                 "rms(vec))")
    eval_learn.add_argument("--learn-batch-size", type=int,
                            help="noise draws of the concept image per Learn Concept step (default: Learn Concept's "
                                 "own, 1)")
    eval_learn.add_argument("--learn-stage1-steps", type=int,
                            help="Learn Concept stage-1 steps (default 4/7 of --learn-steps, TokenVerse's split)")
    eval_learn.add_argument("--learn-config", action="append", default=[], metavar="NAME=VALUE",
                            help="any other Learn Concept setting (a LearnConfig field, VALUE in JSON), e.g. "
                                 "stage2_sigma_range=[0,1]; repeatable")
    eval_learn.add_argument("--scale", type=float, default=1.0, help="the learned Δ's strength when sampling "
                                                                      "(default 1)")
    eval_learn.add_argument("--learn-every-word", action="store_true",
                            help="learn a Δ for every word of the learning caption at once (TokenVerse's "
                                 "decomposition) and score the concept word's; default: the concept word only")
    eval_learn.add_argument("--learn-views", type=int, default=1,
                            help="images per concept to learn from: the concept image and N-1 more scenes with its "
                                 "values, the other groups drawn anew, each under its own caption (default 1)")
    eval_learn.add_argument("--learn-negatives", type=int, default=0,
                            help="negative images per concept: scenes whose values of the concept all differ, each "
                                 "under its own caption (Learn Concept's negatives; default 0)")
    eval_learn.add_argument("--concept-split", choices=["eval", "train"], default="eval",
                            help="where the concept images come from: eval, the held-out combinations (default), or "
                                 "train, combinations the base model was trained on (a diagnosis)")
    eval_learn.add_argument("--adapter", help="a Mod-Adapter checkpoint: score its predicted Δ instead of learning "
                                              "one, on the same concepts, prompts and seeds (the reference)")
    eval_learn.add_argument("--reuse-learned", action="store_true",
                            help="score concept files already in --work-dir instead of learning them again")
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
                       help="oracle, bare, description, adapter=FILE, global=FILE, learn, learn-isolated (Learn "
                            "Concept with TokenVerse's isolation loss, 4 partner scenes per concept image), "
                            "hybrid=FILE; a label after "
                            "a colon names a variant, e.g. adapter:no-moe=FILE")
    table.add_argument("--sets", nargs="+", default=["single", "multi2", "multi3", "multi4"],
                       choices=["single", "multi2", "multi3", "multi4"], help="test sets (default all)")
    table.add_argument("--count", type=int, default=40, help="images per kind set (default 40)")
    table.add_argument("--learn-count", type=int, default=8,
                       help="images per kind set for the learn and hybrid rows (a seeded subset; default 8)")
    table.add_argument("--learn-steps", type=int, default=1400, help="Learn Concept steps (default 1400)")
    table.add_argument("--hybrid-steps", type=int, default=100, help="hybrid refinement steps (default 100)")
    table.add_argument("--learn-lr", type=float,
                       help="learning rate of the learn and hybrid rows (default: Learn Concept's rule, 0.0125 × "
                            "the model's rms(vec))")
    table.add_argument("--versus", metavar="ROW",
                       help="also give each later row's paired difference from this row (its name as in --rows, "
                            "e.g. adapter:full), as with the bare word")
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


def add_demo_command(sub) -> None:
    demo = sub.add_parser("demo", help="compose shipped concept images with the shipped toy world and adapter into a "
                                       "labelled PNG grid (a minute on a CPU)")
    demo.add_argument("--out", default="mod_adapter_demo.png", help="the PNG to write (default mod_adapter_demo.png)")
    demo.add_argument("--world", default=WORLD_FOLDER, help="world folder (default: the shipped one)")
    demo.add_argument("--adapter", help="adapter checkpoint (default: the world's adapter/toy_world_adapter.safetensors)")
    demo.add_argument("--steps", type=int, default=20, help="Euler steps (default 20)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(func=cmd_demo)
