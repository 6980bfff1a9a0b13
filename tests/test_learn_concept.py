"""Learn Concept (TokenVerse mode) on a tiny random FLUX.1 in diffusers, on the CPU.

The tiny model's text stream reaches the image only through attention, so a
concept direction has to make the image tokens read the concept tokens; the
concept latent below has a strong per-channel colour (as a flat-coloured
image has), which such a direction can express. The learning rate is far above
the real default (1e-3) because the random model needs large directions.
"""


import pytest
import torch

from mod_adapter import cli
from mod_adapter.modules.concept import Concept
from mod_adapter.modules.concept_file import load_concept, save_concept
from mod_adapter.modules.errors import ModAdapterError
from mod_adapter.modules.learn_concept import (
    RELATIVE_LR,
    SCALE_SIGMAS,
    CaptionedImages,
    Denoiser,
    IsolationPartner,
    LearnConfig,
    LearningDivergedError,
    evaluate_loss,
    learn_concepts,
    modulation_scale,
    sample_sigmas,
)
from mod_adapter.modules.flow_matching import flow_matching_pair
from mod_adapter.modules.flux_layout import FluxLayout
from mod_adapter.modules.flux_diffusers import fit_image, latent_image_ids, pack_latents, unpack_latents
from mod_adapter.modules.learn_diffusers import DiffusersDenoiser, load_concept_images, plan_output_paths

from tiny_flux import tiny_diffusers_flux

NUM_BLOCKS, WIDTH = 6, 128
LAYOUT = FluxLayout(2, 4, WIDTH)  # tiny_diffusers_flux: 2 double + 4 single blocks
POSITIONS = [[3, 4]]
# Enough steps and a large enough rate for the tiny random model to move clearly
# (held-out loss about 0.72 × the loss without the concept; the test asks for < 0.9).
FAST = LearnConfig(steps=80, stage1_steps=50, lr=2.0, seed=0, log_every=0)


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


class FakeHost:
    """What the fake denoisers below share: the tiny layout, the CPU, no parameters, and a modulation vector of
    rms 1 (so that the learning-rate rule gives RELATIVE_LR)."""

    layout, device = LAYOUT, torch.device("cpu")

    def modulation_vector(self, noisy, sigma):
        return torch.ones(noisy.shape[0], WIDTH)

    def model_parameters(self):
        return []


@pytest.fixture(scope="module")
def model():
    return tiny_diffusers_flux()


@pytest.fixture(scope="module")
def caption_embeds():
    g = torch.Generator().manual_seed(5)
    return torch.randn(1, 8, 64, generator=g), torch.randn(1, 32, generator=g)


@pytest.fixture(scope="module")
def latents():
    g = torch.Generator().manual_seed(6)
    colour = torch.randn(1, 16, 1, 1, generator=g).sign() * 1.5
    return colour + 0.3 * torch.randn(1, 16, 8, 8, generator=g)


@pytest.fixture(scope="module")
def denoiser(model, caption_embeds):
    with DiffusersDenoiser(model, *caption_embeds) as d:
        yield d


@pytest.fixture(scope="module")
def learned(denoiser, latents):
    return learn_concepts(denoiser, latents, POSITIONS, FAST, words=["dog"])


def held_out(denoiser, latents, deltas):
    return evaluate_loss(denoiser, latents, deltas, POSITIONS, seed=FAST.seed, num_draws=16)


# ---------------------------------------------------------------- learning works


def test_learned_delta_lowers_the_held_out_loss(denoiser, latents, learned):
    assert isinstance(denoiser, Denoiser)
    zero = held_out(denoiser, latents, [torch.zeros(NUM_BLOCKS, WIDTH)])
    with_concept = held_out(denoiser, latents, learned.deltas)
    assert with_concept < 0.9 * zero, (with_concept, zero)
    # Zero Δ is the model without concepts.
    assert zero == pytest.approx(held_out(denoiser, latents, None), rel=1e-5)
    assert len(learned.losses) == FAST.steps and learned.steps_done == FAST.steps and not learned.stopped
    assert learned.words == ["dog"]


def test_stage_one_learns_one_global_direction_and_stage_two_per_block_offsets(denoiser, latents, learned):
    stage1_only = learn_concepts(denoiser, latents, POSITIONS, LearnConfig(steps=8, stage1_steps=8, lr=0.1, log_every=0))
    delta = stage1_only.deltas[0]
    assert torch.equal(delta, delta[:1].expand_as(delta))  # every block the same direction
    assert delta.abs().max() > 0.1
    both = learned.deltas[0]
    assert (both - both.mean(dim=0)).abs().max() > 1e-2  # per-block offsets after stage 2


def test_evaluation_draws_differ_from_the_training_draws(latents):
    class Recorder(FakeHost):

        def __init__(self):
            self.seen = []

        def velocity(self, noisy, sigma, deltas, positions):
            self.seen.append(noisy.clone())
            return noisy * 0 + sum(d.sum() for d in deltas) * 0

        def model_parameters(self):
            return []

    training, evaluation = Recorder(), Recorder()
    config = LearnConfig(steps=4, stage1_steps=2, seed=3, flip_probability=0.0, log_every=0)
    learn_concepts(training, latents, POSITIONS, config)
    evaluate_loss(evaluation, latents, [torch.zeros(NUM_BLOCKS, WIDTH)], POSITIONS, seed=3, num_draws=4)
    for noisy in evaluation.seen:
        assert all(not torch.allclose(noisy, other) for other in training.seen)


