"""Nothing silently wrong: every bad input is a clear error naming what is wrong, or a counted skip naming the record.
README's "Bad input" table lists these cases."""

import io
import json
import logging
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmcoconut.cli import analyze as analyze_cli
from mmcoconut.cli import evaluate as evaluate_aokvqa
from mmcoconut.cli.train import main as train_main
from mmcoconut.data.aokvqa import load_canonical
from mmcoconut.data.curriculum import CurriculumDataset
from mmcoconut.evaluation.aokvqa import format_summary
from mmcoconut.processing import check_checkpoint_dir, load_internvl_processor
from mmcoconut.training.recipe import parse_args

DEMO = str(Path("recipes/tiny.yaml").resolve())
CHOICES = ["green", "red", "blue", "yellow"]


def record(rid, image=None, steps=("One.", "Two."), answer="B. red", **extra):
    return {"id": rid, "image": image, "question": "Q?", "steps": list(steps), "answer": answer, **extra}


def photo(path, size=(64, 48)):
    pixels = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


def truncated_jpeg(path):
    """A JPEG cut in half: its header reads fine, decoding fails."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return str(path)


def bomb_png(path):
    """A 20000x20000 PNG (one row of data; PIL refuses it from the header, before decoding)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 20001))
                     + chunk(b"IEND", b""))
    return str(path)


# ---- images ----


def test_truncated_jpeg_is_skipped_at_build_when_skipping(latent_processor, tmp_path, caplog):
    records = [record("good", photo(tmp_path / "ok.png")), record("cut", truncated_jpeg(tmp_path / "cut.jpg"))]
    with caplog.at_level(logging.WARNING, logger="mmcoconut.data.curriculum"):
        dataset = CurriculumDataset(records, latent_processor, skip_bad_samples=True)
    assert len(dataset) == 1 and dataset.skipped == {"bad_image": 1} and dataset.skipped_ids == {"bad_image": ["cut"]}
    messages = [r.getMessage() for r in caplog.records]
    assert any("record 'cut'" in m and "cut.jpg" in m and "truncated" in m for m in messages)
    assert any("kept 1 of 2 records, skipped bad_image: 1 ('cut')" in m for m in messages)
    assert dataset[0]["pixel_values"].shape[0] > 0  # the kept one still loads


@pytest.mark.parametrize("num_workers", [0, 2])
def test_truncated_jpeg_is_an_error_naming_record_and_file_without_skipping(latent_processor, tmp_path, num_workers):
    records = [record("good", photo(tmp_path / "ok.png")), record("cut", truncated_jpeg(tmp_path / "cut.jpg"))]
    dataset = CurriculumDataset(records, latent_processor)  # only headers are read at build
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=num_workers, collate_fn=lambda x: x)
    with pytest.raises(ValueError, match=r"record 'cut': cannot read image .*cut\.jpg: image file is truncated"):
        list(loader)


def test_image_broken_after_build_names_record_in_dataloader_workers(latent_processor, tmp_path):
    path = tmp_path / "late.jpg"
    photo(path)
    dataset = CurriculumDataset([record("late", str(path))], latent_processor, skip_bad_samples=True)
    truncated_jpeg(path)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=2, collate_fn=lambda x: x)
    with pytest.raises(ValueError, match=r"record 'late': cannot read image .*late\.jpg"):
        list(loader)


@pytest.mark.parametrize("skip", [False, True])
def test_decompression_bomb_names_record_and_file(latent_processor, tmp_path, skip):
    records = [record("good", photo(tmp_path / "ok.png")), record("huge", bomb_png(tmp_path / "huge.png"))]
    if not skip:
        with pytest.raises(ValueError, match=r"record 'huge': cannot read image .*huge\.png: Image size \(400000000"):
            CurriculumDataset(records, latent_processor)
        return
    dataset = CurriculumDataset(records, latent_processor, skip_bad_samples=True)
    assert dataset.skipped_ids == {"bad_image": ["huge"]} and len(dataset) == 1


