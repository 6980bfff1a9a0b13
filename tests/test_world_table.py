"""The world's table: test cases, scoring, intervals, and every row's plumbing on an untrained world."""

import re

import pytest

from mod_adapter.modules.world.scene import ATTRIBUTES
from mod_adapter.modules.world.split import EVAL, split_of
from mod_adapter.modules.world.table import MULTI, SINGLE, make_cases, score_case, summarise

from command_helpers import mod_adapter_cli

WORLD_ENCODER = {"name": "ModAdapter-World-ViT-8", "layer": "penultimate", "tokens": 65, "width": 128}


def test_cases_name_every_concept_by_its_word_and_leave_its_values_to_the_concept():
    for kinds in list(SINGLE) + [k for sets in MULTI.values() for k in sets]:
        for case in make_cases([kinds], 3, seed=1):
            assert all(split_of(c) == EVAL for c in case.concepts)  # held-out concept images only
            words = case.prompt.split()
            for kind, concept, word in zip(case.kinds, case.concepts, case.words):
                assert word in words
                if kind != "object":
                    assert f" {kind} " in f" {case.prompt} "
            for kind, concept in zip(case.kinds, case.concepts):  # the ideal output carries each concept
                from mod_adapter.modules.world.scene import CONCEPT_ATTRIBUTES

                assert all(getattr(case.ideal, n) == getattr(concept, n) for n in CONCEPT_ATTRIBUTES[kind])
    assert make_cases([("pose",)], 2, seed=1) == make_cases([("pose",)], 2, seed=1)


def test_scores_count_the_concept_the_prompt_and_what_was_copied():
    (case,) = make_cases([("surface",)], 1, seed=3)
    ideal = {name: getattr(case.ideal, name) for name in ATTRIBUTES}
    perfect = score_case(case, ideal)
    assert (perfect.cp, perfect.pf, perfect.copy_paste) == (1.0, 1.0, 0.0)
    copied = dict(ideal, **{n: getattr(case.concepts[0], n) for n in ATTRIBUTES if n not in ("colour", "pattern")})
    score = score_case(case, copied)
    assert score.cp == 1.0 and score.copy_paste == 1.0 and score.pf < 1.0
    wrong = dict(ideal, colour=next(v for v in ATTRIBUTES["colour"] if v != case.ideal.colour))
    assert score_case(case, wrong).cp == 0.5


def test_summary_gives_cp_pf_as_the_product_of_means_with_intervals():
    from mod_adapter.modules.world.table import CaseScore, MethodResult

    result = MethodResult("x", scores=[CaseScore(1.0, 0.5, None), CaseScore(0.0, 1.0, 0.5)] * 10)
    row = summarise(result)
    assert row["cp_pf"] == pytest.approx(0.5 * 0.75)
    assert row["cp_95"][0] < 0.5 < row["cp_95"][1] and row["copy_paste"] == 0.5


def test_the_summary_splits_cp_and_pf_by_kind_set():
    from mod_adapter.modules.world.table import CaseScore, MethodResult, make_cases

    cases = make_cases([("object",), ("surface", "pose")], 2, seed=0)
    scores = [CaseScore(1.0, 0.5, None), CaseScore(0.5, 0.5, None), CaseScore(0.0, 1.0, None),
              CaseScore(0.0, 0.5, None)]
    kinds = summarise(MethodResult("x", scores=scores, cases=cases))["by_kinds"]
    assert kinds == {"object": {"images": 2, "cp": 0.75, "pf": 0.5, "cp_pf": 0.375},
                     "surface+pose": {"images": 2, "cp": 0.0, "pf": 0.75, "cp_pf": 0.0}}


def test_the_paired_difference_of_cp_pf_cancels_shared_noise_and_needs_the_same_cases():
    from mod_adapter.modules.world.table import CaseScore, MethodResult, cp_pf_difference

    cases = make_cases([("pose",)], 20, seed=0)
    # b is a everywhere but 0.1 lower in CP: the cases' own spread is large, the difference is not
    a = MethodResult("a", scores=[CaseScore(0.2 + 0.8 * (i % 2), 1.0, None) for i in range(20)], cases=cases)
    b = MethodResult("b", scores=[CaseScore(s.cp - 0.1, 1.0, None) for s in a.scores], cases=cases)
    difference, (low, high) = cp_pf_difference(a, b)
    assert difference == pytest.approx(0.1) and low == pytest.approx(0.1) and high == pytest.approx(0.1)
    assert summarise(a)["cp_pf_95"][1] - summarise(a)["cp_pf_95"][0] > 0.2  # unpaired intervals would overlap
    with pytest.raises(ValueError):
        cp_pf_difference(a, MethodResult("c", scores=a.scores, cases=make_cases([("pose",)], 20, seed=1)))


