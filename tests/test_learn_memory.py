"""The memory model of Learn Concept (modules/learn_memory.py) and its benchmark's quick mode, on the CPU.

No timing is asserted: the benchmark's times depend on the machine and its load.
"""

import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from mod_adapter.modules.errors import ModAdapterError
from mod_adapter.modules.flux_layout import FluxLayout
from mod_adapter.modules.learn_memory import (
    FLUX1_BLOCK_ACTIVATIONS,
    GIB,
    BlockActivations,
    block_flops,
    check_learn_fits,
    estimate_learn_peak,
    estimate_learn_seconds,
    flux_parameter_count,
    learn_step_flops,
)

from tiny_flux import DIFFUSERS_TINY_CONFIG

REPO = Path(__file__).resolve().parent.parent
FLUX1_CONFIG = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                    axes_dims_rope=(16, 56, 56))


def test_the_measured_constants_are_positive():
    for f in fields(BlockActivations):
        assert getattr(FLUX1_BLOCK_ACTIVATIONS, f.name) > 0, f.name
    # A block can never need less while it runs than it keeps for its backward.
    for kind, tokens in (("double", (4096, 256)), ("single", (4096, 256))):
        assert FLUX1_BLOCK_ACTIVATIONS.peak(kind, sum(tokens)) >= FLUX1_BLOCK_ACTIVATIONS.saved(kind, *tokens)


@pytest.mark.parametrize("config, layout, head_dim", [
    (FLUX1_CONFIG, FluxLayout(19, 38, 3072), 128),
    (DIFFUSERS_TINY_CONFIG, FluxLayout(2, 4, 128), 32),
])
def test_the_parameter_count_is_diffusers_count(config, layout, head_dim):
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    expected = sum(p.numel() for p in model.parameters())
    assert flux_parameter_count(layout, head_dim=head_dim, in_channels=config["in_channels"],
                                context_dim=config["joint_attention_dim"],
                                pooled_dim=config["pooled_projection_dim"]) == expected
    if config is FLUX1_CONFIG:
        assert expected == 11_901_408_320


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_estimate_grows_with_the_resolution(checkpointing):
    totals = [estimate_learn_peak(r, gradient_checkpointing=checkpointing).total_bytes for r in (256, 512, 768, 1024)]
    assert totals == sorted(totals) and len(set(totals)) == 4
    activations = [estimate_learn_peak(r, gradient_checkpointing=checkpointing).activation_bytes for r in (512, 1024)]
    assert activations[1] > 3 * activations[0]  # 4352 tokens against 1280


@pytest.mark.parametrize("resolution", [512, 1024])
@pytest.mark.parametrize("weights_copied", [False, True])
def test_checkpointing_lowers_the_estimate(resolution, weights_copied):
    off = estimate_learn_peak(resolution, gradient_checkpointing=False, weights_copied=weights_copied)
    on = estimate_learn_peak(resolution, gradient_checkpointing=True, weights_copied=weights_copied)
    assert on.total_bytes < off.total_bytes
    assert on.activation_bytes < off.activation_bytes / 5
    assert on.flops_per_step > off.flops_per_step  # the forward runs again


@pytest.mark.parametrize("resolution", [512, 1024])
def test_fp8_weights_lower_the_estimate_with_checkpointing(resolution):
    bf16 = estimate_learn_peak(resolution, "bf16")
    fp8 = estimate_learn_peak(resolution, "fp8_e4m3fn")
    assert fp8.weight_bytes * 2 == bf16.weight_bytes
    assert fp8.total_bytes < bf16.total_bytes - 10 * GIB


def test_fp8_weights_without_checkpointing_keep_their_casts():
    # Every layer's bf16 cast is saved by its matmul until the backward: without checkpointing, fp8 storage saves
    # nothing, which is why the refusal proposes checkpointing first.
    fp8 = estimate_learn_peak(512, "fp8_e4m3fn", gradient_checkpointing=False)
    assert fp8.weight_copy_bytes == (19 * 339_831_296 + 38 * 141_591_808) * 2  # every block's weights in bf16
    assert estimate_learn_peak(512, "fp8_e4m3fn").weight_copy_bytes == 339_831_296 * 2  # one double block


def test_offloading_keeps_two_blocks_on_the_device():
    offloaded = estimate_learn_peak(512, "bf16", offload_weights=True)
    resident = estimate_learn_peak(512, "bf16")
    assert offloaded.weight_bytes < 2 * GIB < resident.weight_bytes
    assert offloaded.host_bytes == resident.weight_bytes
    assert (estimate_learn_seconds(offloaded, peak_tflops=165)
            > estimate_learn_seconds(resident, peak_tflops=165))


def test_isolation_images_double_the_image_tokens_of_the_largest_step():
    plain = estimate_learn_peak(512, "fp8_e4m3fn", weights_copied=True)
    isolated = estimate_learn_peak(512, "fp8_e4m3fn", weights_copied=True, isolation=True)
    assert isolated.image_tokens == 2 * plain.image_tokens == 2048
    assert isolated.activation_bytes > plain.activation_bytes and isolated.total_bytes > plain.total_bytes
    # Half of the steps: twice the tokens and one more forward without gradients; the others as before.
    assert 1.5 * plain.flops_per_step < isolated.flops_per_step < 2.5 * plain.flops_per_step
    assert estimate_learn_peak(512, isolation=True, isolation_probability=0.0).flops_per_step == pytest.approx(
        estimate_learn_peak(512).flops_per_step)
    assert "1024×512 (beside an isolation image)" in isolated.describe()


