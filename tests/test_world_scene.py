"""The toy world's scenes, captions and split: deterministic, every attribute visible, a fixed split."""

import numpy as np
import pytest

from mod_adapter.modules.errors import ModAdapterError
from mod_adapter.modules.world.captions import GROUPS, caption, describe, full_caption, random_caption
from mod_adapter.modules.world.scene import ATTRIBUTES, CONCEPT_ATTRIBUTES, Scene, all_attribute_combinations, render
from mod_adapter.modules.world.split import EVAL, HELD_OUT_PAIRS, TRAIN, random_scene, scenes, split_of

BASE = Scene("ball", "blue", "plain", "centre", "large", "left", "warm", "sand", seed=3)


def test_rendering_is_deterministic_and_the_seed_only_changes_the_grain():
    image = render(BASE)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert np.array_equal(render(BASE), image)
    grain = np.abs(render(BASE.replace(seed=4)).astype(int) - image).mean()
    other_background = np.abs(render(BASE.replace(background="grass")).astype(int) - image).mean()
    assert 0 < grain < 0.5 * other_background  # the texture's grain, far less than a change of the scene
    assert render(BASE, size=32).shape == (32, 32, 3)
    with pytest.raises(ModAdapterError, match="multiple of 16"):
        render(BASE, size=40)


@pytest.mark.parametrize("name", list(ATTRIBUTES))
def test_every_value_of_every_attribute_is_visibly_distinct(name):
    """Scenes that differ in one attribute differ clearly in pixels (mean absolute difference over the image,
    or over the object's area for the object's own attributes, which cover only part of the image)."""
    images = {value: render(BASE.replace(**{name: value})).astype(np.float32) for value in ATTRIBUTES[name]}
    values = list(images)
    for i, a in enumerate(values):
        for b in values[i + 1:]:
            difference = np.abs(images[a] - images[b]).mean(axis=-1)
            changed = difference > 12
            assert changed.mean() > 0.02, f"{name}: {a} and {b} differ in {changed.mean():.1%} of the pixels"


def test_the_scene_refuses_values_the_world_does_not_have():
    with pytest.raises(ModAdapterError, match="unknown shape 'dog'"):
        BASE.replace(shape="dog")


def test_concept_kinds_cover_every_attribute():
    covered = {a for kind, attrs in CONCEPT_ATTRIBUTES.items() if kind != "object" for a in attrs}
    assert covered | {"shape"} == set(ATTRIBUTES)
    assert len(list(all_attribute_combinations())) == np.prod([len(v) for v in ATTRIBUTES.values()])


def test_captions_use_the_group_words_with_and_without_values():
    assert full_caption(BASE) == ("a ball whose surface is blue plain in a pose, large in the centre "
                                  "under warm light from the left on a sand background")
    assert caption(BASE, {"surface": "word", "pose": "word", "lighting": "word", "background": "word"}) == \
        "a ball with a surface in a pose under a lighting on a background"
    assert caption(BASE, {}) == "a ball"
    rng = np.random.default_rng(0)
    texts = [random_caption(s, rng) for s in scenes(0, 400, TRAIN)]
    for group in GROUPS:
        assert any(group in t for t in texts), group
    assert any("with a surface" in t for t in texts) and any("whose surface is" in t for t in texts)
    assert describe(BASE, "pose") == "large in the centre" and describe(BASE, "lighting") == "warm light from the left"
    assert describe(BASE, "object") == "blue plain ball" and describe(BASE, "background") == "sand"


def test_the_split_holds_out_about_a_fifth_of_the_combinations_and_is_fixed():
    combos = [Scene(**c) for c in all_attribute_combinations()]
    held = sum(split_of(s) == EVAL for s in combos) / len(combos)
    assert 0.15 < held < 0.3
    for first, second, pairs in HELD_OUT_PAIRS:
        for a, b in pairs:
            assert split_of(BASE.replace(**{first: a, second: b})) == EVAL
    rng = np.random.default_rng(5)
    assert all(split_of(random_scene(rng, TRAIN)) == TRAIN for _ in range(200))
    assert all(split_of(random_scene(rng, EVAL)) == EVAL for _ in range(50))
    assert list(scenes(7, 5)) == list(scenes(7, 5))  # the same scenes for the same seed
    with pytest.raises(ValueError, match="no train scene"):
        random_scene(rng, TRAIN, shape="ball", colour="green")


def test_the_attribute_sheet_shows_every_value(tmp_path):
    import subprocess
    import sys

    from PIL import Image

    out = tmp_path / "sheet.png"
    result = subprocess.run([sys.executable, "-m", "mod_adapter.cli", "world", "sheet", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    with Image.open(out) as image:
        assert image.size == (64 * max(len(v) for v in ATTRIBUTES.values()), 64 * len(ATTRIBUTES))
