"""Run train.py and kill this process (SIGKILL, as `kill -9`) midway through one checkpoint's save: a script the fault
tests (tests/test_faults.py) run in a subprocess, never imported.

    python tests/fault_train.py MOMENT STEP RECIPE.yaml [--flag value ...]

MOMENT is where in the save of `checkpoint-STEP` the process dies, in the order the Trainer writes:
`start` (the folder made, nothing in it), `weights` (the model written, no optimizer), `optimizer` (optimizer and
scheduler written, no RNG state), `state` (half of trainer_state.json written, the file the Trainer writes last).
"""

import os
import signal
import sys

from transformers import Trainer, TrainerState

from mmcoconut.cli.train import main
from trainer_curriculum import CurriculumTrainer


def die():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(moment, step):
    at_step = lambda trainer: trainer.state.global_step == step  # noqa: E731

    if moment == "start":
        original_save_model = CurriculumTrainer.save_model

        def save_model(self, output_dir=None, _internal_call=False):
            if _internal_call and at_step(self):
                os.makedirs(output_dir, exist_ok=True)
                die()
            return original_save_model(self, output_dir, _internal_call)

        CurriculumTrainer.save_model = save_model
    elif moment in ("weights", "optimizer"):
        name = "_save_optimizer_and_scheduler" if moment == "weights" else "_save_rng_state"
        original = getattr(Trainer, name)

        def hooked(self, output_dir):
            if at_step(self):
                die()
            return original(self, output_dir)

        setattr(Trainer, name, hooked)
    elif moment == "state":
        original_save_to_json = TrainerState.save_to_json

        def save_to_json(self, json_path):
            if self.global_step == step:
                original_save_to_json(self, json_path)
                with open(json_path, "r+", encoding="utf-8") as f:
                    f.truncate(len(f.read()) // 2)
                die()
            return original_save_to_json(self, json_path)

        TrainerState.save_to_json = save_to_json
    else:
        raise SystemExit(f"unknown moment {moment!r}")


if __name__ == "__main__":
    moment, step, *argv = sys.argv[1:]
    install(moment, int(step))
    main(argv)
