"""The pack's custom socket types (V3 `io.Custom`), in capitals as ComfyUI's own types are."""

from comfy_api.latest import io

ModAdapterSocket = io.Custom("MOD_ADAPTER")  # a loaded adapter: nodes/adapter_loader.AdapterRunner
ConceptEmbedsSocket = io.Custom("CONCEPT_EMBEDS")  # modules.concept_set.ConceptEmbeds
ConceptsSocket = io.Custom("CONCEPTS")  # modules.concept_set.ConceptList

CATEGORY = "mod_adapter"
