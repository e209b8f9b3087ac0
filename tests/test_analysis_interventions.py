"""Causal tests of thoughts: generation with edited thoughts against a naive reference that recomputes the whole
sequence for every thought and every token; the analysis' replacements against the naive thoughts."""

import pytest
import torch

from mmcoconut.analysis import interventions
from mmcoconut.analysis.interventions import (
    causal_table,
    choose_donors,
    format_causal_table,
    kept_thoughts,
    noise_of_norm,
    replace_thought,
)
from modeling_mmcoconut import MMCoconutForConditionalGeneration
from tests.test_thought_supervision import naive_thoughts
from tests.tiny_models import EOS, IMAGE, LATENT, collate, make_model, make_sample

LAYOUT = [(2, 3), (1, 2), (0, 3), (1, 1)]  # (tiles, latents) of the prompts


def prompts():
    return [make_sample(t, n, question_len=4 + i, steps_len=0, seed=i) for i, (t, n) in enumerate(LAYOUT)]


def naive_edited_greedy(model, ids, pixels, k, vector, max_new_tokens):
    """One prompt, no cache: for every new token, fill the prompt's latents left to right (thought k replaced by
    `vector`), each with a full recompute of the sequence, then read the last position."""
    internvl = model.internvl
    prompt_len = len(ids)
    ids = torch.tensor([ids])
    for _ in range(max_new_tokens):
        embeds = internvl.get_input_embeddings()(ids)
        in_prompt = torch.arange(ids.shape[1]) < prompt_len
        if pixels is not None:
            features = internvl.model.get_image_features(pixel_values=pixels).pooler_output
            embeds = embeds.masked_scatter(((ids == IMAGE) & in_prompt)[..., None],
                                           features.reshape(-1, features.shape[-1]))
        latents = [t for t in range(prompt_len) if ids[0, t] == LATENT]
        for index, t in enumerate(latents):
            hidden = internvl.model.language_model(inputs_embeds=embeds, use_cache=False).last_hidden_state
            embeds = embeds.clone()
            embeds[0, t] = vector if index == k else hidden[0, t - 1]
        hidden = internvl.model.language_model(inputs_embeds=embeds, use_cache=False).last_hidden_state
        next_id = internvl.lm_head(hidden[:, -1]).argmax(-1)
        ids = torch.cat([ids, next_id[:, None]], dim=1)
        if int(next_id) == EOS:
            break
    return ids[0, prompt_len:].tolist()


@pytest.mark.parametrize("kind", ["zeroed", "noise", "swapped"])
@pytest.mark.parametrize("k", [0, 2])
def test_generate_with_an_edited_thought_equals_the_naive_reference(kind, k):
    model = make_model(seed=1)
    samples = prompts()
    batch = collate(samples)
    with torch.no_grad():
        thoughts = naive_thoughts(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"])[0]
        hidden_size = model.config.get_text_config().hidden_size
        if kind == "zeroed":
            vectors = torch.zeros(len(samples), hidden_size)
        elif kind == "noise":
            vectors = noise_of_norm(torch.full((len(samples),), 5.0), [(b, k) for b in range(len(samples))],
                                    hidden_size, seed=0)
        else:  # another prompt's first thought
            first = [min(t for (row, t) in thoughts if row == b) for b in range(len(samples))]
            vectors = torch.stack([thoughts[((b + 1) % 4, first[(b + 1) % 4])] for b in range(len(samples))])
        out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             pixel_values=batch["pixel_values"], num_tiles=batch["num_tiles"], max_new_tokens=5,
                             edit_thoughts=replace_thought(k, vectors))
        plain = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               pixel_values=batch["pixel_values"], num_tiles=batch["num_tiles"], max_new_tokens=5)
        width = batch["input_ids"].shape[1]
        for b, (ids, _, pixels) in enumerate(samples):
            expected = naive_edited_greedy(model, ids, pixels, k, vectors[b], 5)
            assert out[b, width:].tolist()[: len(expected)] == expected, f"prompt {b}"
    # the edit reaches the answers (rows with a thought k), so the comparison above can fail
    assert not torch.equal(out, plain)


