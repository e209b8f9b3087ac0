"""One image + question → answer: pipeline, apply_chat_template + generate and predict.py agree; thoughts; LoRA;
quantization; checkpoints written by train.py carry what inference needs."""

import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmcoconut.analysis.attention import analyze
from mmcoconut.inference.loading import load, quantization_config
from mmcoconut.inference.prediction import format_prediction, predict
from mmcoconut.processing import load_internvl_processor
from mmcoconut.text.prompt import messages_for
from modeling_mmcoconut import MMCoconutForConditionalGeneration, MMCoconutGenerateOutput
from tests.test_hub_checkpoint import without_the_project

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What colour is the left square?"


def _run_predict(*args):
    result = subprocess.run(
        [sys.executable, "-m", "mmcoconut.cli.predict", *map(str, args)], capture_output=True, text=True, timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _generate_by_hand(checkpoint, image, question):
    """The documented path: AutoProcessor's chat template + the model's generate with its saved budget."""
    model = MMCoconutForConditionalGeneration.from_pretrained(checkpoint).eval()
    processor = load_internvl_processor(checkpoint)
    inputs = processor.apply_chat_template(messages_for(question, image), add_generation_prompt=True,
                                           tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs)
    return output[0, inputs["input_ids"].shape[1] :].tolist(), processor.tokenizer


def test_pipeline_chat_template_and_predict_give_the_same_answer(inference_checkpoint, question_image):
    from transformers import pipeline

    image = Image.open(question_image).convert("RGB")
    new_ids, tokenizer = _generate_by_hand(inference_checkpoint, image, QUESTION)
    by_hand = tokenizer.decode(new_ids, skip_special_tokens=True)

    pipe = pipeline("image-text-to-text", model=str(inference_checkpoint), trust_remote_code=True)
    answer = pipe(text=messages_for(QUESTION, image), return_full_text=False)
    assert answer[0]["generated_text"] == by_hand

    model, processor = load(inference_checkpoint)
    prediction = predict(model, processor, question_image, QUESTION)
    assert tokenizer.decode(tokenizer(prediction.generated_text, add_special_tokens=False)["input_ids"],
                            skip_special_tokens=True) == by_hand
    assert prediction.num_latents == 2  # latent_stage 1 × c_thought 2

    cli = json.loads(_run_predict("--model", inference_checkpoint, "--image", question_image,
                                  "--question", QUESTION, "--json").strip().splitlines()[-1])
    assert cli["generated_text"] == prediction.generated_text and cli["num_latents"] == 2


def test_auto_classes_and_pipeline_as_remote_code_without_the_project(inference_checkpoint, question_image, tmp_path):
    new_ids, _ = _generate_by_hand(inference_checkpoint, Image.open(question_image).convert("RGB"), QUESTION)
    blocked = ["prompt_format", "predict", "analyze_latents", "aokvqa_evaluation"]
    script = without_the_project(blocked) + textwrap.dedent(f"""
        import torch
        from PIL import Image
        from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline
        path = {str(inference_checkpoint)!r}
        model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        processor = AutoProcessor.from_pretrained(path)
        image = Image.open({str(question_image)!r}).convert("RGB")
        messages = [{{"role": "user", "content": [{{"type": "image", "image": image}},
                                                  {{"type": "text", "text": {QUESTION!r}}}]}}]
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs)[0, inputs["input_ids"].shape[1]:].tolist()
        pipe = pipeline("image-text-to-text", model=path, trust_remote_code=True)
        text = pipe(text=messages, return_full_text=False)[0]["generated_text"]
        assert text == processor.tokenizer.decode(ids, skip_special_tokens=True), (text, ids)
        # A plain prompt is refused with the chat form; a prompt the chat template made runs as the chat does.
        assert type(pipe).__name__ == "MMCoconutImageTextToTextPipeline", type(pipe)
        try:
            pipe(images=image, text={QUESTION!r})
        except ValueError as error:
            assert 'pipe(text=[{{"role": "user", "content"' in str(error), error
        else:
            raise AssertionError("the pipeline answered a plain prompt")
        prompt = processor.apply_chat_template(
            [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": {QUESTION!r}}}]}}],
            add_generation_prompt=True)
        assert pipe(images=image, text=prompt, return_full_text=False)[0]["generated_text"] == text
        assert not any(name in sys.modules for name in BLOCKED)
        print("IDS", ids)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"IDS {new_ids}" in result.stdout


def _fake_generate(model, tokenizer, completion):
    """Make `model.generate` append `completion` (a random tiny model never writes an answer line)."""
    ids = tokenizer(completion, add_special_tokens=False)["input_ids"]

    def generate(input_ids, return_dict_in_generate=False, **kwargs):
        sequences = torch.cat([input_ids, torch.tensor([ids])], dim=1)
        if not return_dict_in_generate:
            return sequences
        num_thoughts = (input_ids == model.config.latent_token_id).sum(-1)  # a fixed prompt's latents
        return MMCoconutGenerateOutput(sequences=sequences, num_thoughts=num_thoughts)

    model.generate = generate


def test_answer_is_letter_and_text_with_choices_and_free_text_without(inference_checkpoint, question_image):
    model, processor = load(inference_checkpoint)
    _fake_generate(model, processor.tokenizer, "<|end-latent|>Answer: B. blue<|im_end|>")
    with_choices = predict(model, processor, question_image, QUESTION, choices=["red", "blue", "green"])
    assert with_choices.question == f"{QUESTION}\nA. red\nB. blue\nC. green"
    assert (with_choices.answer, with_choices.letter) == ("B. blue", "B")
    free = predict(model, processor, question_image, QUESTION)
    assert (free.answer, free.letter, free.parse_error) == ("B. blue", None, None)
    _fake_generate(model, processor.tokenizer, "blue<|im_end|>")
    unparseable = predict(model, processor, question_image, QUESTION)
    assert unparseable.answer is None and "no 'Answer:'" in unparseable.parse_error
    assert "unparseable" in format_prediction(unparseable)
    with pytest.raises(ValueError, match="at most 4 choices"):
        predict(model, processor, question_image, QUESTION, choices=list("abcde"))


def test_show_thoughts_is_analyze_latents_on_the_same_prompt(inference_checkpoint, question_image):
    model, processor = load(inference_checkpoint, attn_implementation="eager")
    prediction = predict(model, processor, question_image, QUESTION, show_thoughts=True, top_k=3)
    record = {"id": "q", "image": str(question_image), "question": QUESTION, "steps": [], "answer": None}
    reference = analyze(model, processor, [record], top_k=3)["samples"][0]["thoughts"]
    assert len(prediction.thoughts) == 2
    for ours, theirs in zip(prediction.thoughts, reference):
        assert [d["token_id"] for d in ours["top_k"]] == [d["token_id"] for d in theirs["top_k"]]
        assert ours["attention"]["mean"] == pytest.approx(theirs["attention"]["mean"], abs=1e-6)
    # 56×28 at ≤4 tiles of 28 px: 2 tiles + thumbnail, 4 image tokens each (a 2×2 grid per tile).
    assert prediction.image_attention.shape == (2, 3, 2, 2)
    image_share = torch.tensor([t["attention"]["mean"]["image"] for t in prediction.thoughts])
    torch.testing.assert_close(prediction.image_attention.sum((1, 2, 3)), image_share, atol=1e-5, rtol=1e-5)
    out = _run_predict("--model", inference_checkpoint, "--image", question_image, "--question", QUESTION,
                       "--show-thoughts", "--top-k", "3")
    assert "thought 1:" in out and "thought 2:" in out and "attention: image" in out


def test_num_latents_option(inference_checkpoint, question_image):
    model, processor = load(inference_checkpoint)
    assert predict(model, processor, question_image, QUESTION, num_latents=5).num_latents == 5
    assert predict(model, processor, None, QUESTION, num_latents=0).num_latents == 0
    with pytest.raises(ValueError, match="no <\\|latent\\|> tokens"):
        predict(model, processor, question_image, QUESTION, num_latents=0, show_thoughts=True)


# ---- a checkpoint trained to stop thinking (supervise_end_latent) ----


@pytest.fixture(scope="module")
def adaptive_checkpoint(inference_checkpoint, tmp_path_factory):
    """`inference_checkpoint` marked as trained with `supervise_end_latent` (adaptive thinking, at most 2 thoughts),
    with the chat template `train.py` gives such a checkpoint."""
    from mmcoconut.processing import prepare_for_inference

    path = tmp_path_factory.mktemp("adaptive_checkpoint") / "ckpt"
    shutil.copytree(inference_checkpoint, path)
    model = MMCoconutForConditionalGeneration.from_pretrained(path)
    model.config.supervise_end_latent = True
    processor = load_internvl_processor(path)
    prepare_for_inference(model.config, model.generation_config, processor, max_new_tokens=8)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _evaluate_one(checkpoint, image, **options):
    """The sample `aokvqa_evaluation` writes for one question (its own prompt layout and generate call)."""
    from mmcoconut.evaluation.aokvqa import build_eval_dataset, generate_answers

    model = MMCoconutForConditionalGeneration.from_pretrained(checkpoint)
    processor = load_internvl_processor(checkpoint)
    record = {"id": "q", "image": str(image), "question": QUESTION, "choices": ["red", "blue", "green", "white"],
              "correct_choice_idx": 0, "answer": "A. red", "steps": []}
    thinking = "fixed" if "num_latents" in options else None
    dataset = build_eval_dataset([record], processor, "coconut", model.config, thinking=thinking)
    with torch.no_grad():
        return generate_answers(model, dataset, thinking=thinking, max_new_tokens=8, show_progress=False, **options)[0]


def test_an_adaptive_checkpoint_answers_from_its_chat_template(adaptive_checkpoint, question_image):
    """The saved template ends the prompt with <|start-latent|> (the evaluation's adaptive prompt), and
    predict, the pipeline, apply_chat_template + generate and the evaluation give the same answer and thoughts."""
    from transformers import pipeline

    image = Image.open(question_image).convert("RGB")
    processor = load_internvl_processor(adaptive_checkpoint)
    inputs = processor.apply_chat_template(messages_for(QUESTION, image), add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    evaluation = _evaluate_one(adaptive_checkpoint, question_image)
    assert processor.tokenizer.decode(inputs["input_ids"][0, -1:]) == "<|start-latent|>"

    model, processor = load(adaptive_checkpoint)
    prediction = predict(model, processor, question_image, QUESTION)
    assert prediction.adaptive and prediction.num_latents == evaluation["thoughts"]
    assert prediction.generated_text == evaluation["generated_text"]

    new_ids, tokenizer = _generate_by_hand(adaptive_checkpoint, image, QUESTION)
    pipe = pipeline("image-text-to-text", model=str(adaptive_checkpoint), trust_remote_code=True)
    answer = pipe(text=messages_for(QUESTION, image), return_full_text=False)
    assert answer[0]["generated_text"] == tokenizer.decode(new_ids, skip_special_tokens=True)
    assert tokenizer.decode(new_ids[new_ids.index(model.config.end_latent_id) + 1 :], skip_special_tokens=True) == \
        tokenizer.decode(tokenizer(prediction.generated_text, add_special_tokens=False)["input_ids"],
                         skip_special_tokens=True)


def test_a_forced_count_on_an_adaptive_checkpoint_is_a_fixed_prompt(adaptive_checkpoint, question_image):
    model, processor = load(adaptive_checkpoint, attn_implementation="eager")
    forced = predict(model, processor, question_image, QUESTION, num_latents=3)
    assert not forced.adaptive and forced.num_latents == 3
    assert forced.generated_text == _evaluate_one(adaptive_checkpoint, question_image, num_latents=3)["generated_text"]
    assert "latents: 3\n" in format_prediction(forced) + "\n"

    # The thoughts shown for adaptive thinking are those of the closed span with as many latents.
    chosen = predict(model, processor, question_image, QUESTION, show_thoughts=True, top_k=3)
    assert chosen.adaptive and len(chosen.thoughts) == chosen.num_latents >= 1
    record = {"id": "q", "image": str(question_image), "question": QUESTION, "steps": [], "answer": None}
    reference = analyze(model, processor, [record], num_latents=chosen.num_latents, top_k=3)["samples"][0]["thoughts"]
    assert [[d["token_id"] for d in t["top_k"]] for t in chosen.thoughts] == \
        [[d["token_id"] for d in t["top_k"]] for t in reference]
    assert "(adaptive: the model stopped thinking there)" in format_prediction(chosen)


# ---- checkpoints from train.py: full and LoRA ----


@pytest.fixture(scope="module")
def lora_run(inference_checkpoint, tmp_path_factory):
    """A few LoRA steps of the demo recipe from `inference_checkpoint` (the base the adapters name)."""
    from mmcoconut.cli.train import main as train_main

    tmp = tmp_path_factory.mktemp("lora_run")
    out = tmp / "run"
    train_main([
        "recipes/tiny.yaml", "--load_model_path", str(inference_checkpoint), "--use_lora", "true",
        "--output_dir", str(out), "--synthetic_dir", str(tmp / "data"), "--synthetic_train", "4",
        "--synthetic_val", "2", "--max_steps", "2", "--per_device_train_batch_size", "2", "--epochs_per_stage", "1",
        "--eval_strategy", "no", "--save_strategy", "no", "--eval_accuracy", "false", "--eval_max_new_tokens", "6",
        "--first_stage", "1",
    ])
    return out, tmp / "data" / "canonical" / "val.jsonl"


def test_train_saves_chat_template_and_budget(lora_run):
    out, _ = lora_run
    processor = load_internvl_processor(out)
    assert "<|start-latent|>" in processor.chat_template
    merged = MMCoconutForConditionalGeneration.from_pretrained(out / "merged")
    assert merged.generation_config.max_new_tokens == 8  # the base's budget is kept (a fresh model gets the eval one)
    from mmcoconut.training.recipe import read_recipe

    recipe_tiles = read_recipe("recipes/tiny.yaml")["max_tiles"]
    assert load_internvl_processor(out / "merged").image_processor.max_patches == recipe_tiles  # not the base's


def test_predict_on_a_lora_adapter_directory_equals_the_merged_model(lora_run):
    out, val = lora_run
    record = json.loads(val.read_text().splitlines()[0])
    image = val.parent / record["image"]
    args = ("--image", image, "--question", record["question"], "--choices", *record["choices"], "--json")
    adapters = json.loads(_run_predict("--model", out, *args).strip().splitlines()[-1])
    merged = json.loads(_run_predict("--model", out / "merged", *args).strip().splitlines()[-1])
    assert adapters == merged
    assert adapters["num_latents"] == 1  # the run's config (stage 1, c_thought 1), not the base's (c_thought 2)


def test_evaluate_runs_on_a_lora_adapter_directory(lora_run, tmp_path):
    from mmcoconut.cli import evaluate as evaluate_aokvqa

    out, val = lora_run
    runs = {}
    for name, model in (("adapters", out), ("merged", out / "merged")):
        evaluate_aokvqa.main(["--model", str(model), "--data-file", str(val), "--max-new-tokens", "3",
                              "--output-dir", str(tmp_path / name)])
        runs[name] = (tmp_path / name / "samples_val.jsonl").read_text()
    assert runs["adapters"] == runs["merged"]


def test_missing_lora_base_fails_fast_naming_it(lora_run, tmp_path, monkeypatch):
    from huggingface_hub import constants

    out, _ = lora_run
    adapters = tmp_path / "adapters"
    shutil.copytree(out, adapters, ignore=shutil.ignore_patterns("merged"))
    config = json.loads((adapters / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "nobody/missing-base"
    (adapters / "adapter_config.json").write_text(json.dumps(config))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match="'nobody/missing-base'.*HF_HUB_OFFLINE.*needs the Hub .* local copy"):
        load(adapters)
    assert time.monotonic() - start < 10


# ---- quantization ----


def test_torchao_int8_weight_only_runs_on_cpu(inference_checkpoint, question_image):
    pytest.importorskip("torchao")
    model, processor = load(inference_checkpoint, quantization="torchao-int8", device="cpu")
    weight = model.internvl.model.language_model.layers[0].mlp.up_proj.weight
    assert "int8" in type(weight).__name__.lower() or "Affine" in type(weight).__name__, type(weight)
    prediction = predict(model, processor, question_image, QUESTION)
    assert prediction.num_latents == 2 and isinstance(prediction.generated_text, str)


def test_a_missing_torchao_names_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # importlib.util.find_spec then finds nothing
    with pytest.raises(ImportError, match=r"--quantization torchao-int8 needs torchao.*pip install 'mmcoconut\[quantization\]'"):
        quantization_config("torchao-int8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
@pytest.mark.parametrize("name", ["bnb-8bit", "bnb-4bit"])
def test_bitsandbytes_is_refused_without_cuda(name):
    with pytest.raises(ValueError, match="needs a CUDA GPU.*torchao-int8"):
        quantization_config(name)


# ---- evaluation: questions without choices, the saved tiling ----


def test_evaluation_refuses_records_without_choices_before_generating(inference_checkpoint, question_image):
    from mmcoconut.evaluation.aokvqa import build_eval_dataset, generate_answers

    model = MMCoconutForConditionalGeneration.from_pretrained(inference_checkpoint)
    processor = load_internvl_processor(inference_checkpoint)
    records = [{"id": "mine", "image": str(question_image), "question": QUESTION, "steps": [], "answer": None}]
    dataset = build_eval_dataset(records, processor, "coconut", model.config)
    model.generate = lambda **kwargs: pytest.fail("generated before checking for choices")
    with pytest.raises(ValueError, match=r"1 record\(s\) have no 'choices' \(first: 'mine'\).*predict\.py"):
        generate_answers(model, dataset, show_progress=False)


def test_evaluate_cli_keeps_the_checkpoint_tiling_by_default(inference_checkpoint, question_image, tmp_path):
    """The checkpoint allows 4 tiles: a 224×112 image is 2 tiles + thumbnail = 12 image tokens (the old default of
    8 tiles made it 4×2 + thumbnail = 36)."""
    from mmcoconut.cli import evaluate as evaluate_aokvqa

    image = tmp_path / "wide.png"
    Image.open(question_image).resize((224, 112)).save(image)
    data = tmp_path / "records.jsonl"
    data.write_text(json.dumps({"id": "q", "image": str(image), "question": QUESTION, "steps": [],
                                "answer": "A. red", "choices": ["red", "blue", "green", "yellow"], "correct_choice_idx": 0,
                                "direct_answers": ["red"]}) + "\n")
    evaluate_aokvqa.main(["--model", str(inference_checkpoint), "--data-file", str(data), "--max-new-tokens", "2",
                          "--output-dir", str(tmp_path / "eval")])
    sample = json.loads((tmp_path / "eval" / "samples_val.jsonl").read_text())
    assert "<IMG_CONTEXT>×12" in sample["prompt"]


def test_a_pause_checkpoint_reports_its_prompt_latents(inference_checkpoint, question_image):
    # generate counts no thoughts for pause tokens (they are tokens, not thoughts); predict still reports the span.
    model, processor = load(inference_checkpoint)
    model.config.training_mode = "pause"  # pause_as_thought follows
    prediction = predict(model, processor, question_image, QUESTION)
    assert prediction.num_latents == 2 and not prediction.adaptive
