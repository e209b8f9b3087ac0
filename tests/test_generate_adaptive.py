"""Adaptive continuous thinking (issue 17): learning to stop (`supervise_end_latent`), `generate(thinking="adaptive")`.

The loss with the stop labels is compared with the naive recompute of `test_modeling_mmcoconut`; batched adaptive
generation with a per-sample naive reference that recomputes the whole sequence from scratch after each thought.
"""

import math

import pytest
import torch
from transformers import GenerationConfig

from data_collator import MMCoconutCollator
from mmcoconut.data.curriculum import CurriculumDataset
from modeling_mmcoconut import (
    CACHE_KWARG,
    MMCoconutForConditionalGeneration,
    MMCoconutGenerateBeamOutput,
    MMCoconutGenerateOutput,
)
from tests.test_data_curriculum import STEPS, ids, record
from tests.test_generate_conventions import naive_beam_search
from tests.test_modeling_mmcoconut import assert_matches_naive, naive_greedy, naive_hidden
from tests.tiny_models import END, LATENT, PAD, START, collate, make_model, make_sample

# ---------------------------------------------------------------- 1. learning to stop: labels


def test_stop_labels_follow_each_samples_thought_count(latent_processor):
    """c_thought=2, stage 2, no padding to the max: 1, 2 and 3 steps give 2, 4 and 4 thoughts. The predictions from
    <|start-latent|> and every thought but the last are labelled <|latent|>, the last one <|end-latent|>."""
    records = [record(f"r{n}", steps=STEPS[:n]) for n in (1, 2, 3)]
    dataset = CurriculumDataset(records, latent_processor, c_thought=2, max_latent_stage=2, supervise_end_latent=True)
    start, end, latent = dataset.start_latent_id, dataset.end_latent_id, dataset.latent_token_id
    for stage, expected_latents in ((0, (0, 0, 0)), (2, (2, 4, 4)), (3, (2, 4, 4))):
        dataset.set_stage(stage)
        for position, n in enumerate(expected_latents):
            features = dataset[position]
            input_ids, labels = features["input_ids"].tolist(), features["labels"].tolist()
            at = input_ids.index(start)
            assert input_ids[at : at + n + 2] == [start] + [latent] * n + [end]
            assert labels[: at + 1] == [-100] * (at + 1)  # question and <|start-latent|> itself: unsupervised
            assert labels[at + 1 : at + n + 2] == [latent] * n + [end], (stage, position)
            assert labels[at + n + 2 :] == input_ids[at + n + 2 :]  # steps and answer as before

    plain = CurriculumDataset(records, latent_processor, c_thought=2, max_latent_stage=2)
    plain.set_stage(2)
    dataset.set_stage(2)
    assert plain[0]["input_ids"].tolist() == dataset[0]["input_ids"].tolist()  # same layout, only labels differ
    assert plain[0]["labels"].tolist().count(-100) == dataset[0]["labels"].tolist().count(-100) + 3


def test_adaptive_prompts_end_at_start_latent_unless_given_a_count(latent_processor):
    dataset = CurriculumDataset([record()], latent_processor, c_thought=2, max_latent_stage=2, supervise_end_latent=True)
    dataset.set_stage(2)
    prompt = ids(latent_processor, "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n")
    assert dataset.prompt_features(0)["input_ids"].tolist() == prompt + [dataset.start_latent_id]
    forced = dataset.prompt_features(0, num_latents=3)["input_ids"].tolist()  # test-time scaling: a fixed span
    assert forced == prompt + [dataset.start_latent_id] + [dataset.latent_token_id] * 3 + [dataset.end_latent_id]
    batch = MMCoconutCollator(pad_token_id=0, latent_token_id=dataset.latent_token_id, pad_to="end")(
        [dataset.prompt_dataset()[0]]
    )
    assert int(batch["input_ids"][0, -1]) == dataset.start_latent_id


@pytest.mark.parametrize(
    "kwargs", [dict(pad_latent_to_max=True), dict(mode="pause"), dict(mode="cot"), dict(mode="no_thoughts")]
)
def test_supervise_end_latent_needs_coconut_with_per_sample_counts(latent_processor, kwargs):
    settings = {"mode": "coconut", "pad_latent_to_max": False, **kwargs}
    with pytest.raises(ValueError, match="supervise_end_latent teaches when to stop thinking"):
        CurriculumDataset([record()], latent_processor, supervise_end_latent=True, **settings)


