"""The judge: a small CNN that reads every attribute of a world image back, in place of the paper's LLM judge.

It is the measuring instrument, not a model under test: it is trained on
renders of every attribute combination, the held-out ones included (a judge
trained on the training split alone read 100% of fresh training-split renders
but only 84% of the positions in held-out combinations: it had learnt which
values go together). Each render is seen through a random blur, noise and
colour jitter (:func:`augment`), so that it reads generated images and not
only clean renders; it is evaluated on fresh renders it never saw. Training uses the pack's resumable training loop
(:func:`~..training.loop.run_training`): ``mod-adapter world train-judge``.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModAdapterError
from ..safetensors_io import load_safetensors_checked, save_safetensors
from ..training.loop import sample_generator
from .model_task import WorldModelTask
from .scene import ATTRIBUTES, Scene, render
from .split import random_scene

JUDGE_FORMAT = "mod-adapter-world-judge"
IMAGE_SIZE = 64


class AttributeClassifier(nn.Module):
    """(B, 3, 64, 64) images in 0..1 -> {attribute: logits (B, values)}.

    Three stride-2 stages keep an 8×8 map; a 4×4 pooled grid (not a global
    pool) keeps where things are, which position and light direction need.
    """

    def __init__(self, width: int = 32, hidden: int = 256):
        super().__init__()

        def stage(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.GELU(), nn.Conv2d(cout, cout, 3, stride=2, padding=1), nn.GELU()]

        self.features = nn.Sequential(*stage(3, width), *stage(width, 2 * width), *stage(2 * width, 4 * width),
                                      nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(4 * width * 16, hidden), nn.GELU())
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, len(values)) for name, values in ATTRIBUTES.items()})
        self.width, self.hidden = width, hidden

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        features = self.features(images * 2.0 - 1.0)
        return {name: head(features) for name, head in self.heads.items()}

    @torch.no_grad()
    def read(self, images: torch.Tensor) -> List[Dict[str, str]]:
        """The attribute values the judge reads in each image."""
        logits = self(images)
        picks = {name: out.argmax(dim=-1).tolist() for name, out in logits.items()}
        return [{name: ATTRIBUTES[name][picks[name][i]] for name in ATTRIBUTES} for i in range(images.shape[0])]


def images_to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) renders -> (B, 3, H, W) float in 0..1."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """What a generated image may look like: a blur (σ up to 1 px), noise (σ up to 0.05) and a mild colour
    jitter (brightness ±10%, each channel ±5%), drawn per image. Mild enough to keep every colour and tint."""
    batch = images.shape[0]
    sigma = torch.rand(batch, generator=generator) * 1.0
    offsets = torch.arange(-2, 3, dtype=torch.float32)
    kernels = torch.exp(-(offsets[None] ** 2) / (2 * sigma[:, None].clamp(min=1e-3) ** 2))
    kernels = kernels / kernels.sum(dim=1, keepdim=True)  # (B, 5); σ→0 is the identity
    blurred = []
    for image, kernel in zip(images, kernels):
        k = kernel.view(1, 1, 1, 5).expand(3, 1, 1, 5)
        x = F.conv2d(F.pad(image[None], (2, 2, 0, 0), mode="replicate"), k, groups=3)
        x = F.conv2d(F.pad(x, (0, 0, 2, 2), mode="replicate"), k.transpose(2, 3), groups=3)
        blurred.append(x[0])
    images = torch.stack(blurred)
    gain = 1.0 + (torch.rand(batch, 1, 1, 1, generator=generator) - 0.5) * 0.2
    channel = 1.0 + (torch.rand(batch, 3, 1, 1, generator=generator) - 0.5) * 0.1
    noise = torch.randn(images.shape, generator=generator) * torch.rand(batch, 1, 1, 1, generator=generator) * 0.05
    return (images * gain * channel + noise).clamp(0.0, 1.0)


def labels_of(scenes: Sequence[Scene]) -> Dict[str, torch.Tensor]:
    return {name: torch.tensor([values.index(getattr(s, name)) for s in scenes]) for name, values in ATTRIBUTES.items()}


def scene_of(seed: int, index: int) -> Scene:
    """Scene ``index`` of the judge's training set (any combination): the same on every machine and after a resume."""
    return random_scene(np.random.default_rng([seed, index]))


