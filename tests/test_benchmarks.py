"""The benchmarks run end to end on a miniature shape, and their three sides compute the same thing.

No timing asserts: only the JSON's fields, and that ours, the floor and the original Coconut algorithm
agree numerically wherever they should (so the benchmark compares equal work).
"""

import argparse
import json

import pytest
import torch

from benchmarks import bench_generate, bench_train_step
from benchmarks.common import (
    LATENT_ID,
    add_common_args,
    build_setup,
    collate_prompts,
    collate_train,
    make_samples,
)
from benchmarks.original_coconut import original_coconut_generate

# The real vocabulary; 56-px tiles (4 image tokens) and everything else as small as it gets.
TINY = [
    "--layers", "1", "--hidden-size", "32", "--heads", "2", "--kv-heads", "1", "--intermediate-size", "64",
    "--vision-hidden-size", "32", "--vision-layers", "1", "--image-size", "56", "--tiles", "1",
    "--question-tokens", "6", "--answer-tokens", "5", "--latents", "2", "--batch-size", "2",
    "--repeats", "1", "--warmup", "0", "--device", "cpu",
]


def tiny_args(*overrides):
    return add_common_args(argparse.ArgumentParser()).parse_args(TINY + list(overrides))


def test_train_step_benchmark_writes_its_json(tmp_path):
    out = tmp_path / "train.json"
    payload = bench_train_step.main(TINY + ["--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["benchmark"] == "train_step"
    assert set(saved["results"]) == {"ours", "floor", "original"}
    for result in saved["results"].values():
        assert {"time_s", "times_s", "peak_memory_bytes", "loss"} <= set(result)
        assert result["peak_memory_bytes"] > 0
    assert set(saved["ratios"]) >= {"time_ours_over_floor", "time_original_over_ours", "memory_ours_over_floor"}
    assert set(saved["targets"]) == set(bench_train_step.TARGETS)
    assert saved["shape"]["vocab_size"] == 151677 and saved["shape"]["tokens_per_tile"] == 4
    assert saved["shape"]["attn_implementation"] == "sdpa"
    assert saved["loss_abs_diff_ours_original"] < 1e-4
    assert "ours" in bench_train_step.report(payload)


def test_generate_benchmark_writes_its_json(tmp_path):
    out = tmp_path / "generate.json"
    payload = bench_generate.main(TINY + ["--new-tokens", "4", "--baseline-new-tokens", "2", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["benchmark"] == "generate"
    assert set(saved["results"]) == {"ours", "floor", "original"}
    for result in saved["results"].values():
        assert {"time_s", "tokens_per_s", "new_tokens"} <= set(result)
        assert result["new_tokens"] == 2 * 4
    assert saved["results"]["original"]["extrapolated"] and saved["results"]["original"]["timed_new_tokens"] == 2
    assert all(len(tokens) == 4 for tokens in saved["tokens"]["ours"] + saved["tokens"]["floor"])
    assert set(saved["ratios"]) >= {"tokens_per_s_ours_over_original", "time_ours_over_floor"}
    assert set(saved["targets"]) == set(bench_generate.TARGETS)
    assert saved["prompts_where_ours_equals_original"] == 2
    assert "extrapolated" in bench_generate.report(payload)


def _loss_and_grads(setup, loss_fn):
    setup.model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in setup.model.named_parameters() if p.grad is not None}
    setup.model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("latents", [3, 0])
def test_training_sides_compute_the_same_loss_and_gradients(latents):
    """Ours equals the original algorithm; without latents the floor is the same computation too."""
    args = tiny_args("--latents", str(latents), "--batch-size", "3")
    setup = build_setup(args)
    setup.model.train()
    batch = collate_train(make_samples(args, setup), setup)
    sides = {name: _loss_and_grads(setup, fn) for name, fn in bench_train_step.loss_functions(setup, batch).items()}
    ours_loss, ours_grads = sides["ours"]
    compared = ["original", "floor"] if latents == 0 else ["original"]
    for name in compared:
        loss, grads = sides[name]
        torch.testing.assert_close(loss, ours_loss, atol=1e-5, rtol=1e-5, msg=name)
        assert grads.keys() == ours_grads.keys()
        for param in ours_grads:
            torch.testing.assert_close(grads[param], ours_grads[param], atol=1e-5, rtol=1e-4, msg=f"{name}: {param}")
    if latents:  # the thoughts make a difference: the floor (latents as tokens) computes something else
        assert abs(float(sides["floor"][0]) - float(ours_loss)) > 1e-4


@pytest.mark.parametrize("latents", [3, 0])
def test_generation_sides_produce_the_same_greedy_tokens(latents):
    """Batched ours equals the original's one-prompt decoding; without latents the floor equals ours too."""
    args = tiny_args("--latents", str(latents), "--batch-size", "3")
    setup = build_setup(args)
    setup.model.eval()
    samples = make_samples(args, setup)
    prompts = collate_prompts(samples, setup)
    new_tokens = 5
    with torch.no_grad():
        generated = {name: fn().tolist() for name, fn in
                     bench_generate.generate_functions(setup, prompts, new_tokens).items()}
        original = [
            original_coconut_generate(setup.internvl, torch.tensor([s.prompt]), LATENT_ID, new_tokens,
                                      pixel_values=s.pixel_values)
            for s in samples
        ]
    assert generated["ours"] == original
    if latents == 0:
        assert generated["floor"] == generated["ours"]