def test_the_paired_cp_difference_is_given_per_kind_set():
    from mod_adapter.modules.world.table import CaseScore, MethodResult, cp_difference_by_kinds

    cases = make_cases([("lighting",), ("background",)], 10, seed=0)
    # a carries lighting (CP 0.3 above b on every lighting case) and nothing of background
    a = MethodResult("a", scores=[CaseScore(0.2 + 0.5 * (i % 2) + 0.3 * (c.kinds == ("lighting",)), 1.0, None)
                                  for i, c in enumerate(cases)], cases=cases)
    b = MethodResult("b", scores=[CaseScore(0.2 + 0.5 * (i % 2), 1.0, None) for i in range(len(cases))], cases=cases)
    kinds = cp_difference_by_kinds(a, b)
    assert set(kinds) == {"lighting", "background"}
    assert kinds["lighting"]["cp_minus"] == pytest.approx(0.3) and kinds["lighting"]["cp_minus_95"][0] == pytest.approx(0.3)
    assert kinds["background"]["cp_minus"] == 0 and kinds["background"]["cp_minus_95"] == (0.0, 0.0)
    with pytest.raises(ValueError):
        cp_difference_by_kinds(a, MethodResult("c", scores=a.scores, cases=make_cases([("pose",)], 20, seed=1)))


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    """An untrained world and a world-preset adapter with random (non-zero) experts: (world folder, adapter file)."""
    import torch

    from mod_adapter.modules.adapter import ModAdapter
    from mod_adapter.modules.checkpoint import save_adapter_checkpoint
    from mod_adapter.modules.config import ModAdapterConfig

    from world_builders import random_world

    folder = tmp_path_factory.mktemp("untrained")
    world = random_world(str(folder))
    torch.manual_seed(0)
    adapter = ModAdapter(ModAdapterConfig.preset("world"))
    with torch.no_grad():
        for expert in adapter.experts:
            expert.fc2.weight.normal_(0, 0.5)
    checkpoint = str(folder / "adapter.safetensors")
    save_adapter_checkpoint(checkpoint, adapter, base_model="toy-world", image_encoder=WORLD_ENCODER)
    return world, checkpoint


def test_every_row_runs_on_an_untrained_world(untrained, monkeypatch):
    import torch

    from mod_adapter.modules.learn_diffusers import DiffusersDenoiser

    from mod_adapter.modules.flux_diffusers import load_flux_pipeline, resolve_flux_source
    from mod_adapter.modules.world import methods
    from mod_adapter.modules.world.paths import check_world
    from mod_adapter.modules.world.judge import load_judge
    from mod_adapter.modules.world.table import evaluate

    world, checkpoint = untrained
    paths = check_world(world)
    pipe = load_flux_pipeline(resolve_flux_source(paths["flux"]), torch.float32)
    models = methods.WorldModels.load(paths, pipe)
    cases = make_cases([("object", "pose")], 1, seed=0)
    judge = load_judge(paths["judge"])
    rows = {
        "oracle": methods.text_oracle(models), "bare": methods.bare_word(models),
        "description": methods.description_only(models), "adapter": methods.adapter_method(models, checkpoint),
        "global": methods.adapter_method(models, checkpoint, everywhere=True),
        "learn": methods.learn_concept_method(models, steps=2),
        "learn-isolated": methods.learn_concept_method(models, steps=6, isolation_partners=2),
        "hybrid": methods.learn_concept_method(models, steps=2, init_checkpoint=checkpoint),
    }
    widths = []  # the learning loop's image widths: a composed concept + partner image is twice as wide
    original = DiffusersDenoiser.velocity
    monkeypatch.setattr(DiffusersDenoiser, "velocity",
                        lambda self, noisy, *a: widths.append(noisy.shape[-1]) or original(self, noisy, *a))
    prompts = {}
    for name, method in rows.items():
        prompt, concepts = method(cases[0])
        prompts[name] = prompt
        assert len(concepts) == (0 if name in ("oracle", "bare") else 2)
        for concept in concepts:
            assert concept.delta.shape == (9, 128) and torch.isfinite(concept.delta).all()
        assert len(evaluate(name, method, cases, pipe, judge, steps=2, cfg=4.0).scores) == 1
    assert prompts["oracle"] != prompts["bare"] == prompts["adapter"]
    assert 16 in widths and 8 in widths  # only learn-isolated composes (its seed draws isolation in 6 steps)
    assert methods.row_method(models, "learn-isolated", "", learn_steps=1, hybrid_steps=1, lr=None,
                              seed=0).__qualname__.startswith("learn_concept_method")
    # partners: the same for the same concept image, never its object
    concept = cases[0].concepts[0]
    partners = methods.isolation_scenes(concept, 6, seed=0)
    assert partners == methods.isolation_scenes(concept, 6, seed=0) and len(set(partners)) == 6
    assert all(p.shape != concept.shape and p.colour != concept.colour and p.pattern != concept.pattern
               for p in partners)
    _, local = rows["adapter"](cases[0])
    _, everywhere = rows["global"](cases[0])
    assert len(everywhere[0].positions) == 48 > len(local[0].positions)