def judge_dataset_fingerprint(seed: int, dataset_size: int) -> str:
    return f"world-all-combinations/seed={seed}/n={dataset_size}"


class JudgeTask(WorldModelTask):
    """The judge as a task of the pack's training loop: the samples are rendered on the fly."""

    name = "judge"

    def __init__(self, classifier: AttributeClassifier, *, seed: int, dataset_size: int, device: torch.device):
        super().__init__(classifier, seed=seed, dataset_size=dataset_size, device=device,
                         dataset_fingerprint=judge_dataset_fingerprint(seed, dataset_size))

    def load_items(self, items: List[Tuple[int, int]], step: int) -> Any:
        scenes = [scene_of(self.seed, index) for _, index in items]  # items: (slot in the batch, sample index)
        images = images_to_tensor([render(s, IMAGE_SIZE) for s in scenes])
        generator = sample_generator(self.seed, step, items[0][0] if items else 0)
        return augment(images, generator), labels_of(scenes)

    def per_sample_losses(self, model: torch.nn.Module, prepared: Any, step: int) -> torch.Tensor:
        images, labels = prepared
        logits = model(images.to(self.device))
        return sum(F.cross_entropy(logits[name], labels[name].to(self.device), reduction="none") for name in ATTRIBUTES)

    def run_settings(self) -> Dict[str, Any]:
        return {"width": self.model.width, "hidden": self.model.hidden}

    def save_model(self, path: str, model: torch.nn.Module, summary: Dict[str, Any]) -> None:
        save_judge(path, model, summary)

    def load_model(self, path: str) -> torch.nn.Module:
        return load_judge(path)


def save_judge(path: str, classifier: AttributeClassifier, summary: Dict[str, Any]) -> None:
    state = {k: v.detach().float().cpu() for k, v in classifier.state_dict().items()}
    save_safetensors(path, state, {"format": JUDGE_FORMAT, "attributes": json.dumps(ATTRIBUTES),
                                   "width": str(classifier.width), "hidden": str(classifier.hidden),
                                   "training": json.dumps(summary, default=str)})


def load_judge(path: str) -> AttributeClassifier:
    tensors, metadata = load_safetensors_checked(path, kind="world judge", error_cls=ModAdapterError)
    if metadata.get("format") != JUDGE_FORMAT:
        raise ModAdapterError(f"{path} is not a world judge (format {metadata.get('format')!r})")
    if json.loads(metadata.get("attributes", "{}")) != {k: list(v) for k, v in ATTRIBUTES.items()}:
        raise ModAdapterError(f"{path} was trained on another world (its attribute values differ from this one's)")
    classifier = AttributeClassifier(int(metadata["width"]), int(metadata["hidden"]))
    classifier.load_state_dict(tensors, strict=True)
    return classifier.eval()


@torch.no_grad()
def judge_accuracy(classifier: AttributeClassifier, scenes: Sequence[Scene], *, augmented_seed: int = None,
                   batch_size: int = 256) -> Dict[str, float]:
    """Per-attribute accuracy on renders of ``scenes`` (clean, or augmented from ``augmented_seed``)."""
    correct = {name: 0 for name in ATTRIBUTES}
    generator = torch.Generator().manual_seed(augmented_seed) if augmented_seed is not None else None
    classifier.eval()
    for start in range(0, len(scenes), batch_size):
        chunk = list(scenes[start:start + batch_size])
        images = images_to_tensor([render(s, IMAGE_SIZE) for s in chunk])
        if generator is not None:
            images = augment(images, generator)
        logits = classifier(images)
        labels = labels_of(chunk)
        for name in ATTRIBUTES:
            correct[name] += int((logits[name].argmax(dim=-1) == labels[name]).sum())
    return {name: correct[name] / len(scenes) for name in ATTRIBUTES}
