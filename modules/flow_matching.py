"""FLUX.1's flow-matching training pair, written once for every loop that trains against the model (Learn Concept,
the adapter's training, the toy world's FLUX.1).

Convention (diffusers' ``examples/dreambooth/train_dreambooth_flux.py``, which matches ComfyUI's
``model_sampling.CONST.noise_scaling``): with clean latents x0, noise ε and σ ∈ [0, 1],

    x_σ = (1 − σ)·x0 + σ·ε,   target velocity v = ε − x0,   loss = mse(model(x_σ, σ), v)

and the transformer receives σ itself as its timestep.
"""

from __future__ import annotations

from typing import Tuple

import torch


def flow_matching_pair(clean: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x_σ, target v) for clean latents x0, noise ε and per-sample σ (one value per row of ``clean``)."""
    s = sigma.view(-1, *([1] * (clean.ndim - 1))).to(clean.dtype)
    return (1.0 - s) * clean + s * noise, noise - clean
