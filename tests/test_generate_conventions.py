"""generate(), forward() and from_internvl() follow transformers' conventions (issue 13).

Each test is compared with what transformers does for its own models, or with a naive reference written from
the definition (recompute the whole sequence, thoughts included, for every new token).
"""

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    DynamicCache,
    GenerationConfig,
    InternVLForConditionalGeneration,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

from configuration_mmcoconut import LATENT_TOKENS
from mmcoconut.processing import tiny_internvl_config
from modeling_mmcoconut import CACHE_KWARG, MMCoconutForConditionalGeneration
from tests.test_modeling_mmcoconut import naive_greedy, naive_hidden
from tests.tiny_models import LATENT, PAD, collate, make_model, make_sample


def prompt_batch(layout=((1, 2),), seed=0):
    """Left-padded prompts `[img] question <start> <latent>*n <end>` for (tiles, latents) pairs."""
    samples = [make_sample(t, n, question_len=4 + i, steps_len=0, seed=seed + i) for i, (t, n) in enumerate(layout)]
    batch = collate(samples)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "num_tiles")}
    return samples, inputs


def new_tokens(out, inputs):
    return out[:, inputs["input_ids"].shape[1] :]


# ---------------------------------------------------------------- 1, 2, 4: generation-config precedence


def test_saved_sampling_settings_are_used_and_explicit_arguments_override_them(tmp_path):
    """Item 1: the model's generation config decides what the caller leaves unset."""
    _, inputs = prompt_batch([(1, 2), (0, 1)])
    model = make_model(seed=1)
    greedy = model.generate(**inputs, max_new_tokens=8, eos_token_id=None)
    torch.manual_seed(0)
    sampled = model.generate(**inputs, max_new_tokens=8, eos_token_id=None, do_sample=True, temperature=5.0)
    assert not torch.equal(sampled, greedy)  # at temperature 5 over 300 tokens, 16 greedy picks cannot happen

    model.generation_config.update(do_sample=True, temperature=5.0)
    model.save_pretrained(tmp_path)
    loaded = MMCoconutForConditionalGeneration.from_pretrained(tmp_path, use_kernels=False).eval()
    assert loaded.generation_config.do_sample and loaded.generation_config.temperature == 5.0
    for configured in (model, loaded):
        torch.manual_seed(0)
        assert torch.equal(configured.generate(**inputs, max_new_tokens=8, eos_token_id=None), sampled)
        assert torch.equal(configured.generate(**inputs, max_new_tokens=8, eos_token_id=None, do_sample=False), greedy)


def poison(internvl):
    """Settings a base checkpoint's generation config might hold; none may reach our generate."""
    internvl.generation_config = GenerationConfig(
        max_new_tokens=2, top_k=1, do_sample=True, temperature=0.01, eos_token_id=7, pad_token_id=9, min_new_tokens=1
    )


@pytest.mark.filterwarnings("ignore:Using the model-agnostic default `max_length`:UserWarning")
def test_the_wrapped_internvl_generation_config_is_never_consulted(tmp_path):
    """Item 2: results depend only on our generation config and the caller's arguments, so they survive save/load."""
    _, inputs = prompt_batch([(1, 2), (0, 1)])
    model = make_model(seed=1)
    reference = model.generate(**inputs)  # our config sets EOS and PAD only: transformers' default length
    assert new_tokens(reference, inputs).shape[1] > 2  # longer than the poisoned max_new_tokens
    poison(model.internvl)
    assert torch.equal(model.generate(**inputs), reference)
    model.save_pretrained(tmp_path)
    loaded = MMCoconutForConditionalGeneration.from_pretrained(tmp_path, use_kernels=False).eval()
    assert torch.equal(loaded.generate(**inputs), reference)


def test_eos_token_id_none_turns_eos_off_whatever_the_wrapped_config_says():
    """Item 2: an explicit `eos_token_id=None` is the caller's choice, as in transformers."""
    _, inputs = prompt_batch()
    model = make_model(seed=1)
    first = int(model.generate(**inputs, max_new_tokens=1)[0, -1])
    model.generation_config.eos_token_id = first
    assert model.generate(**inputs, max_new_tokens=5).shape[1] == inputs["input_ids"].shape[1] + 1  # stops at once
    model.internvl.generation_config.eos_token_id = first
    assert new_tokens(model.generate(**inputs, max_new_tokens=5, eos_token_id=None), inputs).shape[1] == 5


