"""The latent multi-pass forward and generate against a naive reference written from the definition."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, InternVLForConditionalGeneration

from mmcoconut.processing import tiny_internvl_config
from modeling_mmcoconut import MMCoconutForConditionalGeneration
from tests.tiny_models import END, EOS, IMAGE, LATENT, PAD, START, collate, make_model, make_sample


def naive_hidden(model, input_ids, attention_mask, pixel_values, prompt_len=None):
    """The definition: fill latents left to right, recomputing the whole sequence after each one.

    With `prompt_len`, only the first `prompt_len` columns hold images and thoughts: generated tokens are
    plain tokens (a generated `<|latent|>` or image token keeps its learned embedding).
    """
    internvl = model.internvl
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    embeds = internvl.get_input_embeddings()(input_ids)
    in_prompt = torch.arange(input_ids.shape[1]) < (input_ids.shape[1] if prompt_len is None else prompt_len)
    if pixel_values is not None:
        features = internvl.model.get_image_features(pixel_values=pixel_values).pooler_output
        image_mask = (input_ids == IMAGE) & in_prompt
        embeds = embeds.masked_scatter(image_mask[..., None], features.reshape(-1, features.shape[-1]))

    def full_pass(embeds):
        out = internvl.model.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        return out.last_hidden_state

    latent_positions = [(b, t) for t in range(input_ids.shape[1]) for b in range(input_ids.shape[0])
                        if input_ids[b, t] == LATENT and in_prompt[t]]
    for b, t in latent_positions:  # in column order, so each thought sees the thoughts before it
        hidden = full_pass(embeds)
        rows = list(embeds.unbind(0))
        row = list(rows[b].unbind(0))
        row[t] = hidden[b, t - 1]
        rows[b] = torch.stack(row)
        embeds = torch.stack(rows)
    return full_pass(embeds)


def naive_loss_and_logits(model, batch):
    hidden = naive_hidden(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    logits = model.internvl.lm_head(hidden)
    shift_labels = batch["labels"][:, 1:]
    supervised = shift_labels != -100
    sup_logits = logits[:, :-1][supervised]
    return F.cross_entropy(sup_logits, shift_labels[supervised]), sup_logits


def grads_of(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_matches_naive(model, batch, atol=1e-5):
    ours = model(**batch)
    ours_grads = grads_of(model, ours.loss)
    ref_loss, ref_logits = naive_loss_and_logits(model, batch)
    ref_grads = grads_of(model, ref_loss)
    torch.testing.assert_close(ours.loss, ref_loss, atol=atol, rtol=1e-5)
    torch.testing.assert_close(ours.logits, ref_logits, atol=atol, rtol=1e-5)
    assert ours_grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(ours_grads[name], ref_grads[name], atol=atol, rtol=1e-4, msg=name)
    # The thoughts must carry gradient into the vision tower and the language model.
    assert any(n.startswith("internvl.model.vision_tower") for n in ref_grads)
    return ours


MIXED = [(2, 3), (1, 1), (0, 2), (1, 0)]  # (tiles, latents): images, text-only, no latents


def mixed_batch():
    return collate([make_sample(t, n, question_len=4 + i, steps_len=5 + i, seed=i) for i, (t, n) in enumerate(MIXED)])


def test_single_sample_matches_naive_definition():
    model = make_model()
    out = assert_matches_naive(model, collate([make_sample(2, 3)]))
    assert out.num_passes == 4  # prefix, one per latent column (3)... the rest starts at the last latent


def test_mixed_batch_matches_naive_definition():
    assert_matches_naive(make_model(), mixed_batch())


def test_mixed_batch_with_gradient_checkpointing_matches_naive_definition():
    model = make_model()
    model.activation_checkpointing_enable()
    model.train()  # checkpointing is active only in training; dropout is 0 in the tiny config
    assert model.is_activation_checkpointing
    assert not model.internvl.model.language_model.layers[0].gradient_checkpointing
    assert_matches_naive(model, mixed_batch())


def test_padded_batch_loss_is_token_weighted_mean_of_single_losses():
    model = make_model()
    samples = [make_sample(t, n, question_len=4 + i, steps_len=5 + i, seed=i) for i, (t, n) in enumerate(MIXED)]
    batch = collate(samples)
    with torch.no_grad():
        batch_loss = model(**batch).loss
        total, count = 0.0, 0
        for sample in samples:
            single = collate([sample])
            n = int((single["labels"][:, 1:] != -100).sum())
            total += model(**single).loss * n
            count += n
    torch.testing.assert_close(batch_loss, total / count, atol=1e-5, rtol=1e-5)


def test_num_items_in_batch_gives_sum_over_count():
    model = make_model()
    batch = mixed_batch()
    with torch.no_grad():
        mean_loss = model(**batch).loss
        n = int((batch["labels"][:, 1:] != -100).sum())
        summed = model(**batch, num_items_in_batch=torch.tensor(2 * n)).loss
    torch.testing.assert_close(summed, mean_loss / 2)


def test_without_latents_loss_equals_plain_internvl():
    model = make_model()
    batch = collate([make_sample(2, 0, seed=3)])
    with torch.no_grad():
        ours = model(**batch).loss
        plain = model.internvl(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"], labels=batch["labels"],
        ).loss
    torch.testing.assert_close(ours, plain, atol=1e-6, rtol=1e-6)


def test_thoughts_are_filled_one_pass_per_latent_column():
    """Consecutive latents: each thought must see the previous one, which a single fill pass cannot."""
    model = make_model()
    batch = collate([make_sample(1, 3, seed=5)])
    with torch.no_grad():
        out = model(**{**batch, "labels": None})
        one_latent_at_a_time = naive_hidden(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    torch.testing.assert_close(out.last_hidden_state, one_latent_at_a_time, atol=1e-5, rtol=1e-5)
    assert out.num_passes == 4


def naive_greedy(model, ids, pixels, max_new_tokens):
    """One sample, no cache: recompute the whole sequence (thoughts included) for every new token."""
    prompt_len = len(ids)
    ids = torch.tensor([ids])
    for _ in range(max_new_tokens):
        mask = torch.ones_like(ids)
        hidden = naive_hidden(model, ids, mask, pixels, prompt_len)
        next_id = model.internvl.lm_head(hidden[:, -1]).argmax(-1)
        ids = torch.cat([ids, next_id[:, None]], dim=1)
        if int(next_id) == EOS:
            break
    return ids[0].tolist()


def test_batched_greedy_generate_equals_naive_decoding_of_each_sample():
    model = make_model(seed=1)
    prompts = [make_sample(t, n, question_len=4 + i, steps_len=0, seed=i) for i, (t, n) in enumerate(MIXED)]
    batch = collate(prompts)
    max_new = 6
    with torch.no_grad():
        out = model.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"], num_tiles=batch["num_tiles"], max_new_tokens=max_new,
        )
        width = batch["input_ids"].shape[1]
        assert out.shape[0] == len(prompts) and out.shape[1] <= width + max_new
        torch.testing.assert_close(out[:, :width], batch["input_ids"])
        for b, (ids, _, pixels) in enumerate(prompts):
            expected = naive_greedy(model, ids, pixels, max_new)[len(ids):]
            got = out[b, width:].tolist()[: len(expected)]
            assert got == expected, f"sample {b}"


def test_generate_uses_the_kv_cache():
    model = make_model(seed=1)
    batch = collate([make_sample(1, 2, steps_len=0)])
    calls = []
    hook = model.internvl.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    with torch.no_grad():
        model.generate(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], max_new_tokens=5,
                       eos_token_id=None)
    hook.remove()
    # prefill: prefix + 2 latent passes (+ the rest before the last token); then one token per step
    assert calls[3:] == [1] * 5, calls


def test_sampling_generate_runs_with_temperature_and_top_p():
    model = make_model(seed=1)
    batch = collate([make_sample(1, 2, steps_len=0, seed=s) for s in range(2)])
    torch.manual_seed(0)
    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         pixel_values=batch["pixel_values"], max_new_tokens=4, do_sample=True,
                         temperature=0.7, top_p=0.9, eos_token_id=None)
    assert out.shape == (2, batch["input_ids"].shape[1] + 4)


@pytest.mark.parametrize("tie", [False, True])
def test_save_and_load_round_trip(tmp_path, tie):
    model = make_model(tie=tie)
    batch = mixed_batch()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    for loaded in (MMCoconutForConditionalGeneration.from_pretrained(tmp_path), AutoModel.from_pretrained(tmp_path)):
        assert isinstance(loaded, MMCoconutForConditionalGeneration)
        loaded.eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=0, rtol=0)
        assert loaded.config.latent_ids == (START, END, LATENT)
        assert loaded.generation_config.eos_token_id == EOS


def test_bf16_forward_and_backward_run():
    model = make_model().to(torch.bfloat16)
    batch = mixed_batch()
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    out = model(**batch)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)


# ---------------------------------------------------------------- documented errors


def test_error_when_image_tokens_do_not_match_tiles():
    model = make_model()
    batch = collate([make_sample(2, 1)])
    batch["pixel_values"] = batch["pixel_values"][:1]
    with pytest.raises(ValueError, match=r"8 image tokens.*1 tiles x 4 tokens per tile = 4"):
        model(**{k: v for k, v in batch.items() if k != "num_tiles"})


def test_error_names_the_sample_whose_tiles_do_not_match():
    model = make_model()
    batch = collate([make_sample(1, 1, seed=0), make_sample(2, 1, seed=1)])
    batch["num_tiles"] = torch.tensor([2, 1])
    with pytest.raises(ValueError, match="Sample 0 of the batch holds 4 image tokens"):
        model(**batch)


def test_error_when_image_tokens_but_no_pixels():
    model = make_model()
    batch = collate([make_sample(1, 1)])
    batch["pixel_values"] = None
    with pytest.raises(ValueError, match="4 image tokens but no pixel_values"):
        model(**batch)


def test_error_when_latent_comes_before_any_context():
    model = make_model()
    with pytest.raises(ValueError, match="before any context token"):
        model(input_ids=torch.tensor([[LATENT, 5, 6]]))
    with pytest.raises(ValueError, match="Sample 1 .* before any context token"):
        model(input_ids=torch.tensor([[4, 5, LATENT], [PAD, LATENT, 6]]), attention_mask=torch.tensor([[1, 1, 1], [0, 1, 1]]))


def test_error_when_config_lacks_latent_ids():
    model = make_model()
    model.config.latent_token_id = None
    with pytest.raises(ValueError, match="missing latent_token_id.*from_internvl"):
        model(input_ids=torch.tensor([[4, 5, 6]]))


def test_generate_rejects_right_padded_prompts():
    model = make_model()
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(input_ids=torch.tensor([[4, 5, PAD]]), attention_mask=torch.tensor([[1, 1, 0]]), max_new_tokens=2)


def test_from_internvl_adds_latent_tokens_and_initialises_rows(internvl_tokenizer):
    torch.manual_seed(0)
    internvl = InternVLForConditionalGeneration(tiny_internvl_config()).eval()
    old_vocab = internvl.get_input_embeddings().weight.shape[0]
    old_embeddings = internvl.get_input_embeddings().weight.detach().clone()
    model = MMCoconutForConditionalGeneration.from_internvl(internvl, internvl_tokenizer, c_thought=2)
    ids = internvl_tokenizer.convert_tokens_to_ids(["<|start-latent|>", "<|end-latent|>", "<|latent|>"])
    assert model.config.latent_ids == tuple(ids)
    assert model.config.c_thought == 2
    assert min(ids) >= old_vocab and len(internvl_tokenizer) == max(ids) + 1
    assert internvl_tokenizer.encode("a<|latent|>b") [1] == ids[2]  # one special token, not split
    embeddings = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    assert embeddings.shape[0] == head.shape[0] == len(internvl_tokenizer)
    assert model.config.internvl_config.text_config.vocab_size == len(internvl_tokenizer)
    torch.testing.assert_close(embeddings[:old_vocab], old_embeddings)  # old rows untouched
    pieces = internvl_tokenizer.encode("<|latent|>", add_special_tokens=False)
    assert pieces == [ids[2]]
    for token_id in ids:  # rows in the trained distribution, distinct from each other
        assert embeddings[token_id].norm() > 0.5 * old_embeddings.norm(dim=-1).mean() / len(ids)
    assert not torch.equal(embeddings[ids[0]], embeddings[ids[2]])
    assert model.generation_config.eos_token_id == internvl_tokenizer.convert_tokens_to_ids("<|im_end|>")
    # The image token id of the real vocabulary survives the resize and the model runs end to end.
    prompt = torch.tensor([[151644] + [151667] * 4 + [100, ids[0], ids[2], ids[2], ids[1], 200, 201]])
    out = model(input_ids=prompt, pixel_values=torch.randn(1, 3, 28, 28), labels=prompt)
    assert torch.isfinite(out.loss) and out.num_passes == 3


def test_returned_cache_is_a_transformers_cache_object():
    from transformers import Cache

    model = make_model()
    batch = collate([make_sample(1, 2)])
    with torch.no_grad():
        out = model(**{**batch, "labels": None}, use_cache=True)
    assert isinstance(out.cache, Cache)
    assert out.cache.get_seq_length() == batch["input_ids"].shape[1]


def test_unknown_forward_arguments_are_an_error():
    model = make_model()
    with pytest.raises(TypeError, match=r"unexpected arguments \['output_router_logits'\]"):
        model(input_ids=torch.tensor([[4, 5, 6]]), output_router_logits=True)


def test_inference_latents_follow_the_training_mode():
    model = make_model(c_thought=2, latent_stage=3)
    assert model.config.num_inference_latents == 6
    model.config.training_mode = "no_thoughts"  # trained with an empty latent span
    assert model.config.num_inference_latents == 0


def assert_causal(model):
    """Changing later tokens must not change earlier positions' outputs (the causal mask is in place)."""
    model.eval()
    ids = torch.randint(5, 250, (1, 16), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[0, 8:] = 7
    with torch.no_grad():
        a = model(input_ids=ids).logits[0, :8]
        b = model(input_ids=changed).logits[0, :8]
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_attention_is_causal_on_every_construction_path(tmp_path, internvl_tokenizer):
    assert_causal(make_model())
    internvl = InternVLForConditionalGeneration(tiny_internvl_config(vocab_size=151674))
    wrapped = MMCoconutForConditionalGeneration.from_internvl(internvl, internvl_tokenizer)
    for sub_config in (wrapped.internvl.config.text_config, wrapped.internvl.config.vision_config):
        assert sub_config._attn_implementation == "sdpa"
    assert_causal(wrapped)
    wrapped.save_pretrained(tmp_path)
    assert_causal(MMCoconutForConditionalGeneration.from_pretrained(tmp_path))


def test_pause_as_thought_is_derived_from_the_training_mode_and_old_configs_load():
    from configuration_mmcoconut import MMCoconutConfig

    assert MMCoconutConfig(training_mode="pause").pause_as_thought
    assert not MMCoconutConfig(training_mode="coconut").pause_as_thought
    assert "pause_as_thought" not in MMCoconutConfig(training_mode="pause").to_dict()
    # a checkpoint saved when it was stored: consistent values load, a contradiction is an error
    assert MMCoconutConfig.from_dict({"training_mode": "pause", "pause_as_thought": True}).pause_as_thought
    assert not MMCoconutConfig.from_dict({"training_mode": "cot", "pause_as_thought": False}).pause_as_thought
    with pytest.raises(ValueError, match="pause_as_thought is derived from training_mode"):
        MMCoconutConfig.from_dict({"training_mode": "coconut", "pause_as_thought": True})
