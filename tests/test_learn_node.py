"""Learn Concept node inside a real ComfyUI (COMFYUI_PATH), on tiny models.

The models are built under torch.inference_mode(), as ComfyUI's executor
loads them, so the test also proves learning works on such weights.
"""

import os

import pytest
import torch

from mod_adapter.modules.concept_file import load_concept
from mod_adapter.modules.errors import ConceptWordNotFoundError

from comfy_low_vram import simulate_no_vram


@pytest.fixture(scope="module")
def env(comfyui, tmp_path_factory):
    import folder_paths

    import mod_adapter.nodes as pack_nodes
    import tiny_comfy

    concepts_dir = tmp_path_factory.mktemp("mod_concepts")
    folder_paths.add_model_folder_path("mod_concepts", str(concepts_dir), is_default=True)
    with torch.inference_mode():
        models = dict(model=tiny_comfy.tiny_flux_model(), clip=tiny_comfy.tiny_flux_clip(), vae=tiny_comfy.tiny_vae())
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    return dict(nodes=pack_nodes, image=image, concepts_dir=concepts_dir, **models)


def learn(env, seed=0, steps=6, words="dog", caption="a photo of a dog", save=False, init=None, lr=5e-2, flip=True,
          checkpointing=True, offload=False):
    with torch.inference_mode():  # as ComfyUI's executor calls nodes
        return env["nodes"].ModAdapterLearnConcept.execute(
            env["model"], env["clip"], env["vae"], env["image"], caption, words, steps, steps // 2, lr, seed, 64,
            0.8, 0.8, checkpointing, save, "learned", flip_images=flip, init_concepts=init,
            offload_weights=offload).result


def test_learns_concepts_deterministically_and_draws_the_loss_curve(env):
    concepts, curve = learn(env, words="dog, beach", caption="a photo of a dog on a beach")
    assert [c.word for c in concepts.items] == ["dog", "beach"]
    for concept in concepts.items:
        assert concept.delta.shape == (4, 128) and concept.delta.abs().max() > 0
        assert concept.source["kind"] == "learned" and concept.num_double_blocks == 2
    assert curve.ndim == 4 and curve.shape[0] == 1 and curve.shape[-1] == 3 and 0 <= curve.min() <= curve.max() <= 1
    from mod_adapter.modules.curve_plot import MARKER

    marked = ((curve[0] * 255).round() == torch.tensor(MARKER, dtype=curve.dtype)).all(dim=-1)
    assert marked.any()  # the line where stage 2 starts (step 4 of 6)
    again, _ = learn(env, words="dog, beach", caption="a photo of a dog on a beach")
    for a, b in zip(concepts.items, again.items):
        torch.testing.assert_close(a.delta, b.delta)
    other_seed, _ = learn(env, seed=1, words="dog, beach", caption="a photo of a dog on a beach")
    assert not torch.allclose(other_seed.items[0].delta, concepts.items[0].delta)


def test_flipping_can_be_turned_off_for_concepts_that_have_a_side(env):
    flipped, _ = learn(env, seed=2)
    unflipped, _ = learn(env, seed=2, flip=False)
    assert not torch.allclose(flipped.items[0].delta, unflipped.items[0].delta)  # seed 2 draws flips in 6 steps
    again, _ = learn(env, seed=2, flip=False)
    torch.testing.assert_close(again.items[0].delta, unflipped.items[0].delta)


def test_the_shared_model_is_left_unchanged(env):
    import comfy.sample

    def sample(model):
        cond = env["clip"].encode_from_tokens_scheduled(env["clip"].tokenize("a photo of a dog"))
        noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
        return comfy.sample.sample(model, noise, 2, 1.0, "euler", "simple", cond, [], torch.zeros(1, 16, 8, 8),
                                   seed=0, disable_pbar=True)

    before = sample(env["model"])
    learn(env)
    assert torch.equal(sample(env["model"]), before)
    assert not env["model"].object_patches and not env["model"].model_options.get("transformer_options")


def test_saves_concept_files_that_reload_to_the_same_delta(env):
    concepts, _ = learn(env, save=True)
    files = [f for f in os.listdir(env["concepts_dir"]) if f.startswith("learned_dog")]
    assert len(files) == 1
    loaded = load_concept(env["concepts_dir"] / files[0])
    torch.testing.assert_close(loaded.delta, concepts.items[0].delta, rtol=1e-2, atol=1e-3)
    assert loaded.source["method"] == "tokenverse"