# ---------------------------------------------------------------- 1. learning to stop: exact loss


def stop_supervised_sample(num_tiles, num_latents, seed, question_len=4, steps_len=5):
    """`[img] question <start> <latent>*n <end> steps`, labelled as `supervise_end_latent` does (even for n = 0)."""
    ids, labels, pixels = make_sample(num_tiles, 0, question_len=question_len, steps_len=steps_len, seed=seed)
    prefix, steps = ids[: len(ids) - steps_len], ids[len(ids) - steps_len :]
    span = [START] + [LATENT] * num_latents + [END]
    span_labels = [-100] + [LATENT] * num_latents + [END]
    return prefix + span + steps, [-100] * len(prefix) + span_labels + steps, pixels


STOP_LAYOUT = [(2, 3), (1, 1), (0, 2), (1, 0), (0, 0)]  # (tiles, thoughts): a stop right at <|start-latent|> too


def stop_supervised_batch():
    return collate([stop_supervised_sample(t, n, seed=i, question_len=4 + i) for i, (t, n) in enumerate(STOP_LAYOUT)])


@pytest.mark.parametrize("checkpointing", [False, True])
def test_stop_supervised_loss_and_gradients_match_the_naive_recompute(checkpointing):
    model = make_model()
    if checkpointing:
        model.activation_checkpointing_enable()
        model.train()  # checkpointing is active only in training; dropout is 0 in the tiny config
    batch = stop_supervised_batch()
    out = assert_matches_naive(model, batch)
    # The stop labels are really in the loss: 6 latent + 5 end-latent targets beside the steps.
    assert out.logits.shape[0] == int((batch["labels"][:, 1:] != -100).sum()) == 6 + 5 + 5 * 5
    with torch.no_grad():
        unsupervised = {**batch, "labels": batch["labels"].masked_fill(batch["labels"].ge(START), -100)}
        assert not torch.allclose(model(**unsupervised).loss, out.loss)


# ---------------------------------------------------------------- 2. adaptive generation: naive reference


def naive_adaptive(model, prompt, pixels, max_thoughts, threshold=None, max_new_tokens=4):
    """One sample, no cache: recompute the whole sequence after each thought to decide whether to go on.

    Returns (thoughts, new tokens after <|end-latent|>, the decision margins: logit(end) - best other logit, or
    log P(end) - log threshold, at every decision made; >= 0 stops).
    """
    thoughts, margins = 0, []
    while thoughts < max_thoughts:
        seq = torch.tensor([prompt + [LATENT] * thoughts])
        logits = model.internvl.lm_head(naive_hidden(model, seq, torch.ones_like(seq), pixels)[0, -1])
        if threshold is None:
            margin = float(logits[END] - torch.cat([logits[:END], logits[END + 1 :]]).max())
        else:
            margin = float(logits.log_softmax(-1)[END]) - math.log(threshold)
        margins.append(margin)
        if margin >= 0:
            break
        thoughts += 1
    full = prompt + [LATENT] * thoughts + [END]
    return thoughts, naive_greedy(model, full, pixels, max_new_tokens)[len(full) :], margins


ADAPTIVE_LAYOUT = [1, 0, 2, 0, 1]  # tiles per prompt; question lengths differ, so the prompts are left-padded


def adaptive_prompts(layout=ADAPTIVE_LAYOUT):
    samples = []
    for i, tiles in enumerate(layout):
        ids, _, pixels = make_sample(tiles, 0, question_len=3 + 2 * i, steps_len=0, seed=i)
        samples.append((ids + [START], [-100] * (len(ids) + 1), pixels))
    batch = collate(samples)
    return samples, {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "num_tiles")}


