"""How much does FLUX's denoising loss see each concept kind on the toy world? Why Learn Concept carries a pose
or a lighting from one image, and hardly a surface.

Learn Concept minimises the flow-matching loss of the concept image under its caption, which names the concept
only by its word ("a box with a surface ..."). Its Δ can carry the concept only as far as the loss tells the
right value from a wrong one. For each held-out concept image of ``world eval-learn`` (the same scenes: the
script replays its draws), per σ bin, on the same noise draws:

* ``stated``: the loss under the full caption, the concept's value stated in words (the text oracle);
* ``wrong``: the same, with the concept's attributes stated wrong (the values of another scene, as the
  evaluation prompts draw them);
* ``wrong <attribute>``: the same, with only that one of the concept's attributes wrong (for a kind of two
  attributes, e.g. a surface's colour and pattern): how much of the signal each attribute gives;
* ``bare``: under the learning caption with Δ = 0 (the bare word);
* ``learned``: under the learning caption with the learned Δ on the word (when ``--work-dir`` holds the concept
  files of an ``eval-learn`` run);
* ``adapter``: under the learning caption with the adapter's predicted Δ on the word (with ``--adapter``): a Δ
  that is known to carry the concept to new prompts (docs/results.md, the table). Where it has a higher loss
  than ``learned``, the loss of the concept image prefers a Δ that does not transfer.

``wrong − stated`` is the signal that tells the right value from a wrong one; ``bare − learned`` is what the
learned Δ took of it. Both are in units of the loss (a mean squared error of the velocity, about 1.4 here).

With ``--held-out-view``, every column is measured on a new scene instead of the concept image: the concept's
values, every other group drawn anew (a view no run learned from), under its own captions. A learned Δ that
lowers the loss there carries something of the concept beyond its one image. With ``--other-view``, the new
scene has another scene's values of the concept too (the control: a Δ that lowers the loss as much there
carries nothing of its concept, only a correction of the model that any image takes). Several ``--work-dir`` give one
``learned`` column each, named by the folder (e.g. one image against ``eval-learn --learn-views 3``).

    python benchmarks/world_learn_loss_sees.py --work-dir out/world/evlearn-rule-s7 --kinds surface pose lighting
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import numpy as np
import torch

BINS = ((0.0, 0.2), (0.2, 0.4), (0.4, 0.6), (0.6, 0.8), (0.8, 1.0))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", default=None, help="the world folder (default: the shipped one)")
    parser.add_argument("--work-dir", required=True, nargs="+",
                        help="eval-learn --work-dir(s) (their <kind>/<kind>-NNN files); one learned column each")
    parser.add_argument("--kinds", nargs="+", default=["surface", "pose", "lighting"])
    parser.add_argument("--concepts", type=int, default=4, help="concept images per kind (default 4)")
    parser.add_argument("--prompts", type=int, default=8, help="eval-learn's --prompts (replays its draws)")
    parser.add_argument("--seed", type=int, default=7, help="eval-learn's --seed (default 7)")
    parser.add_argument("--draws", type=int, default=16, help="noise draws per σ bin (default 16)")
    parser.add_argument("--adapter", help="a Mod-Adapter checkpoint: adds the loss of its predicted Δ")
    parser.add_argument("--held-out-view", action="store_true",
                        help="measure on a new scene with the concept's values (other groups drawn anew) instead of "
                             "the concept image")
    parser.add_argument("--other-view", action="store_true",
                        help="the control: measure on a new scene with another scene's values of the concept")
    args = parser.parse_args(argv)

    from mod_adapter.modules.concept_file import load_concept
    from mod_adapter.modules.flux_diffusers import encode_caption
    from mod_adapter.modules.learn_concept import evaluate_loss
    from mod_adapter.modules.learn_diffusers import DiffusersDenoiser
    from mod_adapter.modules.world.captions import full_caption
    from mod_adapter.modules.world.cli import world_pipeline
    from mod_adapter.modules.world.evaluation import ABSTRACT_KINDS, eval_learn_draws, more_views, word_positions
    from mod_adapter.modules.world.pairs import concept_caption
    from mod_adapter.modules.world.paths import WORLD_FOLDER
    from mod_adapter.modules.world.methods import scene_latents
    from mod_adapter.modules.world.scene import CONCEPT_ATTRIBUTES
    from mod_adapter.modules.world.transformer import MAX_SEQUENCE_LENGTH

    paths, pipe, _ = world_pipeline(args.world or WORLD_FOLDER)
    torch.set_grad_enabled(False)
    predictor = None
    if args.adapter:
        from mod_adapter.modules.world.methods import AdapterPredictor, WorldModels

        predictor = AdapterPredictor(WorldModels.load(paths, pipe), args.adapter)

    def loss_by_bin(caption, latents, delta=None, positions=None):
        embeds, pooled = encode_caption(pipe, caption, "cpu", MAX_SEQUENCE_LENGTH)
        with DiffusersDenoiser(pipe.transformer, embeds, pooled) as denoiser:
            return [evaluate_loss(denoiser, latents, None if delta is None else [delta],
                                  [positions] if delta is not None else [[0]], seed=args.seed, num_draws=args.draws,
                                  sigma_range=low_high) for low_high in BINS]

    learned_columns = {work_dir: "learned" if len(args.work_dir) == 1 else
                       f"learned:{os.path.basename(os.path.normpath(work_dir))}" for work_dir in args.work_dir}
    rows = []
    for kind in args.kinds:
        per_concept = []
        for c, concept_scene, targets in eval_learn_draws(kind, args.seed, args.concepts, args.prompts):
            # eval-learn --learn-views draws its views from [seed, kind, c, 1]: the held-out view from another stream
            scene = (more_views(concept_scene, kind, 1, np.random.default_rng([args.seed, ABSTRACT_KINDS.index(kind),
                                                                               c, 2]))[0]
                     if args.held_out_view or args.other_view else concept_scene)
            if args.other_view:  # the first prompt's values of the concept, which all differ from the concept's
                scene = dataclasses.replace(scene, **{name: getattr(targets[0], name)
                                                      for name in CONCEPT_ATTRIBUTES[kind]})
            wrong_from = targets[1 if args.other_view else 0]  # values that differ from the scene's own
            wrong_scene = dataclasses.replace(scene, **{name: getattr(wrong_from, name)
                                                        for name in CONCEPT_ATTRIBUTES[kind]})
            latents = scene_latents(pipe, scene)
            learning_caption = concept_caption(scene, kind)
            losses = {"stated": loss_by_bin(full_caption(scene), latents),
                      "wrong": loss_by_bin(full_caption(wrong_scene), latents),
                      "bare": loss_by_bin(learning_caption, latents)}
            attributes = CONCEPT_ATTRIBUTES[kind]
            for name in attributes if len(attributes) > 1 else ():
                one_wrong = dataclasses.replace(scene, **{name: getattr(wrong_scene, name)})
                losses[f"wrong {name}"] = loss_by_bin(full_caption(one_wrong), latents)
            for work_dir in args.work_dir:
                concept_path = os.path.join(work_dir, kind, f"{kind}-{c:03d}.safetensors")
                column = learned_columns[work_dir]
                if os.path.isfile(concept_path):
                    losses[column] = loss_by_bin(learning_caption, latents, load_concept(concept_path).delta,
                                                 word_positions(pipe, learning_caption, kind))
            if predictor is not None:  # the adapter sees the concept image, as an artist's graph gives it
                losses["adapter"] = loss_by_bin(learning_caption, latents, predictor.delta(concept_scene, kind),
                                                word_positions(pipe, learning_caption, kind))
            per_concept.append(losses)
            print(f"{kind} {c + 1}/{args.concepts}", file=sys.stderr)
        for b, (low, high) in enumerate(BINS):
            row = {"kind": kind, "sigma": f"{low:.1f}-{high:.1f}"}
            for name in per_concept[0]:
                row[name] = float(np.mean([p[name][b] for p in per_concept]))
            row["wrong_minus_stated"] = row["wrong"] - row["stated"]
            for name in CONCEPT_ATTRIBUTES[kind]:
                if f"wrong {name}" in row:
                    row[f"wrong_{name}_minus_stated"] = row[f"wrong {name}"] - row["stated"]
            for column in learned_columns.values():
                if column in row:
                    row[f"bare_minus_{column}"] = row["bare"] - row[column]
            rows.append(row)
    print(json.dumps(rows, indent=1))
    columns = ["kind", "sigma", "stated", "wrong", "bare", *learned_columns.values(), "adapter", "wrong_minus_stated",
               *(f"bare_minus_{column}" for column in learned_columns.values())]
    columns += sorted({c for row in rows for c in row if c.startswith("wrong_") and c != "wrong_minus_stated"})
    print("| " + " | ".join(columns) + " |\n|" + " --- |" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) if isinstance(row.get(c), str) else
                                 (f"{row[c]:.4f}" if c in row else "—") for c in columns) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