def test_the_table_command_writes_every_row_with_its_difference_from_the_bare_word(untrained, tmp_path):
    import json

    from PIL import Image

    world, checkpoint = untrained
    out, grid = tmp_path / "table.json", tmp_path / "grid.png"
    run = mod_adapter_cli("world", "table", "--world", world, "--rows", "bare", f"adapter:full={checkpoint}", "learn",
                          "--versus", "adapter:full", "--sets", "single", "--count", "2", "--learn-count", "1",
                          "--learn-steps", "2", "--steps", "2", "--out", str(out), "--grid", str(grid), "--grid-set",
                          "single", "--grid-rows", "1", "--no-progress")
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["learn_lr"] == "rule"  # Learn Concept's learning-rate rule, as for an artist
    rows = {row["method"]: row for row in report["rows"]}
    assert set(rows) == {"bare", "adapter:full", "learn"}
    assert rows["bare"]["images"] == 10 and rows["learn"]["images"] == 5
    assert "cp_pf_minus_bare" not in rows["bare"]
    for name in ("adapter:full", "learn"):  # the learn row is compared on the bare word's first cases
        low, high = rows[name]["cp_pf_minus_bare_95"]
        assert low <= rows[name]["cp_pf_minus_bare"] <= high
        by_kinds = rows[name]["cp_minus_bare_by_kinds"]  # which kinds the row carries beyond the bare word
        assert set(by_kinds) == {"object", "surface", "pose", "lighting", "background"}
        assert all(k["cp_minus_95"][0] <= k["cp_minus"] <= k["cp_minus_95"][1] for k in by_kinds.values())
    # --versus: the learn row (on the first cases) against the adapter row, paired; the adapter row not against itself
    assert rows["learn"]["versus"] == "adapter:full" and "versus" not in rows["adapter:full"]
    low, high = rows["learn"]["cp_pf_minus_versus_95"]
    assert low <= rows["learn"]["cp_pf_minus_versus"] <= high
    with Image.open(grid) as picture:
        assert picture.width >= 128 * 4  # the concept image and three rows' outputs
    unknown = mod_adapter_cli("world", "table", "--world", world, "--rows", "magic", "--no-progress")
    assert unknown.returncode != 0 and "unknown row" in unknown.stderr and "Traceback" not in unknown.stderr