def test_the_estimate_works_for_a_tiny_layout():
    layout = FluxLayout(2, 4, 128)
    small = estimate_learn_peak(64, "fp32", "fp32", layout=layout, text_tokens=16, head_dim=32,
                                gradient_checkpointing=False)
    assert 0 < small.total_bytes < estimate_learn_peak(512, layout=layout).total_bytes
    assert small.weight_bytes == flux_parameter_count(layout, head_dim=32) * 4
    assert learn_step_flops(64, layout=layout, text_tokens=16) > 0


def _between(low, high):
    assert low < high
    return (low + high) // 2


def test_the_refusal_names_checkpointing_first():
    estimate = estimate_learn_peak(512, "bf16", gradient_checkpointing=False)
    available = _between(estimate.with_options(gradient_checkpointing=True).total_bytes, estimate.total_bytes)
    with pytest.raises(ModAdapterError) as error:
        check_learn_fits(estimate, available)
    message = str(error.value)
    assert "To make it fit, turn on gradient_checkpointing: it then needs about" in message
    assert f"{estimate.total_bytes / GIB:.1f} GiB" in message


def test_the_refusal_names_the_largest_resolution_that_fits():
    estimate = estimate_learn_peak(1024, "bf16")
    available = estimate.with_options(resolution=768).total_bytes + 1  # 896 needs more, 768 fits
    with pytest.raises(ModAdapterError, match="To make it fit, lower the resolution to 768:"):
        check_learn_fits(estimate, available)


def test_the_refusal_names_fp8_when_no_lower_resolution_is_offered():
    estimate = estimate_learn_peak(512, "bf16")
    available = _between(estimate.with_options(weight_dtype="fp8_e4m3fn").total_bytes, estimate.total_bytes)
    with pytest.raises(ModAdapterError, match="To make it fit, load the model with weight_dtype fp8_e4m3fn:"):
        check_learn_fits(estimate, available)


def test_the_refusal_names_offloading_when_fp8_is_not_enough():
    estimate = estimate_learn_peak(1024, "fp8_e4m3fn", weights_copied=True)
    available = _between(estimate.with_options(offload_weights=True).total_bytes,
                         estimate.with_options(resolution=512).total_bytes)
    with pytest.raises(ModAdapterError, match="To make it fit, offload the weights to CPU RAM"):
        check_learn_fits(estimate, available, can_offload=True)
    # A host that cannot offload is not told to: nothing else fits, so the message says what the least would need.
    with pytest.raises(ModAdapterError, match="Even with gradient checkpointing, fp8_e4m3fn weights and a 512×512") as error:
        check_learn_fits(estimate, available)
    assert "offload" not in str(error.value)


def test_the_refusal_turns_checkpointing_on_along_with_another_option():
    estimate = estimate_learn_peak(512, "bf16", gradient_checkpointing=False)
    available = _between(estimate.with_options(gradient_checkpointing=True, weight_dtype="fp8_e4m3fn").total_bytes,
                         estimate.with_options(gradient_checkpointing=True).total_bytes)
    with pytest.raises(ModAdapterError,
                       match="turn on gradient_checkpointing and load the model with weight_dtype fp8_e4m3fn"):
        check_learn_fits(estimate, available)


def test_the_refusal_says_when_nothing_fits():
    with pytest.raises(ModAdapterError, match="Even with gradient checkpointing, fp8_e4m3fn weights offloaded"):
        check_learn_fits(estimate_learn_peak(1024, "bf16"), 1 * GIB, device_name="cuda:0", can_offload=True)


def test_a_run_that_fits_passes():
    estimate = estimate_learn_peak(512, "bf16")
    assert check_learn_fits(estimate, estimate.total_bytes) is estimate


def test_the_flop_formula_counts_what_torch_counts_at_flux_size():
    # The ratio of checkpointing on to off is one extra forward: forward / (forward + backward).
    on = block_flops("single", 1024, 256, 3072, gradient_checkpointing=True)
    off = block_flops("single", 1024, 256, 3072, gradient_checkpointing=False)
    assert 1.3 < on / off < 1.6
    # FLUX.1 forward at 1,024 + 256 tokens is ~17.6 TFLOP (docs/benchmarks.md, training FLOPs, counted).
    step = learn_step_flops(512, gradient_checkpointing=True)
    assert 50e12 < step < 56e12


def test_the_quick_benchmark_runs_and_writes_json(tmp_path):
    out = tmp_path / "learn_memory.json"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "learn_memory.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    results = json.loads(out.read_text())
    assert results["size"] == "quick"
    assert results["weights"]["parameters"] == 11_901_408_320
    assert results["weights"]["bytes"]["fp8_e4m3fn"] * 2 == results["weights"]["bytes"]["bf16"]
    assert len(results["blocks"]) == 8  # 2 kinds x 2 resolutions x checkpointing off/on
    for row in results["blocks"]:
        assert row["seconds"] > 0 and row["timed_runs"] >= 1
        # The analytic FLOPs of modules/learn_memory.py are what FlopCounterMode counted.
        assert row["gflops"] == pytest.approx(row["gflops_analytic"], rel=0.01), row
        if not row["gradient_checkpointing"]:
            assert row["saved_bytes"] > 0
    constants = results["constants"]
    # Saved bytes are counted exactly, so they are positive at any size; the resident-set peaks of a model this
    # small, measured in one process, can round to nothing.
    assert all(constants[k] > 0 for k in constants if "_saved_per_" in k)
    assert all(constants[k] >= 0 for k in constants)
    assert BlockActivations.from_measurements(results["constants"]).width == 128
    assert [v["gradient_checkpointing"] for v in results["validation"]] == [False, True]
    assert "per-token constants" in done.stdout