def planted_model():
    """A tiny model whose stop decision changes from thought to thought, differently per prompt.

    Random tiny models barely move their hidden state from one thought to the next; larger language-model
    weights make the thoughts drift, and the `<|end-latent|>` row of the (untied) LM head is pointed along the
    mean drift, so its logit grows with every thought from a different start in each prompt.
    """
    model = make_model(seed=1)
    samples, _ = adaptive_prompts()
    with torch.no_grad():
        for name, weight in model.internvl.model.language_model.named_parameters():
            if weight.dim() == 2 and "embed" not in name:
                weight.mul_(6.0)
        drift = []
        for prompt, _, pixels in samples:
            seq = torch.tensor([prompt + [LATENT] * 4])
            hidden = naive_hidden(model, seq, torch.ones_like(seq), pixels)[0]
            drift.append(hidden[-1] - hidden[-5])  # last thought minus <|start-latent|>
        drift = torch.stack(drift).mean(0)
        model.internvl.lm_head.weight[END] = 2.0 * drift / drift.norm()
    return model


def adaptive_generate(model, inputs, **kwargs):
    kwargs = {"thinking": "adaptive", "max_new_tokens": 4, "eos_token_id": None, "return_dict_in_generate": True,
              **kwargs}
    with torch.no_grad():
        return model.generate(**inputs, **kwargs)


def assert_equals_naive(model, samples, inputs, out, max_thoughts, threshold=None):
    """Thought counts and greedy tokens of every row equal the naive reference; returns the counts."""
    width = inputs["input_ids"].shape[1]
    columns = int(out.num_thoughts.max())
    expected_counts = []
    with torch.no_grad():
        for b, (prompt, _, pixels) in enumerate(samples):
            thoughts, tokens, margins = naive_adaptive(model, prompt, pixels, max_thoughts, threshold)
            # The planted decisions are clear, so float noise cannot flip one between the two computations.
            assert min(abs(m) for m in margins or [1.0]) > 1e-3, f"sample {b}: a decision sits on the boundary"
            assert int(out.num_thoughts[b]) == thoughts, f"sample {b}"
            row = out.sequences[b, width:].tolist()
            assert row[:columns] == [LATENT] * thoughts + [PAD] * (columns - thoughts), f"sample {b}"
            assert row[columns] == END
            assert row[columns + 1 :] == tokens, f"sample {b}"
            expected_counts.append(thoughts)
    return expected_counts


def test_batched_adaptive_generation_equals_naive_decoding_with_rows_stopping_at_different_steps():
    model = planted_model()
    samples, inputs = adaptive_prompts()
    out = adaptive_generate(model, inputs, max_thoughts=4)
    assert isinstance(out, MMCoconutGenerateOutput)
    counts = assert_equals_naive(model, samples, inputs, out, max_thoughts=4)
    assert len(set(counts)) >= 3, f"the plant should make rows stop at different steps, got {counts}"
    assert max(counts) == 4  # one row runs into the cap


def test_end_latent_threshold_stops_on_the_probability():
    model = planted_model()
    samples, inputs = adaptive_prompts()
    by_threshold = adaptive_generate(model, inputs, max_thoughts=4, end_latent_threshold=0.02)
    counts = assert_equals_naive(model, samples, inputs, by_threshold, max_thoughts=4, threshold=0.02)
    assert len(set(counts)) >= 3, counts
    by_argmax = adaptive_generate(model, inputs, max_thoughts=4)
    assert not torch.equal(by_threshold.num_thoughts, by_argmax.num_thoughts)  # the threshold is what decided


def test_max_thoughts_caps_thinking_and_then_equals_fixed_thinking():
    """A model that never stops (P(end) >= 1 never holds) thinks exactly max_thoughts times: the fixed prompt with
    that many latents gives the same answer."""
    model = make_model(seed=1)
    samples, inputs = adaptive_prompts()
    for cap in (0, 3):
        out = adaptive_generate(model, inputs, max_thoughts=cap, end_latent_threshold=1.0)
        assert out.num_thoughts.tolist() == [cap] * len(samples)
        assert_equals_naive(model, samples, inputs, out, max_thoughts=cap, threshold=1.0)
        fixed = collate([(ids + [LATENT] * cap + [END], [-100] * (len(ids) + cap + 1), px) for ids, _, px in samples])
        fixed_inputs = {k: fixed[k] for k in ("input_ids", "attention_mask", "pixel_values", "num_tiles")}
        with torch.no_grad():
            expected = model.generate(**fixed_inputs, max_new_tokens=4, eos_token_id=None, return_dict_in_generate=True)
        assert torch.equal(out.sequences[:, -4:], expected.sequences[:, -4:])
        assert expected.num_thoughts.tolist() == [cap] * len(samples)  # fixed mode reports its prompts' latents