def test_eval_learn_scores_the_learned_delta_against_the_bare_word(untrained, tmp_path):
    import json

    world, _ = untrained
    run = mod_adapter_cli("world", "eval-learn", "--world", world, "--kinds", "surface", "--concepts", "1",
                          "--prompts", "2", "--learn-steps", "2", "--learn-lr", "0.02", "--learn-batch-size", "2",
                          "--steps", "2", "--work-dir", str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert report["learn_lr"] == 0.02 and report["learn_steps"] == 2 and report["learn_batch_size"] == 2
    (row,) = report["rows"]
    assert row["kind"] == "surface" and row["images"] == 2
    assert 0.0 <= row["cp"] <= 1.0 and 0.0 <= row["cp_bare_word"] <= 1.0 and row["learn_seconds_per_concept"] > 0
    from safetensors import safe_open

    with safe_open(str(tmp_path / "surface" / "surface-000.safetensors"), "pt") as learned:
        source = json.loads(learned.metadata()["source"])
    assert source["lr"] == 0.02 and source["batch_size"] == 2  # the settings reached the learner
    assert set(row["cp_by_attribute"]) == {"colour", "pattern"}
    assert row["cp"] == sum(row["cp_by_attribute"].values()) / 2

    # The same concept file, reused at another strength: nothing is learned again, the prompts and seeds are the
    # same (the bare word reads the same), and the learned file is untouched.
    learned_bytes = (tmp_path / "surface" / "surface-000.safetensors").read_bytes()
    again = mod_adapter_cli("world", "eval-learn", "--world", world, "--kinds", "surface", "--concepts", "1",
                            "--prompts", "2", "--learn-steps", "2", "--learn-lr", "0.02", "--steps", "2",
                            "--reuse-learned", "--scale", "0", "--work-dir", str(tmp_path))
    assert again.returncode == 0, again.stderr[-3000:]
    (reused,) = json.loads(again.stdout)["rows"]
    assert reused["learn_seconds_per_concept"] is None and "reused" in again.stderr
    assert (tmp_path / "surface" / "surface-000.safetensors").read_bytes() == learned_bytes
    assert reused["cp_bare_word"] == row["cp_bare_word"] and reused["pf_bare_word"] == row["pf_bare_word"]
    # At strength 0 the learned Δ does nothing: the image is the bare word's
    assert reused["cp"] == reused["cp_bare_word"] and reused["pf"] == reused["pf_bare_word"]


def test_eval_learn_passes_its_stage_split_to_the_learner(untrained, tmp_path):
    import json

    world, _ = untrained
    run = mod_adapter_cli("world", "eval-learn", "--world", world, "--kinds", "pose", "--concepts", "1",
                          "--prompts", "1", "--learn-steps", "3", "--learn-stage1-steps", "3", "--steps", "1",
                          "--work-dir", str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout)["learn_stage1_steps"] == 3
    from safetensors import safe_open

    with safe_open(str(tmp_path / "pose" / "pose-000.safetensors"), "pt") as learned:
        source = json.loads(learned.metadata()["source"])
        delta = learned.get_tensor("delta")
    assert source["stage1_steps"] == 3, source
    # stage 1 only: one global direction, the same in every block
    import torch

    assert delta.abs().sum() > 0 and torch.equal(delta, delta[:1].expand_as(delta))

    # Any other LearnConfig field reaches the learner (here one it must refuse); an unknown name is refused first
    bad = mod_adapter_cli("world", "eval-learn", "--world", world, "--kinds", "pose", "--concepts", "1",
                          "--prompts", "1", "--learn-steps", "3", "--steps", "1", "--learn-config",
                          "stage2_sigma_range=[0.5,2]", "--work-dir", str(tmp_path / "bad"))
    assert bad.returncode != 0 and "stage2_sigma_range must be (low, high)" in bad.stderr, bad.stderr[-2000:]
    unknown = mod_adapter_cli("world", "eval-learn", "--world", world, "--kinds", "pose", "--learn-config",
                              "stage3_steps=1", "--work-dir", str(tmp_path / "unknown"))
    assert unknown.returncode != 0 and "NAME one of" in unknown.stderr and "Traceback" not in unknown.stderr

    # TokenVerse's decomposition: every word of the learning caption gets a Δ of its own, in one run
    every = mod_adapter_cli("world", "eval-learn", "--world", world, "--kinds", "pose", "--concepts", "1",
                            "--prompts", "1", "--learn-steps", "2", "--steps", "1", "--learn-every-word",
                            "--work-dir", str(tmp_path / "every"))
    assert every.returncode == 0, every.stderr[-3000:]
    assert json.loads(every.stdout)["learn_every_word"] is True
    files = sorted((tmp_path / "every" / "pose" / "pose-000-every-word").glob("*.safetensors"))
    with safe_open(str(files[0]), "pt") as first:
        caption = json.loads(first.metadata()["source"])["caption"]
    assert [f.stem for f in files] == sorted(set(re.findall(r"[a-z]+", caption))), caption
    for path in files:
        with safe_open(str(path), "pt") as learned:
            assert learned.metadata()["word"] == path.stem
            assert json.loads(learned.metadata()["source"])["caption"] == caption  # learned together


def test_eval_learn_learns_each_concept_from_several_views_each_with_its_caption(untrained, tmp_path):
    import json

    from safetensors import safe_open

    from mod_adapter.modules.world.evaluation import more_views
    from mod_adapter.modules.world.scene import CONCEPT_ATTRIBUTES

    world, _ = untrained
    args = ["world", "eval-learn", "--world", world, "--kinds", "surface", "--concepts", "1", "--prompts", "1",
            "--learn-steps", "2", "--steps", "1"]
    one = mod_adapter_cli(*args, "--work-dir", str(tmp_path / "one"))
    three = mod_adapter_cli(*args, "--learn-views", "3", "--work-dir", str(tmp_path / "three"))
    assert one.returncode == 0 and three.returncode == 0, (one.stderr + three.stderr)[-3000:]
    assert json.loads(three.stdout)["learn_views"] == 3
    with safe_open(str(tmp_path / "three" / "surface" / "surface-000.safetensors"), "pt") as learned:
        source = json.loads(learned.metadata()["source"])
    with safe_open(str(tmp_path / "one" / "surface" / "surface-000.safetensors"), "pt") as learned:
        one_source = json.loads(learned.metadata()["source"])
    assert source["images"] == 3 and source["image_files"] == [
        "surface-000.png", "surface-000-view1.png", "surface-000-view2.png"]
    # the concept image and its caption are the one-view run's; the other views have captions of their own
    assert source["caption"] == one_source["caption"] and len(set(source["captions"])) == 3
    assert ((tmp_path / "three" / "surface" / "surface-000.png").read_bytes()
            == (tmp_path / "one" / "surface" / "surface-000.png").read_bytes())
    # every view shares the concept's values and only those are fixed
    import numpy as np

    from mod_adapter.modules.world.split import EVAL, random_scene

    scene = random_scene(np.random.default_rng(0), EVAL)
    views = more_views(scene, "surface", 20, np.random.default_rng(1))
    assert all(v.colour == scene.colour and v.pattern == scene.pattern for v in views)
    assert len({(v.shape, v.position, v.direction) for v in views}) > 5
    assert CONCEPT_ATTRIBUTES["surface"] == ("colour", "pattern")
    bad = mod_adapter_cli(*args, "--learn-views", "2", "--learn-every-word", "--work-dir", str(tmp_path / "bad"))
    assert bad.returncode != 0 and "--learn-views 1" in bad.stderr and "Traceback" not in bad.stderr

    # negatives: scenes whose surface differs in colour and pattern, each under its own caption
    negative = mod_adapter_cli(*args, "--learn-negatives", "2", "--work-dir", str(tmp_path / "negative"))
    assert negative.returncode == 0, negative.stderr[-3000:]
    assert json.loads(negative.stdout)["learn_negatives"] == 2
    with safe_open(str(tmp_path / "negative" / "surface" / "surface-000.safetensors"), "pt") as learned:
        negative_source = json.loads(learned.metadata()["source"])
    assert negative_source["negative_images"] == ["surface-000-negative0.png", "surface-000-negative1.png"]
    assert negative_source["caption"] == one_source["caption"] and negative_source["images"] == 1
    assert len(set(negative_source["negative_captions"])) == 2
    assert all(" surface " in caption for caption in negative_source["negative_captions"])


def test_eval_learn_draws_its_concept_images_from_the_split_it_is_given(untrained, tmp_path):
    import json

    import numpy as np
    from PIL import Image

    from mod_adapter.modules.world.evaluation import more_views
    from mod_adapter.modules.world.scene import render
    from mod_adapter.modules.world.split import EVAL, TRAIN, random_scene, split_of

    world, _ = untrained
    args = ["world", "eval-learn", "--world", world, "--kinds", "surface", "--concepts", "1", "--prompts", "1",
            "--learn-steps", "2", "--steps", "1", "--learn-views", "2", "--seed", "7"]
    for split in (TRAIN, EVAL):
        folder = tmp_path / split
        run = mod_adapter_cli(*args, "--concept-split", split, "--work-dir", str(folder))
        assert run.returncode == 0, run.stderr[-3000:]
        assert json.loads(run.stdout)["concept_split"] == split
        # the concept image is the split's first scene of the kind's stream, its view one of the split's too
        scene = random_scene(np.random.default_rng([7, 0]), split)
        view = more_views(scene, "surface", 1, np.random.default_rng([7, 0, 0, 1]), split)[0]
        assert split_of(scene) == split and split_of(view) == split
        for drawn, name in ((scene, "surface-000.png"), (view, "surface-000-view1.png")):
            assert np.array_equal(np.asarray(Image.open(folder / "surface" / name)), render(drawn))
    bad = mod_adapter_cli(*args, "--concept-split", "test", "--work-dir", str(tmp_path / "bad"))
    assert bad.returncode != 0 and "--concept-split" in bad.stderr and "Traceback" not in bad.stderr


def test_eval_learn_scores_an_adapters_prediction_on_the_same_prompts_without_learning(untrained, tmp_path,
                                                                                      monkeypatch):
    import json

    world, adapter = untrained
    args = ["world", "eval-learn", "--world", world, "--kinds", "pose", "--concepts", "1", "--prompts", "2",
            "--steps", "1", "--work-dir", str(tmp_path / "predicted")]
    run = mod_adapter_cli(*args, "--adapter", adapter)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "predicted" in run.stderr and "s to learn" not in run.stderr
    assert json.loads(run.stdout)["adapter"] == adapter
    assert not list((tmp_path / "predicted").rglob("*.safetensors"))  # nothing was learned
    row = json.loads(run.stdout)["rows"][0]
    assert row["images"] == 2 and row["learn_seconds_per_concept"] is None

    # in process: the prediction for the concept scene and word is what the prompts are sampled with
    import torch

    from mod_adapter.modules.world import sampling
    from mod_adapter.modules.world.cli import world_pipeline
    from mod_adapter.modules.world.evaluation import concept_learning

    paths, pipe, judge = world_pipeline(world)
    blocks = len(pipe.transformer.transformer_blocks) + len(pipe.transformer.single_transformer_blocks)
    width = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
    predicted, sampled = {}, []

    def predict(scene, word):
        predicted[(scene, word)] = torch.full((blocks, width), 0.25)
        return predicted[(scene, word)]

    generate = sampling.generate

    def recording_generate(pipe, prompts, seeds, concepts=None, **kwargs):
        sampled.append(concepts)
        return generate(pipe, prompts, seeds, concepts=concepts, **kwargs)

    monkeypatch.setattr(sampling, "generate", recording_generate)
    concept_learning(paths["flux"], pipe, judge, "pose", concepts=1, prompts_per_concept=2, steps=2, seed=7,
                     work_dir=str(tmp_path / "in-process"), sample_steps=1, cfg=4.0, predict=predict,
                     log=lambda message: None)
    (scene, word), delta = next(iter(predicted.items()))
    assert word == "pose" and len(predicted) == 1
    with_delta, bare = sampled
    assert bare is None and len(with_delta) == 2
    assert all(concepts[0].delta is delta and concepts[0].name == "pose" for concepts in with_delta)


def test_caption_words_are_the_distinct_words_with_the_concept_word_first():
    from mod_adapter.modules.world.evaluation import caption_words

    assert caption_words("a ring with a surface in a pose, on the left", "pose") == [
        "pose", "a", "ring", "with", "surface", "in", "on", "the", "left"]
    with pytest.raises(ValueError, match="lighting"):
        caption_words("a ring with a surface", "lighting")


def test_the_demo_writes_a_labelled_grid(untrained, tmp_path):
    from PIL import Image

    from mod_adapter.modules.world.demo import DEMO_ROWS

    world, checkpoint = untrained
    out = tmp_path / "demo.png"
    run = mod_adapter_cli("demo", "--world", world, "--adapter", checkpoint, "--out", str(out), "--steps", "2",
                          "--no-progress")
    assert run.returncode == 0, run.stderr
    # a first run prints its result and nothing of the libraries' (deprecation notices, loading bars, accelerate)
    assert run.stderr.strip().splitlines() == [run.stderr.strip().splitlines()[-1]], run.stderr
    assert run.stderr.startswith(f"wrote {out}"), run.stderr
    with Image.open(out) as grid:
        assert grid.format == "PNG" and grid.height > 128 * len(DEMO_ROWS) and grid.width >= 128 * 3
    missing = mod_adapter_cli("demo", "--world", world, "--out", str(tmp_path / "x.png"))
    assert missing.returncode != 0 and "adapter" in missing.stderr and "Traceback" not in missing.stderr


def test_the_picture_grid_shows_every_rows_output_beside_the_concept_images():
    import torch

    from mod_adapter.modules.world.table import CaseScore, MethodResult, picture_grid

    cases = make_cases([("object", "pose")], 2, seed=0)
    results = [MethodResult(name, scores=[CaseScore(1, 1, None)] * 2, cases=cases,
                            images=[torch.full((3, 64, 64), value)] * 2) for name, value in (("a", 0.0), ("b", 1.0))]
    grid = picture_grid(results, 2)
    assert grid.dtype.name == "uint8" and grid.shape[1] >= 4 * 128  # two concept images + two rows' outputs
    assert grid.shape[0] >= 2 * 128
