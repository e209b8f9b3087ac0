"""Step-level supervision of continuous thoughts (`thought_labels`): loss and gradients against a naive reference that
recomputes the whole sequence after each thought, then decodes every thought into its step on its own."""

import json

import pytest
import torch
import torch.nn.functional as F

from configuration_mmcoconut import MMCoconutConfig
from mmcoconut.training.arguments import ModelArguments
from mmcoconut.training.build import apply_lora
from tests.test_modeling_mmcoconut import grads_of
from tests.tiny_models import IMAGE, LATENT, collate, make_model, make_sample

WEIGHT = 0.7


def naive_thoughts(model, input_ids, attention_mask, pixel_values, latent_id=LATENT, image_id=IMAGE):
    """{(row, position): the thought placed there}, filled left to right with a full recompute for each one, and the
    final hidden states."""
    internvl = model.internvl
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    embeds = internvl.get_input_embeddings()(input_ids)
    if pixel_values is not None:
        features = internvl.model.get_image_features(pixel_values=pixel_values).pooler_output
        embeds = embeds.masked_scatter((input_ids == image_id)[..., None], features.reshape(-1, features.shape[-1]))

    def full_pass(embeds):
        return internvl.model.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state

    thoughts = {}
    for t in range(input_ids.shape[1]):
        for b in range(input_ids.shape[0]):
            if input_ids[b, t] != latent_id:
                continue
            thought = full_pass(embeds)[b, t - 1]
            thoughts[(b, t)] = thought
            mask = torch.zeros_like(embeds)
            mask[b, t] = 1
            embeds = embeds * (1 - mask) + mask * thought
    return thoughts, full_pass(embeds)


