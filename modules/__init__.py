"""The Mod-Adapter method in pure torch: the adapter network, its file formats,
concept-word lookup and the per-token modulation engine. Nothing here imports
ComfyUI, so the same code serves the nodes, the CLI and training."""