def test_edited_forward_equals_the_naive_fill():
    model = make_model(seed=2)
    batch = collate(prompts())
    vectors = torch.randn(4, model.config.get_text_config().hidden_size)
    with torch.no_grad():
        ours = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"], edit_thoughts=replace_thought(1, vectors)).last_hidden_state
        for b, (ids, _, pixels) in enumerate(prompts()):
            width = batch["input_ids"].shape[1]
            pad = width - len(ids)
            alone = model(input_ids=torch.tensor([ids]), pixel_values=pixels,
                          edit_thoughts=replace_thought(1, vectors[b : b + 1])).last_hidden_state
            torch.testing.assert_close(ours[b, pad:], alone[0], atol=1e-5, rtol=1e-5)


def test_edit_thoughts_is_refused_where_it_would_mean_nothing():
    model = make_model()
    batch = collate(prompts())
    with pytest.raises(ValueError, match="thinking='fixed' only"):
        model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"], thinking="adaptive", edit_thoughts=lambda t, i: t)


# ---------------------------------------------------------------- the analysis on a checkpoint


@pytest.fixture(scope="module")
def depth_records(tmp_path_factory):
    from mmcoconut.data.aokvqa import load_canonical
    from mmcoconut.data.synthetic import write_synthetic_aokvqa

    paths = write_synthetic_aokvqa(tmp_path_factory.mktemp("depth"), 1, 7, seed=0, task="colour_chain_depth")
    return load_canonical(paths["canonical_dir"] / "val.jsonl")


def test_choose_donors_picks_the_next_question_with_as_many_steps_and_another_answer():
    records = [{"steps": ["a"] * n, "correct_choice_idx": c} for n, c in [(1, 0), (2, 1), (1, 0), (1, 3), (2, 1)]]
    assert choose_donors(records) == [3, None, 3, 0, None]


def test_intervene_places_zero_noise_of_the_kept_norm_and_the_donors_thought(inference_checkpoint, depth_records,
                                                                            monkeypatch):
    from mmcoconut.processing import load_internvl_processor

    model = MMCoconutForConditionalGeneration.from_pretrained(inference_checkpoint).eval()
    processor = load_internvl_processor(inference_checkpoint)
    placed = []
    original = interventions.replace_thought
    monkeypatch.setattr(interventions, "replace_thought",
                        lambda k, vectors: placed.append((k, vectors.clone())) or original(k, vectors))
    results = interventions.intervene(model, processor, depth_records, "steps", batch_size=3, max_new_tokens=3)

    # the naive thoughts of each record alone, from a full recompute per thought
    from mmcoconut.analysis.attention import prompt_batches

    naive = []
    for i in range(len(depth_records)):
        count = len(depth_records[i]["steps"]) * model.config.c_thought
        for _, _, batch in prompt_batches(model, processor, [depth_records[i]], count, 1):
            with torch.no_grad():
                thoughts, _ = naive_thoughts_real(model, batch)
            naive.append(thoughts)
    donors = choose_donors(depth_records)
    assert [r["donor"] for r in results] == donors
    assert sum(d is not None for d in donors) >= 2
    # the calls come per (group of equal thought counts, batch, position): zeroed, noise, swapped
    counts = [r["num_thoughts"] for r in results]
    expected_calls = []
    for count in sorted(set(counts)):
        members = [i for i, c in enumerate(counts) if c == count]
        for start in range(0, len(members), 3):
            for k in range(count):
                expected_calls.append((members[start : start + 3], k))
    assert len(placed) == 3 * len(expected_calls)
    for n, (rows, k) in enumerate(expected_calls):
        (k0, zero), (k1, noise), (k2, swapped) = placed[3 * n : 3 * n + 3]
        assert k0 == k1 == k2 == k
        assert not zero.any()
        for b, i in enumerate(rows):
            torch.testing.assert_close(noise[b].norm(), naive[i][k].norm(), atol=1e-4, rtol=1e-4)
            if donors[i] is not None:
                torch.testing.assert_close(swapped[b], naive[donors[i]][k], atol=1e-5, rtol=1e-5)
    assert all(len(r["answers"]["zeroed"]) == r["num_thoughts"] for r in results)