def test_a_generation_config_argument_works_as_in_transformers():
    """Item 4: `generation_config=` is the caller's config; unset fields still come from ours."""
    _, inputs = prompt_batch([(1, 2), (0, 1)])
    model = make_model(seed=1)
    expected = model.generate(**inputs, max_new_tokens=4, eos_token_id=None)
    given = model.generate(**inputs, generation_config=GenerationConfig(max_new_tokens=4, eos_token_id=None))
    assert torch.equal(given, expected)
    # pad_token_id is unset in the argument: ours (PAD) pads the rows that finished at our EOS.
    model.generation_config.eos_token_id = int(expected[0, -4])
    padded = model.generate(**inputs, generation_config=GenerationConfig(max_new_tokens=4))
    assert padded[0, -3:].tolist() == [PAD] * 3


def test_synced_gpus_is_the_callers_choice():
    _, inputs = prompt_batch()
    model = make_model(seed=1)
    expected = model.generate(**inputs, max_new_tokens=3)
    assert torch.equal(model.generate(**inputs, max_new_tokens=3, synced_gpus=False), expected)


@pytest.mark.parametrize("name", ["past_key_values", "cache"])
def test_a_cache_argument_is_refused(name):
    _, inputs = prompt_batch()
    with pytest.raises(ValueError, match="builds its KV cache from the latent prefill"):
        make_model().generate(**inputs, max_new_tokens=2, **{name: DynamicCache()})


# ---------------------------------------------------------------- 3: beams and num_return_sequences


def naive_beam_search(model, ids, pixels, num_beams, steps):
    """Beam search without EOS from the definition: every beam's log-probabilities from a full recompute."""
    beams = [(0.0, list(ids))]
    for _ in range(steps):
        candidates = []
        for score, seq in beams:
            seq_ids = torch.tensor([seq])
            hidden = naive_hidden(model, seq_ids, torch.ones_like(seq_ids), pixels, prompt_len=len(ids))
            log_probs = F.log_softmax(model.internvl.lm_head(hidden[0, -1]).float(), dim=-1)
            top = log_probs.topk(num_beams)
            candidates += [(score + float(v), seq + [int(t)]) for v, t in zip(top.values, top.indices)]
        beams = sorted(candidates, key=lambda c: -c[0])[:num_beams]
    return [seq[len(ids) :] for _, seq in beams]


@pytest.mark.parametrize("layout", [[(2, 3)], [(2, 3), (0, 2)]], ids=["batch1", "batch2"])
def test_beam_search_equals_naive_beam_search(layout):
    samples, inputs = prompt_batch(layout)
    model = make_model(seed=1)
    num_beams, steps = 3, 4
    with torch.no_grad():
        out = model.generate(**inputs, num_beams=num_beams, num_return_sequences=num_beams, max_new_tokens=steps,
                             eos_token_id=None)
        assert out.shape == (len(samples) * num_beams, inputs["input_ids"].shape[1] + steps)
        for b, (ids, _, pixels) in enumerate(samples):
            expected = naive_beam_search(model, ids, pixels, num_beams, steps)
            assert new_tokens(out, inputs)[b * num_beams : (b + 1) * num_beams].tolist() == expected, f"sample {b}"


def test_num_return_sequences_repeats_each_prompt_in_order():
    """Sampling with top_k=1 is greedy, so every returned sequence of a prompt is that prompt's greedy decoding."""
    samples, inputs = prompt_batch([(1, 2), (0, 1)])
    model = make_model(seed=1)
    out = model.generate(**inputs, do_sample=True, top_k=1, num_return_sequences=2, max_new_tokens=5,
                         eos_token_id=None)
    assert out.shape[0] == 4
    for b, (ids, _, pixels) in enumerate(samples):
        expected = naive_greedy(model, ids, pixels, 5)[len(ids) :]
        assert new_tokens(out, inputs)[2 * b].tolist() == new_tokens(out, inputs)[2 * b + 1].tolist() == expected


# ---------------------------------------------------------------- 5, 6: from_internvl and the embedding matrix


def latent_rows_from_pieces(model, tokenizer, fresh_tokenizer):
    """Each latent row must be the mean of the rows of the pieces its text splits into as plain text."""
    for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        for token in LATENT_TOKENS:
            pieces = fresh_tokenizer.encode(token, add_special_tokens=False)
            assert len(pieces) > 1
            torch.testing.assert_close(weight[tokenizer.convert_tokens_to_ids(token)], weight[pieces].mean(0))


