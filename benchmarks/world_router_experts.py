"""Which expert does each of the world's concept words reach, in a trained adapter?

With k-means routing (the shipped adapter) each word goes to one expert; with the linear-router ablation every
expert runs, weighted by a softmax gate. This prints, per word, its expert or its gate weights, from the word's
neutral feature vector_in(CLIP(word)), as the adapter sees it at inference.

    python benchmarks/world_router_experts.py world/adapter/toy_world_adapter.safetensors
    python benchmarks/world_router_experts.py out/world/adapters/linear-router/adapter.safetensors
"""

from __future__ import annotations

import argparse

import torch

from mod_adapter.modules.checkpoint import load_adapter_checkpoint
from mod_adapter.modules.flux_diffusers import load_flux_pipeline, resolve_flux_source
from mod_adapter.modules.world.captions import GROUPS
from mod_adapter.modules.world.paths import WORLD_FOLDER, check_world
from mod_adapter.modules.world.methods import WorldModels
from mod_adapter.modules.world.scene import SHAPES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("adapter", help="an adapter checkpoint trained on the world")
    parser.add_argument("--world", default=WORLD_FOLDER)
    args = parser.parse_args()

    paths = check_world(args.world)
    models = WorldModels.load(paths, load_flux_pipeline(resolve_flux_source(paths["flux"]), torch.float32))
    adapter = load_adapter_checkpoint(args.adapter, dtype=torch.float32).adapter.eval()
    words = [*SHAPES, *GROUPS]  # an object is named by its shape, an abstract concept by its group's word
    with torch.no_grad():
        neutral = torch.cat([models.text_feature(word)[None] for word in words])
        experts = adapter.route(neutral).tolist()
        gates = adapter.gate_weights(neutral).tolist() if adapter.config.router == "linear" else None
    print(f"router: {adapter.config.router}, {adapter.config.num_experts} expert(s)")
    for index, word in enumerate(words):
        line = f"{word:>10}: expert {experts[index] + 1}"
        if gates is not None:
            line += "; gate " + "/".join(f"{weight:.2f}" for weight in gates[index])
        print(line)


if __name__ == "__main__":
    main()
