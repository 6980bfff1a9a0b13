"""Save Concept / Load Concept: concept files in models/mod_concepts, shared and reused like embeddings."""

import os
import sys

import folder_paths
from comfy_api.latest import io

from ..modules.concept_file import load_concept, new_concept_path, save_concept
from ..modules.concept_set import ConceptList, chain, check_unique_words, resolve_concepts
from .model_folders import CONCEPT_FOLDER, default_folder, missing_file_error
from .sockets import CATEGORY, ConceptsSocket


def show_text_on_node(text: str, node_id) -> None:
    """Shows `text` on the node in the frontend (ComfyUI's progress text), when a server runs the graph."""
    server = sys.modules.get("server")  # ComfyUI's own module, imported by main.py; absent without a server
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is not None and node_id is not None:
        instance.send_progress_text(text, node_id)


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
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, concepts, filename_prefix) -> io.NodeOutput:
        check_unique_words(concepts.words)  # two files for one word would be loaded as two concepts fighting
        resolved = resolve_concepts(concepts)
        folder = default_folder(CONCEPT_FOLDER)
        written = []
        for concept in resolved:
            path = new_concept_path(folder, filename_prefix, concept.word)
            save_concept(path, concept)
            written.append(os.path.relpath(path, folder).replace(os.sep, "/"))
        report = "Saved to models/mod_concepts:\n" + "\n".join(written)
        show_text_on_node(report, getattr(cls.hidden, "unique_id", None))
        return io.NodeOutput(ConceptList(tuple(resolved)), ui={"text": written})


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
                               tooltip="Multiplies the strength stored in the file. A learned lighting may "
                               "want about 1.5 (docs/results.md); a pose or an object, 1."),
                ConceptsSocket.Input("concepts", optional=True, tooltip="Concepts to chain onto."),
            ],
            outputs=[ConceptsSocket.Output(display_name="CONCEPTS", tooltip="The chain with this concept added: "
                                           "connect it to Modulation Apply (or to more concepts).")],
        )

    @classmethod
    def validate_inputs(cls, concept_name=None):  # only this input: ComfyUI still checks the others (strength range)
        return missing_file_error(CONCEPT_FOLDER, concept_name, "The concept file") or True

    @classmethod
    def execute(cls, concept_name, strength, concepts=None) -> io.NodeOutput:
        concept = load_concept(folder_paths.get_full_path_or_raise(CONCEPT_FOLDER, concept_name))
        concept.strength = concept.strength * float(strength)
        return io.NodeOutput(chain(concepts, concept))