def test_starting_from_a_given_delta_beats_starting_from_zero(denoiser, latents):
    short = LearnConfig(steps=30, stage1_steps=20, lr=2.0, seed=1, log_every=0)
    init = learn_concepts(denoiser, latents, POSITIONS, short).deltas  # stands in for a predicted concept
    same_budget = LearnConfig(steps=30, stage1_steps=20, lr=2.0, seed=2, log_every=0)
    from_init = learn_concepts(denoiser, latents, POSITIONS, same_budget, init=init).deltas
    from_zero = learn_concepts(denoiser, latents, POSITIONS, same_budget).deltas
    assert held_out(denoiser, latents, from_init) < held_out(denoiser, latents, from_zero)


def test_a_run_starts_exactly_at_init(denoiser, latents):
    init = torch.randn(NUM_BLOCKS, WIDTH, generator=torch.Generator().manual_seed(9))
    untouched = learn_concepts(denoiser, latents, POSITIONS, FAST, init=[init], should_stop=lambda: True)
    torch.testing.assert_close(untouched.deltas[0], init)
    # During stage 1 only the global direction moves: the per-block shape of init is kept.
    moved = learn_concepts(denoiser, latents, POSITIONS, LearnConfig(steps=3, stage1_steps=3, lr=0.1, log_every=0),
                           init=[init]).deltas[0]
    shift = moved - init
    torch.testing.assert_close(shift, shift[:1].expand_as(shift))
    assert shift.abs().max() > 1e-3


def test_several_words_of_one_caption_learn_one_delta_each(denoiser, latents):
    result = learn_concepts(denoiser, latents, [[1], [3, 4]], LearnConfig(steps=6, stage1_steps=3, lr=0.3, log_every=0),
                            words=["red", "dog"])
    assert len(result.deltas) == 2 and result.words == ["red", "dog"]
    assert not torch.allclose(result.deltas[0], result.deltas[1])
    assert all(d.shape == (NUM_BLOCKS, WIDTH) and d.abs().max() > 0 for d in result.deltas)


def test_same_seed_same_result(denoiser, latents):
    config = LearnConfig(steps=8, stage1_steps=4, lr=0.3, seed=7, log_every=0)
    first = learn_concepts(denoiser, latents, POSITIONS, config)
    second = learn_concepts(denoiser, latents, POSITIONS, config)
    assert torch.equal(first.deltas[0], second.deltas[0])
    assert first.losses == second.losses
    other = learn_concepts(denoiser, latents, POSITIONS, LearnConfig(steps=8, stage1_steps=4, lr=0.3, seed=8, log_every=0))
    assert not torch.equal(first.deltas[0], other.deltas[0])


def test_gradient_checkpointing_gives_the_same_result(model, denoiser, latents):
    config = LearnConfig(steps=4, stage1_steps=2, lr=0.3, seed=4, log_every=0)
    plain = learn_concepts(denoiser, latents, POSITIONS, config).deltas[0]
    model.enable_gradient_checkpointing()
    try:
        checkpointed = learn_concepts(denoiser, latents, POSITIONS, config).deltas[0]
    finally:
        model.disable_gradient_checkpointing()
    torch.testing.assert_close(checkpointed, plain, rtol=1e-4, atol=1e-5)


def test_checkpointing_gives_the_same_result_when_a_step_runs_several_captions(model, caption_embeds, latents):
    """Images under another caption and negatives run several forwards with Δ in one step, at other token
    positions: each is backpropagated before the next, so the recompute sees its own forward's concepts."""
    other = torch.randn(1, 8, 64, generator=torch.Generator().manual_seed(31)), caption_embeds[1]
    more = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(32))
    config = LearnConfig(steps=6, stage1_steps=3, lr=0.3, seed=4, batch_size=3, negative_probability=1.0,
                         log_every=0)

    def run():
        with DiffusersDenoiser(model, *caption_embeds) as host:
            other_caption = host.with_caption(*other)
            return learn_concepts(host, latents, POSITIONS, config,
                                  more_images=[CaptionedImages(other_caption, [[1, 2, 5]], more[:1])],
                                  negatives=[CaptionedImages(other_caption, [[6]], more[1:])]).deltas[0]

    plain = run()
    model.enable_gradient_checkpointing()
    try:
        checkpointed = run()
    finally:
        model.disable_gradient_checkpointing()
    torch.testing.assert_close(checkpointed, plain, rtol=1e-4, atol=1e-5)


def test_saved_concept_reloads_to_the_same_delta(tmp_path, learned):
    path = tmp_path / "dog.safetensors"
    source = {"kind": "learned", "method": "tokenverse", "steps": learned.steps_done, "images": 1, "caption": "a dog"}
    save_concept(path, Concept(word="dog", delta=learned.deltas[0], source=source), num_double_blocks=2)
    loaded = load_concept(path)
    assert loaded.word == "dog" and loaded.source == source
    assert torch.equal(loaded.delta, learned.deltas[0].to(torch.bfloat16).float())
    torch.testing.assert_close(loaded.delta, learned.deltas[0], rtol=1e-2, atol=1e-2)


# ------------------------------------------------------------- the loop's rules


def test_model_parameters_receive_no_gradient_and_keep_their_flags(model, denoiser, latents):
    first = next(model.parameters())
    first.requires_grad_(True)  # as a user's model might come
    try:
        learn_concepts(denoiser, latents, POSITIONS, LearnConfig(steps=2, stage1_steps=1, lr=0.1, log_every=0))
        assert all(p.grad is None for p in model.parameters())
        assert first.requires_grad  # put back after the run
    finally:
        first.requires_grad_(False)


