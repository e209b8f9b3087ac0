import logging

import numpy as np
import pytest
import torch
from PIL import Image

from configuration_mmcoconut import END_LATENT_TOKEN, LATENT_TOKEN, START_LATENT_TOKEN
from data_collator import MMCoconutCollator
from mmcoconut.data.aokvqa import load_canonical, load_hf_aokvqa
from mmcoconut.data.curriculum import CurriculumDataset
from mmcoconut.data.images import to_rgb
from mmcoconut.data.synthetic import STEPS_FROM
from mmcoconut.processing import build_internvl_processor, tiny_internvl_config

STEPS = ["Step one.", "Step two.", "Step three."]
PROMPT = "<|im_start|>user\n{image}Q?<|im_end|>\n<|im_start|>assistant\n"
PER_TILE = 4  # tiny_internvl_config: 28-px tiles, 7-px patches, pixel shuffle 0.5


def record(rid="r", steps=STEPS, answer="B. red", image=None, question="Q?"):
    return {"id": rid, "image": image, "question": question, "steps": list(steps), "answer": answer}


def ids(processor, text):
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def latent_span(n):
    return START_LATENT_TOKEN + LATENT_TOKEN * n + END_LATENT_TOKEN


def check_layout(processor, features, hidden_text, target_text):
    """input_ids == hidden + target exactly; labels -100 on hidden, equal to the ids on target."""
    hidden, target = ids(processor, hidden_text), ids(processor, target_text)
    assert features["input_ids"].tolist() == hidden + target
    assert features["labels"].tolist() == [-100] * len(hidden) + target


# mode, stage -> latents, markers, steps kept (c_thought=2, max_latent_stage=2, three steps)
LAYOUTS = [
    ("coconut", 0, 0, True, STEPS),
    ("coconut", 1, 2, True, STEPS[1:]),
    ("coconut", 2, 4, True, STEPS[2:]),
    ("coconut", 3, 4, True, []),  # past max_latent_stage: every step goes, latents stay at the cap
    ("coconut", 7, 4, True, []),
    ("pause", 1, 2, True, STEPS[1:]),
    ("no_thoughts", 0, 0, True, STEPS),
    ("no_thoughts", 1, 0, True, STEPS[1:]),
    ("no_thoughts", 3, 0, True, []),
    ("cot", 0, 0, False, STEPS),
    ("cot", 2, 0, False, STEPS),
    ("no_cot", 0, 0, False, []),
    ("no_cot", 2, 0, False, []),
]


@pytest.mark.parametrize("mode, stage, n_latents, markers, kept", LAYOUTS)
def test_layout_and_labels_per_mode_and_stage(latent_processor, mode, stage, n_latents, markers, kept):
    dataset = CurriculumDataset([record()], latent_processor, mode=mode, c_thought=2, max_latent_stage=2)
    dataset.set_stage(stage)
    features = dataset[0]
    hidden = PROMPT.format(image="") + (latent_span(n_latents) if markers else "")
    target = "".join(f"{step}\n" for step in kept) + "Answer: B. red<|im_end|>"
    check_layout(latent_processor, features, hidden, target)
    assert features["num_tiles"] == 0 and "pixel_values" not in features
    assert dataset.num_latents(0) == n_latents


@pytest.mark.parametrize("pad, expected", [(False, 1), (True, 3)])
def test_stage_beyond_the_steps_and_pad_latent_to_max(latent_processor, pad, expected):
    dataset = CurriculumDataset(
        [record(steps=["Only step."])], latent_processor, c_thought=1, max_latent_stage=3, pad_latent_to_max=pad
    )
    dataset.set_stage(3)
    check_layout(latent_processor, dataset[0], PROMPT.format(image="") + latent_span(expected),
                 "Answer: B. red<|im_end|>")


def test_stage_past_max_latent_stage_removes_every_step(latent_processor):
    # Coconut's final stage: four steps, cap 1 -> one step's worth of latents, no language steps left.
    dataset = CurriculumDataset([record(steps=STEPS + ["Step four."])], latent_processor, c_thought=2,
                                max_latent_stage=1)
    dataset.set_stage(1)
    check_layout(latent_processor, dataset[0], PROMPT.format(image="") + latent_span(2),
                 "Step two.\nStep three.\nStep four.\nAnswer: B. red<|im_end|>")
    dataset.set_stage(2)
    check_layout(latent_processor, dataset[0], PROMPT.format(image="") + latent_span(2), "Answer: B. red<|im_end|>")


