"""analyze_latents: the CLI's JSON and plots on a tiny checkpoint, and its thoughts and attention shares against the
model's own forward and transformers' `output_attentions`."""

import json

import pytest
import torch
from PIL import Image

from data_collator import MMCoconutCollator
from mmcoconut.analysis import attention as analyze_latents
from mmcoconut.analysis.attention import ATTENTION_CATEGORIES, analyze, analyze_batch, special_token_ids
from mmcoconut.cli import analyze as analyze_cli
from mmcoconut.data.aokvqa import load_canonical
from mmcoconut.data.curriculum import CurriculumDataset
from mmcoconut.inference.loading import load_model
from mmcoconut.processing import load_internvl_processor, tiny_internvl_config
from modeling_mmcoconut import MMCoconutForConditionalGeneration

C_THOUGHT, LATENT_STAGE, NUM_LATENTS, TOP_K = 2, 1, 3, 5


@pytest.fixture(scope="module")
def data_file(synthetic_aokvqa, tmp_path_factory):
    """Two generated records with images and a text-only copy of the first (so a batch mixes both)."""
    records = load_canonical(synthetic_aokvqa["canonical_dir"] / "val.jsonl")[:2]
    text_only = {**records[0], "id": "text_only", "image": None}
    path = tmp_path_factory.mktemp("analyze_data") / "records.jsonl"
    lines = [json.dumps({**r, "image": None if r["image"] is None else str(r["image"])}) for r in [*records, text_only]]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def loaded_batch(tiny_checkpoint, data_file, latent_processor):
    """The eager tiny model, a processor with the same token ids (the session's; loading the saved one costs
    seconds) and a collated batch of three prompts with `NUM_LATENTS` latents each."""
    model = load_model(tiny_checkpoint, dtype="float32", device="cpu", attn_implementation="eager")
    processor = latent_processor
    assert processor.tokenizer.convert_tokens_to_ids("<|latent|>") == model.config.latent_token_id
    dataset = CurriculumDataset(load_canonical(data_file), processor, mode="coconut", c_thought=C_THOUGHT)
    collator = MMCoconutCollator(processor.tokenizer.pad_token_id, model.config.latent_token_id, pad_to="end")
    batch = collator([dataset.prompt_features(i, NUM_LATENTS) for i in range(len(dataset))])
    batch.pop("ids")
    return model, processor, batch


