"""Which part of a learned world Δ carries its concept? Writes edited concept files for `eval-learn --reuse-learned`.

`mod-adapter world eval-learn` keeps one learned file per concept in ``--work-dir/<kind>/``. This script writes a
new work dir whose files are an edit of them; `eval-learn --reuse-learned` then scores the edit on exactly the
same concepts, prompts and seeds (it learns nothing, and draws the concept images again).

* ``blocks``: keep Δ on some blocks only and zero the rest (``double``, ``single``, or block indices ``0,1,2``):
  does one half of the model carry the concept?
* ``minus-negatives``: learn, per concept, the word's Δ on the negative images alone (scenes whose values of the
  concept all differ from it, drawn exactly as ``eval-learn --learn-negatives N`` draws them, each under its own
  learning caption, Learn Concept's default recipe), and write the source Δ minus that Δ: does taking away what
  the word learns on *other* images leave the concept? The negatives' Δ files are kept in ``--negatives-dir`` and
  reused when present. The cosine of each source Δ with its negatives' Δ is printed.

    python benchmarks/world_delta_parts.py blocks --work-dir out/world/exp26/rule-s19 \\
        --out out/world/exp26/surface-double-s19 --kind surface --concepts 8 --keep double
    python benchmarks/world_delta_parts.py minus-negatives --work-dir out/world/exp26/views3-s19 \\
        --out out/world/exp26/views3-minus-neg-s19 --negatives-dir out/world/exp26/negonly3-s19 \\
        --kind surface --concepts 8 --seed 19 --negatives 3
    mod-adapter world eval-learn --kinds surface --concepts 8 --prompts 8 --seed 19 --reuse-learned \\
        --work-dir out/world/exp26/surface-double-s19
"""

from __future__ import annotations

import argparse
import os

import torch

from mod_adapter.modules.concept_file import load_concept, save_concept
from mod_adapter.modules.learn_concept import LearnConfig
from mod_adapter.modules.learn_diffusers import learn_concept_files
from mod_adapter.modules.world.evaluation import ABSTRACT_KINDS, eval_learn_draws, negative_scenes
from mod_adapter.modules.world.pairs import concept_caption
from mod_adapter.modules.world.paths import WORLD_FOLDER, check_world
from mod_adapter.modules.world.scene import render
from mod_adapter.modules.world.transformer import MAX_SEQUENCE_LENGTH


def concept_file(work_dir: str, kind: str, c: int) -> str:
    return os.path.join(work_dir, kind, f"{kind}-{c:03d}.safetensors")


def kept_blocks(keep: str, num_blocks: int, num_double_blocks: int) -> list:
    if keep == "double":
        return list(range(num_double_blocks))
    if keep == "single":
        return list(range(num_double_blocks, num_blocks))
    return [int(index) for index in keep.split(",")]


def write_blocks(args: argparse.Namespace) -> None:
    for c in range(args.concepts):
        concept = load_concept(concept_file(args.work_dir, args.kind, c))
        mask = torch.zeros(concept.delta.shape[0], 1)
        mask[kept_blocks(args.keep, concept.delta.shape[0], concept.num_double_blocks)] = 1.0
        concept.delta = concept.delta * mask
        os.makedirs(os.path.join(args.out, args.kind), exist_ok=True)
        save_concept(concept_file(args.out, args.kind, c), concept)
        print(f"{args.kind} {c}: Δ kept on blocks {mask.flatten().nonzero().flatten().tolist()}")


def write_minus_negatives(args: argparse.Namespace) -> None:
    from PIL import Image

    paths = check_world(args.world)
    folder = os.path.join(args.negatives_dir, args.kind)
    os.makedirs(folder, exist_ok=True)
    os.makedirs(os.path.join(args.out, args.kind), exist_ok=True)
    for c, concept_scene, _ in eval_learn_draws(args.kind, args.seed, args.concepts, args.prompts):
        scenes = negative_scenes(concept_scene, args.kind, args.seed, c, args.negatives)
        negatives_delta = concept_file(args.negatives_dir, args.kind, c)
        if not os.path.exists(negatives_delta):
            images = [os.path.join(folder, f"{args.kind}-{c:03d}-negative{n}.png") for n in range(len(scenes))]
            for scene, path in zip(scenes, images):
                Image.fromarray(render(scene)).save(path)
            # eval-learn's settings for a concept: the default recipe, its seed, no flips
            config = LearnConfig(seed=args.seed + c, flip_probability=0.0, log_every=0)
            learn_concept_files(paths["flux"], images, [concept_caption(scene, args.kind) for scene in scenes],
                                [args.kind], negatives_delta, config=config, resolution=64, device="cpu",
                                dtype="fp32", gradient_checkpointing=False, max_sequence_length=MAX_SEQUENCE_LENGTH,
                                eval_draws=0, overwrite=True, show_progress=False, log=lambda message: None)
        source = load_concept(concept_file(args.work_dir, args.kind, c))
        taken = load_concept(negatives_delta).delta
        cosine = float(torch.nn.functional.cosine_similarity(source.delta.flatten(), taken.flatten(), dim=0))
        source.delta = source.delta - taken
        save_concept(concept_file(args.out, args.kind, c), source)
        print(f"{args.kind} {c}: cosine(Δ, negatives' Δ) {cosine:.2f}, mean norm per block of the negatives' Δ "
              f"{taken.norm(dim=-1).mean():.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, func in (("blocks", write_blocks), ("minus-negatives", write_minus_negatives)):
        command = commands.add_parser(name)
        command.add_argument("--work-dir", required=True, help="eval-learn's --work-dir with the learned files")
        command.add_argument("--out", required=True, help="the new work dir, for eval-learn --reuse-learned")
        command.add_argument("--kind", choices=ABSTRACT_KINDS, default="surface")
        command.add_argument("--concepts", type=int, default=8, help="eval-learn's --concepts")
        command.set_defaults(func=func)
        if name == "blocks":
            command.add_argument("--keep", required=True, help="double, single, or block indices such as 0,1,2")
        else:
            command.add_argument("--world", default=WORLD_FOLDER)
            command.add_argument("--negatives-dir", required=True, help="where the negatives' Δ files go")
            command.add_argument("--seed", type=int, default=7, help="eval-learn's --seed")
            command.add_argument("--prompts", type=int, default=8, help="eval-learn's --prompts")
            command.add_argument("--negatives", type=int, default=3, help="negative images per concept")
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