def test_a_host_that_leaks_gradients_into_the_model_is_caught(latents):
    weight = torch.nn.Parameter(torch.ones(()))

    class LeakyDenoiser(FakeHost):

        def velocity(self, noisy, sigma, deltas, positions):
            weight.requires_grad_(True)  # a broken host re-enables training of the model
            return noisy * weight + deltas[0].mean()

        def model_parameters(self):
            return [weight]

    with pytest.raises(RuntimeError, match="only Δ may be trained"):
        learn_concepts(LeakyDenoiser(), latents, POSITIONS, LearnConfig(steps=2, stage1_steps=1, log_every=0))


class _BreaksAtStep:
    """Wraps a denoiser; from the given step on it predicts NaN."""

    def __init__(self, inner, step):
        self.inner, self.step, self.calls = inner, step, 0
        self.layout, self.device = inner.layout, inner.device

    def velocity(self, *args):
        self.calls += 1
        out = self.inner.velocity(*args)
        return out * float("nan") if self.calls >= self.step else out

    def modulation_vector(self, noisy, sigma):
        return self.inner.modulation_vector(noisy, sigma)

    def model_parameters(self):
        return self.inner.model_parameters()


def test_nan_loss_stops_the_run_with_a_clear_error(denoiser, latents):
    steps_reported = []
    with pytest.raises(LearningDivergedError, match=r"step 3 of 10.*nan.*Lower the learning rate"):
        learn_concepts(_BreaksAtStep(denoiser, 3), latents, POSITIONS, LearnConfig(steps=10, log_every=0),
                       progress=lambda step, total, loss: steps_reported.append(step))
    assert steps_reported == [1, 2]
    assert issubclass(LearningDivergedError, ModAdapterError)


def test_should_stop_ends_the_run_early(denoiser, latents):
    progress = []
    result = learn_concepts(denoiser, latents, POSITIONS, LearnConfig(steps=50, log_every=0),
                            progress=lambda step, total, loss: progress.append((step, total)),
                            should_stop=lambda: len(progress) >= 3)
    assert result.stopped and result.steps_done == 3 and len(result.losses) == 3
    assert progress == [(1, 50), (2, 50), (3, 50)]
    assert torch.isfinite(result.deltas[0]).all()


def test_flow_matching_convention_matches_an_oracle(latents):
    class Oracle(FakeHost):  # knows x0, so its velocity (x_σ − x0)/σ is exactly ε − x0

        def velocity(self, noisy, sigma, deltas, positions):
            return (noisy - latents) / sigma.view(-1, 1, 1, 1)

        def model_parameters(self):
            return []

    assert evaluate_loss(Oracle(), latents, None, POSITIONS, num_draws=4) < 1e-9
    noise = torch.randn_like(latents)
    noisy, target = flow_matching_pair(latents, noise, torch.tensor([0.25]))
    torch.testing.assert_close(noisy, 0.75 * latents + 0.25 * noise)
    torch.testing.assert_close(target, noise - latents)


def test_timesteps_follow_the_tokenverse_stage_ranges():
    g = torch.Generator().manual_seed(0)
    stage1 = sample_sigmas(g, 20000, (0.8, 1.0), 0.92)
    stage2 = sample_sigmas(g, 20000, (0.0, 0.8), 0.92)
    # 92% from the range plus the uniform draws that land in it anyway.
    assert float(((stage1 >= 0.8)).float().mean()) == pytest.approx(0.92 + 0.08 * 0.2, abs=0.01)
    assert float(((stage2 < 0.8)).float().mean()) == pytest.approx(0.92 + 0.08 * 0.8, abs=0.01)
    assert float(sample_sigmas(g, 1000, (0.0, 0.8), 1.0, min_sigma=0.05).min()) >= 0.05


def test_flip_augmentation_uses_the_flipped_encodings(latents):
    class NearlyClean(FakeHost):  # with σ ≈ 0 the noisy latent is the (possibly flipped) clean one

        def __init__(self):
            self.seen = []

        def velocity(self, noisy, sigma, deltas, positions):
            self.seen.append(noisy.clone())
            return noisy + deltas[0].mean()

        def model_parameters(self):
            return []

    def run(flip_probability, flipped_latents=None):
        recorder = NearlyClean()
        config = LearnConfig(steps=3, stage1_steps=3, stage1_sigma_range=(0.0, 1e-7), range_probability=1.0,
                             min_sigma=0.0, flip_probability=flip_probability, log_every=0)
        learn_concepts(recorder, latents, POSITIONS, config, flipped_latents=flipped_latents)
        return recorder.seen

    encoded_flip = torch.randn_like(latents)
    for seen in run(1.0, encoded_flip):
        torch.testing.assert_close(seen, encoded_flip, atol=1e-5, rtol=0)
    for seen in run(1.0):
        torch.testing.assert_close(seen, latents.flip(-1), atol=1e-5, rtol=0)
    for seen in run(0.0, encoded_flip):
        torch.testing.assert_close(seen, latents, atol=1e-5, rtol=0)


@pytest.mark.parametrize("change", [dict(steps=0), dict(stage1_steps=-1), dict(lr=0.0), dict(lr=float("nan")),
                                    dict(stage1_sigma_range=(0.9, 0.8)), dict(range_probability=1.5),
                                    dict(batch_size=0), dict(max_grad_norm=-1.0), dict(steps=1.5),
                                    dict(negative_weight=-1.0), dict(negative_probability=2.0)])
def test_invalid_settings_are_refused(denoiser, latents, change):
    with pytest.raises(ModAdapterError, match="Invalid learning setting"):
        learn_concepts(denoiser, latents, POSITIONS, LearnConfig(**change))


