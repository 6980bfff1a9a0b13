"""FLUX.1's real tokenizer files, as the pack ships them in world/flux: CLIP-L's BPE folder and T5 v1.1's
tokenizer.json (the public files, identical to the ones FLUX.1's own folders carry)."""

from mod_adapter.modules.world.paths import world_paths

CLIP_L_TOKENIZER = world_paths()["clip_tokenizer"]
T5_TOKENIZER_FILE = world_paths()["t5_tokenizer"]


def load_t5_tokenizer():
    from transformers import T5TokenizerFast

    return T5TokenizerFast(tokenizer_file=T5_TOKENIZER_FILE)


def load_clip_l_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(CLIP_L_TOKENIZER, model_max_length=77)
