"""Two CPU processes (gloo): the latent forward and generate agree their language-model calls across ranks.

Sharded training (FSDP, ZeRO-3) gathers each layer's weights inside its forward call, a collective every
rank must join, so every rank has to run the same number of language-model (and vision-tower) calls per
step even when one rank's batch holds more latent columns than another's (DESIGN §4.6). The extra passes
come from splitting segments, which must not change any rank's result: each rank is compared with the
same model run on the same batch in a single process.

The last test launches the demo recipe with `accelerate launch --num_processes 2 --cpu` for a few steps.
"""

import os
import pickle
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.tiny_models import collate, make_model, make_sample

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
WORLD_SIZE = 2
# (tiles, latents) per sample of each rank's batch, per case: rank 0 has 3 latent columns, rank 1 fewer.
FORWARD_CASES = {
    "rank1_no_latents": ([(1, 3), (2, 2)], [(1, 0), (2, 0)]),
    "rank1_one_latent": ([(1, 3), (2, 2)], [(1, 1), (2, 0)]),
}
GENERATE_LATENTS = (3, 0)
MAX_NEW_TOKENS = 6


def forward_batch(case, rank):
    samples = FORWARD_CASES[case][rank]
    return collate([make_sample(t, n, question_len=4 + i, steps_len=5 + i, seed=10 * rank + i)
                    for i, (t, n) in enumerate(samples)])


def generate_batch(rank):
    # Prompts end right after <|end-latent|> (or the question): the answer is what gets generated.
    batch = collate([make_sample(1, GENERATE_LATENTS[rank], question_len=5 + rank, steps_len=0, seed=20 + rank)])
    batch.pop("labels")
    return batch


class CallCounter:
    """Forward calls of the language model, its first decoder layer and the vision tower."""

    def __init__(self, model):
        self.counts = {"language_model": 0, "decoder_layer_0": 0, "vision_tower": 0}
        modules = {
            "language_model": model.internvl.model.language_model,
            "decoder_layer_0": model.internvl.model.language_model.layers[0],
            "vision_tower": model.internvl.model.vision_tower,
        }
        for name, module in modules.items():
            module.register_forward_pre_hook(lambda *_, name=name: self._count(name))

    def _count(self, name):
        self.counts[name] += 1

    def take(self):
        counts, self.counts = self.counts, dict.fromkeys(self.counts, 0)
        return counts


def run_forward(model, counter, batch):
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"loss": out.loss.detach(), "logits": out.logits.detach(), "num_passes": out.num_passes,
            "grads": grads, "calls": counter.take()}


def run_generate(model, counter, batch, eos_token_id):
    sequences = model.generate(**batch, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=eos_token_id)
    return {"sequences": sequences, "calls": counter.take()}


def run_all(rank, eos_token_ids, gradient_checkpointing=False):
    """Every case on this rank's batches: the same code in one process and in each of the two."""
    model = make_model()
    if gradient_checkpointing:
        model.train()
        model.gradient_checkpointing_enable()
    counter = CallCounter(model)
    results = {case: run_forward(model, counter, forward_batch(case, rank)) for case in FORWARD_CASES}
    model.eval()
    results["generate"] = run_generate(model, counter, generate_batch(rank), eos_token_ids[rank])
    return results


def _run_rank(rank, port, out_dir, work, *args):
    """One rank of the gloo group: `work(rank, *args)`, its result pickled to `{out_dir}/rank{rank}.pkl`."""
    torch.set_num_threads(1)
    # A rank that skips a collective makes the other's time out (and the test fail) instead of hanging.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE,
                            timeout=timedelta(seconds=60))
    try:
        results = work(rank, *args)
    finally:
        dist.destroy_process_group()
    with open(Path(out_dir) / f"rank{rank}.pkl", "wb") as f:
        pickle.dump(results, f)