def test_zero_thoughts_when_end_latent_is_predicted_at_once():
    """The <|end-latent|> row of the LM head points along the prompts' <|start-latent|> states: every row stops at
    once, no thinking column is added, and the answer follows <|start-latent|><|end-latent|>."""
    model = make_model(seed=1)
    samples, inputs = adaptive_prompts()
    with torch.no_grad():
        starts = [naive_hidden(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), pixels)[0, -1]
                  for ids, _, pixels in samples]
        mean = torch.stack(starts).mean(0)
        model.internvl.lm_head.weight[END] = 3.0 * mean / mean.norm()
    out = adaptive_generate(model, inputs, max_thoughts=4)
    assert out.num_thoughts.tolist() == [0] * len(samples)
    assert_equals_naive(model, samples, inputs, out, max_thoughts=4)
    assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + 1 + 4  # <|end-latent|> and the answer only


def test_thinking_runs_one_column_per_step_over_the_kv_cache():
    model = planted_model()
    _, inputs = adaptive_prompts()
    lengths = []
    hook = model.internvl.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    out = adaptive_generate(model, inputs, max_thoughts=4)
    hook.remove()
    # prefill: the prompts have no latents, so one pass; then one column per thinking step, then one per token
    columns = int(out.num_thoughts.max())
    assert lengths == [inputs["input_ids"].shape[1]] + [1] * columns + [1] * 4


def test_plain_tensor_output_holds_the_thoughts_as_latent_tokens():
    model = planted_model()
    _, inputs = adaptive_prompts()
    out = adaptive_generate(model, inputs, max_thoughts=4)
    with torch.no_grad():
        plain = model.generate(**inputs, thinking="adaptive", max_thoughts=4, max_new_tokens=4, eos_token_id=None)
    assert torch.equal(plain, out.sequences)
    new = plain[:, inputs["input_ids"].shape[1] :]
    end_column = int((new[0] == END).nonzero()[0])  # the same column in every row
    assert (new[:, :end_column] == LATENT).sum(-1).tolist() == out.num_thoughts.tolist()


def test_adaptive_beam_search_equals_naive_beam_search_after_naive_thinking():
    """Thinking is deterministic, so the beams (and num_return_sequences) expand the cache after it."""
    model = planted_model()
    samples, inputs = adaptive_prompts([1, 0])
    num_beams, steps = 3, 3
    out = adaptive_generate(model, inputs, max_thoughts=4, num_beams=num_beams, num_return_sequences=num_beams,
                            max_new_tokens=steps)
    assert isinstance(out, MMCoconutGenerateBeamOutput)
    assert out.sequences.shape[0] == len(samples) * num_beams
    with torch.no_grad():
        for b, (prompt, _, pixels) in enumerate(samples):
            thoughts, _, _ = naive_adaptive(model, prompt, pixels, 4)
            assert out.num_thoughts[b * num_beams : (b + 1) * num_beams].tolist() == [thoughts] * num_beams
            full = prompt + [LATENT] * thoughts + [END]
            expected = naive_beam_search(model, full, pixels, num_beams, steps)
            assert out.sequences[b * num_beams : (b + 1) * num_beams, -steps:].tolist() == expected, f"sample {b}"
    assert len(set(out.num_thoughts.tolist())) == 2  # the two prompts think differently


def test_sampling_decodes_after_a_deterministic_stop():
    model = planted_model()
    _, inputs = adaptive_prompts()
    greedy = adaptive_generate(model, inputs, max_thoughts=4)
    torch.manual_seed(0)
    sampled = adaptive_generate(model, inputs, max_thoughts=4, do_sample=True, top_k=1, temperature=5.0)
    assert torch.equal(sampled.sequences, greedy.sequences)  # top_k=1 sampling is greedy, thoughts included
    assert torch.equal(sampled.num_thoughts, greedy.num_thoughts)


# ---------------------------------------------------------------- the default follows the checkpoint