def test_inconsistent_inputs_are_refused(denoiser, latents):
    with pytest.raises(ModAdapterError, match="no token positions"):
        learn_concepts(denoiser, latents, [[]], FAST, words=["dog"])
    with pytest.raises(ModAdapterError, match=r"\(images, channels, height, width\)"):
        learn_concepts(denoiser, latents[0], POSITIONS, FAST)
    with pytest.raises(ModAdapterError, match=r"must be a \(6, 128\) tensor"):
        learn_concepts(denoiser, latents, POSITIONS, FAST, words=["dog"], init=[torch.zeros(57, 3072)])


# ------------------------------------------------------- diffusers plumbing


def test_packing_and_ids_match_diffusers_flux_pipeline():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 6, 10)
    packed = pack_latents(latents)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(latents, 2, 16, 6, 10))
    torch.testing.assert_close(unpack_latents(packed, 6, 10), latents)
    torch.testing.assert_close(unpack_latents(packed, 6, 10), FluxPipeline._unpack_latents(packed, 6 * 8, 10 * 8, 8))
    torch.testing.assert_close(latent_image_ids(6, 10), FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32))


def test_images_of_any_size_are_resized_and_centre_cropped(tmp_path):
    from PIL import Image

    wide = Image.new("RGB", (128, 64), (255, 0, 0))
    wide.paste(Image.new("RGB", (64, 64), (0, 0, 255)), (32, 0))  # the centre square is blue
    wide.save(tmp_path / "wide.png")
    Image.new("RGB", (64, 64), (0, 255, 0)).save(tmp_path / "square.png")
    Image.new("RGB", (40, 90), (255, 255, 255)).save(tmp_path / "tall_small.png")
    pixels, notes = load_concept_images([str(tmp_path / n) for n in ("wide.png", "square.png", "tall_small.png")], 64)
    assert pixels.shape == (3, 3, 64, 64) and pixels.min() >= -1 and pixels.max() <= 1
    torch.testing.assert_close(pixels[0], torch.tensor([-1.0, -1.0, 1.0])[:, None, None].expand(3, 64, 64))
    assert len(notes) == 2 and notes[0].startswith("wide.png: 128×64 resized to 64×64")
    assert "tall_small.png: 40×90" in notes[1]
    image, note = fit_image(Image.new("RGB", (64, 64)), 64)
    assert note is None and image.size == (64, 64)


def test_unusable_images_and_resolutions_are_refused(tmp_path):
    (tmp_path / "not_an_image.png").write_text("hello")
    with pytest.raises(ModAdapterError, match="Cannot read concept image"):
        load_concept_images([str(tmp_path / "not_an_image.png")], 64)
    with pytest.raises(ModAdapterError, match="does not exist"):
        load_concept_images([str(tmp_path / "missing.png")], 64)
    with pytest.raises(ModAdapterError, match="multiple of 16"):
        load_concept_images([str(tmp_path / "missing.png")], 500)


def test_output_paths(tmp_path):
    assert plan_output_paths(str(tmp_path / "a.safetensors"), ["dog"]) == [str(tmp_path / "a.safetensors")]
    assert plan_output_paths(str(tmp_path / "out"), ["dog", "sandy beach"]) == [
        str(tmp_path / "out" / "dog.safetensors"), str(tmp_path / "out" / "sandy_beach.safetensors")]
    with pytest.raises(ModAdapterError, match="give a folder instead"):
        plan_output_paths(str(tmp_path / "a.safetensors"), ["dog", "beach"])
    (tmp_path / "b.safetensors").write_bytes(b"x")
    with pytest.raises(ModAdapterError, match="--overwrite"):
        plan_output_paths(str(tmp_path / "b.safetensors"), ["dog"])
    assert plan_output_paths(str(tmp_path / "b.safetensors"), ["dog"], overwrite=True)


# ------------------------------------------------------------ the CLI, end to end


