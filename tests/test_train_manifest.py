"""The training manifest: every problem reported on its line, clean copies, tar shards, the CLI."""

import io
import json
import tarfile

import pytest
from PIL import Image

from mod_adapter.cli import main as cli_main
from mod_adapter.modules.errors import ModAdapterError
from mod_adapter.modules.token_positions import TextSequenceLayout
from mod_adapter.modules.training.manifest import (
    ManifestError,
    ShardMember,
    iter_records,
    read_manifest,
    validate_manifest,
    word_in_caption,
    write_clean_manifest,
    write_shards,
)


def _png(path, size=(32, 24), color="red", mode="RGB"):
    Image.new(mode, size, color).save(path)
    return path


def _write(path, lines):
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "img").mkdir()
    _png(tmp_path / "img" / "dog.png")
    _png(tmp_path / "img" / "cat.png", color="blue")
    _png(tmp_path / "img" / "target.png", size=(64, 64))
    _png(tmp_path / "img" / "mask.png", mode="L", color=255)
    _png(tmp_path / "img" / "bigmask.png", size=(50, 50), mode="L", color=255)
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return tmp_path


GOOD = {"concept_image": "img/dog.png", "concept_word": "dog", "caption": "a photo of a dog on the beach"}

BROKEN_LINES = [
    GOOD,                                                                       # 1 ok
    '{"concept_image": "img/dog.png", "concept_word": "dog", caption}',         # 2 invalid JSON
    {"concept_word": "dog", "caption": "a dog"},                                # 3 missing concept_image
    {"concept_image": "img/nope.png", "concept_word": "dog", "caption": "a dog"},  # 4 missing image
    {"concept_image": "img/broken.png", "concept_word": "dog", "caption": "a dog"},  # 5 unreadable image
    {"concept_image": "img/cat.png", "concept_word": "cat", "caption": "a hotdog stand"},  # 6 word absent
    {"concept_image": "img/cat.png", "concept_word": "cat", "caption": "   "},  # 7 empty caption
    dict(GOOD),                                                                 # 8 duplicate of 1
    {"concept_image": "img/cat.png", "concept_word": "cat", "caption": "two cats", "mask": "img/bigmask.png"},  # 9 mask size
    {"concept_image": "img/cat.png", "concept_word": "cat", "caption": "a cat", "colour": "blue"},  # 10 ok + warning
    [1, 2, 3],                                                                  # 11 not an object
    {"concept_image": "img/cat.png", "concept_word": 7, "caption": "a cat"},   # 12 not a string
    {"concept_image": "img/cat.png", "concept_word": "cat", "caption": "a sleepy cat", "target_image": "img/target.png",
     "mask": "img/mask.png", "attribute_caption": "sleepy blue cat"},           # 13 ok, every field
]


def test_every_problem_on_its_line(folder):
    path = _write(folder / "train.jsonl", BROKEN_LINES[:5] + [""] + BROKEN_LINES[5:])  # a blank line is skipped
    report = validate_manifest(path)
    by_line = {}
    for line, message in report.problems:
        by_line.setdefault(line, []).append(message)
    assert sorted(by_line) == [2, 3, 4, 5, 7, 8, 9, 10, 12, 13]  # file lines (blank line 6 shifts the rest)
    assert "invalid JSON" in by_line[2][0]
    assert "missing field 'concept_image'" in by_line[3][0]
    assert "does not exist" in by_line[4][0] and "img/nope.png" in by_line[4][0]
    assert "not a readable image" in by_line[5][0]
    assert "'cat' does not occur" in by_line[7][0]
    assert "'caption' is empty" in by_line[8][0]
    assert "duplicate of line 1" in by_line[9][0]
    assert "mask is 50x50 but concept_image is 32x24" in by_line[10][0]
    assert "must be a JSON object" in by_line[12][0]
    assert "'concept_word' must be a string" in by_line[13][0]
    assert report.warnings == [(11, "unknown field(s) ['colour'] ignored (known fields: ['concept_image', "
                                    "'concept_word', 'caption', 'target_image', 'mask', 'attribute_caption'])")]
    assert [r.line for r in report.records] == [1, 11, 14] and not report.ok
    full = report.records[2]
    assert full.target_image == folder / "img" / "target.png" and full.mask == folder / "img" / "mask.png"
    assert full.attribute_caption == "sleepy blue cat"
    assert report.records[0].target_image == report.records[0].concept_image  # default target
    formatted = report.format()
    assert formatted[0].startswith("line 2: invalid JSON") and any(l.startswith("line 11: warning:") for l in formatted)

    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    text = str(info.value)
    assert "line 2: invalid JSON" in text and "line 9: duplicate of line 1" in text
    assert "line 4" not in text  # read_manifest does not open images