def test_from_internvl_with_a_tokenizer_that_already_holds_the_latent_tokens(internvl_tokenizer, base_tokenizer_dir):
    """Item 5: `data_curriculum` tells users to add the tokens; the ids must still fit the embedding matrix."""
    from transformers import AutoTokenizer

    fresh = AutoTokenizer.from_pretrained(base_tokenizer_dir)
    internvl_tokenizer.add_special_tokens(
        {"additional_special_tokens": list(LATENT_TOKENS)}, replace_extra_special_tokens=False
    )
    torch.manual_seed(0)
    internvl = InternVLForConditionalGeneration(tiny_internvl_config()).eval()
    model = MMCoconutForConditionalGeneration.from_internvl(internvl, internvl_tokenizer)
    assert model.get_input_embeddings().weight.shape[0] == len(internvl_tokenizer)
    assert model.get_output_embeddings().weight.shape[0] == len(internvl_tokenizer)
    latent_rows_from_pieces(model, internvl_tokenizer, fresh)
    start, end, latent = model.config.latent_ids
    prompt = torch.tensor([[100, start, latent, latent, end, 200]])
    assert torch.isfinite(model(input_ids=prompt, labels=prompt).loss)


def test_from_internvl_gives_the_same_model_whether_or_not_the_tokenizer_holds_the_tokens(
    internvl_tokenizer, base_tokenizer_dir
):
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    internvl = InternVLForConditionalGeneration(tiny_internvl_config()).eval()
    state = {k: v.clone() for k, v in internvl.state_dict().items()}
    torch.manual_seed(1)  # the same random rows for the tokenizer's ids that are not latent ones
    plain = MMCoconutForConditionalGeneration.from_internvl(internvl, internvl_tokenizer)

    holding = AutoTokenizer.from_pretrained(base_tokenizer_dir)
    holding.add_special_tokens({"additional_special_tokens": list(LATENT_TOKENS)}, replace_extra_special_tokens=False)
    again = InternVLForConditionalGeneration(tiny_internvl_config()).eval()
    again.load_state_dict(state)
    torch.manual_seed(1)
    wrapped = MMCoconutForConditionalGeneration.from_internvl(again, holding)
    assert plain.config.latent_ids == wrapped.config.latent_ids
    torch.testing.assert_close(wrapped.get_input_embeddings().weight, plain.get_input_embeddings().weight)
    torch.testing.assert_close(wrapped.get_output_embeddings().weight, plain.get_output_embeddings().weight)


def test_from_internvl_refuses_latent_tokens_held_as_ordinary_tokens(internvl_tokenizer):
    internvl_tokenizer.add_tokens(list(LATENT_TOKENS))
    internvl = InternVLForConditionalGeneration(tiny_internvl_config())
    with pytest.raises(ValueError, match="holds <\\|start-latent\\|> as an ordinary added token"):
        MMCoconutForConditionalGeneration.from_internvl(internvl, internvl_tokenizer)


@pytest.mark.parametrize("tie", [False, True])
def test_from_internvl_never_shrinks_a_padded_embedding_matrix(internvl_tokenizer, base_tokenizer_dir, tie):
    """Item 6: Qwen-style vocabularies pad the matrix beyond the tokenizer; the latent rows still get initialised."""
    from transformers import AutoTokenizer

    padded_rows = len(internvl_tokenizer) + 64  # room for the three latent ids inside the padding
    torch.manual_seed(0)
    internvl = InternVLForConditionalGeneration(tiny_internvl_config(vocab_size=padded_rows, tie_word_embeddings=tie))
    before = internvl.get_input_embeddings().weight.detach().clone()
    model = MMCoconutForConditionalGeneration.from_internvl(internvl, internvl_tokenizer)
    embeddings = model.get_input_embeddings().weight
    assert embeddings.shape[0] == model.get_output_embeddings().weight.shape[0] == padded_rows
    assert max(model.config.latent_ids) < padded_rows
    latent_rows_from_pieces(model, internvl_tokenizer, AutoTokenizer.from_pretrained(base_tokenizer_dir))
    untouched = torch.ones(padded_rows, dtype=torch.bool)
    untouched[list(model.config.latent_ids)] = False
    torch.testing.assert_close(embeddings[untouched], before[untouched])  # no other row changed


# ---------------------------------------------------------------- 7: short prompts and empty sequences


def test_one_token_prompt_generates_as_the_naive_reference():
    model = make_model(seed=1)
    out = model.generate(input_ids=torch.tensor([[42]]), max_new_tokens=4)
    assert out[0].tolist() == naive_greedy(model, [42], None, 4)


