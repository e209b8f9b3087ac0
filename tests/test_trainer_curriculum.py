"""The curriculum schedule, optimizer/scheduler resets at stage boundaries, and resuming mid-curriculum."""

import pytest
import torch
from torch.utils.data import Dataset
from transformers import TrainerCallback, TrainingArguments

from tests.tiny_models import END, LATENT, START, collate, make_model
from trainer_curriculum import CurriculumSchedule, CurriculumTrainer, stage_for_epoch

STEPS = [[10 + 3 * i, 11 + 3 * i, 12 + 3 * i] for i in range(3)]  # three reasoning steps of three tokens


class ToyCurriculumData(Dataset):
    """Text-only samples: question, then stage k replaces the first k steps by k latents."""

    def __init__(self, n=8):
        self.n = n
        self.stage = None
        self.items_seen = []
        self.epochs = []

    def set_stage(self, stage, epoch=0):
        self.stage = stage
        self.epochs.append(epoch)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        question = [100 + i, 101, 102]
        k = self.stage
        latent = [START] + [LATENT] * k + [END] if k else []
        rest = [t for step in STEPS[k:] for t in step] + [200 + i % 4]
        ids = question + latent + rest
        labels = [-100] * (len(question) + len(latent)) + rest
        self.items_seen.append((self.stage, i))
        return ids, labels, None


def toy_collator(samples):
    batch = collate(samples)
    del batch["pixel_values"]
    return batch


class Recorder(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer
        self.steps = []

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        opt = self.trainer.optimizer
        state_size = sum(len(s) for s in opt.state.values()) if opt is not None else 0
        self.steps.append(
            dict(step=state.global_step, stage=self.trainer.train_dataset.stage, optimizer_state=state_size,
                 lr=self.trainer.lr_scheduler.get_last_lr()[0])
        )


def make_trainer(tmp_path, schedule, epochs, data=None, **args):
    model = make_model().train()
    args = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=epochs, learning_rate=1e-2,
        lr_scheduler_type="linear", warmup_steps=0, report_to="none", save_strategy="no", logging_steps=1,
        use_cpu=True, seed=0, dataloader_num_workers=0,
    ) | args
    training_args = TrainingArguments(**args)
    trainer = CurriculumTrainer(
        model=model, args=training_args, train_dataset=data or ToyCurriculumData(), data_collator=toy_collator,
        schedule=schedule,
    )
    recorder = Recorder(trainer)
    trainer.add_callback(recorder)
    return trainer, recorder


def test_stage_for_epoch_is_epoch_over_epochs_per_stage_capped():
    # After max_latent_stage comes Coconut's final stage (all steps removed), then it stays there.
    assert [stage_for_epoch(e, 2, 3) for e in range(10)] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert [stage_for_epoch(e, 1, 2, first_stage=1) for e in range(4)] == [1, 2, 3, 3]
    assert CurriculumSchedule(epochs_per_stage=1, max_latent_stage=3, mode="cot").stage(5) == 0
    with pytest.raises(ValueError, match="epochs_per_stage"):
        stage_for_epoch(0, 0, 3)


def test_first_stage_can_last_longer():
    assert [stage_for_epoch(e, 2, 3, first_stage_epochs=3) for e in range(10)] == [0, 0, 0, 1, 1, 2, 2, 3, 3, 4]
    schedule = CurriculumSchedule(epochs_per_stage=1, max_latent_stage=2, first_stage_epochs=2)
    assert schedule.stage_segments(5) == [(0, 2), (2, 3), (3, 4), (4, 5)]
    with pytest.raises(ValueError, match="first_stage_epochs"):
        stage_for_epoch(0, 1, 3, first_stage_epochs=0)


def test_optimizer_and_lr_schedule_restart_exactly_at_stage_boundaries(tmp_path):
    schedule = CurriculumSchedule(epochs_per_stage=2, max_latent_stage=2)
    trainer, recorder = make_trainer(tmp_path, schedule, epochs=6)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    steps = recorder.steps
    assert [s["stage"] for s in steps] == [0] * 4 + [1] * 4 + [2] * 4  # 2 steps per epoch
    # Optimizer state is empty right at each stage start (and at the very first step), never elsewhere.
    assert [s["optimizer_state"] == 0 for s in steps] == [i in (0, 4, 8) for i in range(12)]
    # Linear decay restarts from the full learning rate at every stage start.
    lrs = [s["lr"] for s in steps]
    assert lrs[0] == lrs[4] == lrs[8] == pytest.approx(1e-2)
    assert lrs[1] < lrs[0] and lrs[5] < lrs[4] and lrs[3] < lrs[2]
    # The data really changed: stage 1 and 2 items have latents, and the weights moved.
    assert {stage for stage, _ in trainer.train_dataset.items_seen} == {0, 1, 2}
    assert trainer.train_dataset.epochs == list(range(6))  # reseeds uniform_prob mixing every epoch
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["stage"] for entry in logs] == [s["stage"] for s in steps]
    assert logs[-1]["latents_per_sample"] == 2 and logs[0]["latents_per_sample"] == 0
    assert all(entry["train_tokens_per_second"] > 0 for entry in logs)


def test_no_reset_when_reset_optimizer_is_off(tmp_path):
    schedule = CurriculumSchedule(epochs_per_stage=1, max_latent_stage=2, reset_optimizer=False)
    trainer, recorder = make_trainer(tmp_path, schedule, epochs=3)
    trainer.train()
    assert [s["optimizer_state"] == 0 for s in recorder.steps] == [True] + [False] * 5


def test_resume_mid_curriculum_lands_in_the_same_stage_with_the_same_data(tmp_path):
    schedule = CurriculumSchedule(epochs_per_stage=1, max_latent_stage=3)
    full, full_rec = make_trainer(tmp_path / "full", schedule, epochs=4, save_strategy="epoch")
    full.train()
    # Checkpoint after epoch 2 (step 4) is at the start of stage 2.
    resumed, resumed_rec = make_trainer(tmp_path / "resumed", schedule, epochs=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4"))
    assert [s["stage"] for s in resumed_rec.steps] == [2, 2, 3, 3]
    assert resumed_rec.steps == full_rec.steps[4:]
    seen = resumed.train_dataset.items_seen
    assert seen == full.train_dataset.items_seen[-len(seen):]
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, msg=name)


def test_persistent_workers_are_refused(tmp_path):
    with pytest.raises(ValueError, match="persistent_workers"):
        make_trainer(tmp_path, CurriculumSchedule(), epochs=1, dataloader_num_workers=1,
                     dataloader_persistent_workers=True)
