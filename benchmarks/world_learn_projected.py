"""Learn Concept on the world's own rendition of each concept image: does a learned Δ carry more from an image the
model can draw?

For each concept image that `mod-adapter world eval-learn` draws (same seed, kind and order), the image is
projected onto what the world's FLUX.1 draws: noised to σ ``--sigma`` (fixed noise per concept) and denoised back
under its learning caption, which names the concept's word without its value (Euler, the sampler's schedule of
20 steps, classifier-free guidance 4, as eval-learn samples). The judge reads whether the projection still shows
the concept's values. The word's Δ is then learned on the projection, with eval-learn's recipe (the rule's
learning rate, 1,400 steps, no flips, the concept's seed), into ``--work-dir/<kind>/<kind>-NNN.safetensors``, so
that `eval-learn --reuse-learned --work-dir` scores it on the same prompts and seeds.

    python benchmarks/world_learn_projected.py --kind surface --concepts 8 --seed 19 --sigma 0.3 \\
        --work-dir out/world/exp26/proj03-s19
    mod-adapter world eval-learn --kinds surface --concepts 8 --prompts 8 --seed 19 --reuse-learned \\
        --work-dir out/world/exp26/proj03-s19
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
from PIL import Image

from mod_adapter.modules.flux_diffusers import flux_velocity, vae_decode
from mod_adapter.modules.learn_concept import LearnConfig
from mod_adapter.modules.learn_diffusers import learn_concept_files
from mod_adapter.modules.world.cli import world_pipeline
from mod_adapter.modules.world.evaluation import ABSTRACT_KINDS, eval_learn_draws, judge_reads
from mod_adapter.modules.world.methods import scene_latents
from mod_adapter.modules.world.pairs import concept_caption
from mod_adapter.modules.world.paths import WORLD_FOLDER
from mod_adapter.modules.world.sampling import encode_prompts, initial_noise, sigmas
from mod_adapter.modules.world.scene import CONCEPT_ATTRIBUTES
from mod_adapter.modules.world.transformer import MAX_SEQUENCE_LENGTH

SAMPLE_STEPS, CFG = 20, 4.0  # eval-learn's sampling defaults


@torch.no_grad()
def project(pipe, latents: torch.Tensor, caption: str, sigma: float, noise_seed: int) -> torch.Tensor:
    """The image (1, 3, H, W) in 0..1 that the model draws from ``latents`` noised to the schedule's first σ ≤
    ``sigma``, under ``caption``."""
    schedule = sigmas(SAMPLE_STEPS)
    start = int((schedule > sigma + 1e-6).sum())
    first = float(schedule[start])
    x = (1.0 - first) * latents + first * initial_noise(noise_seed)
    embeds, pooled = encode_prompts(pipe, [caption], MAX_SEQUENCE_LENGTH)
    empty_embeds, empty_pooled = encode_prompts(pipe, [""], MAX_SEQUENCE_LENGTH)
    for i in range(start, SAMPLE_STEPS):
        level = torch.full((1,), float(schedule[i]))
        v_cond = flux_velocity(pipe.transformer, x, level, embeds, pooled, None)
        v_uncond = flux_velocity(pipe.transformer, x, level, empty_embeds, empty_pooled, None)
        x = x + (float(schedule[i + 1]) - float(schedule[i])) * (v_uncond + CFG * (v_cond - v_uncond)).float()
    return ((vae_decode(pipe.vae, x) + 1.0) / 2.0).clamp(0.0, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", default=WORLD_FOLDER)
    parser.add_argument("--work-dir", required=True, help="where the projections and learned files go")
    parser.add_argument("--kind", choices=ABSTRACT_KINDS, default="surface")
    parser.add_argument("--concepts", type=int, default=8, help="eval-learn's --concepts")
    parser.add_argument("--prompts", type=int, default=8, help="eval-learn's --prompts")
    parser.add_argument("--seed", type=int, default=7, help="eval-learn's --seed")
    parser.add_argument("--sigma", type=float, default=0.3, help="how far the image is noised before it is redrawn")
    args = parser.parse_args()

    paths, pipe, judge = world_pipeline(args.world)
    folder = os.path.join(args.work_dir, args.kind)
    os.makedirs(folder, exist_ok=True)
    kept = []
    for c, scene, _ in eval_learn_draws(args.kind, args.seed, args.concepts, args.prompts):
        caption = concept_caption(scene, args.kind)
        image = project(pipe, scene_latents(pipe, scene), caption, args.sigma, noise_seed=1000 + c)
        read = judge_reads(judge, image)[0]
        shown = {name: read[name] == getattr(scene, name) for name in CONCEPT_ATTRIBUTES[args.kind]}
        kept.append(shown)
        path = os.path.join(folder, f"{args.kind}-{c:03d}-projected.png")
        Image.fromarray((image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)
        config = LearnConfig(seed=args.seed + c, flip_probability=0.0, log_every=0)  # eval-learn's settings
        learn_concept_files(paths["flux"], [path], [caption], [args.kind],
                            os.path.join(folder, f"{args.kind}-{c:03d}.safetensors"), config=config, resolution=64,
                            device="cpu", dtype="fp32", gradient_checkpointing=False,
                            max_sequence_length=MAX_SEQUENCE_LENGTH, eval_draws=0, overwrite=True,
                            show_progress=False, log=lambda message: None)
        print(f"{args.kind} {c}: the projection shows " + ", ".join(
            f"{name} {'yes' if hit else 'no'}" for name, hit in shown.items()), flush=True)
    print("share of the concept's values the projections show: " + ", ".join(
        f"{name} {np.mean([k[name] for k in kept]):.2f}" for name in kept[0]))


if __name__ == "__main__":
    main()