def test_bad_image_skip_reaches_the_printed_evaluation_table(tiny_checkpoint, synthetic_aokvqa, tmp_path, capsys):
    records = load_canonical(synthetic_aokvqa["canonical_dir"] / "val.jsonl")
    records[1]["image"] = truncated_jpeg(tmp_path / "cut.jpg")
    data_file = tmp_path / "val.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "eval"
    metrics = evaluate_aokvqa.main([
        "--model", str(tiny_checkpoint), "--data-file", str(data_file), "--split", "val", "--mode", "coconut",
        "--max-new-tokens", "2", "--max-tiles", "4", "--output-dir", str(out), "--skip-bad-samples",
    ])
    assert metrics["num_samples"] == 2 and metrics["num_skipped"] == 1
    assert metrics["skipped_ids"] == {"bad_image": [records[1]["id"]]}
    table = capsys.readouterr().out
    assert any(line.startswith("| questions skipped") and "1 (bad_image 1)" in line for line in table.splitlines())
    assert json.loads((out / "metrics_val.json").read_text())["skipped"] == {"bad_image": 1}


def test_summary_table_shows_no_skips_as_zero():
    table = format_summary({"num_samples": 3, "num_skipped": 0})
    assert re.search(r"^\| questions skipped +\| +0 \|$", table, re.MULTILINE), table


# ---- canonical records ----


def _load(tmp_path, *records):
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return load_canonical(path)


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"answer": "C. blue"}, r"'answer' 'C. blue' does not name choices\[correct_choice_idx\] = B. 'red'"),
        ({"answer": "purple"}, r"'answer' 'purple' does not name .*matches no single choice"),
        ({"choices": CHOICES[:3]}, "'choices' must hold exactly 4 choices, got 3"),
        ({"choices": CHOICES + ["pink"]}, "'choices' must hold exactly 4 choices, got 5"),
        ({"choices": "green red"}, "'choices' must be a list of strings"),
        ({"correct_choice_idx": 4}, r"'correct_choice_idx' must be an integer in 0..3, got 4"),
        ({"correct_choice_idx": -1}, r"'correct_choice_idx' must be an integer in 0..3, got -1"),
        ({"correct_choice_idx": True}, r"'correct_choice_idx' must be an integer in 0..3, got True"),
        ({"choices": None}, "'correct_choice_idx' is given but 'choices' is not"),
        ({"direct_answers": "red"}, "'direct_answers' must be a list of strings"),
        ({"difficult_direct_answer": "no"}, "'difficult_direct_answer' must be true or false"),
    ],
)
def test_canonical_multiple_choice_is_cross_checked_at_load(tmp_path, fields, match):
    bad = record("q7", **{"choices": CHOICES, "correct_choice_idx": 1, **fields})
    with pytest.raises(ValueError, match=rf"records.jsonl record 'q7': {match}"):
        _load(tmp_path, record("q1", choices=CHOICES, correct_choice_idx=1), bad)


@pytest.mark.parametrize("answer", ["B. red", "B", "red", "b) Red", None])
def test_answers_that_name_the_correct_choice_are_accepted(tmp_path, answer):
    (loaded,) = _load(tmp_path, record("q1", answer=answer, choices=CHOICES, correct_choice_idx=1))
    assert loaded["answer"] == answer


def test_all_records_too_long_is_a_clear_error(latent_processor):
    records = [record("a", steps=["word " * 50]), record("b", steps=["word " * 60])]
    with pytest.raises(ValueError, match=r"all 2 records were skipped \(too_long: 2 \('a', 'b'\)\); the shortest "
                                         r"one needs max_length >= \d+ \(max_length is 20\)"):
        CurriculumDataset(records, latent_processor, mode="cot", max_length=20)
    with pytest.raises(ValueError, match="got no records"):
        CurriculumDataset([], latent_processor)