@pytest.fixture(scope="module")
def tiny_pipeline_dir(tmp_path_factory):
    """A complete FLUX.1 diffusers folder at toy size, with FLUX's real tokenizers."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from flux_tokenizers import load_clip_l_tokenizer, load_t5_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 16, 16, 16),
                        layers_per_block=1, latent_channels=16, norm_num_groups=8, sample_size=64,
                        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=77, projection_dim=32))
    t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4))
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip,
        tokenizer=load_clip_l_tokenizer(), text_encoder_2=t5, tokenizer_2=load_t5_tokenizer(),
        transformer=tiny_diffusers_flux(),
    )
    folder = tmp_path_factory.mktemp("tiny_flux_pipeline")
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture()
def concept_images(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    paths = []
    for name, (w, h) in (("square.png", (64, 64)), ("wide.png", (96, 64))):
        data = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(data).save(tmp_path / name)
        paths.append(str(tmp_path / name))
    return paths


def _learn_args(pipeline, images, out, *extra):
    return ["learn", "--flux", str(pipeline), "--image", *images, "--caption", "a red dog on a sandy beach",
            "--word", "dog", "beach", "--out", str(out), "--resolution", "64", "--max-sequence-length", "32",
            "--device", "cpu", "--steps", "6", "--stage1-steps", "3", "--lr", "0.3", "--eval-draws", "2",
            "--no-progress", *extra]


def test_cli_learns_and_saves_one_concept_file_per_word(tiny_pipeline_dir, concept_images, tmp_path, capsys):
    out = tmp_path / "concepts"
    assert cli.main(_learn_args(tiny_pipeline_dir, concept_images, out)) == 0
    printed = capsys.readouterr().out
    assert "note: wide.png: 96×64 resized to 64×64" in printed
    assert "held-out denoising loss (2 draws)" in printed
    for word in ("dog", "beach"):
        concept = load_concept(out / f"{word}.safetensors")
        assert concept.word == word and concept.delta.shape == (NUM_BLOCKS, WIDTH)
        assert concept.delta.abs().max() > 0
        source = concept.source
        assert (source["kind"], source["method"], source["steps"], source["images"]) == ("learned", "tokenverse", 6, 2)
        assert source["caption"] == "a red dog on a sandy beach" and source["words"] == ["dog", "beach"]
    assert not torch.equal(load_concept(out / "dog.safetensors").delta, load_concept(out / "beach.safetensors").delta)


def test_cli_word_not_in_caption_is_an_error_before_loading_flux(tiny_pipeline_dir, concept_images, tmp_path, capsys):
    args = _learn_args(tiny_pipeline_dir, concept_images, tmp_path / "out")
    args[args.index("--word") + 2] = "cat"  # "dog cat"
    assert cli.main(args) == cli.EXIT_USER_ERROR
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and "'cat'" in captured.err
    assert "loading FLUX.1" not in captured.out
    assert not (tmp_path / "out").exists()


def test_cli_diverging_run_writes_nothing(tiny_pipeline_dir, concept_images, tmp_path, capsys, monkeypatch):
    original = DiffusersDenoiser.velocity
    monkeypatch.setattr(DiffusersDenoiser, "velocity", lambda self, *a: original(self, *a) * float("nan"))
    out = tmp_path / "out"
    assert cli.main(_learn_args(tiny_pipeline_dir, concept_images, out)) == cli.EXIT_USER_ERROR
    assert "error: Learning diverged at step 1" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_cli_stop_request_writes_nothing(tiny_pipeline_dir, concept_images, tmp_path, capsys):
    out = tmp_path / "out"
    args = cli.build_parser().parse_args(_learn_args(tiny_pipeline_dir, concept_images, out))
    calls = []
    assert cli.cmd_learn(args, should_stop=lambda: calls.append(1) or len(calls) > 2) == cli.EXIT_INTERRUPTED
    assert "stopped after 2 of 6 steps; nothing was saved" in capsys.readouterr().out
    assert not out.exists() or not any(out.iterdir())


def test_cli_learns_with_the_rule_and_an_isolation_image(tiny_pipeline_dir, concept_images, tmp_path, capsys,
                                                           monkeypatch):
    widths = []
    original = DiffusersDenoiser.velocity
    monkeypatch.setattr(DiffusersDenoiser, "velocity",
                        lambda self, noisy, *a: widths.append(noisy.shape[-1]) or original(self, noisy, *a))
    args = _learn_args(tiny_pipeline_dir, concept_images[:1], tmp_path / "out", "--isolate-with", concept_images[1],
                       "a blue teapot", "--isolation-probability", "1")
    del args[args.index("--lr"):args.index("--lr") + 2]  # the rule
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    source = load_concept(tmp_path / "out" / "dog.safetensors").source
    assert source["vec_rms"] > 0 and source["lr"] == pytest.approx(RELATIVE_LR * source["vec_rms"], rel=1e-5)
    assert f"learning rate {source['lr']:.4g}" in printed
    assert source["isolation_images"] == ["wide.png"] and source["isolation_captions"] == ["a blue teapot"]
    # Every step composed the 8-latent-wide image with the partner: the model without Δ, then with it (under
    # gradient checkpointing, the CLI's default, which recomputes the last forward's concepts in backward).
    assert widths[:12] == [16] * 12 and widths[12:] == [8] * (len(widths) - 12)


def test_cli_refuses_an_isolation_caption_the_model_cannot_read_before_loading_flux(
        tiny_pipeline_dir, concept_images, tmp_path, capsys):
    args = _learn_args(tiny_pipeline_dir, concept_images[:1], tmp_path / "out", "--isolate-with", concept_images[1],
                       "a very long description " * 8)
    assert cli.main(args) == cli.EXIT_USER_ERROR
    captured = capsys.readouterr()
    assert "is longer than the 31 text tokens" in captured.err and "loading FLUX.1" not in captured.out


def test_cli_learns_from_images_with_a_caption_each(tiny_pipeline_dir, concept_images, tmp_path, capsys,
                                                   monkeypatch):
    captions_seen = set()
    original = DiffusersDenoiser.velocity
    monkeypatch.setattr(DiffusersDenoiser, "velocity",
                        lambda self, *a: captions_seen.add(self.prompt_embeds.data_ptr()) or original(self, *a))
    args = _learn_args(tiny_pipeline_dir, concept_images, tmp_path / "out", "--steps", "12")
    at = args.index("--caption")
    args[at + 1:at + 2] = ["a red dog on a sandy beach", "a sleeping dog on a beach at night"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "word 'dog' in 'a sleeping dog on a beach at night': T5 tokens" in printed
    source = load_concept(tmp_path / "out" / "dog.safetensors").source
    assert source["caption"] == "a red dog on a sandy beach"
    assert source["captions"] == ["a red dog on a sandy beach", "a sleeping dog on a beach at night"]
    assert len(captions_seen) == 2  # each image was denoised under its own caption


def test_cli_learns_with_negative_images(tiny_pipeline_dir, concept_images, tmp_path, capsys, monkeypatch):
    calls = []  # (caption's T5 tensor, with Δ?) per forward
    original = DiffusersDenoiser.velocity
    monkeypatch.setattr(DiffusersDenoiser, "velocity", lambda self, noisy, sigma, deltas, *a: calls.append(
        (self.prompt_embeds.data_ptr(), bool(deltas))) or original(self, noisy, sigma, deltas, *a))
    args = _learn_args(tiny_pipeline_dir, concept_images[:1], tmp_path / "out", "--negative", concept_images[1],
                       "a white dog on a rocky beach", "--negative-probability", "1", "--negative-weight", "2",
                       "--eval-draws", "0")
    assert cli.main(args) == 0
    source = load_concept(tmp_path / "out" / "dog.safetensors").source
    assert source["negative_images"] == ["wide.png"] and source["negative_captions"] == ["a white dog on a rocky beach"]
    assert (source["negative_probability"], source["negative_weight"]) == (1.0, 2.0)
    # every step: the concept image with Δ, then the negative under its own caption without Δ and with it
    main_caption = calls[0][0]
    assert len(calls) == 3 * 6 and all(calls[3 * s][0] == main_caption and calls[3 * s][1] for s in range(6))
    assert all(calls[3 * s + 1][0] != main_caption and calls[3 * s + 1] == (calls[3 * s + 2][0], False)
               and calls[3 * s + 2][1] for s in range(6))
    capsys.readouterr()
    missing = _learn_args(tiny_pipeline_dir, concept_images[:1], tmp_path / "out2", "--negative", concept_images[1],
                          "a white dog")  # no 'beach'
    assert cli.main(missing) == cli.EXIT_USER_ERROR
    captured = capsys.readouterr()
    assert "'beach'" in captured.err and "loading FLUX.1" not in captured.out


@pytest.mark.parametrize("captions, message", [
    (["a red dog on a sandy beach", "a dog", "a beach"], "3 captions for 2 images"),
    (["a red dog on a sandy beach", "a dog in a room"], "'beach'"),
])
def test_cli_refuses_captions_that_do_not_fit_the_images_before_loading_flux(
        tiny_pipeline_dir, concept_images, tmp_path, capsys, captions, message):
    args = _learn_args(tiny_pipeline_dir, concept_images, tmp_path / "out")
    at = args.index("--caption")
    args[at + 1:at + 2] = captions
    assert cli.main(args) == cli.EXIT_USER_ERROR
    captured = capsys.readouterr()
    assert message in captured.err and "loading FLUX.1" not in captured.out


def test_cli_help_states_the_rules_default():
    help_text = " ".join(cli.build_parser()._subparsers._group_actions[0].choices["learn"].format_help().split())
    assert f"default {RELATIVE_LR:g}, measured on the toy world" in help_text


# --------------------------------------------------------------------------
# The learning-rate rule
# --------------------------------------------------------------------------


class ScaledHost(FakeHost):
    """A modulation vector of rms ``scale``; the velocity reads Δ, so that every step has a gradient."""

    def __init__(self, scale):
        self.scale = scale

    def modulation_vector(self, noisy, sigma):
        return torch.full((noisy.shape[0], WIDTH), float(self.scale))

    def velocity(self, noisy, sigma, deltas, positions):
        return noisy + deltas[0].sum(dim=0).mean()


@pytest.mark.parametrize("scale", [0.05, 1.0, 40.0])
def test_the_rule_moves_delta_by_the_same_share_of_rms_vec_on_any_scale(latents, scale):
    one_step = LearnConfig(steps=1, stage1_steps=1, seed=0, log_every=0)
    result = learn_concepts(ScaledHost(scale), latents, POSITIONS, one_step)
    assert result.vec_rms == pytest.approx(scale) and result.lr == pytest.approx(RELATIVE_LR * scale)
    # Adam's first step moves every coordinate by the rate, whatever the gradient's size: RELATIVE_LR of rms(vec).
    assert float(result.deltas[0].abs().max()) / scale == pytest.approx(RELATIVE_LR, rel=1e-4)
    fixed = learn_concepts(ScaledHost(scale), latents, POSITIONS, LearnConfig(steps=1, stage1_steps=1, lr=1e-3,
                                                                              log_every=0))
    assert fixed.vec_rms is None and fixed.lr == 1e-3  # an explicit rate is used as given


class LinearModulationHost(FakeHost):
    """A FLUX.1-width (3072) stand-in whose concept tokens read W·(vec + Δ): rescaling vec by α and W by 1/α
    gives the same model, so a rule that transfers must learn α·Δ there."""

    WIDTH = 3072

    def __init__(self, alpha):
        g = torch.Generator().manual_seed(3)
        self.layout = FluxLayout(1, 1, self.WIDTH)
        self.alpha = alpha
        self.vec = alpha * torch.randn(self.WIDTH, generator=g)
        self.weight = torch.randn(16, self.WIDTH, generator=g) / (alpha * self.WIDTH ** 0.5)

    def modulation_vector(self, noisy, sigma):
        return self.vec.expand(noisy.shape[0], -1)

    def velocity(self, noisy, sigma, deltas, positions):
        shift = torch.stack([self.weight @ (self.vec + d) for d in deltas[0]]).mean(dim=0)  # (16,)
        return noisy + shift.view(1, -1, 1, 1)


def test_the_rule_learns_the_same_concept_on_a_rescaled_model_at_flux_width(latents):
    for clip in (None, 0.5):  # without clipping, and with a norm that clips about half the steps (it scales too)
        config = LearnConfig(steps=20, stage1_steps=10, seed=4, max_grad_norm=clip, log_every=0)
        base = learn_concepts(LinearModulationHost(1.0), latents, POSITIONS, config).deltas[0]
        for alpha in (0.1, 10.0):
            rescaled = learn_concepts(LinearModulationHost(alpha), latents, POSITIONS, config).deltas[0]
            torch.testing.assert_close(rescaled / alpha, base, rtol=1e-2, atol=1e-3)
    fixed_rate = LearnConfig(steps=20, stage1_steps=10, seed=4, lr=RELATIVE_LR, max_grad_norm=None, log_every=0)
    unscaled = learn_concepts(LinearModulationHost(10.0), latents, POSITIONS, fixed_rate).deltas[0]
    assert not torch.allclose(unscaled / 10.0, base, rtol=1e-2)  # a fixed rate does not transfer


@pytest.mark.parametrize("guidance_embeds", [False, True])
def test_the_diffusers_modulation_vector_is_what_the_blocks_receive(caption_embeds, guidance_embeds):
    model = tiny_diffusers_flux(guidance_embeds=guidance_embeds)
    with DiffusersDenoiser(model, *caption_embeds, guidance=3.5) as host:
        noisy, sigma = torch.randn(2, 16, 8, 8), torch.tensor([0.3, 0.9])
        received = []
        handle = model.transformer_blocks[0].register_forward_pre_hook(
            lambda module, args, kwargs: received.append(kwargs["temb"].detach()), with_kwargs=True)
        try:
            with torch.no_grad():
                host.velocity(noisy, sigma, [], [])
        finally:
            handle.remove()
        torch.testing.assert_close(host.modulation_vector(noisy, sigma), received[0])


def test_the_rule_reads_the_model_and_records_the_rate(denoiser, latents):
    result = learn_concepts(denoiser, latents, POSITIONS, LearnConfig(steps=2, stage1_steps=1, log_every=0))
    scale = modulation_scale(denoiser, latents)
    assert result.vec_rms == pytest.approx(scale) and result.lr == pytest.approx(RELATIVE_LR * scale)
    sigma = (torch.arange(SCALE_SIGMAS) + 0.5) / SCALE_SIGMAS
    vec = denoiser.modulation_vector(latents.expand(SCALE_SIGMAS, -1, -1, -1), sigma)
    assert scale == pytest.approx(float(vec.pow(2).mean(dim=-1).sqrt().mean()))
    assert not vec.requires_grad


# --------------------------------------------------------------------------
# Images of the same concepts under captions of their own
# --------------------------------------------------------------------------


def test_more_images_under_the_same_caption_are_one_run_over_all_the_images(denoiser, latents):
    more = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(21))
    config = LearnConfig(steps=8, stage1_steps=4, lr=0.3, seed=3, batch_size=3, log_every=0)
    together = learn_concepts(denoiser, torch.cat([latents, more]), POSITIONS, config)
    grouped = learn_concepts(denoiser, latents, POSITIONS, config,
                             more_images=[CaptionedImages(denoiser, POSITIONS, more)])
    # The same draws; only the forward passes split the batch differently (float sums in another order).
    torch.testing.assert_close(grouped.deltas[0], together.deltas[0], rtol=1e-3, atol=1e-4)
    assert grouped.losses == pytest.approx(together.losses, rel=1e-4)


class RecordingHost(FakeHost):
    """Records, per call, its caption's name, the token positions and the sign of each image of the batch."""

    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def velocity(self, noisy, sigma, deltas, positions):
        self.calls.append((self.name, [list(p) for p in positions], noisy.mean(dim=(1, 2, 3)).sign().tolist()))
        return noisy + deltas[0].mean() * 0 if deltas else noisy