def test_starts_from_given_concepts(env):
    start, _ = learn(env, steps=4)
    zero_steps_from_start, _ = learn(env, steps=1, init=start, lr=1e-12)
    torch.testing.assert_close(zero_steps_from_start.items[0].delta, start.items[0].delta, rtol=1e-4, atol=1e-6)


def test_a_word_missing_from_the_caption_is_an_error(env):
    with pytest.raises(ConceptWordNotFoundError, match="giraffe"):
        learn(env, words="giraffe")


def test_interrupt_from_the_ui_stops_and_saves_nothing(env, monkeypatch):
    import comfy.model_management as mm

    polls = []

    def interrupted():
        polls.append(1)
        return len(polls) > 2

    monkeypatch.setattr(mm, "processing_interrupted", interrupted)
    monkeypatch.setattr(mm, "interrupt_processing", True, raising=False)
    before = set(os.listdir(env["concepts_dir"]))
    with pytest.raises(mm.InterruptProcessingException):
        learn(env, steps=20, save=True)
    assert set(os.listdir(env["concepts_dir"])) == before
    assert getattr(mm, "in_training", False) is False  # Cancel leaves ComfyUI in inference mode
    mm.interrupt_current_processing(False)


def test_training_mode_is_on_for_exactly_the_learning_loop(env, monkeypatch):
    """ComfyUI 0.33.0's FLUX can only backpropagate with `in_training` set (comfy-kitchen RoPE has no
    autograd formula); sampling afterwards must take the inference kernels again, also after an error."""
    import comfy.model_management as mm

    import mod_adapter.nodes.learn_concept as learn_node

    if not hasattr(mm, "in_training"):  # ComfyUI 0.3.64: one path for training and inference
        learn(env, steps=2)
        assert not hasattr(mm, "in_training"), "the pack must not invent a switch this ComfyUI does not have"
        return
    real_learn = learn_node.learn_concepts
    seen = []

    def recording_learn(*args, **kwargs):
        seen.append(mm.in_training)
        return real_learn(*args, **kwargs)

    monkeypatch.setattr(learn_node, "learn_concepts", recording_learn)
    assert mm.in_training is False
    learn(env, steps=2)
    assert seen == [True] and mm.in_training is False

    def failing_learn(*args, **kwargs):
        seen.append(mm.in_training)
        raise RuntimeError("out of memory")

    monkeypatch.setattr(learn_node, "learn_concepts", failing_learn)
    with pytest.raises(RuntimeError, match="out of memory"):
        learn(env, steps=2)
    assert seen == [True, True] and mm.in_training is False


def test_sampling_after_learning_uses_the_inference_rope_kernels(env, monkeypatch):
    import comfy.ldm.flux.layers as flux_layers
    import comfy.ldm.flux.math as flux_math
    import comfy.model_management as mm
    import comfy.sample

    learn(env, steps=2)
    fast_calls = []
    if hasattr(mm, "in_training"):  # 0.33.0: comfy-kitchen's kernel, taken only outside training mode
        kernels, name = flux_math.comfy.quant_ops.ck, "apply_rope"
    else:  # 0.3.64 computes RoPE inline in the blocks' attention(), the same for training and inference
        kernels, name = flux_layers, "attention"
    real_rope = getattr(kernels, name)

    def counting_rope(*args, **kwargs):
        fast_calls.append(1)
        return real_rope(*args, **kwargs)

    monkeypatch.setattr(kernels, name, counting_rope)
    cond = env["clip"].encode_from_tokens_scheduled(env["clip"].tokenize("a photo of a dog"))
    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    comfy.sample.sample(env["model"], noise, 1, 1.0, "euler", "simple", cond, [], torch.zeros(1, 16, 8, 8), seed=0,
                        disable_pbar=True)
    assert fast_calls


def test_checkpointed_blocks_give_the_gradients_of_the_plain_forward(env):
    """ComfyUI's blocks update their inputs in place: the recompute must still see the block's inputs."""
    import comfy.model_management

    from mod_adapter.modules.comfy_learn_host import ComfyFluxDenoiser
    from mod_adapter.nodes.learn_concept import comfy_training_mode

    clip = env["clip"]
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a dog"))
    context, pooled = cond[0][0].clone(), cond[0][1]["pooled_output"].clone()
    g = torch.Generator().manual_seed(5)
    noisy = torch.randn(1, 16, 8, 8, generator=g)
    target = torch.randn(1, 16, 8, 8, generator=g)
    delta0 = torch.randn(4, 128, generator=g) * 0.3
    grads = []
    with torch.inference_mode(False), torch.enable_grad(), comfy_training_mode():
        for checkpointing in (False, True):
            denoiser = ComfyFluxDenoiser(env["model"], context, pooled, gradient_checkpointing=checkpointing)
            comfy.model_management.load_models_gpu([denoiser.model_patcher])  # as the node does
            delta = delta0.clone().requires_grad_(True)
            out = denoiser.velocity(noisy, torch.tensor([0.7]), [delta], [[3, 4]])
            ((out - target) ** 2).mean().backward()
            grads.append(delta.grad)
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)


