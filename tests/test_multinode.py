"""Two machines x 1 process over loopback equals one machine x 2 processes (DDP, gloo, CPU).

Two `accelerate launch` commands on this one machine play the two machines: `--num_machines 2 --machine_rank 0|1
--main_process_ip 127.0.0.1 --main_process_port P` (torchrun's static rendezvous). Each "machine" has its own
data and output directories, as machines with their own disks would: rank 0 (machine 0) writes the model and the
checkpoint's trainer state. The per-step logged losses must equal README's single-machine 2-process run's.
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
STEPS = 6
FLAGS = ["--max_steps", str(STEPS), "--first_stage_epochs", "1", "--epochs_per_stage", "1", "--synthetic_train", "32",
         "--per_device_train_batch_size", "8", "--eval_strategy", "no", "--logging_steps", "1",
         "--save_strategy", "steps", "--save_steps", str(STEPS)]
# Same algorithm, same reduction (a 2-rank gloo all-reduce): the same float32 numbers are expected.
LOSS_ATOL = 1e-6


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(launch_flags, out, data):
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "ds_configs/accelerate_ddp.yaml",
            *launch_flags, "train.py", "recipes/tiny.yaml", *FLAGS, "--synthetic_dir", str(data),
            "--output_dir", str(out)]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}


def step_losses(out):
    state = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    return {e["step"]: (e["loss"], e["stage"]) for e in state["log_history"] if "loss" in e}


def test_two_machines_one_process_each_equal_one_machine_two_processes(tmp_path):
    single = tmp_path / "one-machine"
    proc = subprocess.run(
        command(["--num_processes", "2", "--main_process_port", str(free_port())], single / "run", single / "data"),
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-8000:]

    port = free_port()
    machines, logs = [], []
    for rank in (0, 1):
        machine = tmp_path / f"machine{rank}"
        machine.mkdir()
        flags = ["--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
                 "--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]
        log = open(machine / "launcher.log", "w")
        logs.append(log)
        machines.append(subprocess.Popen(command(flags, machine / "run", machine / "data"), cwd=REPO, env=ENV,
                                         stdout=log, stderr=subprocess.STDOUT, text=True))
    try:
        codes = [p.wait(timeout=600) for p in machines]
    finally:
        for p in machines:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
    texts = [(tmp_path / f"machine{rank}" / "launcher.log").read_text() for rank in (0, 1)]
    assert codes == [0, 0], "\n----\n".join(t[-6000:] for t in texts)

    # Two machines really formed one group: the launchers each started one process of a world of 2.
    ours, reference = step_losses(tmp_path / "machine0" / "run"), step_losses(single / "run")
    rows = [f"step {s}: 2x1 {ours[s][0]:.7f}  1x2 {reference[s][0]:.7f}  stage {ours[s][1]}" for s in reference]
    print("2 machines x 1 process vs 1 machine x 2 processes:\n" + "\n".join(rows))
    assert sorted(ours) == sorted(reference) == list(range(1, STEPS + 1))
    assert [ours[s][1] for s in sorted(ours)] == [0, 0, 1, 1, 2, 2]  # 2 steps per epoch: a world of 2 ranks
    for step in reference:
        assert abs(ours[step][0] - reference[step][0]) <= LOSS_ATOL, "\n".join(rows)
    assert (tmp_path / "machine0" / "run" / "model.safetensors").is_file()
    # Machine 1 saved no model (only the global main process does), but its process did train: its RNG state.
    assert not (tmp_path / "machine1" / "run" / "model.safetensors").exists()
    assert (tmp_path / "machine1" / "run" / f"checkpoint-{STEPS}" / "rng_state_1.pth").is_file()