def test_each_image_is_denoised_under_its_own_caption():
    calls = []
    main, night = RecordingHost("main", calls), RecordingHost("night", calls)
    bright = torch.full((1, 16, 8, 8), 100.0)  # main caption's image: positive; the other caption's: negative
    dark = torch.full((3, 16, 8, 8), -100.0)
    # σ ≤ 0.5, so each noisy image keeps its clean image's sign
    config = LearnConfig(steps=200, stage1_steps=100, lr=0.1, seed=4, batch_size=2, log_every=0,
                         stage1_sigma_range=(0.01, 0.5), stage2_sigma_range=(0.01, 0.5), range_probability=1.0)
    learn_concepts(main, bright, [[3, 4]], config, more_images=[CaptionedImages(night, [[7]], dark)])
    by_caption = {"main": [], "night": []}
    for name, positions, signs in calls:  # an explicit lr: every call is a training step's
        by_caption[name].append((positions, signs))
    assert all(p == [[3, 4]] and set(s) == {1.0} for p, s in by_caption["main"])
    assert all(p == [[7]] and set(s) == {-1.0} for p, s in by_caption["night"])
    drawn = {name: sum(len(s) for _, s in records) for name, records in by_caption.items()}
    assert drawn["main"] + drawn["night"] == 2 * 200  # every drawn image, once
    assert 0.15 < drawn["main"] / 400 < 0.35  # drawn uniformly over the 4 images: 1 in 4 under the main caption