def test_cli_writes_json_sorted_decodings_normalised_shares_and_valid_pngs(tiny_checkpoint, data_file, tmp_path):
    analyze_cli.main([
        "--model", str(tiny_checkpoint), "--data-file", str(data_file), "--limit", "3", "--num-latents",
        str(NUM_LATENTS), "--top-k", str(TOP_K), "--batch-size", "2", "--max-tiles", "4", "--output-dir", str(tmp_path),
    ])
    results = json.loads((tmp_path / "latents.json").read_text())
    tokenizer = load_internvl_processor(tiny_checkpoint).tokenizer
    steps = load_canonical(data_file)[0]["steps"]  # the text-only record copies the first one
    assert results["num_latents"] == NUM_LATENTS and results["categories"] == list(ATTENTION_CATEGORIES)
    assert [s["id"] for s in results["samples"]][2] == "text_only"
    num_layers = results["num_layers"]
    assert num_layers == tiny_internvl_config().text_config.num_hidden_layers
    for sample in results["samples"]:
        assert [t["index"] for t in sample["thoughts"]] == list(range(NUM_LATENTS))
        for thought in sample["thoughts"]:
            probs = [d["prob"] for d in thought["top_k"]]
            assert len(probs) == TOP_K and all(isinstance(d["token"], str) for d in thought["top_k"])
            assert probs == sorted(probs, reverse=True) and all(0 < p <= 1 for p in probs)
            layers = thought["attention"]["per_layer"]
            assert len(layers) == num_layers
            for shares in [*layers, thought["attention"]["mean"]]:
                assert set(shares) == set(ATTENTION_CATEGORIES)
                assert all(0 <= v <= 1 for v in shares.values())
                assert sum(shares.values()) == pytest.approx(1, abs=1e-5)
            if thought["index"] == 0:  # nothing before the first thought is a thought
                assert thought["attention"]["mean"]["thoughts"] == pytest.approx(0, abs=1e-7)
            step_ids = tokenizer(f"{thought['step']}\n", add_special_tokens=False)["input_ids"]
            assert thought["top1_in_step"] == (thought["top_k"][0]["token_id"] in step_ids)
            if sample["id"] == "text_only":
                assert thought["attention"]["mean"]["image"] == 0 and thought["key_counts"]["image"] == 0
                assert thought["step"] == steps[thought["index"] // C_THOUGHT]
            assert thought["key_counts"]["thoughts"] == thought["index"] and thought["key_counts"]["self"] == 1
    assert len(results["mean_attention"]) == NUM_LATENTS
    assert results["max_recompute_rel_diff"] < 1e-4
    for name in ("attention_share.png", "top_k_decodings.png"):
        with Image.open(tmp_path / name) as image:
            image.verify()
            assert image.format == "PNG" and min(image.size) > 50


def test_decoded_thoughts_are_the_forward_hidden_states_before_each_latent(loaded_batch):
    model, processor, batch = loaded_batch
    result = analyze_batch(model, batch, special_token_ids(processor.tokenizer, model.config), top_k=TOP_K)
    with torch.no_grad():
        forward = model(**batch)  # all positions' logits
    positions = result["positions"]
    assert positions.shape == (3, NUM_LATENTS)
    assert bool((batch["input_ids"].gather(1, positions) == model.config.latent_token_id).all())
    for b in range(positions.shape[0]):
        for k, p in enumerate(positions[b].tolist()):
            torch.testing.assert_close(result["thoughts"][b, k], forward.last_hidden_state[b, p - 1], rtol=0, atol=0)
            top_probs, top_ids = forward.logits[b, p - 1].float().softmax(-1).topk(TOP_K)
            torch.testing.assert_close(result["top_probs"][b, k], top_probs)
            assert result["top_ids"][b, k].tolist() == top_ids.tolist()


def test_attention_shares_match_output_attentions_summed_by_token(loaded_batch):
    """Reference: transformers' own `output_attentions` over the filled sequence, summed key by key in Python."""
    model, processor, batch = loaded_batch
    special = special_token_ids(processor.tokenizer, model.config)
    result = analyze_batch(model, batch, special, top_k=TOP_K)
    forward = model(**batch)
    embeds = analyze_latents.filled_inputs_embeds(
        model, batch["input_ids"], batch["pixel_values"], forward.last_hidden_state, result["positions"]
    )
    with torch.no_grad():
        attentions = model.internvl.model.language_model(
            inputs_embeds=embeds, attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
            output_attentions=True,
        ).attentions
    image_id, latent_id = model.internvl.config.image_token_id, model.config.latent_token_id
    for b, row in enumerate(batch["input_ids"].tolist()):
        for k, p in enumerate(result["positions"][b].tolist()):
            for layer, weights in enumerate(attentions):
                expected = dict.fromkeys(ATTENTION_CATEGORIES, 0.0)
                probs = weights[b, :, p].mean(0)
                for j, token in enumerate(row[: p + 1]):
                    if not batch["attention_mask"][b, j]:
                        continue
                    category = ("self" if j == p else "thoughts" if token == latent_id else "image" if token == image_id
                                else "special" if token in special else "text")
                    expected[category] += float(probs[j])
                got = dict(zip(ATTENTION_CATEGORIES, result["attention"][b, k, layer].tolist()))
                assert got == pytest.approx(expected, abs=1e-6)


def test_attention_needs_eager_and_the_batch_needs_latents(loaded_batch, tiny_checkpoint):
    model, processor, batch = loaded_batch
    special = special_token_ids(processor.tokenizer, model.config)
    sdpa = MMCoconutForConditionalGeneration.from_pretrained(tiny_checkpoint, attn_implementation="sdpa").eval()
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        analyze_batch(sdpa, batch, special)
    no_latents = {**batch, "input_ids": batch["input_ids"].masked_fill(
        batch["input_ids"] == model.config.latent_token_id, processor.tokenizer.pad_token_id)}
    with pytest.raises(ValueError, match="no <\\|latent\\|> tokens"):
        analyze_batch(model, no_latents, special)


def test_top1_in_step_marks_a_thought_that_decodes_to_a_token_of_its_step(tiny_checkpoint, data_file, latent_processor):
    # Thoughts depend on the prompt only, so rewriting the steps keeps every decoding. c_thought is 2: thoughts 1-2
    # replace step 1, thoughts 3-4 step 2, and thoughts 5-6 have no step (the record has two).
    model = load_model(tiny_checkpoint, dtype="float32", device="cpu", attn_implementation="eager")
    record = load_canonical(data_file)[2]  # text-only: the session processor's tiling need not match the checkpoint
    first = analyze(model, latent_processor, [record], num_latents=6, top_k=1)["samples"][0]["thoughts"]
    token = first[0]["top_k"][0]["token"]
    rewritten = {**record, "steps": [f"{token} here", "nothing"]}
    encode = lambda text: latent_processor.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert first[2]["top_k"][0]["token_id"] not in encode("nothing\n")  # so thought 3 is outside its step

    thoughts = analyze(model, latent_processor, [rewritten], num_latents=6, top_k=1)["samples"][0]["thoughts"]
    for new, old in zip(thoughts, first):
        assert new["top_k"][0]["token_id"] == old["top_k"][0]["token_id"]
        assert new["top_k"][0]["prob"] == pytest.approx(old["top_k"][0]["prob"], rel=1e-4)
    assert [t["step"] for t in thoughts] == [f"{token} here"] * 2 + ["nothing"] * 2 + [None] * 2
    assert thoughts[0]["top1_in_step"] is True
    assert thoughts[2]["top1_in_step"] is False
    assert thoughts[4]["top1_in_step"] is None and thoughts[5]["top1_in_step"] is None