def test_uniform_prob_mixes_stages_deterministically(latent_processor):
    records = [record(rid=str(i)) for i in range(40)]
    dataset = CurriculumDataset(records, latent_processor, c_thought=1, max_latent_stage=3, uniform_prob=1.0, seed=1)
    latent_id = dataset.latent_token_id

    def latents():
        return [int((dataset[i]["input_ids"] == latent_id).sum()) for i in range(len(dataset))]

    dataset.set_stage(0, epoch=0)
    first = latents()
    assert set(first) == {0, 1, 2, 3}  # stages drawn from 0..len(steps)
    assert latents() == first
    dataset.set_stage(0, epoch=1)
    assert latents() != first
    never = CurriculumDataset(records, latent_processor, c_thought=1, max_latent_stage=3, uniform_prob=0.0)
    never.set_stage(2)
    assert {int((never[i]["input_ids"] == latent_id).sum()) for i in range(len(never))} == {2}


def test_length_does_not_change_with_stage(latent_processor):
    dataset = CurriculumDataset([record(str(i)) for i in range(3)], latent_processor, max_latent_stage=2)
    lengths = []
    for stage in range(4):
        dataset.set_stage(stage)
        lengths.append(len(dataset))
    assert lengths == [3, 3, 3, 3]


def save_image(path, size=(40, 30), mode="RGB", colour=(200, 10, 10)):
    Image.new(mode, size, colour if mode == "RGB" else 0).save(path)
    return str(path)


@pytest.mark.parametrize("size", [(1, 1), (10000, 10), (10, 10000), (300, 200), (96, 96), (28, 28)])
def test_image_tokens_equal_tiles_times_tokens_per_tile(latent_processor, tmp_path, size):
    path = save_image(tmp_path / "im.png", size=size)
    dataset = CurriculumDataset([record(image=path)], latent_processor, c_thought=1, max_latent_stage=2)
    dataset.set_stage(1)
    features = dataset[0]
    tiles = latent_processor.image_processor.get_number_of_image_patches(size[1], size[0], {})
    assert features["num_tiles"] == tiles
    assert features["pixel_values"].shape == (tiles, 3, 28, 28)
    image_span = "<img>" + "<IMG_CONTEXT>" * (PER_TILE * tiles) + "</img>\n"
    check_layout(latent_processor, features, PROMPT.format(image=image_span) + latent_span(1),
                 "Step two.\nStep three.\nAnswer: B. red<|im_end|>")


def test_aspect_ratios_reach_the_tile_limit(latent_processor, tmp_path):
    wide = save_image(tmp_path / "wide.png", size=(10000, 10))
    dataset = CurriculumDataset([record(image=wide)], latent_processor, max_tiles=3)
    assert dataset[0]["num_tiles"] == 4  # 3 tiles + thumbnail
    assert CurriculumDataset([record(image=wide)], latent_processor)[0]["num_tiles"] == 9


@pytest.mark.parametrize("mode, save_as", [
    ("L", "png"), ("P", "png"), ("RGBA", "png"), ("LA", "png"), ("1", "png"), ("CMYK", "jpg"), ("I;16", "png"),
])
def test_image_modes_become_rgb_tiles(latent_processor, tmp_path, mode, save_as):
    path = tmp_path / f"im.{save_as}"
    Image.new(mode, (50, 20)).save(path)
    features = CurriculumDataset([record(image=str(path))], latent_processor)[0]
    assert features["pixel_values"].shape[1:] == (3, 28, 28)
    assert torch.isfinite(features["pixel_values"]).all()


