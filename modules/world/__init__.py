"""The toy world: FLUX.1-architecture models small enough to train on a CPU, and exact ground truth.

- `scene`: the procedural scenes (shape, surface, pose, lighting, background) and their rendering
- `captions`: captions that state any subset of a scene's attributes, and the concept descriptions p+
- `split`: the attribute combinations held out from every model's training
- `judge`: the attribute classifier that reads every attribute back (in place of an LLM judge)
"""