def test_one_token_prompt_batch_with_padding_is_left_alone():
    """A batch whose every prompt is one token: nothing to prefill, transformers' loop runs it on our model."""
    model = make_model(seed=1)
    out = model.generate(input_ids=torch.tensor([[42], [7]]), max_new_tokens=3, eos_token_id=None)
    for b, token in enumerate((42, 7)):
        assert out[b].tolist() == naive_greedy(model, [token], None, 3)


def test_one_token_prompt_with_pixel_values_is_an_error():
    with pytest.raises(ValueError, match="one-token prompt has no image tokens"):
        make_model().generate(input_ids=torch.tensor([[42]]), pixel_values=torch.randn(1, 3, 28, 28), max_new_tokens=2)


def test_forward_on_an_empty_sequence_is_an_error():
    with pytest.raises(ValueError, match=r"at least one token; input_ids have shape \(2, 0\)"):
        make_model()(input_ids=torch.zeros(2, 0, dtype=torch.long))


# ---------------------------------------------------------------- 8: logits_to_keep


def test_logits_to_keep_as_int_or_index_tensor_as_in_transformers():
    model = make_model()
    _, inputs = prompt_batch([(1, 2), (0, 1)])
    with torch.no_grad():
        full = model(**inputs).logits
        positions = torch.tensor([0, 3, full.shape[1] - 1])
        torch.testing.assert_close(model(**inputs, logits_to_keep=positions).logits, full[:, positions])
        torch.testing.assert_close(model(**inputs, logits_to_keep=2).logits, full[:, -2:])
        torch.testing.assert_close(model(**inputs, logits_to_keep=0).logits, full)


def test_logits_to_keep_with_labels_is_an_error():
    batch = collate([make_sample(1, 2)])
    with pytest.raises(ValueError, match="logits_to_keep cannot be combined with labels"):
        make_model()(**batch, logits_to_keep=torch.tensor([1]))


# ---------------------------------------------------------------- 9: return_dict=False


def test_return_dict_false_returns_a_tuple_without_none_entries():
    model = make_model()
    batch = collate([make_sample(1, 2)])
    with torch.no_grad():
        out = model(**batch)
        loss, logits, last_hidden_state, num_passes = model(**batch, return_dict=False)
        assert isinstance(loss, torch.Tensor)
        torch.testing.assert_close(loss, out.loss)
        torch.testing.assert_close(logits, out.logits)
        torch.testing.assert_close(last_hidden_state, out.last_hidden_state)
        assert num_passes == out.num_passes
        logits, cache, *_ = model(**{**batch, "labels": None}, use_cache=True, return_dict=False)
        assert logits.shape[:2] == batch["input_ids"].shape and cache.get_seq_length() == batch["input_ids"].shape[1]


# ---------------------------------------------------------------- 10: a generated <|latent|>


class ForceFirstToken(LogitsProcessor):
    def __init__(self, token, prompt_width):
        self.token, self.prompt_width = token, prompt_width

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.prompt_width:
            scores = torch.full_like(scores, -float("inf"))
            scores[:, self.token] = 0
        return scores


def test_a_generated_latent_gets_its_learned_embedding_not_a_thought():
    """As in the original Coconut's generate: only the prompt's latents are filled with thoughts."""
    model = make_model(seed=1)
    prompt = [5, 6, 7, 8]
    force_latent = LogitsProcessorList([ForceFirstToken(LATENT, prompt_width=len(prompt))])
    out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=2, eos_token_id=None, output_scores=True,
                         return_dict_in_generate=True, logits_processor=force_latent)
    assert out.sequences[0, 4] == LATENT
    ids = torch.tensor([prompt + [LATENT]])
    with torch.no_grad():
        learned = model.internvl(input_ids=ids).logits[0, -1]
        thought = model.internvl.lm_head(naive_hidden(model, ids, torch.ones_like(ids), None)[0, -1])
    torch.testing.assert_close(out.scores[1][0], learned, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(learned, thought, atol=1e-3)  # the two readings differ: the test can tell them apart


# ---------------------------------------------------------------- kept as they were (the review found them right)


def test_eos_lists_stop_each_sample_and_pad_it_afterwards():
    _, inputs = prompt_batch([(1, 2), (0, 1)])
    model = make_model(seed=1)
    free = new_tokens(model.generate(**inputs, max_new_tokens=5, eos_token_id=None), inputs)
    eos = [int(free[0, 1]), 299]  # sample 0 stops at its second token, sample 1 runs on
    assert int(free[1, :].eq(eos[0]).sum()) == 0, "pick another seed"
    out = new_tokens(model.generate(**inputs, max_new_tokens=5, eos_token_id=eos), inputs)
    assert out[0].tolist() == free[0, :2].tolist() + [PAD] * 3
    assert out[1].tolist() == free[1].tolist()


def test_stopping_criteria_and_min_new_tokens():
    class StopAfter(StoppingCriteria):
        def __init__(self, width):
            self.width = width

        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.width + 2, dtype=torch.bool)

    _, inputs = prompt_batch()
    model = make_model(seed=1)
    width = inputs["input_ids"].shape[1]
    stopped = model.generate(**inputs, max_new_tokens=6, eos_token_id=None,
                             stopping_criteria=StoppingCriteriaList([StopAfter(width)]))
    assert stopped.shape[1] == width + 2
    first = int(model.generate(**inputs, max_new_tokens=1)[0, -1])
    at_least = model.generate(**inputs, max_new_tokens=4, eos_token_id=first, min_new_tokens=3)
    assert at_least.shape[1] >= width + 3 and int(at_least[0, width]) != first