def test_to_rgb_scales_sixteen_bit_and_whitens_transparency():
    sixteen = Image.fromarray(np.array([[0, 65535], [257 * 100, 30000]], dtype=np.uint16))
    assert sixteen.mode == "I;16"
    assert np.asarray(to_rgb(sixteen))[..., 0].tolist() == [[0, 255], [100, 117]]
    clear = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    assert np.asarray(to_rgb(clear)).tolist() == [[[255, 255, 255]] * 2] * 2
    rgb = Image.new("RGB", (1, 1))
    assert to_rgb(rgb) is rgb
    with pytest.raises(ValueError, match="mode 'F'"):
        to_rgb(Image.new("F", (1, 1)))


def test_in_memory_pil_images_stay_usable(latent_processor):
    image = Image.new("RGB", (30, 30), (1, 2, 3))
    dataset = CurriculumDataset([record(image=image)], latent_processor)
    first, second = dataset[0], dataset[0]
    assert torch.equal(first["pixel_values"], second["pixel_values"])
    assert image.getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.parametrize("bad", ["missing", "unreadable"])
def test_bad_image_raises_with_record_and_path(latent_processor, tmp_path, bad):
    path = tmp_path / "bad.jpg"
    if bad == "unreadable":
        path.write_bytes(b"not an image")
    records = [record("good", image=save_image(tmp_path / "ok.png")), record("broken", image=str(path))]
    with pytest.raises(ValueError, match=r"record 'broken': cannot read image .*bad\.jpg"):
        CurriculumDataset(records, latent_processor)


def test_bad_image_skipped_counted_and_logged_once(latent_processor, tmp_path, caplog):
    records = [
        record("good", image=save_image(tmp_path / "ok.png")),
        record("gone", image=str(tmp_path / "gone.jpg")),
        record("text"),
    ]
    with caplog.at_level(logging.INFO, logger="mmcoconut.data.curriculum"):
        dataset = CurriculumDataset(records, latent_processor, skip_bad_samples=True)
    assert len(dataset) == 2 and dataset.skipped == {"bad_image": 1}
    assert [dataset.reference(i)["id"] for i in range(2)] == ["good", "text"]
    messages = [r.getMessage() for r in caplog.records if r.name == "mmcoconut.data.curriculum"]
    assert any("'gone'" in m and "gone.jpg" in m for m in messages)
    assert sum("kept 2 of 3 records" in m and "bad_image: 1" in m for m in messages) == 1


def test_image_that_breaks_after_the_build_raises(latent_processor, tmp_path):
    path = tmp_path / "late.png"
    save_image(path)
    dataset = CurriculumDataset([record("late", image=str(path))], latent_processor, skip_bad_samples=True)
    path.unlink()
    with pytest.raises(ValueError, match="record 'late': cannot read image"):
        dataset[0]


def test_too_long_is_skipped_never_truncated(latent_processor, caplog):
    short, long = record("short", steps=["A."]), record("long", steps=["word " * 60])
    full = CurriculumDataset([short, long], latent_processor, mode="cot")
    limit = len(full[0]["input_ids"])
    with caplog.at_level(logging.INFO, logger="mmcoconut.data.curriculum"):
        dataset = CurriculumDataset([short, long], latent_processor, mode="cot", max_length=limit)
    assert len(dataset) == 1 and dataset.skipped == {"too_long": 1}
    assert dataset[0]["input_ids"].tolist() == full[0]["input_ids"].tolist()
    assert any("too_long: 1" in r.getMessage() for r in caplog.records)


def test_max_length_covers_every_stage(latent_processor):
    # With many thoughts per step the last stage is the longest: the record must go even at stage 0.
    sample = record(steps=["A.", "B."])
    longest = CurriculumDataset([sample], latent_processor, c_thought=30, max_latent_stage=2)
    longest.set_stage(3)
    limit = len(longest[0]["input_ids"])
    assert len(CurriculumDataset([sample], latent_processor, c_thought=30, max_latent_stage=2, max_length=limit)) == 1
    with pytest.raises(ValueError, match=rf"too_long: 1 \('r'\)\); the shortest one needs max_length >= {limit} "):
        CurriculumDataset([sample], latent_processor, c_thought=30, max_latent_stage=2, max_length=limit - 1)


