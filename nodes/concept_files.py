"""Save Concept / Load Concept: concept files in models/mod_concepts, shared and reused like embeddings."""

import folder_paths
from comfy_api.latest import io

from ..modules.concept_file import load_concept, new_concept_path, save_concept
from ..modules.concept_set import ConceptList, chain, resolve_concepts
from .model_folders import CONCEPT_FOLDER, default_folder
from .sockets import CATEGORY, ConceptsSocket


class ModAdapterSaveConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ModAdapterSaveConcept",
            display_name="Mod-Adapter Save Concept",
            category=f"{CATEGORY}/concepts",
            description="Saves each concept as a small concept file in models/mod_concepts, reusable without the "
                        "adapter or the image.",
            inputs=[
                ConceptsSocket.Input("concepts", tooltip="The concepts to save (predicted ones are predicted now)."),
                io.String.Input("filename_prefix", default="concept",
                                tooltip="File name start; the concept word and a counter are added. "
                                        "May include a subfolder, e.g. 'pets/rex'."),
            ],
            outputs=[ConceptsSocket.Output(display_name="CONCEPTS", tooltip="The same concepts, already predicted: "
                                           "wire them on to avoid predicting twice.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, concepts, filename_prefix) -> io.NodeOutput:
        resolved = resolve_concepts(concepts)
        folder = default_folder(CONCEPT_FOLDER)
        for concept in resolved:
            save_concept(new_concept_path(folder, filename_prefix, concept.word), concept)
        return io.NodeOutput(ConceptList(tuple(resolved)))


class ModAdapterLoadConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ModAdapterLoadConcept",
            display_name="Mod-Adapter Load Concept",
            category=f"{CATEGORY}/concepts",
            description="Loads a concept file from models/mod_concepts.",
            inputs=[
                io.Combo.Input("concept_name", options=folder_paths.get_filename_list(CONCEPT_FOLDER),
                               tooltip="A concept file (.safetensors) in models/mod_concepts."),
                io.Float.Input("strength", default=1.0, min=-2.0, max=3.0, step=0.05,
                               tooltip="Multiplies the strength stored in the file."),
                ConceptsSocket.Input("concepts", optional=True, tooltip="Concepts to chain onto."),
            ],
            outputs=[ConceptsSocket.Output(display_name="CONCEPTS", tooltip="The chain with this concept added: "
                                           "connect it to Modulation Apply (or to more concepts).")],
        )

    @classmethod
    def execute(cls, concept_name, strength, concepts=None) -> io.NodeOutput:
        concept = load_concept(folder_paths.get_full_path_or_raise(CONCEPT_FOLDER, concept_name))
        concept.strength = concept.strength * float(strength)
        return io.NodeOutput(chain(concepts, concept))