def test_the_learning_rate_rule_reads_the_modulation_vector_the_blocks_receive(env):
    import comfy.model_management

    from mod_adapter.modules.comfy_learn_host import ComfyFluxDenoiser

    clip = env["clip"]
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a dog"))
    noisy, sigma = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([0.3, 0.9])
    with torch.inference_mode(False):
        denoiser = ComfyFluxDenoiser(env["model"], cond[0][0].clone(), cond[0][1]["pooled_output"].clone(), 3.5)
        comfy.model_management.load_models_gpu([denoiser.model_patcher])  # as the node does
        diffusion_model = denoiser.model_patcher.model.diffusion_model
        received, last_block_ran = [], []
        hooks = [diffusion_model.double_blocks[0].img_mod.register_forward_pre_hook(
                     lambda module, args: received.append(args[0].detach().clone())),
                 diffusion_model.single_blocks[-1].register_forward_pre_hook(
                     lambda module, args: last_block_ran.append(True))]
        try:
            with torch.no_grad():
                denoiser.velocity(noisy, sigma, [], [])
            assert len(received) == 1 and last_block_ran == [True]
            vec = denoiser.modulation_vector(noisy, sigma)
            assert last_block_ran == [True]  # the probe stops at the first block's modulation
        finally:
            for hook in hooks:
                hook.remove()
    assert vec.shape == (2, 128) and vec[0].abs().max() > 0 and not torch.allclose(vec[0], vec[1])  # σ moves vec
    torch.testing.assert_close(vec, received[0].float())


def test_a_learning_rate_of_zero_asks_for_the_rule(env):
    from mod_adapter.modules.learn_concept import RELATIVE_LR

    concepts, _ = learn(env, lr=0.0, steps=2)
    source = concepts.items[0].source
    assert source["vec_rms"] > 0 and source["relative_lr"] == RELATIVE_LR
    assert source["lr"] == pytest.approx(RELATIVE_LR * source["vec_rms"], rel=1e-5)
    explicit, _ = learn(env, lr=5e-2, steps=2)
    assert explicit.items[0].source["lr"] == 5e-2 and "vec_rms" not in explicit.items[0].source


def test_isolation_images_are_learned_beside_the_concept_image(env, monkeypatch):
    from mod_adapter.modules.comfy_learn_host import ComfyFluxDenoiser
    from mod_adapter.modules.errors import ModAdapterError

    widths = []
    original = ComfyFluxDenoiser.velocity
    monkeypatch.setattr(ComfyFluxDenoiser, "velocity",
                        lambda self, noisy, *a: widths.append(noisy.shape[-1]) or original(self, noisy, *a))
    partners = torch.rand(2, 48, 80, 3, generator=torch.Generator().manual_seed(4))  # resized like the concept image

    def run(captions):
        with torch.inference_mode():
            return env["nodes"].ModAdapterLearnConcept.execute(
                env["model"], env["clip"], env["vae"], env["image"], "a photo of a dog", "dog", 6, 3, 5e-2, 0, 64,
                0.8, 0.8, True, False, "learned", isolation_images=partners, isolation_captions=captions).result

    concepts, _ = run("a red teapot\na blue cup")
    source = concepts.items[0].source
    assert source["isolation_captions"] == ["a red teapot", "a blue cup"] and source["isolation_probability"] == 0.5
    assert 16 in widths and 8 in widths  # some steps composed the 8-wide concept latent with a partner
    assert concepts.items[0].delta.abs().max() > 0
    one_line, _ = run("a teapot")
    assert one_line.items[0].source["isolation_captions"] == ["a teapot", "a teapot"]
    with pytest.raises(ModAdapterError, match="2 isolation image"):
        run("a\nb\nc")


