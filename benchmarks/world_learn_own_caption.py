"""Does a concept learnt by `mod-adapter world eval-learn` come back on its own learning caption?

`eval-learn` scores a learned Δ on new prompts. This script reloads its Δ files from ``--work-dir``, redraws the
same concept scenes (same seed), and samples each concept's own learning caption on 8 seeds at Δ scales 0, 0.5,
1 and 2. It prints, per concept, how often the judge reads each of the concept's attributes.

    python benchmarks/world_learn_own_caption.py --work-dir out/world/evlearn --kind surface
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from mod_adapter.modules.concept_file import load_concept
from mod_adapter.modules.flux_diffusers import load_flux_pipeline, resolve_flux_source
from mod_adapter.modules.token_modulation import TokenConcept
from mod_adapter.modules.world.evaluation import ABSTRACT_KINDS, eval_learn_draws, word_positions
from mod_adapter.modules.world.paths import WORLD_FOLDER, check_world
from mod_adapter.modules.world.judge import load_judge
from mod_adapter.modules.world.pairs import concept_caption
from mod_adapter.modules.world.sampling import generate
from mod_adapter.modules.world.scene import CONCEPT_ATTRIBUTES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", default=WORLD_FOLDER)
    parser.add_argument("--work-dir", required=True, help="eval-learn's --work-dir")
    parser.add_argument("--kind", choices=ABSTRACT_KINDS, default="surface")
    parser.add_argument("--concepts", type=int, default=4, help="eval-learn's --concepts")
    parser.add_argument("--prompts", type=int, default=8, help="eval-learn's --prompts")
    parser.add_argument("--seed", type=int, default=7, help="eval-learn's --seed")
    args = parser.parse_args()

    paths = check_world(args.world)
    pipe = load_flux_pipeline(resolve_flux_source(paths["flux"]), torch.float32)
    judge = load_judge(paths["judge"])
    names = CONCEPT_ATTRIBUTES[args.kind]
    for c, scene, _ in eval_learn_draws(args.kind, args.seed, args.concepts, args.prompts):
        delta = load_concept(os.path.join(args.work_dir, args.kind, f"{args.kind}-{c:03d}.safetensors")).delta
        caption = concept_caption(scene, args.kind)
        positions = word_positions(pipe, caption, args.kind)
        seeds = list(range(8))
        for scale in (0.0, 0.5, 1.0, 2.0):
            concepts = [[TokenConcept(delta * scale, positions, 1.0, name=args.kind)]] * len(seeds) if scale else None
            reads = judge.read(generate(pipe, [caption] * len(seeds), seeds, steps=20, cfg=4.0,
                                        concepts=concepts).float())
            hits = {n: float(np.mean([r[n] == getattr(scene, n) for r in reads])) for n in names}
            print(f"concept {c} ({', '.join(getattr(scene, n) for n in names)}), Δ × {scale}: "
                  + ", ".join(f"{n} {v:.0%}" for n, v in hits.items()) + f"; |Δ| per block ≈ {delta.norm(dim=-1).mean():.1f}")


if __name__ == "__main__":
    main()
