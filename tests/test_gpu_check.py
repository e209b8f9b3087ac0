"""`make gpu-check` (benchmarks/gpu_check.py) at toy size on CPU, so the one-command GPU check cannot rot.

The check runs as its own process, as `make gpu-check` runs it: it sets up a one-process torch.distributed group
(for FSDP2 and ZeRO-3), which must not leak into the test process. No timing asserts.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TOY = ["--size", "toy", "--device", "cpu", "--threads", "1", "--repeats", "1", "--warmup", "0",
       "--eval-questions", "8", "--eval-batch-size", "4", "--new-tokens", "3"]


def run_check(tmp_path, *flags, timeout=300):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", *TOY, *flags, "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return proc.stdout, json.loads(out.read_text())


def test_gpu_check_runs_at_toy_size_on_cpu(tmp_path):
    stdout, payload = run_check(tmp_path, "--parts", "train,eval,fsdp2")
    assert payload["benchmark"] == "gpu_check" and payload["parts"] == ["train", "eval", "fsdp2"]
    shape = payload["shape"]
    assert shape["size"] == "toy" and shape["device"] == "cpu" and shape["attn_implementation"] == "sdpa"
    # The batch: 8 tiles + 6 latents, batch 4; the real vocabulary even at toy size.
    assert (shape["tiles"], shape["latents"], shape["batch_size"]) == (8, 6, 4)
    assert shape["vocab_size"] == 151677
    train = payload["results"]["train"]
    for side in ("ours", "floor"):
        assert train[side]["time_s"] > 0 and train[side]["peak_memory_bytes"] > 0
        assert torch.isfinite(torch.tensor(train[side]["loss"]))
    assert set(payload["ratios"]) == {"time_ours_over_floor", "memory_ours_over_floor"}
    evaluation = payload["results"]["eval"]
    for side in ("ours", "floor"):
        assert evaluation[side]["new_tokens"] == 8 * 3
        assert evaluation[side]["questions_per_s"] > 0 and evaluation[side]["tokens_per_s"] > 0
    fsdp2 = payload["results"]["fsdp2"]
    assert fsdp2["sharded_modules"] == 2  # one decoder layer and one vision layer at toy size
    assert fsdp2["time_s"] > 0 and torch.isfinite(torch.tensor(fsdp2["loss"]))
    assert "zero3" not in payload["results"]
    for text in ("training step, ours", "training step, floor", "FSDP2 step", "batched evaluation", "questions/s"):
        assert text in stdout, stdout


def test_real_size_is_internvl3_1b():
    """`--size real` builds InternVL3-1B's published shape: 938,193,024 parameters, plus the latent tokens' rows."""
    from benchmarks.gpu_check import build_parser, build_real_setup
    from mmcoconut.processing import tokens_per_tile

    args = build_parser().parse_args(["--device", "cpu"])
    setup = build_real_setup(args, "sdpa", build_device="meta")
    config = setup.internvl.config
    assert tokens_per_tile(config) == 256
    text, vision = config.text_config, config.vision_config
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads, text.num_key_value_heads) == (24, 896,
                                                                                                              14, 2)
    assert (vision.num_hidden_layers, vision.hidden_size, vision.num_attention_heads) == (24, 1024, 16)
    parameters = sum(p.numel() for p in setup.model.parameters())
    assert parameters == 938_193_024 + 3 * 896 * 2  # untied: 3 new embedding rows and 3 new LM-head rows


def test_gpu_check_help_answers():
    """A benchmark imports the library at its top like any module (docs/architecture.md): `--help` may load torch."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "--parts" in proc.stdout, proc.stderr


@pytest.mark.slow
def test_gpu_check_zero3_part_at_toy_size(tmp_path):
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("the deepspeed extra is not installed")
    stdout, payload = run_check(tmp_path, "--parts", "zero3", timeout=600)
    zero3 = payload["results"]["zero3"]
    assert zero3["zero_stage"] == 3 and zero3["time_s"] > 0 and zero3["peak_memory_bytes"] > 0
    assert torch.isfinite(torch.tensor(zero3["loss"]))
    assert "ZeRO-3 engine step" in stdout