def naive_thoughts_real(model, batch):
    """`naive_thoughts` for a one-prompt batch of the real tokenizer's checkpoint: the thoughts in order."""
    thoughts, hidden = naive_thoughts(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                      model.config.latent_token_id, model.internvl.config.image_token_id)
    return [thoughts[key] for key in sorted(thoughts)], hidden


def test_kept_thoughts_are_the_hidden_states_before_the_latents():
    model = make_model(seed=3)
    sample = collate([prompts()[0]])  # an image and 3 latents
    sample["position_ids"] = (sample["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        ours = kept_thoughts(model, sample)[0]
        thoughts, _ = naive_thoughts(model, sample["input_ids"], sample["attention_mask"], sample["pixel_values"])
    torch.testing.assert_close(ours, torch.stack([thoughts[key] for key in sorted(thoughts)]), atol=1e-5, rtol=1e-5)


def test_causal_table_counts_per_hop_and_position():
    def result(hops, correct, donor_correct, kept, zeroed, noise, swapped):
        return {"hops": hops, "num_thoughts": len(zeroed), "correct": correct, "donor": None if donor_correct is None
                else 0, "donor_correct": donor_correct,
                "answers": {"kept": kept, "zeroed": zeroed, "noise": noise, "swapped": swapped}}

    results = [
        result(1, 0, 2, 0, [1], [0], [2]),
        result(1, 1, None, 1, [1], [None], [None]),
        result(2, 3, 1, 3, [3, 0], [3, 3], [1, 3]),
    ]
    table = causal_table(results)
    assert table["1"] == [{"thought": 1, "n": 2, "n_swapped": 1, "kept": 1.0, "zeroed": 0.5, "noise": 0.5,
                           "swapped": 0.0, "follows_donor": 1.0}]
    assert table["2"][1] == {"thought": 2, "n": 1, "n_swapped": 1, "kept": 1.0, "zeroed": 0.0, "noise": 1.0,
                             "swapped": 1.0, "follows_donor": 0.0}
    assert table["all"][0]["n"] == 3 and table["all"][1]["n"] == 1
    assert "| 2 | 2 | 1 | 100.0% | 0.0% | 100.0% | 100.0% | 0.0% |" in format_causal_table(table)


def test_intervene_command_writes_the_table_and_the_plot(inference_checkpoint, depth_records, tmp_path, capsys):
    import json

    from mmcoconut.cli.intervene import main

    data = tmp_path / "val.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in depth_records[:4]))
    summary = main(["--model", str(inference_checkpoint), "--data-file", str(data), "--output-dir",
                    str(tmp_path / "out"), "--num-latents", "2", "--batch-size", "4", "--max-new-tokens", "3"])
    assert (tmp_path / "out" / "causal.png").stat().st_size > 0
    written = json.loads((tmp_path / "out" / "causal.json").read_text())
    assert written["table"] == summary["table"] and len(written["questions"]) == 4
    assert [row["thought"] for row in written["table"]["all"]] == [1, 2]
    assert "| all | 1 | 4 |" in capsys.readouterr().out


def test_intervene_command_needs_scored_records(inference_checkpoint, tmp_path, capsys):
    import json

    from mmcoconut.cli.intervene import main

    data = tmp_path / "val.jsonl"
    data.write_text(json.dumps({"id": "q1", "image": None, "question": "Q?", "steps": ["a."], "answer": "A"}) + "\n")
    with pytest.raises(SystemExit) as exit:
        main(["--model", str(inference_checkpoint), "--data-file", str(data), "--output-dir", str(tmp_path / "o")])
    assert exit.value.code == 2
    assert "record 'q1' has no correct_choice_idx" in capsys.readouterr().err