def naive_loss(model, batch, thought_labels, weight):
    thoughts, hidden = naive_thoughts(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    shift_labels = batch["labels"][:, 1:]
    supervised = shift_labels != -100
    total = F.cross_entropy(model.internvl.lm_head(hidden[:, :-1][supervised]), shift_labels[supervised],
                            reduction="sum")
    for b in range(batch["input_ids"].shape[0]):
        positions = [t for (row, t) in sorted(thoughts) if row == b]
        for k, t in enumerate(positions):
            step = [token for token in thought_labels[b, k].tolist() if token != -100]
            if not step:
                continue
            step = torch.tensor(step)
            inputs = torch.cat([thoughts[(b, t)][None], model.get_input_embeddings()(step[:-1])])[None]
            decoded = model.internvl.model.language_model(inputs_embeds=inputs, use_cache=False).last_hidden_state[0]
            total = total + weight * F.cross_entropy(model.internvl.lm_head(decoded), step, reduction="sum")
    return total / supervised.sum()


def labelled_batch():
    """Four samples (images, text only, no latents); steps of different lengths, some latents unsupervised."""
    layout = [(2, 3), (1, 1), (0, 2), (1, 0)]  # (tiles, latents)
    samples = [make_sample(t, n, question_len=4 + i, steps_len=5 + i, seed=i) for i, (t, n) in enumerate(layout)]
    batch = collate(samples)
    g = torch.Generator().manual_seed(7)
    steps = {(0, 0): 3, (0, 1): 5, (1, 0): 2, (2, 1): 4}  # (sample, latent) -> step length; the rest unsupervised
    thought_labels = torch.full((4, 3, 5), -100)
    for (b, k), length in steps.items():
        thought_labels[b, k, :length] = torch.randint(2, 280, (length,), generator=g)
    return batch, thought_labels


def assert_matches_naive_with_steps(model, batch, thought_labels):
    ours = model(**batch, thought_labels=thought_labels)
    ours_grads = grads_of(model, ours.loss)
    reference = naive_loss(model, batch, thought_labels, WEIGHT)
    reference_grads = grads_of(model, reference)
    torch.testing.assert_close(ours.loss, reference, atol=1e-5, rtol=1e-5)
    assert ours_grads.keys() == reference_grads.keys()
    for name in reference_grads:
        torch.testing.assert_close(ours_grads[name], reference_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    return ours


def test_step_supervised_loss_and_gradients_match_the_naive_reference():
    model = make_model(thought_supervision_weight=WEIGHT)
    batch, thought_labels = labelled_batch()
    out = assert_matches_naive_with_steps(model, batch, thought_labels)
    with torch.no_grad():
        plain = model(**batch).loss
    assert out.loss > plain + 1e-3  # the step term is there (and the reference agrees on its size)


def test_step_supervision_with_gradient_checkpointing_matches_the_naive_reference():
    model = make_model(thought_supervision_weight=WEIGHT)
    model.activation_checkpointing_enable()
    model.train()  # dropout is 0 in the tiny config
    assert_matches_naive_with_steps(model, *labelled_batch())


def test_step_supervision_is_a_sum_over_the_answer_count():
    """With `num_items_in_batch` both terms are divided by it: gradient accumulation and DDP see one big batch."""
    model = make_model(thought_supervision_weight=WEIGHT)
    batch, thought_labels = labelled_batch()
    n = int((batch["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        mean = model(**batch, thought_labels=thought_labels).loss
        summed = model(**batch, thought_labels=thought_labels, num_items_in_batch=torch.tensor(3 * n)).loss
    torch.testing.assert_close(summed, mean / 3)


def test_no_supervised_thought_adds_nothing():
    model = make_model(thought_supervision_weight=WEIGHT)
    batch, thought_labels = labelled_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch, thought_labels=torch.full_like(thought_labels, -100)).loss,
                                   model(**batch).loss)


def test_step_supervision_through_lora_matches_the_naive_reference():
    model = apply_lora(make_model(thought_supervision_weight=WEIGHT), ModelArguments(use_lora=True)).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    batch, thought_labels = labelled_batch()
    through_peft = model(**batch, thought_labels=thought_labels).loss
    inner = model.get_base_model()
    with torch.no_grad():
        torch.testing.assert_close(through_peft, naive_loss(inner, batch, thought_labels, WEIGHT), atol=1e-5, rtol=1e-5)
    through_peft.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_" in n)


def test_old_checkpoint_config_loads_without_the_weight(tmp_path):
    make_model().config.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())
    del stored["thought_supervision_weight"]  # as saved before the field existed
    (tmp_path / "config.json").write_text(json.dumps(stored))
    assert MMCoconutConfig.from_pretrained(tmp_path).thought_supervision_weight == 0.0


def test_error_when_weight_is_zero():
    batch, thought_labels = labelled_batch()
    with pytest.raises(ValueError, match="thought_supervision_weight is 0"):
        make_model()(**batch, thought_labels=thought_labels)


def test_error_when_a_supervised_row_has_no_latent():
    batch, thought_labels = labelled_batch()
    thought_labels[3, 0, 0] = 5  # sample 3 has no latents
    with pytest.raises(ValueError, match=r"hold \[3, 1, 2, 0\] continuous thoughts"):
        make_model(thought_supervision_weight=WEIGHT)(**batch, thought_labels=thought_labels)


def test_error_without_labels():
    batch, thought_labels = labelled_batch()
    with pytest.raises(ValueError, match="they need labels"):
        make_model(thought_supervision_weight=WEIGHT)(**{**batch, "labels": None}, thought_labels=thought_labels)


# ---------------------------------------------------------------- the recipe field, end to end


def test_training_with_step_supervision_saves_the_same_kind_of_checkpoint(tmp_path):
    from mmcoconut.cli.train import main as train_main
    from modeling_mmcoconut import MMCoconutForConditionalGeneration

    calls = []
    original = MMCoconutForConditionalGeneration._step_decoding_loss

    def counted(self, *args):
        loss = original(self, *args)
        calls.append(float(loss.detach()))
        return loss

    MMCoconutForConditionalGeneration._step_decoding_loss = counted
    try:
        trainer = train_main([
            "recipes/tiny.yaml", "--output_dir", str(tmp_path / "run"), "--synthetic_dir", str(tmp_path / "data"),
            "--synthetic_train", "8", "--num_train_epochs", "2", "--first_stage_epochs", "1",
            "--epochs_per_stage", "1", "--per_device_train_batch_size", "4", "--eval_strategy", "no",
            "--save_strategy", "no", "--thought_supervision", "step", "--thought_supervision_weight", "0.5",
        ])
    finally:
        MMCoconutForConditionalGeneration._step_decoding_loss = original
    assert len(calls) == 4 and calls[:2] == [0.0, 0.0] and all(loss > 0 for loss in calls[2:])  # stage 0, then 1
    saved = MMCoconutForConditionalGeneration.from_pretrained(tmp_path / "run")
    assert saved.config.thought_supervision_weight == 0.5
    assert {n for n, _ in saved.named_parameters()} == {n for n, _ in trainer.model.named_parameters()}


@pytest.mark.parametrize("flags, match", [
    (["--mode", "cot"], "mode 'cot' has none"),
    (["--thought_supervision", "steps"], "thought_supervision must be one of"),
    (["--thought_supervision_weight", "0"], "thought_supervision_weight must be > 0"),
])
def test_bad_thought_supervision_settings_are_refused_before_loading(tmp_path, no_loading, flags, match):
    from mmcoconut.cli.train import main as train_main
    from mmcoconut.errors import UserValueError

    with pytest.raises(UserValueError, match=match):
        train_main(["recipes/tiny.yaml", "--output_dir", str(tmp_path / "run"), "--thought_supervision", "step",
                    *flags])