def test_checkpoints_trained_to_stop_think_adaptively_by_default(tmp_path):
    model = planted_model()
    _, inputs = adaptive_prompts()
    expected = adaptive_generate(model, inputs, max_thoughts=4)
    assert model.config.default_thinking == "fixed"
    with torch.no_grad():  # fixed thinking: the open span is an ordinary prompt token, nothing is thought
        fixed = model.generate(**inputs, max_new_tokens=4, eos_token_id=None, return_dict_in_generate=True)
    assert fixed.num_thoughts.tolist() == [0] * len(ADAPTIVE_LAYOUT)
    assert fixed.sequences.shape[1] == inputs["input_ids"].shape[1] + 4
    model.config.supervise_end_latent = True
    model.config.latent_stage, model.config.c_thought = 2, 2  # the default cap: 4 thoughts, as trained
    model.save_pretrained(tmp_path)
    loaded = MMCoconutForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.supervise_end_latent and loaded.config.default_thinking == "adaptive"
    with torch.no_grad():
        default = loaded.generate(**inputs, max_new_tokens=4, eos_token_id=None, return_dict_in_generate=True)
    assert torch.equal(default.sequences, expected.sequences)
    assert torch.equal(default.num_thoughts, expected.num_thoughts)
    closed = collate([make_sample(1, 2, steps_len=0)])
    with pytest.raises(ValueError, match="needs every prompt to end with <\\|start-latent\\|>.*thinking='fixed'"):
        loaded.generate(input_ids=closed["input_ids"], pixel_values=closed["pixel_values"], max_new_tokens=2)
    out = loaded.generate(input_ids=closed["input_ids"], pixel_values=closed["pixel_values"], max_new_tokens=2,
                          thinking="fixed", eos_token_id=None)
    assert out.shape[1] == closed["input_ids"].shape[1] + 2


# ---------------------------------------------------------------- refused combinations


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(thinking="sometimes"), "thinking must be one of"),
        (dict(thinking="fixed", max_thoughts=2), "apply to thinking='adaptive' only"),
        (dict(thinking="fixed", end_latent_threshold=0.5), "apply to thinking='adaptive' only"),
        (dict(thinking="adaptive", max_thoughts=-1), "max_thoughts must be an int >= 0"),
        (dict(thinking="adaptive", max_thoughts=1.5), "max_thoughts must be an int >= 0"),
        (dict(thinking="adaptive", end_latent_threshold=0.0), r"end_latent_threshold must be in \(0, 1\]"),
        (dict(thinking="adaptive", end_latent_threshold=1.5), r"end_latent_threshold must be in \(0, 1\]"),
        (dict(inputs_embeds=torch.zeros(1, 1, 8)), "takes no cache or inputs_embeds argument"),
    ],
)
def test_bad_thinking_arguments_are_refused(kwargs, match):
    _, inputs = adaptive_prompts([0])
    with pytest.raises(ValueError, match=match):
        make_model().generate(**inputs, max_new_tokens=2, **kwargs)


def test_adaptive_prompt_must_end_with_start_latent():
    samples, inputs = adaptive_prompts([0, 1])
    inputs["input_ids"][1, -1] = 7
    with pytest.raises(ValueError, match="prompt 1 ends with token 7"):
        make_model().generate(**inputs, thinking="adaptive", max_thoughts=2, max_new_tokens=2)


def test_pause_models_cannot_think_adaptively():
    model = make_model(training_mode="pause")
    _, inputs = adaptive_prompts([0])
    with pytest.raises(ValueError, match="pause_as_thought model has none"):
        model.generate(**inputs, thinking="adaptive", max_thoughts=2, max_new_tokens=2)


def test_adaptive_thinking_needs_a_pad_token_and_takes_the_callers():
    model = make_model(seed=1)
    _, inputs = adaptive_prompts([0])
    model.generation_config.pad_token_id = None
    with pytest.raises(ValueError, match="writes pad_token_id into the thinking columns"):
        model.generate(**inputs, thinking="adaptive", max_thoughts=2, max_new_tokens=2)
    with torch.no_grad():  # either way of giving it works
        model.generate(**inputs, thinking="adaptive", max_thoughts=2, max_new_tokens=2, pad_token_id=PAD)
        model.generate(**inputs, thinking="adaptive", max_thoughts=2,
                       generation_config=GenerationConfig(max_new_tokens=2, pad_token_id=PAD))


