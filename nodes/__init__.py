"""ComfyUI layer of Mod-Adapter: V3 node definitions only; the method lives in ../modules."""

try:
    from comfy_api.latest import ComfyExtension, io  # noqa: F401
except ImportError as e:  # imported outside ComfyUI
    raise ImportError(
        "mod_adapter.nodes needs ComfyUI (comfy_api was not found). Put the pack in ComfyUI/custom_nodes/ "
        "and start ComfyUI; outside ComfyUI use mod_adapter.modules or the `mod-adapter` command."
    ) from e

from typing_extensions import override


class ModAdapterExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return []


async def comfy_entrypoint() -> ModAdapterExtension:
    return ModAdapterExtension()
