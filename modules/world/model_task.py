"""What the toy world's four trained models (the judge, the VAE, CLIP, FLUX.1) share as tasks of the pack's
training loop: their stage and file names, the model the loop trains, its dataset's fingerprint (so that a resume
refuses another dataset) and how its weights are saved and read back."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from ..training.loop import TrainingTask


class WorldModelTask(TrainingTask):
    """A subclass names its model (``name``: stage ``world-<name>``, weights ``<name>.safetensors``) and gives
    :meth:`save_model` / :meth:`load_model` (its world checkpoint file), the samples and the loss."""

    name = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:  # class attributes: the loop reads them before any task exists (--resume checks)
            cls.stage = f"world-{cls.name}"
            cls.weights_file = f"{cls.name}.safetensors"
            cls.ema_weights_file = f"{cls.name}-ema.safetensors"

    def __init__(self, model: torch.nn.Module, *, seed: int, dataset_size: int, device: torch.device,
                 dataset_fingerprint: Optional[str] = None):
        self.world_model = model.to(device)
        self.seed, self.dataset_size, self.device = seed, int(dataset_size), device
        self.dataset_fingerprint = (dataset_fingerprint
                                    or f"world-train-split/{self.name}/seed={seed}/n={self.dataset_size}")

    @property
    def model(self) -> torch.nn.Module:
        return self.world_model

    def checkpoint_metadata(self) -> Dict[str, Any]:
        return {"training": {}}

    def save_model(self, path: str, model: torch.nn.Module, summary: Dict[str, Any]) -> None:
        raise NotImplementedError

    def load_model(self, path: str) -> torch.nn.Module:
        raise NotImplementedError

    def save_weights(self, path: str, summary: Dict[str, Any]) -> None:
        self.save_model(path, self.model, summary)

    def load_weights(self, path: str) -> Dict[str, torch.Tensor]:
        return self.load_model(path).state_dict()