def test_require_attribute_caption_and_no_image_check(folder):
    path = _write(folder / "m.jsonl", [GOOD, {**GOOD, "concept_image": "img/nope.png", "caption": "dogs running",
                                              "attribute_caption": "muddy dog"}])
    assert validate_manifest(path, check_images=False).ok
    report = validate_manifest(path, require_attribute_caption=True)
    assert [(l, "attribute_caption" in m or "does not exist" in m) for l, m in report.problems] == [(1, True), (2, True)]
    with pytest.raises(ManifestError, match="mod-adapter caption"):
        read_manifest(path, require_attribute_caption=True)


def test_word_matching_rules():
    assert word_in_caption("dog", "Two DOGS play") is None  # case and plural
    assert word_in_caption("puppy", "three puppies") is None
    assert word_in_caption("golden hour", "shot at golden   hour") is None
    assert word_in_caption("dog", "a hotdog") is not None
    assert word_in_caption("dog", "dogma") is not None
    # With a tokenizer layout the inference-time rules apply, including a token window.
    vocab = {}

    def encode(text):
        return [vocab.setdefault("\u2581" + w, len(vocab) + 2) for w in text.split()]

    def piece(i):
        return {v: k for k, v in vocab.items()}.get(i, "<s>")

    layout = TextSequenceLayout.from_callables(encode, piece, eos_id=0, pad_id=1, max_length=6, name="tiny")
    assert word_in_caption("dog", "a dog runs", layout) is None
    assert word_in_caption("dog", "a cat runs", layout) is not None
    late = word_in_caption("dog", "one two three four five six dog", layout)
    assert late is not None and word_in_caption("dog", "one two three four five six dog") is None


def test_write_clean_manifest(folder):
    path = _write(folder / "train.jsonl", BROKEN_LINES)
    report = validate_manifest(path)
    out = folder / "clean" / "train.clean.jsonl"
    assert write_clean_manifest(report, out) == 3
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    # Images outside the output's folder are written with absolute paths, those inside it relative.
    assert lines[0] == {"concept_image": str(folder / "img" / "dog.png"), "concept_word": "dog",
                        "caption": "a photo of a dog on the beach"}
    beside = folder / "train.clean.jsonl"
    write_clean_manifest(report, beside)
    assert json.loads(beside.read_text().splitlines()[2])["mask"] == "img/mask.png"
    assert "target_image" not in lines[0] and lines[2]["attribute_caption"] == "sleepy blue cat"
    clean = validate_manifest(out)
    assert clean.ok and not clean.warnings and len(clean.records) == 3
    assert [r.concept_image for r in clean.records] == [r.concept_image for r in report.records]
    with pytest.raises(ManifestError, match="being checked"):
        write_clean_manifest(report, path)


