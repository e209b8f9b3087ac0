"""Step-level supervision of the thoughts under 2-process DDP: the Trainer's logged loss equals the definition (one
forward over the whole global batch, both terms divided by its answer tokens), as `test_ddp_loss.py` checks for the
plain loss. Half of the samples have no supervised thought, so a rank may decode nothing while the other decodes."""

import json
import sys

import pytest

from tests.test_ddp_loss import REPO, free_port

pytestmark = pytest.mark.slow

SCRIPT = r'''
import json, sys
import torch
from transformers import Trainer, TrainingArguments
from tests.tiny_models import collate, make_model, make_sample

out_path, per_device = sys.argv[1], int(sys.argv[2])
LAYOUT = [(1, 2, 3), (0, 1, 9), (1, 0, 5), (0, 2, 14)]  # (tiles, latents, steps)
STEPS = {0: [[5, 6, 7], [8, 9, -100]], 1: [[10, 11, 12], [-100] * 3]}  # samples 2 and 3: no supervised thought
samples = [make_sample(t, n, question_len=4, steps_len=s, seed=i) for i, (t, n, s) in enumerate(LAYOUT)]


def collate_with_steps(features):
    batch = collate([f[1] for f in features])
    batch["thought_labels"] = torch.tensor([STEPS.get(f[0], [[-100] * 3] * 2) for f in features])
    return batch


class Data(torch.utils.data.Dataset):
    def __len__(self):
        return len(samples)

    def __getitem__(self, i):
        return i, samples[i]


reference = make_model(seed=0, thought_supervision_weight=0.5)
args = TrainingArguments(
    output_dir=out_path + ".trainer", per_device_train_batch_size=per_device, max_steps=1, logging_steps=1,
    learning_rate=0.0, use_cpu=True, ddp_backend="gloo", report_to=[], save_strategy="no", seed=0,
    dataloader_drop_last=False, disable_tqdm=True, remove_unused_columns=False,
)
trainer = Trainer(model=reference, args=args, train_dataset=Data(), data_collator=collate_with_steps)
trainer.train()
logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry][0]
with torch.no_grad():
    direct = float(make_model(seed=0, thought_supervision_weight=0.5)(
        **collate_with_steps([(i, s) for i, s in enumerate(samples)])).loss)
    plain = float(make_model(seed=0)(**collate(samples)).loss)
if int(__import__("os").environ.get("RANK", "0")) == 0:
    json.dump({"logged": logged, "direct": direct, "plain": plain}, open(out_path, "w"))
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
'''


def launch(tmp_path, name, nproc, per_device):
    import os
    import subprocess

    script = tmp_path / "ddp_steps.py"
    script.write_text(SCRIPT)
    out = tmp_path / f"{name}.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "USE_HUB_KERNELS": "0"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", str(script), str(out), str(per_device)]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


def test_ddp_logged_loss_with_step_supervision_equals_the_definition(tmp_path):
    single = launch(tmp_path, "single", nproc=1, per_device=4)
    ddp = launch(tmp_path, "ddp", nproc=2, per_device=2)
    assert single["logged"] == pytest.approx(single["direct"], abs=1e-3)
    assert ddp["logged"] == pytest.approx(single["direct"], abs=1e-3)
    assert single["direct"] > single["plain"] + 1e-2  # the step term is in it


def _step_batch(rank):
    """Rank 0: two supervised thoughts; rank 1: no latent at all, so only rank 0 has a step to decode."""
    import torch

    from tests.tiny_models import collate, make_sample

    batch = collate([make_sample(1, 2 if rank == 0 else 0, question_len=4, steps_len=5, seed=rank)])
    labels = torch.tensor([[[5, 6, 7], [8, 9, -100]]]) if rank == 0 else torch.full((1, 1, 1), -100)
    return batch, labels


def _fsdp2_step_work(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from tests.tiny_models import make_model

    model = make_model(thought_supervision_weight=0.5)
    mesh = init_device_mesh("cpu", (2,))
    for module in model.modules():
        if type(module).__name__ in model._no_split_modules:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    batch, labels = _step_batch(rank)
    out = model(**batch, thought_labels=labels)
    out.loss.backward()
    return {"loss": out.loss.detach()}


def test_fsdp2_ranks_without_a_step_to_decode_keep_in_step(tmp_path):
    """Under FSDP2 the decoding pass all-gathers the weights: a rank with nothing to decode must run it too (a
    dummy pass of weight 0), or the other rank's gather times out; each rank's loss is its single-process one."""
    import torch

    from tests.test_distributed import spawn_two_ranks
    from tests.tiny_models import make_model

    two = spawn_two_ranks(tmp_path, _fsdp2_step_work)
    for rank in range(2):
        batch, labels = _step_batch(rank)
        with torch.no_grad():
            alone = make_model(thought_supervision_weight=0.5)(**batch, thought_labels=labels).loss
        torch.testing.assert_close(two[rank]["loss"], alone, atol=1e-5, rtol=1e-5)
