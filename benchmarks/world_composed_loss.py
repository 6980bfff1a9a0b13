"""Can the world's FLUX.1 denoise what TokenVerse's concept isolation shows it? Why ``learn-isolated`` loses.

An isolation step (docs/learn_concept.md, "Concept isolation") denoises the concept image beside a partner
scene, a 64 × 128 image under "CAPTION and a <partner's object>". The world's FLUX.1 was trained on single
64 × 64 scenes only. For held-out scenes and the partners ``world table``'s ``learn-isolated`` row draws
(:func:`~mod_adapter.modules.world.methods.isolation_scenes`), per σ bin, on the same noise draws:

* ``alone``: the scene alone under its full caption (what the model was trained on);
* ``composed``: the scene beside its partner under the composed caption;
* ``composed, left half`` / ``right half``: the same composed image's loss on each half.

A composed loss far above the lone scene's says the isolation steps train Δ on images the model cannot draw.

    python benchmarks/world_composed_loss.py --scenes 8
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

BINS = ((0.0, 0.2), (0.2, 0.4), (0.4, 0.6), (0.6, 0.8), (0.8, 1.0))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", default=None, help="the world folder (default: the shipped one)")
    parser.add_argument("--scenes", type=int, default=8, help="held-out scenes (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the scenes and of the table's partners")
    parser.add_argument("--draws", type=int, default=8, help="noise draws per σ bin (default 8)")
    args = parser.parse_args(argv)

    from mod_adapter.modules.flow_matching import flow_matching_pair
    from mod_adapter.modules.flux_diffusers import encode_caption
    from mod_adapter.modules.learn_concept import composed_caption
    from mod_adapter.modules.learn_diffusers import DiffusersDenoiser
    from mod_adapter.modules.world.captions import describe, full_caption
    from mod_adapter.modules.world.cli import world_pipeline
    from mod_adapter.modules.world.evaluation import text_layout
    from mod_adapter.modules.world.methods import isolation_scenes, scene_latents
    from mod_adapter.modules.world.paths import WORLD_FOLDER
    from mod_adapter.modules.world.split import EVAL, random_scene
    from mod_adapter.modules.world.transformer import MAX_SEQUENCE_LENGTH

    _, pipe, _ = world_pipeline(args.world or WORLD_FOLDER)
    torch.set_grad_enabled(False)
    layout = text_layout(pipe)

    def losses_by_bin(caption: str, latents: torch.Tensor, draw_seed: int):
        """Per σ bin: (whole image, left half, right half) mean squared error of the velocity, no concepts."""
        width = latents.shape[-1] // 2
        generator = torch.Generator().manual_seed(draw_seed)
        with DiffusersDenoiser(pipe.transformer, *encode_caption(pipe, caption, "cpu", MAX_SEQUENCE_LENGTH)) as model:
            out = []
            for low, high in BINS:
                parts = []
                for draw in range(args.draws):
                    sigma = torch.full((1,), low + (high - low) * (draw + 0.5) / args.draws)
                    noisy, target = flow_matching_pair(latents, torch.randn(latents.shape, generator=generator), sigma)
                    error = (model.velocity(noisy, sigma, [], []).float() - target).pow(2)
                    parts.append([float(error.mean()), float(error[..., :width].mean()),
                                  float(error[..., width:].mean())])
                out.append(np.mean(parts, axis=0))
            return out

    rng = np.random.default_rng(args.seed)
    per_scene = []
    for index in range(args.scenes):
        scene = random_scene(rng, EVAL)
        partner = isolation_scenes(scene, 1, args.seed)[0]
        caption = full_caption(scene)
        both = composed_caption(layout, caption, f"a {describe(partner, 'object')}")
        alone = scene_latents(pipe, scene)
        composed = torch.cat([alone, scene_latents(pipe, partner)], dim=-1)
        per_scene.append({"alone": [b[0] for b in losses_by_bin(caption, alone, index)],
                          **{name: [b[k] for b in losses_by_bin(both, composed, index)]
                             for k, name in enumerate(("composed", "composed, left half", "composed, right half"))}})
        print(f"scene {index + 1}/{args.scenes}", file=sys.stderr)

    rows = [{"sigma": f"{low:.1f}-{high:.1f}",
             **{name: float(np.mean([s[name][b] for s in per_scene])) for name in per_scene[0]}}
            for b, (low, high) in enumerate(BINS)]
    print(json.dumps(rows, indent=1))
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |\n|" + " --- |" * len(columns))
    for row in rows:
        print("| " + " | ".join(row[c] if isinstance(row[c], str) else f"{row[c]:.4f}" for c in columns) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
