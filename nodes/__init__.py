"""ComfyUI layer of Mod-Adapter: V3 node definitions only; the method lives in ../modules."""

try:
    from comfy_api.latest import ComfyExtension, io
except ImportError as e:  # imported outside ComfyUI
    raise ImportError(
        "mod_adapter.nodes needs ComfyUI (comfy_api was not found). Put the pack in ComfyUI/custom_nodes/ "
        "and start ComfyUI; outside ComfyUI use mod_adapter.modules or the `mod-adapter` command."
    ) from e

from typing_extensions import override

from .model_folders import register_model_folders

register_model_folders()  # before the loaders' schemas list the folders

from .adapter_loader import ModAdapterLoader  # noqa: E402
from .concept_encoder import ModAdapterConceptEncoder  # noqa: E402
from .concept_files import ModAdapterLoadConcept, ModAdapterSaveConcept  # noqa: E402
from .concept_region import ModAdapterConceptRegion  # noqa: E402
from .example_inputs import copy_example_inputs  # noqa: E402
from .learn_concept import ModAdapterLearnConcept  # noqa: E402
from .modulation_apply import ModAdapterModulationApply, ModAdapterModulationApplyAdvanced  # noqa: E402
from .predictor import ModAdapterPredictor  # noqa: E402
from .toy_world import ModAdapterToyWorld, ModAdapterToyWorldScene  # noqa: E402

NODES = [
    ModAdapterLoader,
    ModAdapterConceptEncoder,
    ModAdapterPredictor,
    ModAdapterModulationApply,
    ModAdapterModulationApplyAdvanced,
    ModAdapterSaveConcept,
    ModAdapterLoadConcept,
    ModAdapterConceptRegion,
    ModAdapterLearnConcept,
    ModAdapterToyWorld,
    ModAdapterToyWorldScene,
]


class ModAdapterExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> ModAdapterExtension:
    # Here, not in ComfyExtension.on_load, which ComfyUI 0.3.64 never calls. Never raises.
    copy_example_inputs()  # the FLUX.1 templates' Load Image nodes name them
    return ModAdapterExtension()