def test_skip_line_names_the_first_skipped_ids(latent_processor, caplog):
    records = [record("short", steps=["A."])] + [record(f"long{i}", steps=["word " * 60]) for i in range(7)]
    with caplog.at_level(logging.WARNING, logger="mmcoconut.data.curriculum"):
        dataset = CurriculumDataset(records, latent_processor, mode="cot", max_length=40)
    assert dataset.skipped_ids["too_long"] == [f"long{i}" for i in range(7)]
    assert any(
        "kept 1 of 8 records, skipped too_long: 7 ('long0', 'long1', 'long2', 'long3', 'long4', ...)" in r.getMessage()
        for r in caplog.records
    )


# ---- recipes: checked before any model or data is loaded ----


def _recipe(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"base: {DEMO}\noutput_dir: {tmp_path / 'out'}\n{text}\n")
    return str(path)


@pytest.mark.parametrize(
    "text, match",
    [
        ("c_thought: 1.5", r"c_thought: 1.5 is float, expected int"),
        ("epochs_per_stage: 1.5", r"epochs_per_stage: 1.5 is float, expected int"),
        ("learning_rate: [1, 2]", r"learning_rate: \[1, 2\] is list, expected float"),
        ("skip_bad_samples: 1", r"skip_bad_samples: 1 is int, expected bool"),
        ("lora_target_modules: [q_proj, 3]", r"lora_target_modules: \['q_proj', 3\] is list, expected a list of str"),
        ("mode: cocnut", r"mode must be one of \('cot', 'coconut', 'no_cot', 'no_thoughts', 'pause'\), got 'cocnut'"),
        ("c_thought: 0", "c_thought must be >= 1, got 0"),
        ("max_latent_stage: -1", "max_latent_stage must be >= 0, got -1"),
        ("epochs_per_stage: 0", "epochs_per_stage must be >= 1, got 0"),
        ("first_stage: 5", r"first_stage must be in 0..max_latent_stage \+ 1 = 4, got 5"),
        ("lr_scheduler_type: polynomial", "lr_scheduler_type must be one of .*got 'polynomial'"),
        ("lr_scheduler_type: nonsense", "nonsense"),
        ("num_train_epochs: -1", r"num_train_epochs must be > 0, got -1"),
        ("num_train_epochs: 0", r"num_train_epochs must be > 0, got 0"),
        ("data_source: canonical\ntrain_file: missing.jsonl", "train_file missing.jsonl does not exist"),
        ("tiny_internvl: '{oops'", "tiny_internvl is not valid JSON"),
    ],
)
def test_bad_recipes_are_refused_before_loading(tmp_path, no_loading, text, match):
    with pytest.raises(ValueError, match=match):
        train_main([_recipe(tmp_path, text)])


def test_every_problem_is_listed_at_once(tmp_path, no_loading):
    with pytest.raises(ValueError) as error:
        train_main([_recipe(tmp_path, "c_thought: 0\nepochs_per_stage: 0\nnum_train_epochs: -1")])
    assert str(error.value).count("\n  - ") == 3


def test_flags_after_the_recipe_are_checked_too(tmp_path, no_loading):
    with pytest.raises(ValueError, match="c_thought must be >= 1, got 0"):
        train_main([_recipe(tmp_path, ""), "--c_thought", "0"])
    with pytest.raises(SystemExit):  # argparse: invalid int value
        train_main([_recipe(tmp_path, ""), "--c_thought", "1.5"])


def test_string_numbers_in_yaml_still_work(tmp_path):
    # PyYAML reads `1e-3` (no dot) as a string; argparse converts string defaults, as before.
    training = parse_args([_recipe(tmp_path, "learning_rate: 1e-3")])[-1]
    assert training.learning_rate == 1e-3