def test_cli_validate_exit_codes(folder, capsys):
    bad = _write(folder / "bad.jsonl", BROKEN_LINES)
    assert cli_main(["validate", str(bad)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("line 2: invalid JSON")
    assert len([l for l in out if "warning" not in l]) == 10 and all(l.startswith("line ") for l in out)

    clean = folder / "clean.jsonl"
    assert cli_main(["validate", str(bad), "--write-clean", str(clean)]) == 1
    assert "wrote 3 valid record(s)" in capsys.readouterr().err
    assert cli_main(["validate", str(clean)]) == 0
    assert capsys.readouterr().out == ""
    assert cli_main(["validate", str(folder / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err

    missing_images = _write(folder / "noimg.jsonl", [{**GOOD, "concept_image": "img/gone.png"}])
    assert cli_main(["validate", str(missing_images)]) == 1
    assert cli_main(["validate", str(missing_images), "--no-image-check"]) == 0
    assert cli_main(["validate", str(clean), "--require-attribute-caption"]) == 1


def test_empty_or_unreadable_manifest(folder):
    empty = _write(folder / "empty.jsonl", ["", "  "])
    assert validate_manifest(empty).problems == [(0, f"manifest {empty} has no records")]
    (folder / "binary.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ModAdapterError, match="UTF-8"):
        validate_manifest(folder / "binary.jsonl")


# --------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------


def _png_bytes(size=(32, 24), color="red", mode="RGB"):
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, "PNG")
    return buffer.getvalue()


def _shard(path, samples, mode="w"):
    with tarfile.open(path, mode) as tar:
        for key, members in samples:
            for name, data in members.items():
                data = json.dumps(data).encode() if name == "json" else data
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_iter_records_jsonl(folder):
    path = _write(folder / "train.jsonl", [GOOD, BROKEN_LINES[12], BROKEN_LINES[1]])
    stream = iter_records(path)
    first = next(stream)
    assert first.concept_word == "dog" and first.open_image().size == (32, 24)
    assert next(stream).open_mask().mode == "L"
    with pytest.raises(ManifestError, match="line 3: invalid JSON"):
        next(stream)


def test_shard_records_hold_no_image_bytes(tmp_path):
    """Training reads the whole record list up front: images of uncompressed shards stay on disk until drawn."""
    samples = [
        ("a/s000", {"json": {"concept_word": "dog", "caption": "a dog"}, "PNG": _png_bytes(color="red"),
                    "mask.png": _png_bytes(mode="L", color=200)}),
        ("a/s001", {"json": {"concept_word": "cat", "caption": "a cat"}, "jpg": _png_bytes(color="blue"),
                    "target.png": _png_bytes(size=(64, 64), color="green")}),
    ]
    _shard(tmp_path / "plain.tar", samples)
    _shard(tmp_path / "packed.tar.gz", samples, mode="w:gz")
    streamed = list(iter_records(str(tmp_path / "plain.tar")))
    records = read_manifest(str(tmp_path / "plain.tar"))
    assert [r.key for r in records] == ["a/s000", "a/s001"]
    for record in records:
        assert record.data and all(isinstance(v, ShardMember) for v in record.data.values()), record.data
    assert records[0].data["target_image"] is records[0].data["concept_image"]  # the default target shares it
    assert records[0].data["concept_image"].name == "a/s000.png"  # webdataset lowercases suffixes; the index too
    for record, reference in zip(records, streamed):
        for which in ("concept_image", "target_image", "mask"):
            got, want = (record.open_image(which, mode=None) if getattr(record, which) else None,
                         reference.open_image(which, mode=None) if getattr(reference, which) else None)
            assert (got is None) == (want is None) and (got is None or got.tobytes() == want.tobytes())
    assert records[1].open_image("target_image").getpixel((0, 0)) == (0, 128, 0)
    assert records[0].open_mask().getpixel((0, 0)) == 200

    # A compressed shard cannot be read at an offset: its images stay in memory, and still load.
    packed = read_manifest(str(tmp_path / "packed.tar.gz"))
    assert all(isinstance(v, bytes) for r in packed for v in r.data.values())
    assert packed[1].open_image("target_image").size == (64, 64)

    # The shard changed under a run: a clear error, never the wrong bytes silently.
    raw = (tmp_path / "plain.tar").read_bytes()
    (tmp_path / "plain.tar").write_bytes(raw[: records[1].data["target_image"].offset + 10])
    with pytest.raises(ManifestError, match="shard changed after it was read"):
        records[1].open_image("target_image")


def test_iter_records_webdataset_shards(tmp_path):
    pytest.importorskip("webdataset")
    (tmp_path / "outside.png").write_bytes(_png_bytes(color="green"))
    _shard(tmp_path / "shard-000.tar", [
        ("s000", {"json": {"concept_word": "dog", "caption": "a dog"}, "png": _png_bytes(),
                  "mask.png": _png_bytes(mode="L", color=255)}),
        ("s001", {"json": {"concept_word": "cat", "caption": "a cat", "attribute_caption": "grey cat"},
                  "jpg": _png_bytes(color="blue"), "target.png": _png_bytes(size=(64, 64))}),
    ])
    _shard(tmp_path / "shard-001.tar", [
        ("s002", {"json": {"concept_word": "cup", "caption": "a cup", "concept_image": "outside.png"}}),
    ])
    for source in (str(tmp_path / "shard-{000..001}.tar"), str(tmp_path / "shard-*.tar")):
        records = list(iter_records(source))
        assert [r.key for r in records] == ["s000", "s001", "s002"] and [r.line for r in records] == [1, 2, 3]
        assert records[0].open_image().getpixel((0, 0)) == (255, 0, 0)
        assert records[0].open_mask().size == (32, 24) and records[1].open_mask() is None
        assert records[1].open_image("target_image").size == (64, 64) and records[1].attribute_caption == "grey cat"
        assert records[0].open_image("target_image").getpixel((0, 0)) == (255, 0, 0)  # target defaults to concept
        assert records[2].concept_image == tmp_path / "outside.png" and records[2].data is None
        assert records[2].open_image().getpixel((0, 0)) == (0, 128, 0)
    assert validate_manifest(str(tmp_path / "shard-{000..001}.tar")).ok

    _shard(tmp_path / "shard-002.tar", [
        ("s003", {"json": {"concept_word": "dog", "caption": "a cat"}, "png": _png_bytes()}),
        ("s004", {"png": _png_bytes()}),
        ("s005", {"json": {"concept_word": "dog", "caption": "a dog"}, "png": b"garbage"}),
        ("s006", {"json": {"concept_word": "dog", "caption": "a dog"}, "png": _png_bytes(),
                  "mask.png": _png_bytes(size=(8, 8), mode="L")}),
    ])
    report = validate_manifest(str(tmp_path / "shard-{000..002}.tar"))
    problems = dict(report.problems)
    assert "'dog' does not occur" in problems[4] and "s003" in problems[4]
    assert "no s004.json" in problems[5]
    assert "not a readable image" in problems[6]
    assert "mask is 8x8" in problems[7]
    assert len(report.records) == 3
    with pytest.raises(ManifestError, match="line 4: sample 's003'"):
        list(iter_records(str(tmp_path / "shard-{000..002}.tar")))
    with pytest.raises(ManifestError, match="no shard file"):
        list(iter_records(str(tmp_path / "shard-{000..009}.tar")))
    with pytest.raises(ManifestError, match="tar shard"):
        write_clean_manifest(report, tmp_path / "clean.jsonl")


def test_pack_writes_shards_that_read_back_as_the_manifest(folder, capsys):
    _png(folder / "img" / "odd.tif")  # a format shards do not name: packed as PNG
    path = _write(folder / "train.jsonl", [
        GOOD,
        {"concept_image": "img/cat.png", "concept_word": "cat", "caption": "a sleepy cat", "target_image": "img/target.png",
         "mask": "img/mask.png", "attribute_caption": "sleepy blue cat"},
        {"concept_image": "img/odd.tif", "concept_word": "vase", "caption": "a vase on a table"},
    ])
    pattern = str(folder / "shards" / "part-%03d.tar")
    assert cli_main(["pack", str(path), "--out", pattern, "--max-count", "2", "--no-progress"]) == 0
    printed = capsys.readouterr()
    assert printed.out.split() == [str(folder / "shards" / "part-000.tar"), str(folder / "shards" / "part-001.tar")]
    assert "packed 3 sample(s) into 2 shard(s)" in printed.err
    first = (folder / "shards" / "part-000.tar").read_bytes()

    want, got = read_manifest(path), read_manifest(str(folder / "shards" / "part-*.tar"))
    assert [(r.concept_word, r.caption, r.attribute_caption) for r in got] == \
           [(r.concept_word, r.caption, r.attribute_caption) for r in want]
    for a, b in zip(want, got):
        assert b.open_image().tobytes() == a.open_image().tobytes()
        assert b.open_image("target_image").tobytes() == a.open_image("target_image").tobytes()
        assert (a.mask is None) == (b.mask is None)
    assert got[1].open_mask().tobytes() == want[1].open_mask().tobytes()
    assert got[2].data["concept_image"].name.endswith(".png")
    assert got[0].data["target_image"] is got[0].data["concept_image"]  # no target member when it is the concept image

    # The same manifest packs to the same bytes (fixed mtime).
    assert cli_main(["pack", str(path), "--out", pattern, "--max-count", "2", "--no-progress"]) == 0
    assert (folder / "shards" / "part-000.tar").read_bytes() == first

    # A broken manifest is refused before anything is written; a pattern without a field too.
    broken = _write(folder / "broken.jsonl", [GOOD, {"concept_word": "dog", "caption": "a dog"}])
    assert cli_main(["pack", str(broken), "--out", str(folder / "b" / "x-%03d.tar"), "--no-progress"]) == 2
    assert "line 2: missing field 'concept_image'" in capsys.readouterr().err and not (folder / "b").exists()
    with pytest.raises(ManifestError, match="printf field"):
        write_shards(path, folder / "shards" / "all.tar")
