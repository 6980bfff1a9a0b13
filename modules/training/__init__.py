"""Training the Mod-Adapter (never loaded by ComfyUI).

- `manifest`: the training data (JSONL records, WebDataset shards), validated
- `captioner`: attribute captions p+ from a VLM
- `image_encoder`: the CLIP vision tokens, as ComfyUI's CLIP_VISION gives them
- `features`: text features (neutral features, pre-training targets) and router files
- `stages`: what the stages share (dtype, concept images, Δ prediction, adapter and router building)
- `loop`: the resumable, distributed training loop; `state`: its checkpoints
- `pretrain`: stage 1, no DiT (regress the VLM caption's feature)
- `flux`: stage 2, FLUX.1's flow-matching loss with Δ on the concept tokens
"""