def test_a_batch_of_views_is_learned_each_under_its_own_caption_line(env, monkeypatch):
    from mod_adapter.modules.comfy_learn_host import ComfyFluxDenoiser
    from mod_adapter.modules.errors import ModAdapterError

    calls = []  # per velocity call: which caption (its T5 context) and how many images
    original = ComfyFluxDenoiser.velocity

    def recording(self, noisy, *a):
        calls.append((self.context.data_ptr(), noisy.shape[0]))
        return original(self, noisy, *a)

    monkeypatch.setattr(ComfyFluxDenoiser, "velocity", recording)
    views = torch.rand(3, 64, 64, 3, generator=torch.Generator().manual_seed(7))

    def run(caption, steps=12):
        with torch.inference_mode():
            return env["nodes"].ModAdapterLearnConcept.execute(
                env["model"], env["clip"], env["vae"], views, caption, "dog", steps, steps // 2, 5e-2, 0, 64,
                0.8, 0.8, False, False, "learned", flip_images=False).result

    concepts, _ = run("a photo of a dog on a beach\na dog asleep in a room\na photo of a dog on a beach")
    source = concepts.items[0].source
    assert source["caption"] == "a photo of a dog on a beach" and source["images"] == 3
    assert source["captions"] == ["a photo of a dog on a beach", "a dog asleep in a room",
                                  "a photo of a dog on a beach"]
    assert len({caption for caption, _ in calls}) == 2  # two distinct captions, each with its own conditioning
    assert concepts.items[0].delta.abs().max() > 0
    calls.clear()
    one, _ = run("a photo of a dog", steps=4)  # one line: the caption of every image, as before
    assert "captions" not in one.items[0].source and len({caption for caption, _ in calls}) == 1
    with pytest.raises(ModAdapterError, match="2 lines for 3 image"):
        run("a dog\na dog on a beach")
    with pytest.raises(ConceptWordNotFoundError):
        run("a dog\na cat\na dog")


@pytest.mark.parametrize("weight_dtype", ["float8_e4m3fn", "float8_e5m2"])
def test_learns_on_fp8_weights_as_on_the_same_weights_in_float32(env, weight_dtype):
    """Load Diffusion Model's weight_dtype fp8: weights stored in fp8 and cast per layer (ComfyUI's manual cast)."""
    import tiny_comfy

    dtype = getattr(torch, weight_dtype)
    with torch.inference_mode():
        fp8 = tiny_comfy.tiny_flux_model(weight_dtype=dtype)
        upcast = tiny_comfy.tiny_flux_model(weight_dtype=dtype, upcast=True)
    stored = {p.dtype for p in fp8.model.diffusion_model.parameters()}
    assert stored == {dtype}
    learned = [learn(dict(env, model=model), steps=6)[0].items[0].delta for model in (fp8, upcast)]
    assert learned[0].abs().max() > 0  # the gradient reached Δ through the fp8 layers
    # The same float32 arithmetic on the same values: equal up to summation order.
    torch.testing.assert_close(learned[0], learned[1], rtol=1e-4, atol=1e-6)


def test_no_weight_of_the_model_receives_a_gradient_and_its_flags_come_back(env):
    """ComfyUI 0.3.x loads weights with requires_grad=True: the run freezes them (else every weight's gradient
    is computed and kept) and gives each its flag back."""
    import comfy.model_management

    from mod_adapter.modules.comfy_learn_host import ComfyFluxDenoiser
    from mod_adapter.modules.learn_concept import LearnConfig, learn_concepts
    from mod_adapter.nodes.learn_concept import comfy_training_mode

    clip = env["clip"]
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a dog"))
    with torch.inference_mode(False), comfy_training_mode():
        denoiser = ComfyFluxDenoiser(env["model"], cond[0][0].clone(), cond[0][1]["pooled_output"].clone())
        comfy.model_management.load_models_gpu([denoiser.model_patcher])
        weights = list(denoiser.model_parameters())
        flags = [p.requires_grad for p in weights]
        result = learn_concepts(denoiser, torch.randn(1, 16, 8, 8), [[3]],
                                LearnConfig(steps=2, stage1_steps=1, lr=1e-2, log_every=0))
    assert result.deltas[0].abs().max() > 0
    assert not [p for p in weights if p.grad is not None]
    assert [p.requires_grad for p in weights] == flags


