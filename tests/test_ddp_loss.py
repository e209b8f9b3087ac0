"""The Trainer's logged training loss under 2-process DDP equals the single-process loss on the same global batch
(issue 22, part 4).

transformers' Trainer passes `num_items_in_batch` (the supervised tokens of the whole global batch) to a model that
accepts loss kwargs and then does not rescale the loss itself; a model that takes `**kwargs` but ignores the count
gets its logged DDP loss multiplied by the number of processes. Ours sets `accepts_loss_kwargs` explicitly and uses
the count. A control model that ignores the count runs in the same processes, to show that the check can fail.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import json, sys
import torch
from transformers import Trainer, TrainingArguments
from modeling_mmcoconut import MMCoconutForConditionalGeneration
from tests.tiny_models import collate, make_model, make_sample

out_path, per_device = sys.argv[1], int(sys.argv[2])
# (tiles, latents, steps): different supervised lengths, so a mean of per-rank means is not the global token mean.
LAYOUT = [(1, 2, 3), (0, 1, 9), (1, 0, 5), (0, 2, 14)]
samples = [make_sample(t, n, question_len=4, steps_len=s, seed=i) for i, (t, n, s) in enumerate(LAYOUT)]


class Data(torch.utils.data.Dataset):
    def __len__(self):
        return len(samples)

    def __getitem__(self, i):
        return samples[i]


class IgnoresCount(MMCoconutForConditionalGeneration):
    """The control: takes the count (through **kwargs) but ignores it, returning its own batch's mean."""

    def forward(self, *args, num_items_in_batch=None, **kwargs):
        return super().forward(*args, **kwargs)


def logged_loss(model_class):
    reference = make_model(seed=0)
    model = model_class(reference.config)
    model.load_state_dict(reference.state_dict())
    args = TrainingArguments(
        output_dir=out_path + ".trainer", per_device_train_batch_size=per_device, max_steps=1, logging_steps=1,
        learning_rate=0.0, use_cpu=True, ddp_backend="gloo", report_to=[], save_strategy="no", seed=0,
        dataloader_drop_last=False, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Data(), data_collator=collate)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry][0]


with torch.no_grad():  # the definition: one forward over the whole global batch, mean over its supervised tokens
    direct = float(make_model(seed=0)(**collate(samples)).loss)
result = {
    "ours": logged_loss(MMCoconutForConditionalGeneration),
    "ignores_count": logged_loss(IgnoresCount),
    "direct": direct,
    "world_size": int(torch.distributed.get_world_size()) if torch.distributed.is_initialized() else 1,
}
if int(__import__("os").environ.get("RANK", "0")) == 0:
    json.dump(result, open(out_path, "w"))
# Tear gloo down before the interpreter does: under load a rank otherwise aborted at exit ("terminate called
# without an active exception"), after its results were written.
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
'''


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, name, nproc, per_device):
    script = tmp_path / "ddp_loss.py"
    script.write_text(SCRIPT)
    out = tmp_path / f"{name}.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "USE_HUB_KERNELS": "0"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", str(script), str(out), str(per_device)]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


def test_ddp_logged_loss_equals_the_single_process_loss_on_the_same_global_batch(tmp_path):
    from modeling_mmcoconut import MMCoconutForConditionalGeneration

    assert MMCoconutForConditionalGeneration.accepts_loss_kwargs is True  # set explicitly, not inferred
    single = launch(tmp_path, "single", nproc=1, per_device=4)
    ddp = launch(tmp_path, "ddp", nproc=2, per_device=2)
    assert (single["world_size"], ddp["world_size"]) == (1, 2)
    print(f"single process: {single}\ntwo processes: {ddp}")
    # One process over the whole batch logs the definition's loss, with or without the count.
    assert single["ours"] == pytest.approx(single["direct"], abs=1e-3)
    assert single["ignores_count"] == pytest.approx(single["direct"], abs=1e-3)
    # Two processes, half the batch each: ours logs the same loss...
    assert ddp["ours"] == pytest.approx(single["ours"], abs=1e-3)
    # ...and a model that ignores the count does not (this is what the check would catch).
    assert ddp["ignores_count"] != pytest.approx(single["ours"], abs=1e-2)
