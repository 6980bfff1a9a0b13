"""Attribute captioning (p+): a tiny random Qwen2.5-VL end to end, resumability, batching, the CLI.

The model and its processor are real transformers classes built offline: a
byte-level BPE tokenizer trained here on a few sentences, Qwen2VLImageProcessor,
Qwen2.5-VL's special tokens and a small chat template, saved to a folder and
loaded back with AutoProcessor / AutoModelForImageTextToText (local files only).
"""

import json

import pytest
import torch
from PIL import Image

from mod_adapter.cli import main as cli_main
from mod_adapter.modules.training.captioner import (
    DEFAULT_PROMPT,
    CaptionerError,
    VLMCaptioner,
    caption_manifest,
    clean_caption,
    default_output_path,
    partial_path,
)
from mod_adapter.modules.training.manifest import read_manifest

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["describe the dog in this image as one short noun phrase",
              "transparent cyan-green glass surface", "fluffy cream-coloured puppy with floppy ears"] * 10
    tok.train_from_iterator(corpus, trainer)
    tokenizer = transformers.Qwen2TokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = {s: tokenizer.convert_tokens_to_ids(s) for s in SPECIALS}
    processor = transformers.Qwen2_5_VLProcessor(
        image_processor=transformers.Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16),
        tokenizer=tokenizer,
        video_processor=transformers.Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )
    config = transformers.Qwen2_5_VLConfig(
        text_config=dict(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[0], in_chans=3),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    torch.manual_seed(0)
    model = transformers.Qwen2_5_VLForConditionalGeneration(config)
    with torch.no_grad():  # large random weights: the answer depends on the image and the prompt
        for param in model.parameters():
            param.normal_(0.0, 0.5)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    folder = tmp_path_factory.mktemp("tiny_qwen25vl")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _png(path, color, size=(40, 30)):
    Image.new("RGB", size, color).save(path)
    return path.name


def _manifest(folder, rows):
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def dataset(tmp_path):
    colors = ["red", "green", "blue", "yellow", "purple", "orange"]
    rows = []
    for i, color in enumerate(colors):
        name = _png(tmp_path / f"img{i}.png", color, size=(40 + 7 * i, 30 + 5 * i))
        rows.append({"concept_image": name, "concept_word": "mug", "caption": f"a {color} mug on a table"})
    # Same image and word, another caption: shares one p+.
    rows.append({"concept_image": "img0.png", "concept_word": "Mug", "caption": "my mug at home"})
    # Already captioned in the input: kept.
    rows.append({"concept_image": "img1.png", "concept_word": "table", "caption": "a table", "attribute_caption": "oak table"})
    return tmp_path, _manifest(tmp_path, rows)


class CountingCaptioner:
    """Records every (image color, word) it is asked about; can fail on a given call."""

    def __init__(self, fail_on_call=None):
        self.calls = []
        self.fail_on_call = fail_on_call

    def __call__(self, images, words):
        if self.fail_on_call is not None and len(self.calls) + 1 == self.fail_on_call:
            raise KeyboardInterrupt("simulated interrupt")
        batch = [(im.getpixel((0, 0)), w) for im, w in zip(images, words)]
        self.calls.append(batch)
        return [f"\"shiny {c[0]}-{c[1]}-{c[2]} {w}.\"" for (c, w) in batch]

    @property
    def seen(self):
        return [item for batch in self.calls for item in batch]


def test_clean_caption():
    assert clean_caption('  "Transparent cyan-green glass surface."\nmore') == "Transparent cyan-green glass surface"
    assert clean_caption("Answer: red  mug!") == "red mug"
    assert clean_caption("\x00\x01\n\n") == ""


def test_resume_after_interrupt_never_captions_twice(dataset):
    folder, manifest = dataset
    out = folder / "out.jsonl"
    first = CountingCaptioner(fail_on_call=3)
    with pytest.raises(KeyboardInterrupt):
        caption_manifest(manifest, first, out=out, batch_size=2, progress=False)
    assert not out.exists()  # the output only ever appears complete
    progress = partial_path(out).read_text().splitlines()
    assert len(progress) == 4 and len(first.seen) == 4
    # A write torn by the interrupt: the partial line is ignored.
    with open(partial_path(out), "a") as handle:
        handle.write('{"concept_image": "x", "concept_wo')

    second = CountingCaptioner()
    summary = caption_manifest(manifest, second, out=out, batch_size=2, progress=False)
    assert summary.complete and summary.captioned == 2 and summary.reused == 5
    assert [len(b) for b in second.calls] == [2]
    everything = first.seen + second.seen
    assert len(everything) == len(set(everything)) == 6  # 6 distinct (image, word) pairs, each captioned once
    assert not partial_path(out).exists()

    records = read_manifest(out)
    assert len(records) == 8 and all(r.attribute_caption for r in records)
    assert records[0].attribute_caption == records[6].attribute_caption  # same image + word (case-insensitive)
    assert records[7].attribute_caption == "oak table"
    assert records[0].attribute_caption == "shiny 255-0-0 mug"
    assert records[0].concept_image == folder / "img0.png"  # paths stay valid from the output's folder

    third = CountingCaptioner()
    again = caption_manifest(manifest, third, out=out, progress=False)
    assert third.calls == [] and again.captioned == 0 and again.complete


def test_failures_limit_and_overwrite(dataset):
    folder, manifest = dataset
    (folder / "img3.png").unlink()
    first = CountingCaptioner()
    summary = caption_manifest(manifest, first, batch_size=4, limit=4, progress=False)
    out = default_output_path(manifest)
    assert summary.out_path == out and out.name == "train.captioned.jsonl"
    assert not summary.complete
    lines = dict(summary.failures)
    assert "cannot read" in lines[4] and "limit" in lines[5] and "limit" in lines[6]
    assert partial_path(out).exists()  # unfinished: kept for the next run
    assert len(first.seen) == 3

    _png(folder / "img3.png", "white")
    second = CountingCaptioner()
    summary = caption_manifest(manifest, second, batch_size=4, progress=False)
    assert summary.complete and len(second.seen) == 3 and not partial_path(out).exists()
    assert {w for _, w in first.seen + second.seen} == {"mug"}

    redo = CountingCaptioner()
    summary = caption_manifest(manifest, redo, batch_size=8, overwrite=True, progress=False)
    assert len(redo.seen) == 7  # 6 mug images + the table, which had its own p+
    assert read_manifest(out)[7].attribute_caption.startswith("shiny")

    with pytest.raises(CaptionerError):
        caption_manifest(manifest, redo, batch_size=0)

    def mute(images, words):
        return ["   "] * len(images)

    summary = caption_manifest(manifest, mute, out=folder / "mute.jsonl", progress=False)
    assert len(summary.failures) == 7 and all("empty caption" in m for _, m in summary.failures)


def test_tiny_qwen25vl_batched_equals_unbatched(tiny_vlm, dataset):
    folder, manifest = dataset
    captioner = VLMCaptioner.load(str(tiny_vlm), device="cpu", max_new_tokens=6)
    assert type(captioner.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    images = [Image.open(folder / f"img{i}.png") for i in range(3)]
    words = ["mug", "golden hour", "dog"]
    batched = captioner(images, words)
    single = [captioner([im], [w])[0] for im, w in zip(images, words)]
    assert batched == single
    assert len(batched) == 3 and all(c for c in batched)
    assert len(set(batched)) > 1  # answers depend on the input, so batched == single means something

    summary = caption_manifest(manifest, captioner, batch_size=3, progress=False)
    assert summary.captioned + len(summary.failures) >= 6
    records = read_manifest(summary.out_path)
    assert records[7].attribute_caption == "oak table"
    assert sum(bool(r.attribute_caption) for r in records) == 8 - len(summary.failures)


def test_cli_caption(tiny_vlm, dataset, capsys):
    folder, manifest = dataset
    out = folder / "cli_out.jsonl"
    code = cli_main(["caption", str(manifest), "--model", str(tiny_vlm), "--out", str(out), "--batch-size", "4",
                     "--device", "cpu", "--max-new-tokens", "4", "--no-progress"])
    records = read_manifest(out)
    err = capsys.readouterr().err
    assert "wrote" in err and len(records) == 8
    assert code == (0 if all(r.attribute_caption for r in records) else 1)
    assert cli_main(["caption", str(manifest), "--model", str(folder / "no_such_model"), "--out", str(out)]) == 2
    assert "cannot load the captioning model" in capsys.readouterr().err
    assert cli_main(["caption", str(manifest), "--model", str(tiny_vlm), "--prompt", "no placeholder"]) == 2


def test_prompt_mentions_the_word():
    assert "{word}" in DEFAULT_PROMPT
    with pytest.raises(CaptionerError):
        VLMCaptioner(model=None, processor=None, prompt="describe it")