def _fsdp2_work(rank):
    """The model under torch's FSDP2 (`fully_shard` per decoder/vision layer, as ds_configs/accelerate_fsdp.yaml)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    for module in model.modules():
        if type(module).__name__ in model._no_split_modules:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    out = model(**forward_batch("rank1_no_latents", rank))
    out.loss.backward()
    # Sharded gradients, gathered: collectives every rank joins in the same order.
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    results = {"loss": out.loss.detach(), "logits": out.logits.detach(), "num_passes": out.num_passes,
               "grads": grads}
    model.eval()
    results["sequences"] = model.generate(**generate_batch(rank), max_new_tokens=MAX_NEW_TOKENS)
    return results


def _text_only_work(rank):
    model = make_model()
    counter = CallCounter(model)
    # Rank 0's batch has an image, rank 1's is text only (allowed by DESIGN §5).
    model(**collate([make_sample(1 - rank, 2, seed=rank)]))
    return counter.take()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_two_ranks(tmp_path, work, *args):
    """Run `work(rank, *args)` on two gloo ranks; returns their results in rank order."""
    mp.spawn(_run_rank, args=(free_port(), str(tmp_path), work, *args), nprocs=WORLD_SIZE, join=True)
    return [pickle.loads((tmp_path / f"rank{rank}.pkl").read_bytes()) for rank in range(WORLD_SIZE)]


@pytest.fixture(scope="module")
def eos_token_ids():
    """Rank 1 stops after its first token (that token is its EOS); rank 0 generates all MAX_NEW_TOKENS.

    So a rank that has finished must keep joining the other's decoding steps (`synced_gpus`).
    """
    model = make_model()
    first = model.generate(**generate_batch(1), max_new_tokens=1)[0, -1].item()
    rank0 = model.generate(**generate_batch(0), max_new_tokens=MAX_NEW_TOKENS, eos_token_id=first)
    assert rank0.shape[1] == generate_batch(0)["input_ids"].shape[1] + MAX_NEW_TOKENS, "pick another seed"
    return (model.generation_config.eos_token_id, first)


@pytest.fixture(scope="module")
def single_process(eos_token_ids):
    torch.manual_seed(0)
    return [run_all(rank, eos_token_ids) for rank in range(WORLD_SIZE)]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, eos_token_ids):
    return spawn_two_ranks(tmp_path_factory.mktemp("two_ranks"), run_all, eos_token_ids)


def assert_same_result(ours, ref):
    torch.testing.assert_close(ours["loss"], ref["loss"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours["logits"], ref["logits"], atol=1e-5, rtol=1e-5)
    assert ours["grads"].keys() == ref["grads"].keys()
    for name in ref["grads"]:
        torch.testing.assert_close(ours["grads"][name], ref["grads"][name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("case", sorted(FORWARD_CASES))
def test_ranks_run_the_same_number_of_language_model_passes(case, two_processes, single_process):
    rank0, rank1 = (results[case] for results in two_processes)
    alone0, alone1 = (results[case] for results in single_process)
    # Alone, rank 1's batch needs fewer passes: the agreement is what makes the counts equal.
    assert alone0["num_passes"] == 4 and alone1["num_passes"] < 4
    assert rank0["num_passes"] == rank1["num_passes"] == 4
    assert rank0["calls"]["language_model"] == rank1["calls"]["language_model"] == 4
    assert rank0["calls"]["decoder_layer_0"] == rank1["calls"]["decoder_layer_0"] == 4


@pytest.mark.parametrize("case", sorted(FORWARD_CASES))
@pytest.mark.parametrize("rank", range(WORLD_SIZE))
def test_splitting_passes_leaves_each_ranks_loss_logits_and_grads_unchanged(case, rank, two_processes, single_process):
    assert_same_result(two_processes[rank][case], single_process[rank][case])


def test_generate_runs_the_same_number_of_calls_on_every_rank(two_processes, single_process):
    rank0, rank1 = (results["generate"] for results in two_processes)
    alone0, alone1 = (results["generate"] for results in single_process)
    # Alone: rank 0 prefills in 4 passes, then one call per new token; rank 1 prefills in 1 and stops after one.
    assert alone0["calls"]["language_model"] == 4 + MAX_NEW_TOKENS
    assert alone1["calls"]["language_model"] == 1 + 1
    assert alone1["calls"]["language_model"] < alone0["calls"]["language_model"]
    assert rank0["calls"]["language_model"] == rank1["calls"]["language_model"] == alone0["calls"]["language_model"]


@pytest.mark.parametrize("rank", range(WORLD_SIZE))
def test_generate_gives_each_rank_its_single_process_tokens(rank, two_processes, single_process):
    ours, ref = two_processes[rank]["generate"]["sequences"], single_process[rank]["generate"]["sequences"]
    assert torch.equal(ours, ref)
    assert ref.shape[1] - generate_batch(rank)["input_ids"].shape[1] == (MAX_NEW_TOKENS if rank == 0 else 1)


def test_gradient_checkpointing_keeps_pass_agreement_and_results(tmp_path, eos_token_ids, single_process):
    two = spawn_two_ranks(tmp_path, run_all, eos_token_ids, True)
    for case in FORWARD_CASES:
        assert two[0][case]["calls"] == two[1][case]["calls"]
        for rank in range(WORLD_SIZE):
            assert_same_result(two[rank][case], single_process[rank][case])


def test_fsdp2_full_shard_runs_uneven_latents_and_matches_single_process(tmp_path, eos_token_ids, single_process):
    """Under FSDP2 each layer's weights are all-gathered inside its forward: unequal pass counts would
    deadlock (without the agreement this run times out in gloo's all_gather), and results must not change."""
    two = spawn_two_ranks(tmp_path, _fsdp2_work)
    alone = [results["rank1_no_latents"] for results in single_process]
    # FSDP reduce-scatters gradients as the mean over ranks (data parallel).
    mean_grads = {n: (alone[0]["grads"][n] + alone[1]["grads"][n]) / 2 for n in alone[0]["grads"]}
    for rank in range(WORLD_SIZE):
        assert two[rank]["num_passes"] == 4
        assert_same_result(two[rank], {**alone[rank], "grads": mean_grads})
        # Default EOS: neither rank stops early, both decode MAX_NEW_TOKENS greedy tokens.
        sequences = make_model().generate(**generate_batch(rank), max_new_tokens=MAX_NEW_TOKENS)
        assert torch.equal(two[rank]["sequences"], sequences)


def test_vision_tower_runs_on_every_rank_when_one_batch_is_text_only(tmp_path):
    rank0, rank1 = spawn_two_ranks(tmp_path, _text_only_work)
    assert rank0["language_model"] == rank1["language_model"]
    assert rank0["vision_tower"] == rank1["vision_tower"] == 1


def test_accelerate_launch_two_cpu_processes_trains_the_demo(tmp_path):
    """The README's DDP command on CPU, 6 steps: two gloo processes through stages 0, 1 and 2.

    Not `accelerate launch --cpu --num_processes 2`: with `--cpu` accelerate runs a single process
    unless an MPI hostfile is given. The DDP config launches through torchrun and, with no GPU (and
    the demo's `use_cpu`), gives two CPU processes.
    """
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", "ds_configs/accelerate_ddp.yaml",
        "--num_processes", "2", "--main_process_port", str(free_port()),
        "train.py", "recipes/tiny.yaml",
        "--output_dir", str(out), "--synthetic_dir", str(tmp_path / "data"), "--synthetic_train", "32",
        "--per_device_train_batch_size", "8", "--max_steps", "6", "--first_stage_epochs", "1",
        "--epochs_per_stage", "1", "--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-8000:]
    # 32 samples / (2 ranks x 8 per device) = 2 steps per epoch, so 6 steps reach stage 2; a single
    # process (4 steps per epoch) would end in stage 1.
    assert "'epoch': '0.5'" in log, log[-4000:]
    for stage in (0, 1, 2):
        assert f"'stage': {stage}" in log, log[-4000:]
    assert (out / "model.safetensors").is_file()
    # Quiet: no per-rank warnings (the tokenizer's ids are already on the config; no unused-parameter search).
    for noise in ("new PAD/BOS/EOS tokens", "find_unused_parameters", "deprecated"):
        assert noise not in log, log[-4000:]