def test_more_images_are_checked(denoiser, latents):
    good = CaptionedImages(denoiser, POSITIONS, latents)
    for bad, message in ((CaptionedImages(denoiser, POSITIONS, torch.zeros(1, 16, 4, 4)), "same resolution"),
                         (CaptionedImages(denoiser, [[3], [4]], latents), "position lists"),
                         (CaptionedImages(denoiser, [[]], latents), "no token positions"),
                         (CaptionedImages(denoiser, POSITIONS, latents, torch.zeros(2, 16, 8, 8)), "flipped"),
                         (CaptionedImages(denoiser, POSITIONS, latents * float("nan")), "finite")):
        with pytest.raises(ModAdapterError, match=message):
            learn_concepts(denoiser, latents, POSITIONS, FAST, more_images=[good, bad])


class ChannelShiftHost(FakeHost):
    """Δ (its mean over blocks) shifts every channel of the prediction by M·Δ, for every image alike: the best Δ
    for an image moves the prediction's channel means to −(the image's channel means)."""

    def __init__(self):
        self.shift = torch.randn(16, WIDTH, generator=torch.Generator().manual_seed(13)) / WIDTH ** 0.5

    def velocity(self, noisy, sigma, deltas, positions):
        out = torch.zeros_like(noisy)
        if deltas:
            out = out + (self.shift @ deltas[0].mean(dim=0)).view(1, -1, 1, 1)
        return out