def test_forward_takes_inputs_embeds_only_to_continue_a_cache():
    model = make_model()
    with pytest.raises(ValueError, match="inputs_embeds only continue a cached sequence"):
        model(inputs_embeds=torch.zeros(1, 3, 16))
    prompt, mask = torch.tensor([[4, 5, 6]]), torch.ones(1, 4, dtype=torch.long)
    with torch.no_grad():
        by_ids = model(input_ids=torch.tensor([[7]]), attention_mask=mask,
                       **{CACHE_KWARG: model(input_ids=prompt, use_cache=True).cache})
        embeds = model.get_input_embeddings()(torch.tensor([[7]]))
        cache = model(input_ids=prompt, use_cache=True).cache
        by_embeds = model(inputs_embeds=embeds, attention_mask=mask, **{CACHE_KWARG: cache})
        torch.testing.assert_close(by_embeds.logits, by_ids.logits)
        assert by_embeds.last_hidden_state.shape == (1, 1, embeds.shape[-1])
        with pytest.raises(ValueError, match="with input_ids or inputs_embeds: give one"):
            model(input_ids=torch.tensor([[7]]), inputs_embeds=embeds, attention_mask=mask, **{CACHE_KWARG: cache})


# ---------------------------------------------------------------- the recipe field


def test_recipe_supervise_end_latent_reaches_the_data_and_the_checkpoint(tmp_path):
    from mmcoconut.cli.train import main as train_main

    out = tmp_path / "run"
    trainer = train_main([
        "recipes/tiny.yaml", "--output_dir", str(out), "--synthetic_dir", str(tmp_path / "data"),
        "--synthetic_train", "8", "--synthetic_val", "4", "--num_train_epochs", "2", "--epochs_per_stage", "1",
        "--first_stage_epochs", "1", "--per_device_train_batch_size", "4", "--pad_latent_to_max", "false", "--supervise_end_latent", "true",
        "--eval_max_new_tokens", "4",
    ])
    for dataset in (trainer.train_dataset, trainer.eval_dataset):
        assert dataset.supervise_end_latent
        labels = dataset[0]["labels"].tolist()
        assert labels.count(dataset.end_latent_id) == 1 and labels.count(dataset.latent_token_id) == 1  # stage 1
    model = MMCoconutForConditionalGeneration.from_pretrained(out)
    assert model.config.supervise_end_latent and model.config.default_thinking == "adaptive"
    with pytest.raises(ValueError, match="needs mode='coconut'.*pad_latent_to_max=False"):
        train_main(["recipes/tiny.yaml", "--output_dir", str(tmp_path / "bad"), "--synthetic_dir",
                    str(tmp_path / "data"), "--synthetic_train", "8", "--synthetic_val", "4",
                    "--supervise_end_latent", "true"])


# ---------------------------------------------------------------- two processes (slow)


DISTRIBUTED_ROWS = (0, 2)  # rows of ADAPTIVE_LAYOUT: the planted model stops them after 1 and 4 thoughts


def _rank_prompt(rank):
    samples, _ = adaptive_prompts()
    batch = collate([samples[DISTRIBUTED_ROWS[rank]]])
    return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "num_tiles")}


def _adaptive_rank_work(rank):
    from tests.test_distributed import CallCounter

    model = planted_model()
    counter = CallCounter(model)
    out = adaptive_generate(model, _rank_prompt(rank), max_thoughts=4)
    return {"sequences": out.sequences, "num_thoughts": out.num_thoughts, "calls": counter.take()}


@pytest.mark.slow
def test_ranks_think_in_step_and_each_gets_its_single_process_answer(tmp_path):
    """Sharded models need every rank to join every thinking step: the rank that stops first runs masked ones."""
    from tests.test_distributed import spawn_two_ranks

    ranks = spawn_two_ranks(tmp_path, _adaptive_rank_work)
    assert ranks[0]["calls"] == ranks[1]["calls"]
    model = planted_model()
    for rank, result in enumerate(ranks):
        alone = adaptive_generate(model, _rank_prompt(rank), max_thoughts=4)
        assert result["num_thoughts"].tolist() == alone.num_thoughts.tolist()
        assert result["sequences"][0, -5:].tolist() == alone.sequences[0, -5:].tolist()  # <|end-latent|> + answer
    assert [int(r["num_thoughts"]) for r in ranks] == [1, 4]
    new = [r["sequences"].shape[1] - _rank_prompt(rank)["input_ids"].shape[1] for rank, r in enumerate(ranks)]
    assert new == [4 + 1 + 4] * 2  # rank 0 waited in 3 masked thinking columns