def test_streamer_and_scores():
    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.tolist())

        def end(self):
            self.chunks.append("end")

    _, inputs = prompt_batch()
    model = make_model(seed=1)
    streamer = Collect()
    out = model.generate(**inputs, max_new_tokens=3, eos_token_id=None, streamer=streamer,
                         return_dict_in_generate=True, output_scores=True)
    width = inputs["input_ids"].shape[1]
    assert streamer.chunks[0] == inputs["input_ids"].tolist() and streamer.chunks[-1] == "end"
    assert [chunk[0] for chunk in streamer.chunks[1:-1]] == out.sequences[0, width:].tolist()
    assert len(out.scores) == 3
    assert [int(score.argmax(-1)) for score in out.scores] == out.sequences[0, width:].tolist()
    assert getattr(out, CACHE_KWARG).get_seq_length() == width + 2


def test_compute_transition_scores_after_greedy_decoding_and_beam_search():
    """transformers reads the vocabulary size from `config.get_text_config()`, the wrapped InternVL's text config."""
    _, inputs = prompt_batch([(1, 2), (0, 1)])
    model = make_model(seed=1)
    width, steps = inputs["input_ids"].shape[1], 4
    greedy = model.generate(**inputs, max_new_tokens=steps, eos_token_id=None, return_dict_in_generate=True,
                            output_scores=True)
    scores = model.compute_transition_scores(greedy.sequences, greedy.scores, normalize_logits=True)
    chosen = greedy.sequences[:, width:]
    expected = torch.stack(greedy.scores, dim=1).log_softmax(-1).gather(-1, chosen[..., None])[..., 0]
    assert scores.shape == (2, steps) and torch.isfinite(scores).all()
    torch.testing.assert_close(scores, expected)

    beams = model.generate(**inputs, num_beams=2, max_new_tokens=steps, eos_token_id=None, length_penalty=0.0,
                           return_dict_in_generate=True, output_scores=True)
    scores = model.compute_transition_scores(beams.sequences, beams.scores, beams.beam_indices,
                                             normalize_logits=False)
    assert scores.shape == (2, steps) and torch.isfinite(scores).all()
    # Without a length penalty a beam's score is the sum of its tokens' log-probabilities.
    torch.testing.assert_close(scores.sum(-1), beams.sequences_scores)


def test_generate_rejects_prompts_ending_in_a_latent():
    with pytest.raises(ValueError, match="ends with <\\|latent\\|>"):
        make_model().generate(input_ids=torch.tensor([[4, 5, LATENT]]), max_new_tokens=2)


def test_image_prompts_need_their_pixels():
    _, inputs = prompt_batch()
    inputs["pixel_values"] = None
    with pytest.raises(ValueError, match="4 image tokens but no pixel_values"):
        make_model().generate(**inputs, max_new_tokens=2)


# ---------------------------------------------------------------- issue 22: output flags are forward arguments now


def test_forward_takes_output_hidden_states_and_output_attentions_and_refuses_unknown_arguments():
    """transformers' generate passes `output_hidden_states` / `output_attentions` to forward; other unknown arguments
    are still an error (they would otherwise be silently ignored)."""
    model = make_model()
    batch = collate([make_sample(1, 2)])
    batch.pop("labels")
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
        assert len(out.hidden_states) == model.internvl.config.text_config.num_hidden_layers + 1
        assert out.hidden_states[0].shape[:2] == batch["input_ids"].shape
        assert out.num_passes > 1  # the passes' hidden states are joined into one sequence
        torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state)
    with pytest.raises(TypeError, match=r"unexpected arguments \['output_router_logits'\]"):
        model(input_ids=torch.tensor([[4, 5, 6]]), output_router_logits=True)