@pytest.mark.parametrize("field, text", [
    ("question", "Look at <IMG_CONTEXT> here"),
    ("question", "an <img> tag"),
    ("steps", [f"think {LATENT_TOKEN}"]),
    ("answer", f"A. {END_LATENT_TOKEN}"),
])
def test_special_tokens_in_text_are_an_error(latent_processor, field, text):
    with pytest.raises(ValueError, match="record 'r': question, steps or answer contain"):
        CurriculumDataset([{**record(), field: text}], latent_processor)


def test_tokenizer_without_latent_tokens_is_an_error(internvl_tokenizer):
    processor = build_internvl_processor(tiny_internvl_config(), internvl_tokenizer)
    with pytest.raises(ValueError, match="add the latent tokens"):
        CurriculumDataset([record()], processor)


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "latent"}, "mode must be one of"),
    ({"c_thought": 0}, "c_thought"),
    ({"uniform_prob": 1.5}, "uniform_prob"),
    ({"max_tiles": 0}, "max_tiles"),
])
def test_bad_settings(latent_processor, kwargs, match):
    with pytest.raises(ValueError, match=match):
        CurriculumDataset([record()], latent_processor, **kwargs)


def test_bad_records(latent_processor):
    with pytest.raises(ValueError, match="position 0 has no 'id'"):
        CurriculumDataset([{"question": "q", "steps": [], "answer": "a"}], latent_processor)
    with pytest.raises(ValueError, match="record 'r': 'steps' must be a list of strings"):
        CurriculumDataset([{**record(), "steps": "one"}], latent_processor)


def test_unlabeled_records_can_be_prompted_not_trained(latent_processor):
    dataset = CurriculumDataset([record(answer=None)], latent_processor, max_latent_stage=2)
    with pytest.raises(ValueError, match="record 'r' has no answer"):
        dataset[0]
    dataset.set_stage(1)
    assert dataset.prompt_features(0)["input_ids"].tolist() == ids(
        latent_processor, PROMPT.format(image="") + latent_span(1))


def test_prompt_features_and_references(latent_processor, synthetic_aokvqa):
    records = load_canonical(synthetic_aokvqa["canonical_dir"] / "val.jsonl")
    dataset = CurriculumDataset(records, latent_processor, c_thought=2, max_latent_stage=2)
    dataset.set_stage(2)
    prompt = dataset.prompt_features(0)
    training = dataset[0]
    hidden = (training["labels"] == -100).sum()
    assert prompt["input_ids"].tolist() == training["input_ids"][:hidden].tolist()
    assert prompt["input_ids"][-6:].tolist() == ids(latent_processor, latent_span(4))
    assert torch.equal(prompt["pixel_values"], training["pixel_values"]) and prompt["id"] == records[0]["id"]
    assert "labels" not in prompt
    assert dataset.prompt_features(0, num_latents=1)["input_ids"][-3:].tolist() == ids(latent_processor, latent_span(1))
    reference = dataset.reference(0)
    assert reference == {k: records[0][k] for k in (
        "id", "answer", "choices", "correct_choice_idx", "direct_answers", "difficult_direct_answer")}

    cot = CurriculumDataset(records, latent_processor, mode="cot")
    assert cot.prompt_features(0)["input_ids"][-3:].tolist() == ids(latent_processor, "<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="no latent span"):
        cot.prompt_features(0, num_latents=2)

    batch = MMCoconutCollator(latent_processor.tokenizer.pad_token_id, dataset.latent_token_id, pad_to="end")(
        [dataset.prompt_dataset()[i] for i in range(len(dataset))])
    assert batch["ids"] == [r["id"] for r in records]
    assert (batch["input_ids"][:, -1] == dataset.end_latent_id).all()


def test_hub_dataset_records_give_the_same_features(latent_processor, synthetic_aokvqa):
    from_files = load_canonical(synthetic_aokvqa["canonical_dir"] / "train.jsonl")
    from_hub = load_hf_aokvqa("train", synthetic_aokvqa["hf_dir"], steps_from=STEPS_FROM)
    a = CurriculumDataset(from_files, latent_processor, c_thought=1, max_latent_stage=3)
    b = CurriculumDataset(from_hub, latent_processor, c_thought=1, max_latent_stage=3)
    assert len(a) == len(b) == len(from_files)
    for stage in (0, 2):
        a.set_stage(stage)
        b.set_stage(stage)
        for i in range(len(a)):
            fa, fb = a[i], b[i]
            assert fa.keys() == fb.keys()
            for key in fa:
                assert torch.equal(torch.as_tensor(fa[key]), torch.as_tensor(fb[key])), key


def test_dataloader_workers_tile_on_the_fly(latent_processor, synthetic_aokvqa):
    records = load_canonical(synthetic_aokvqa["canonical_dir"] / "train.jsonl")
    dataset = CurriculumDataset(records, latent_processor, c_thought=1, max_latent_stage=3)
    dataset.set_stage(1)
    collator = MMCoconutCollator(latent_processor.tokenizer.pad_token_id, dataset.latent_token_id)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=collator)
    batches = list(loader)
    expected = collator([dataset[i] for i in range(3)])
    for key in expected:
        assert torch.equal(batches[0][key], expected[key]), key
    for batch in batches:
        image_tokens = (batch["input_ids"] == latent_processor.tokenizer.context_image_token_id).sum()
        assert image_tokens == batch["pixel_values"].shape[0] * PER_TILE == batch["num_tiles"].sum() * PER_TILE
        latent_cols = (batch["input_ids"] == dataset.latent_token_id).float().argmax(dim=1)
        assert (latent_cols == latent_cols[0]).all()


