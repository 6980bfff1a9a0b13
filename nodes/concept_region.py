"""Concept Region: restricts concepts to a region of the image (a MASK), through attention only."""

from comfy_api.latest import io

from ..modules.concept_regions import check_region_mask
from ..modules.concept_set import ConceptList, comma_separated_words
from ..modules.errors import ModAdapterError
from .sockets import CATEGORY, ConceptsSocket


def concept_region(concepts, mask, words=""):
    if not isinstance(concepts, ConceptList):
        raise ModAdapterError(f"Concept Region needs CONCEPTS (from Predictor, Load Concept or Learn Concept), got "
                              f"{type(concepts).__name__}")
    names = comma_separated_words(words)
    return concepts.with_region(check_region_mask(mask, ", ".join(names) or "region"), names)


class ModAdapterConceptRegion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ModAdapterConceptRegion",
            display_name="Mod-Adapter Concept Region",
            category=f"{CATEGORY}/concepts",
            description="Puts concepts in a region of the image: the concept word's tokens attend to, and are "
                        "attended by, only the image inside the mask. Its modulation is unchanged.",
            inputs=[
                ConceptsSocket.Input("concepts", tooltip="The concepts, e.g. from Predictor or Load Concept."),
                io.Mask.Input("mask", tooltip="Where the concepts may act (white): stretched over the whole "
                                              "generated image, as ComfyUI's own mask nodes are."),
                io.String.Input("words", default="", tooltip="Comma-separated concept words this region is for. "
                                "Empty: every concept of the input that has no region yet."),
            ],
            outputs=[ConceptsSocket.Output(display_name="CONCEPTS",
                                           tooltip="The same concepts, the chosen ones restricted to the region.")],
        )

    @classmethod
    def execute(cls, concepts, mask, words="") -> io.NodeOutput:
        return io.NodeOutput(concept_region(concepts, mask, words))