@pytest.mark.parametrize("chain", [["a.yaml"], ["a.yaml", "b.yaml"], ["a.yaml", "b.yaml", "c.yaml"]])
def test_base_cycles_are_a_clear_error(tmp_path, chain):
    for name, base in zip(chain, chain[1:] + chain[:1]):
        (tmp_path / name).write_text(f"base: {base}\nc_thought: 1\n")
    loop = " -> ".join(str(tmp_path / name) for name in chain + chain[:1])
    with pytest.raises(ValueError, match=f"recipe base chain loops: {loop}$"):
        parse_args([str(tmp_path / chain[0])])


def test_missing_base_recipe_is_named(tmp_path):
    (tmp_path / "a.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(FileNotFoundError, match=r"a.yaml: base recipe .*nowhere.yaml not found"):
        parse_args([str(tmp_path / "a.yaml")])


# ---- checkpoint directories ----


@pytest.fixture
def incomplete(tiny_checkpoint, tmp_path):
    """A copy of the tiny checkpoint without the file a test names."""

    def without(name):
        path = tmp_path / f"without-{name}"
        shutil.copytree(tiny_checkpoint, path)
        (path / name).unlink()
        return path

    return without


MISSING = [
    ("config.json", "missing config.json"),
    ("model.safetensors", r"missing model.safetensors \(or model.safetensors.index.json\)"),
    ("tokenizer.json", r"missing tokenizer.json \(or vocab.json \+ merges.txt\)"),
    ("processor_config.json", r"missing processor_config.json \(or preprocessor_config.json\)"),
]


@pytest.mark.parametrize("name, match", MISSING)
def test_incomplete_checkpoint_is_named_before_training_loads_anything(tmp_path, no_loading, incomplete, name, match):
    path = incomplete(name)
    with pytest.raises(FileNotFoundError, match=rf"{path} is not a complete checkpoint: {match}"):
        train_main([_recipe(tmp_path, f"load_model_path: {path}")])


@pytest.mark.parametrize("name, match", MISSING)
def test_incomplete_checkpoint_is_named_by_evaluate_and_analyze(tmp_path, no_loading, incomplete, name, match):
    path = incomplete(name)
    with pytest.raises(FileNotFoundError, match=match):
        evaluate_aokvqa.main(["--model", str(path), "--data-file", "x.jsonl", "--output-dir", str(tmp_path / "e")])
    with pytest.raises(FileNotFoundError, match=match):
        analyze_cli.main(["--model", str(path), "--data-file", "x.jsonl", "--output-dir", str(tmp_path / "a")])


def test_missing_tokenizer_is_named_by_the_processor_loader(incomplete):
    # transformers' own message for this is "You need to have sentencepiece or tiktoken installed".
    with pytest.raises(FileNotFoundError, match=r"missing tokenizer.json \(or vocab.json \+ merges.txt\)"):
        load_internvl_processor(incomplete("tokenizer.json"))


def test_checkpoint_check_details(tiny_checkpoint, tmp_path):
    check_checkpoint_dir(tiny_checkpoint)  # complete
    check_checkpoint_dir("OpenGVLab/InternVL3-1B-Pretrained")  # a Hub id is left to from_pretrained
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory: ./not-there"):
        check_checkpoint_dir("./not-there")
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file"):
        check_checkpoint_dir(tmp_path / "file")
    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_checkpoint, sharded)
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(FileNotFoundError, match="missing model-00002-of-00002.safetensors$"):
        check_checkpoint_dir(sharded)
    adapters = tmp_path / "lora"
    adapters.mkdir()
    (adapters / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="missing config.json.*LoRA adapters: load the merged model"):
        check_checkpoint_dir(adapters, parts=("config",))