# ---- step-level supervision of the thoughts (issue 27) ----


@pytest.mark.parametrize("stage, pad, expected_steps", [
    (0, False, []),
    (1, False, [0, 0]),                 # c_thought 2: both latents of step 1 decode it
    (2, False, [0, 0, 1, 1]),
    (3, False, [0, 0, 1, 1]),           # past max_latent_stage: every step removed, latents capped at 2 steps' worth
    (2, True, [0, 0, 1, 1]),
])
def test_thought_labels_hold_the_step_each_latent_replaced(latent_processor, stage, pad, expected_steps):
    dataset = CurriculumDataset([record()], latent_processor, c_thought=2, max_latent_stage=2,
                                pad_latent_to_max=pad, thought_supervision=True)
    dataset.set_stage(stage)
    features = dataset[0]
    step_ids = [ids(latent_processor, f"{step}\n") for step in STEPS]
    rows = [[t for t in row if t != -100] for row in features["thought_labels"].tolist()]
    assert rows == [step_ids[k] for k in expected_steps]
    assert int((features["input_ids"] == dataset.latent_token_id).sum()) == len(rows)


def test_thought_labels_of_padded_latents_are_empty(latent_processor):
    dataset = CurriculumDataset([record(steps=["Only step."])], latent_processor, c_thought=1, max_latent_stage=3,
                                pad_latent_to_max=True, thought_supervision=True)
    dataset.set_stage(3)
    rows = dataset[0]["thought_labels"].tolist()
    assert len(rows) == 3 and rows[0][: len(ids(latent_processor, "Only step.\n"))] == ids(latent_processor, "Only step.\n")
    assert all(t == -100 for row in rows[1:] for t in row)


def test_thought_labels_reach_the_batch(latent_processor):
    dataset = CurriculumDataset([record(), record(rid="s", steps=["A.", "B."])], latent_processor, c_thought=1,
                                max_latent_stage=2, thought_supervision=True)
    dataset.set_stage(2)
    collator = MMCoconutCollator(latent_processor.tokenizer.pad_token_id, dataset.latent_token_id)
    batch = collator([dataset[0], dataset[1]])
    assert batch["thought_labels"].shape[:2] == (2, 2)
    for i in range(2):
        row = dataset[i]["thought_labels"]
        assert torch.equal(batch["thought_labels"][i, :, : row.shape[1]], row)
        assert (batch["thought_labels"][i, :, row.shape[1]:] == -100).all()


@pytest.mark.parametrize("mode", ["cot", "pause", "no_thoughts", "no_cot"])
def test_thought_supervision_needs_continuous_thoughts(latent_processor, mode):
    with pytest.raises(ValueError, match="has none"):
        CurriculumDataset([record()], latent_processor, mode=mode, thought_supervision=True)