def test_negatives_keep_delta_from_lowering_the_loss_of_images_without_the_concept():
    """The concept image and a negative share a colour common to every image (what any image's loss rewards)
    and differ in a colour of their own (the concept): with the negative, Δ keeps the concept's part and drops
    most of the common one."""
    g = torch.Generator().manual_seed(14)
    common = torch.full((16, 1, 1), 2.0)
    own, other = 0.7 * torch.randn(2, 16, 1, 1, generator=g)
    concept = (common + own).expand(1, 16, 8, 8).clone()
    negative = (common + other).expand(1, 16, 8, 8).clone()
    host = ChannelShiftHost()
    config = LearnConfig(steps=300, stage1_steps=300, lr=0.05, seed=3, negative_probability=1.0, log_every=0)
    plain = learn_concepts(host, concept, POSITIONS, config)
    with_negative = learn_concepts(host, concept, POSITIONS, config,
                                   negatives=[CaptionedImages(host, [[5]], negative)])

    def gain(images, result):  # how much Δ lowers the loss of the images
        return (evaluate_loss(host, images, None, POSITIONS, num_draws=16)
                - evaluate_loss(host, images, result.deltas, POSITIONS, num_draws=16))

    assert gain(negative, plain) > 0.5  # the plain Δ takes the common colour, which the negative shares
    assert gain(negative, with_negative) < 0.2 * gain(negative, plain)
    shifted = [host.shift @ result.deltas[0].mean(dim=0) for result in (plain, with_negative)]
    towards_own = [torch.nn.functional.cosine_similarity(s, -own.flatten(), dim=0) for s in shifted]
    assert towards_own[1] > towards_own[0]  # what is left points more to the concept's own colour
    assert gain(concept, with_negative) > 0.3 * gain(concept, plain)  # and still carries much of the concept


# --------------------------------------------------------------------------
# TokenVerse's concept-isolation loss
# --------------------------------------------------------------------------


class HalvesHost(FakeHost):
    """Δ (its mean over blocks) adds W_left·Δ to every channel of a lone or left image and W_right·Δ to the right
    half of a composed one: a model in which a concept can, but need not, act beside itself."""

    def __init__(self):
        g = torch.Generator().manual_seed(12)
        self.left, self.right = (torch.randn(16, WIDTH, generator=g) / WIDTH ** 0.5 for _ in range(2))

    def velocity(self, noisy, sigma, deltas, positions):
        out = noisy.clone()
        if deltas:
            delta = deltas[0].mean(dim=0)
            out[..., :8] = out[..., :8] + (self.left @ delta).view(1, -1, 1, 1)
            out[..., 8:] = out[..., 8:] + (self.right @ delta).view(1, -1, 1, 1)
        return out


def test_isolation_keeps_delta_from_acting_on_the_partner(latents):
    host = HalvesHost()
    partner = IsolationPartner(host, POSITIONS, torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(8)))
    config = LearnConfig(steps=300, stage1_steps=300, lr=0.05, seed=2, log_every=0)
    plain = learn_concepts(host, latents, POSITIONS, config).deltas[0].mean(dim=0)
    isolated = learn_concepts(host, latents, POSITIONS, config, isolation=[partner]).deltas[0].mean(dim=0)
    # Both carry the concept on its own image ...
    target = (host.left @ plain).norm()
    assert (host.left @ isolated - host.left @ plain).norm() < 0.3 * target
    # ... but only the isolated Δ stays off the partner.
    assert (host.right @ isolated).norm() < 0.2 * (host.right @ plain).norm()


def test_isolation_runs_on_the_diffusers_host_with_a_composed_caption(model, caption_embeds, latents):
    composed = torch.cat([caption_embeds[0], torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(9))], 1)
    with DiffusersDenoiser(model, *caption_embeds) as host:
        partner = IsolationPartner(host.with_caption(composed, caption_embeds[1]), POSITIONS,
                                   torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(8)))
        isolated = learn_concepts(host, latents, POSITIONS, FAST, isolation=[partner])
        assert held_out(host, latents, isolated.deltas) < 0.95 * held_out(host, latents, None)  # it still learns
        assert torch.equal(host.prompt_embeds, caption_embeds[0])  # the partner's caption is its own


@pytest.mark.parametrize("unused", [dict(isolation_probability=1.0), dict(negative_probability=1.0)])
def test_a_run_without_partners_or_negatives_draws_what_it_drew_before(denoiser, latents, unused):
    config = LearnConfig(steps=6, stage1_steps=3, lr=0.3, seed=5, log_every=0, **unused)
    ignored = learn_concepts(denoiser, latents, POSITIONS, config)
    plain = learn_concepts(denoiser, latents, POSITIONS, LearnConfig(steps=6, stage1_steps=3, lr=0.3, seed=5,
                                                                     log_every=0))
    torch.testing.assert_close(ignored.deltas[0], plain.deltas[0])


def test_isolation_partners_are_checked(denoiser, latents):
    good = IsolationPartner(denoiser, POSITIONS, latents[:1])
    for bad, message in ((IsolationPartner(denoiser, POSITIONS, torch.zeros(1, 16, 4, 4)), "size"),
                         (IsolationPartner(denoiser, [[3], [4]], latents[:1]), "position lists"),
                         (IsolationPartner(denoiser, [[]], latents[:1]), "no token positions")):
        with pytest.raises(ModAdapterError, match=message):
            learn_concepts(denoiser, latents, POSITIONS, FAST, isolation=[good, bad])