def test_a_run_that_cannot_fit_the_gpu_is_refused_with_the_setting_that_would(env):
    from mod_adapter.modules.flux_layout import FluxLayout
    from mod_adapter.modules.errors import ModAdapterError
    from mod_adapter.nodes.learn_concept import refuse_runs_that_cannot_fit

    flux1, gib = FluxLayout(19, 38, 3072), 2**30
    common = dict(compute_dtype=torch.bfloat16, device="cuda:0", resolution=512, isolation=False, concepts=1)
    with pytest.raises(ModAdapterError, match="load the model with weight_dtype fp8_e4m3fn"):  # bf16 on 24 GB
        refuse_runs_that_cannot_fit(flux1, torch.bfloat16, total_bytes=24 * gib, gradient_checkpointing=True, **common)
    with pytest.raises(ModAdapterError, match="turn on gradient_checkpointing"):  # fp8 on 24 GB, checkpointing off
        refuse_runs_that_cannot_fit(flux1, torch.float8_e4m3fn, total_bytes=24 * gib, gradient_checkpointing=False,
                                    **common)
    with pytest.raises(ModAdapterError, match="To make it fit, turn on offload_weights"):  # fp8 on 12 GB
        refuse_runs_that_cannot_fit(flux1, torch.float8_e4m3fn, total_bytes=12 * gib, gradient_checkpointing=True,
                                    **common)
    assert refuse_runs_that_cannot_fit(flux1, torch.float8_e4m3fn, total_bytes=12 * gib, gradient_checkpointing=True,
                                       offload_weights=True, **common).offload_weights
    fits = refuse_runs_that_cannot_fit(flux1, torch.bfloat16, total_bytes=80 * gib, gradient_checkpointing=True, **common)
    assert fits.total_bytes < 80 * gib
    # The CPU's memory is the machine's: never refused here.
    assert refuse_runs_that_cannot_fit(flux1, torch.bfloat16, total_bytes=1, gradient_checkpointing=True,
                                       **dict(common, device="cpu")) is None



def test_offloaded_weights_give_the_gradients_of_a_fully_loaded_model(env, monkeypatch):
    """Learn Concept's offload_weights: ComfyUI's low-VRAM loading, where layers cast their offloaded weights per
    forward (and again in the checkpointed rebuild); Δ's gradient is the fully loaded model's."""
    import comfy.model_management

    from mod_adapter.modules.comfy_learn_host import ComfyFluxDenoiser
    from mod_adapter.nodes.learn_concept import comfy_training_mode, load_for_learning

    clip = env["clip"]
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a dog"))
    context, pooled = cond[0][0].clone(), cond[0][1]["pooled_output"].clone()
    g = torch.Generator().manual_seed(5)
    noisy, target = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 16, 8, 8, generator=g)
    delta0 = torch.randn(4, 128, generator=g) * 0.3
    grads, lowvram = [], []
    with torch.inference_mode(False), torch.enable_grad(), comfy_training_mode():
        for offload in (False, True):
            if offload:
                simulate_no_vram(monkeypatch)
            denoiser = ComfyFluxDenoiser(env["model"], context, pooled, gradient_checkpointing=True)
            load_for_learning(denoiser.model_patcher, offload_weights=offload)
            lowvram.append(denoiser.model_patcher.model.model_lowvram)
            delta = delta0.clone().requires_grad_(True)
            out = denoiser.velocity(noisy, torch.tensor([0.7]), [delta], [[3, 4]])
            ((out - target) ** 2).mean().backward()
            grads.append(delta.grad)
            comfy.model_management.unload_all_models()  # no low-VRAM clone stays loaded for the next test
    assert lowvram == [False, True]  # the second run really cast offloaded weights per layer
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)
    # The node, with and without the option (the simulated --novram still in force): the same concept.
    offloaded = learn(env, offload=True)[0].items[0].delta
    resident = learn(env, offload=False)[0].items[0].delta
    torch.testing.assert_close(offloaded, resident, rtol=1e-5, atol=1e-7)


def test_offloading_asks_comfyui_for_partial_loading_and_needs_checkpointing(env, monkeypatch):
    """The same request as ComfyUI's own trainer (nodes_train.py); without the rebuild, autograd would keep every
    layer's device copy of its weight, so offloading without checkpointing is refused before anything runs."""
    import comfy.model_management as mm

    from mod_adapter.modules.errors import ModAdapterError
    from mod_adapter.nodes.learn_concept import load_for_learning

    requests = []
    monkeypatch.setattr(mm, "load_models_gpu", lambda models, **kwargs: requests.append((models, kwargs)))
    load_for_learning(env["model"], offload_weights=True)
    load_for_learning(env["model"], offload_weights=False)
    assert [kwargs for _, kwargs in requests] == [dict(memory_required=1e20, force_full_load=False), {}]
    with pytest.raises(ModAdapterError, match="offload_weights saves memory only with gradient_checkpointing"):
        learn(env, offload=True, checkpointing=False)
    flux_loads = [m for models, _ in requests[2:] for m in models if m.is_clone(env["model"])]
    assert not flux_loads  # refused before the model was loaded (the text encoder was, for the caption)
