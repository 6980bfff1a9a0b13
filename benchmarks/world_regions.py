"""Concept regions on the toy world: an object concept restricted to one half of the image, read by the judge.

The world has one object per scene, so the demonstration is by position: for pairs of the world's adapter (an object concept: its shape and surface; a target prompt that names the object by its word and leaves
its surface to the concept), the prompt puts the object on the left or the right, and the concept is restricted
to the half where the object stands ("inside") or to the other half ("outside"). Per variant, on the same noise:
CP (the judge reads the concept's colour and pattern) and PF (the prompt's other stated values). With the region
inside, the concept should act as without a region; outside, the object should look as with the bare word.

Runs in-process in a real ComfyUI (the engine's regions are a ComfyUI host feature), through the pack's nodes:
Concept Encoder, Predictor, Concept Region, Modulation Apply, then ComfyUI's own sampler and VAE.

    COMFYUI_PATH=~/.cache/mod-adapter/comfyui/0.33.0 python benchmarks/world_regions.py --pairs 48
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from _measure import import_comfyui

VARIANTS = ("bare word", "no region", "region inside", "region outside")


def half_mask(side: str, size: int = 64) -> torch.Tensor:
    mask = torch.zeros(1, size, size)
    if side == "left":
        mask[..., : size // 2] = 1.0
    else:
        mask[..., size // 2:] = 1.0
    return mask


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=48, help="held-out object pairs with the object on a side")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=4.0)
    parser.add_argument("--out", default="out/world/regions.json")
    args = parser.parse_args(argv)
    if not os.environ.get("COMFYUI_PATH"):
        parser.error("set COMFYUI_PATH to a ComfyUI checkout (regions are a ComfyUI host feature)")
    import_comfyui(os.environ["COMFYUI_PATH"], cpu=True)
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    import comfy.sample

    import mod_adapter.nodes as pack_nodes
    from mod_adapter.modules.world.evaluation import score
    from mod_adapter.modules.world.judge import images_to_tensor, load_judge
    from mod_adapter.modules.world.pairs import concept_caption, pairs
    from mod_adapter.modules.world.paths import WORLD_ADAPTER_FILE, WORLD_FOLDER, world_paths
    from mod_adapter.modules.world.scene import render
    from mod_adapter.nodes.concept_region import concept_region
    from mod_adapter.nodes.modulation_apply import modulation_apply
    from mod_adapter.nodes.toy_world import load_toy_world

    model, clip, vae, clip_vision = load_toy_world(WORLD_FOLDER)
    runner = pack_nodes.ModAdapterLoader.execute(WORLD_ADAPTER_FILE).result[0]
    judge = load_judge(world_paths()["judge"])
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))

    def sample(patched, positive, seed):
        latent = torch.zeros(1, 16, 8, 8)
        noise = comfy.sample.prepare_noise(latent, seed)
        samples = comfy.sample.sample(patched, noise, args.steps, args.cfg, "euler", "simple", positive, negative,
                                      latent, seed=seed, disable_pbar=True)
        return vae.decode(samples)[..., :3].movedim(-1, 1).float().clamp(0, 1)

    # Any scenes of the world (split None): an object's held-out (eval) scenes rarely leave a target that shares
    # only the object; what is measured is the region, not generalisation.
    chosen = [p for p in pairs(args.seed, args.pairs * 4, split=None, kinds=("object",))
              if p.target.position in ("left", "right")][:args.pairs]
    scores = {v: {"cp": [], "pf": []} for v in VARIANTS}
    started = time.time()
    for index, pair in enumerate(chosen):
        prompt = concept_caption(pair.target, "object")
        image = images_to_tensor([render(pair.concept)]).movedim(1, -1)
        with torch.inference_mode():
            embeds = pack_nodes.ModAdapterConceptEncoder.execute(image, pair.word, clip_vision, clip).result[0]
            concepts = pack_nodes.ModAdapterPredictor.execute(runner, model, embeds, 1.0, None).result[0]
            other_side = "left" if pair.target.position == "right" else "right"
            setups = {
                "bare word": (model, clip.encode_from_tokens_scheduled(clip.tokenize(prompt))),
                "no region": modulation_apply(model, clip, prompt, concepts),
                "region inside": modulation_apply(model, clip, prompt,
                                                  concept_region(concepts, half_mask(pair.target.position))),
                "region outside": modulation_apply(model, clip, prompt, concept_region(concepts, half_mask(other_side))),
            }
            for variant, (patched, positive) in setups.items():
                read = judge.read(sample(patched, positive, args.seed * 1000 + index))[0]
                _, pf = score(read, pair.concept, pair.target, "object")
                # CP on what the concept brings (the prompt already names the shape)
                cp = float(np.mean([read[name] == getattr(pair.concept, name) for name in ("colour", "pattern")]))
                scores[variant]["cp"].append(cp)
                scores[variant]["pf"].append(pf)
        print(f"{index + 1}/{len(chosen)} pairs, {time.time() - started:.0f} s", file=sys.stderr)

    summary = {v: {"cp": float(np.mean(s["cp"])), "pf": float(np.mean(s["pf"]))} for v, s in scores.items()}
    result = {"pairs": len(chosen), "seed": args.seed, "steps": args.steps, "cfg": args.cfg, "variants": summary,
              "command": "python benchmarks/world_regions.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print("| variant | CP (concept's colour and pattern) | PF (the prompt's other values) |")
    print("|---|---:|---:|")
    for variant in VARIANTS:
        print(f"| {variant} | {summary[variant]['cp']:.2f} | {summary[variant]['pf']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