# ---- commands: a user error is one line on stderr, exit status 2, no traceback; the fail-fast ones before torch ----

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "datasets")
# Runs a command as its console script does (`run`, through `__main__`), hiding the modules named in PROBE_HIDE
# (importlib.util.find_spec then finds nothing, as when they are not installed), and reports on its last stderr line
# which heavy modules were imported by the time it exited.
COMMAND_PROBE = """
import os, runpy, sys
kind, target, *args = sys.argv[1:]
for name in filter(None, os.environ.get("PROBE_HIDE", "").split(",")):
    sys.modules[name] = None
sys.argv = [target if kind == "path" else "mmcoconut-" + target.rsplit(".", 1)[-1], *args]
try:
    runpy.run_path(target, run_name="__main__") if kind == "path" else runpy.run_module(target, run_name="__main__")
except SystemExit as exit:
    code = exit.code
else:
    code = 0
heavy = [name for name in {heavy!r} if sys.modules.get(name) is not None]
print("PROBE", ",".join(heavy) or "-", file=sys.stderr)
sys.exit(code)
""".format(heavy=HEAVY)


def free_port():
    """A loopback port nothing listens on: connecting to it is refused at once, as without network."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_command(target, *args, hide=(), env=None, kind="module"):
    """(exit status, stderr lines before the probe's, heavy modules imported, seconds) of one command run."""
    environment = {**os.environ, "PYTHONPATH": str(REPO), "PROBE_HIDE": ",".join(hide), **(env or {})}
    for name in ("MMCOCONUT_DEBUG", *[key for key, value in (env or {}).items() if value is None]):
        environment.pop(name, None)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", COMMAND_PROBE, kind, target, *map(str, args)], cwd=REPO,
                          env=environment, capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - started
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("PROBE "), proc.stderr[-3000:]
    return proc.returncode, lines[:-1], lines[-1].split()[1], seconds


def assert_one_line(result, prog, *fragments, status=2, fast=True):
    """The command printed exactly one line, `PROG: ...` naming every fragment, exited with `status`, and (`fast`)
    failed before importing torch, within a few seconds."""
    code, lines, heavy, seconds = result
    assert code == status, (code, lines)
    assert not any("Traceback" in line for line in lines), "\n".join(lines)
    assert len(lines) == 1, "\n".join(lines)
    assert lines[0].startswith(f"{prog}: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    if fast:
        assert heavy == "-", f"imported {heavy} before failing: {lines[0]}"
        assert seconds < 10, seconds
    return lines[0]


OFFLINE = {"HF_ENDPOINT": None, "HF_HUB_OFFLINE": None}


def unreachable_hub():
    return {"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HUB_OFFLINE": None}


@pytest.mark.parametrize("command", ["predict", "evaluate", "analyze", "probe", "app"])
@pytest.mark.parametrize("model", ["tests/no-such-checkpoint", "./no-such-checkpoint", "/no/such/checkpoint",
                                   "no-such-checkpoint"])
def test_a_missing_local_model_is_one_line_before_torch_and_no_hub_call(command, model):
    """A name that looks local (a separator beyond owner/name, a leading `.`, an existing parent directory, no
    owner) is a path: missing, it is an error at once, and the Hub (here: unreachable) is never asked."""
    args = {
        "predict": ["--question", "q"],
        "evaluate": ["--data-file", "x.jsonl", "--output-dir", "o"],
        "analyze": ["--data-file", "x.jsonl", "--output-dir", "o"],
        "probe": ["--data-file", "x.jsonl", "--output-dir", "o"],
        "app": [],
    }[command]
    result = run_command(f"mmcoconut.cli.{command}", "--model", model, *args, env=unreachable_hub())
    assert_one_line(result, f"mmcoconut-{command}", f"--model {model}: no such checkpoint directory")


def test_a_near_miss_is_named():
    line = assert_one_line(run_command("mmcoconut.cli.predict", "--model", "tests/test_bad_inpt.py", "--question", "q"),
                           "mmcoconut-predict")
    assert "did you mean tests/test_bad_input.py?" in line


@pytest.mark.parametrize("command", ["predict", "evaluate", "analyze", "probe", "app", "convert"])
def test_an_unreachable_hub_is_one_line_in_seconds_before_torch(command):
    """A Hub id is probed once, with a short timeout, before anything is imported: no minute of retries.
    (Exit status 2, as for every expected user error.)"""
    args = {
        "predict": ["--model", "someone/model", "--question", "q"],
        "evaluate": ["--model", "someone/model", "--data-file", __file__, "--output-dir", "o"],
        "analyze": ["--model", "someone/model", "--data-file", __file__, "--output-dir", "o"],
        "probe": ["--model", "someone/model", "--data-file", __file__, "--output-dir", "o"],
        "app": ["--model", "someone/model"],
        "convert": ["someone/model", "out"],
    }[command]
    line = assert_one_line(run_command(f"mmcoconut.cli.{command}", *args, env=unreachable_hub()),
                           f"mmcoconut-{command}", "cannot reach http://127.0.0.1:", "'someone/model'")
    assert "HF_HUB_OFFLINE=1" in line and "local copy" in line


def test_offline_without_the_model_in_the_cache_is_one_line(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path), "HF_ENDPOINT": None}
    assert_one_line(run_command("mmcoconut.cli.predict", "--model", "someone/model", "--question", "q", env=env),
                    "mmcoconut-predict", "HF_HUB_OFFLINE is set", "'someone/model' is not in the cache")


def test_evaluate_checks_a_hub_dataset_before_torch(tiny_checkpoint):
    assert_one_line(
        run_command("mmcoconut.cli.evaluate", "--model", tiny_checkpoint, "--hf-dataset", "someone/dataset",
                    "--output-dir", "o", env=unreachable_hub()),
        "mmcoconut-evaluate", "cannot reach", "the dataset 'someone/dataset'", "--hf-dataset",
    )


@pytest.mark.parametrize("flag, make, fragment", [
    ("--image", lambda tmp: tmp / "missing.jpg", "missing.jpg: no such file"),
    ("--image", lambda tmp: tmp, "is a directory; expected a file"),
    ("--image", lambda tmp: (tmp / "notes.png").write_text("not a picture") and tmp / "notes.png", "not an image"),
])
def test_predict_checks_the_image_before_the_model(tmp_path, flag, make, fragment):
    # The model is a Hub id on an unreachable Hub: the image is checked first, without the network.
    result = run_command("mmcoconut.cli.predict", "--model", "someone/model", "--question", "q", flag, make(tmp_path),
                         env=unreachable_hub())
    assert_one_line(result, "mmcoconut-predict", f"{flag} ", fragment)


def test_app_checks_its_example_image(tmp_path):
    assert_one_line(run_command("mmcoconut.cli.app", "--example-image", tmp_path / "missing.png"),
                    "mmcoconut-app", "--example-image", "no such file")


@pytest.mark.parametrize("choices", [["cat", "dog"], ["green, blue, yellow, purple"], ["a", "b", "c", "d", "e"],
                                     ["green,blue,yellow,purple"]])
def test_predict_takes_exactly_the_trained_number_of_choices_as_separate_arguments(choices):
    line = assert_one_line(
        run_command("mmcoconut.cli.predict", "--model", "someone/model", "--question", "q", "--choices", *choices,
                    env=unreachable_hub()),
        "mmcoconut-predict", "--choices takes",
    )
    assert "--choices green blue yellow purple" in line  # the form that works


@pytest.mark.parametrize("command, args, module, install", [
    ("predict", ["--model", "m", "--question", "q", "--quantization", "torchao-int8"], "torchao",
     "pip install 'mmcoconut[quantization]'"),
    ("predict", ["--model", "m", "--question", "q", "--quantization", "bnb-4bit"], "bitsandbytes",
     "pip install bitsandbytes"),
    ("app", ["--model", "m", "--quantization", "torchao-int8"], "torchao", "pip install 'mmcoconut[quantization]'"),
    ("app", ["--model", "m"], "gradio", "pip install 'mmcoconut[app]'"),
])
def test_a_missing_extra_names_the_pip_command_before_torch(command, args, module, install):
    line = assert_one_line(run_command(f"mmcoconut.cli.{command}", *args, hide=[module, "torchao", "bitsandbytes"]),
                           f"mmcoconut-{command}", f"needs {module}", install)
    if module == "torchao":
        assert line.startswith(f"mmcoconut-{command}: --quantization torchao-int8 needs torchao")


def test_preflight_extras_are_setup_cfgs():
    """`mmcoconut.preflight.EXTRAS` names extras setup.cfg defines, each installing the module it is named for."""
    import configparser

    from mmcoconut.preflight import EXTRAS

    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    extras = config["options.extras_require"]
    for module, extra in EXTRAS.items():
        if extra is not None:
            assert extra in extras and module in extras[extra], (module, extra)


def test_bad_flags_are_one_line():
    assert_one_line(run_command("mmcoconut.cli.predict", "--model", "m", "--question", "q", "--no-such-flag"),
                    "mmcoconut-predict", "unrecognized arguments: --no-such-flag", "--help")
    assert_one_line(run_command("mmcoconut.cli.evaluate", "--model", "m"), "mmcoconut-evaluate",
                    "required: --output-dir")
    assert_one_line(run_command("mmcoconut.cli.predict", "--model", "m", "--question", "q", "--num-latents", "-1"),
                    "mmcoconut-predict", "--num-latents must be >= 0")


def test_missing_data_paths_are_one_line_before_loading(tiny_checkpoint, tmp_path):
    """analyze and probe check their data file before torch; evaluate after its output-directory check (which lives
    in mmcoconut.evaluation), still before loading."""
    common = ["--model", tiny_checkpoint, "--output-dir", tmp_path / "out"]
    for command in ("analyze", "probe"):
        assert_one_line(run_command(f"mmcoconut.cli.{command}", *common, "--data-file", tmp_path / "val.jsonl"),
                        f"mmcoconut-{command}", "--data-file", "val.jsonl: no such file")
    assert_one_line(run_command("mmcoconut.cli.evaluate", *common, "--data-file", tmp_path / "val.jsonl"),
                    "mmcoconut-evaluate", "--data-file", "val.jsonl: no such file", fast=False)
    assert_one_line(run_command("mmcoconut.cli.evaluate", *common, "--aokvqa-dir", tmp_path / "a", "--coco-dir", tmp_path),
                    "mmcoconut-evaluate", "--aokvqa-dir", "no such directory", fast=False)


def test_an_incomplete_checkpoint_is_one_line_before_torch(incomplete, tmp_path):
    path = incomplete("config.json")
    assert_one_line(run_command("mmcoconut.cli.predict", "--model", path, "--question", "q"),
                    "mmcoconut-predict", f"{path} is not a complete checkpoint: missing config.json")


def test_existing_results_without_overwrite_are_one_line(tiny_checkpoint, synthetic_aokvqa, tmp_path):
    """Checked after the library is imported (that check lives in mmcoconut.evaluation), still before loading; also
    through the checkout's script, `python evaluate_aokvqa.py`."""
    out = tmp_path / "eval"
    out.mkdir()
    (out / "metrics_val.json").write_text("{}")
    args = ["--model", tiny_checkpoint, "--data-file", synthetic_aokvqa["canonical_dir"] / "val.jsonl",
            "--output-dir", out]
    assert_one_line(run_command("mmcoconut.cli.evaluate", *args), "mmcoconut-evaluate",
                    "already holds results of split 'val'", "--overwrite", fast=False)
    assert_one_line(run_command("evaluate_aokvqa.py", *args, kind="path"), "evaluate_aokvqa.py",
                    "already holds results of split 'val'", fast=False)


def _train_recipe(tmp_path, text=""):
    path = tmp_path / "recipe.yaml"
    path.write_text(
        f"tiny_internvl: {{}}\ndata_source: synthetic\nsynthetic_dir: {tmp_path / 'data'}\n"
        f"output_dir: {tmp_path / 'out'}\nuse_cpu: true\nbf16: false\nreport_to: none\n{text}\n"
    )
    return path


@pytest.mark.parametrize("text, args, fragments", [
    ("", ["--c_thought", "0"], ["invalid configuration:", "c_thought must be >= 1, got 0"]),
    ("load_model_path: tests/no-such-checkpoint", [], ["no such checkpoint directory: tests/no-such-checkpoint"]),
    ("report_to: wandb", [], ["report_to wandb needs wandb", "pip install 'mmcoconut[wandb]'"]),
    ("deepspeed: ds_configs/zero2.json", [], ["needs deepspeed", "pip install 'mmcoconut[deepspeed]'"]),
])
def test_train_py_user_errors_are_one_line_without_traceback(tmp_path, text, args, fragments):
    code, lines, _, _ = run_command("train.py", _train_recipe(tmp_path, text), *args, kind="path",
                                    hide=["wandb", "deepspeed"])
    assert code == 2 and not any("Traceback" in line for line in lines), "\n".join(lines)
    # The error is the last thing said, once (an invalid configuration lists each problem on a line of its own).
    starts = [i for i, line in enumerate(lines) if line.startswith("train.py: ")]
    assert len(starts) == 1, "\n".join(lines)
    said = "\n".join(lines[starts[0]:])
    assert all(line.startswith("  - ") for line in lines[starts[0] + 1:]), said
    for fragment in fragments:
        assert fragment in said, (fragment, said)


def test_a_missing_recipe_is_one_line(tmp_path):
    code, lines, _, _ = run_command("train.py", tmp_path / "missing.yaml", kind="path")
    assert code == 2 and lines == [f"train.py: recipe {tmp_path / 'missing.yaml'}: no such file"], lines


@pytest.mark.parametrize("how", [["--debug"], []])
def test_debug_shows_the_traceback_of_a_user_error(how, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "MMCOCONUT_DEBUG": "0" if how else "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mmcoconut.cli.predict", "--model", "m", "--question", "q",
         "--image", str(tmp_path / "missing.jpg"), *how],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1 and "Traceback" in proc.stderr
    assert "UserFileNotFoundError: --image" in proc.stderr.strip().splitlines()[-1]


def test_an_unexpected_error_keeps_its_traceback(monkeypatch, capsys):
    """Only user errors become one line: a bug (here, a TypeError inside the checks) is raised as it is."""
    from mmcoconut.cli import predict as predict_cli

    def broken(args):
        raise TypeError("a bug")

    monkeypatch.setattr(predict_cli, "check_before_loading", broken)
    with pytest.raises(TypeError, match="a bug"):
        predict_cli.run(["--model", "m", "--question", "q"])
    assert capsys.readouterr().err == ""


def test_user_errors_are_the_builtin_types_too():
    """Callers that catch the built-in types (tests, scripts) keep working: a user error is both."""
    from mmcoconut import errors

    assert issubclass(errors.UserFileNotFoundError, FileNotFoundError)
    assert issubclass(errors.UserFileExistsError, FileExistsError)
    assert issubclass(errors.UserValueError, ValueError)
    assert issubclass(errors.MissingExtraError, ImportError)
    assert issubclass(errors.SetupError, RuntimeError) and errors.SetupError.exit_status == 2
    classes = [getattr(errors, name) for name in errors.__all__ if isinstance(getattr(errors, name), type)]
    assert all(issubclass(error, errors.UserError) for error in classes)
    from mmcoconut import preflight
    from mmcoconut.training.arguments import SetupError
    from mmcoconut.training.checks import require_hub

    assert SetupError is errors.SetupError and require_hub is preflight.require_hub
    assert check_checkpoint_dir is preflight.check_checkpoint_dir
