"""Nothing lost under races and kills, no request that stalls, every bad value caught before loading (issue 24).

docs/errors.md's "Bad input and faults" table lists each case with the test here that checks it. The command-line
cases run as a user runs them (one line on stderr, exit status 2, no traceback, before torch where the table says
so); the runs that are killed or raced are real `train.py` processes on the tiny recipe.
"""

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmcoconut.cli.train import main as train_main
from mmcoconut.data.aokvqa import load_canonical
from mmcoconut.data.curriculum import CurriculumDataset
from mmcoconut.data.images import image_size, load_image
from mmcoconut.errors import UserError
from mmcoconut.inference.loading import load, load_model
from mmcoconut.inference.prediction import open_request_image, predict
from mmcoconut.preflight import check_checkpoint_dir
from mmcoconut.training import build as training_build
from mmcoconut.training.checks import latest_complete_checkpoint, prepare_output_dir
from mmcoconut.training.recipe import MAX_RECIPE_VALUES, parse_args
from mmcoconut.training.run_lock import OWNER_NAME, output_dir_lock
from tests.test_bad_input import assert_one_line, bomb_png, run_command

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "recipes" / "tiny.yaml")
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def tiny_run(tmp_path, out, *extra):
    """train.py arguments of a run of a few seconds: 8 questions, 2 steps an epoch, a checkpoint every epoch."""
    return [
        TINY, "--output_dir", str(out), "--synthetic_dir", str(tmp_path / "data"), "--synthetic_train", "8",
        "--synthetic_val", "4", "--per_device_train_batch_size", "4", "--epochs_per_stage", "1",
        "--first_stage_epochs", "1", "--num_train_epochs", "3", "--eval_strategy", "no", "--eval_accuracy", "false",
        "--logging_steps", "1", "--save_total_limit", "2", *extra,
    ]


def recipe(tmp_path, text, name="recipe.yaml"):
    """A recipe over the tiny one that changes what `text` says."""
    path = tmp_path / name
    path.write_text(f"base: {TINY}\noutput_dir: {tmp_path / 'run'}\nsynthetic_dir: {tmp_path / 'data'}\n{text}")
    return str(path)


@pytest.fixture
def no_model(monkeypatch):
    """Records load, models do not: the check under test must come before the model."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the check")

    monkeypatch.setattr(training_build, "build_model_and_processor", refuse)


# ---- 1. one run per output directory ----


def test_a_second_run_into_a_locked_output_dir_fails_at_once_naming_dir_and_owner(tmp_path, no_loading):
    out = tmp_path / "run"
    with output_dir_lock(out):
        with pytest.raises(FileExistsError, match=rf"output_dir {out} is in use by another training run "
                                                  rf"\(process {os.getpid()} on "):
            train_main(tiny_run(tmp_path, out))
    assert not (out / OWNER_NAME).exists()  # released: the record goes with the lock


HOLD_LOCK = """
import sys, time
from mmcoconut.training.run_lock import output_dir_lock
with output_dir_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def test_the_lock_of_a_killed_run_is_taken_over_with_a_log_line(tmp_path, caplog):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True,
                              env=ENV, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FileExistsError, match=rf"in use by another training run \(process {holder.pid} "):
            with output_dir_lock(out):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    with output_dir_lock(out):
        pass
    assert f"taking over the lock of process {holder.pid}" in caplog.text


def test_other_ranks_do_not_take_the_lock(tmp_path):
    with output_dir_lock(tmp_path / "run"):
        with output_dir_lock(tmp_path / "run", main_process=False) as lock:
            assert lock is None


@pytest.mark.slow
def test_two_runs_started_together_one_trains_the_other_is_refused(tmp_path):
    """Before the lock both passed the guard, both exited 0, and the first run's model was gone."""
    out = tmp_path / "run"
    # The data is generated once beforehand, so the two runs race only for the output directory.
    training_build.ensure_synthetic_data(parse_args(tiny_run(tmp_path, out))[1])
    runs = [subprocess.Popen([sys.executable, "train.py", *tiny_run(tmp_path, out)], cwd=REPO, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [run.communicate(timeout=300) + (run.returncode,) for run in runs]
    codes = sorted(code for _, _, code in results)
    assert codes == [0, 2], [(code, err[-2000:]) for _, err, code in results]
    _, loser_err, _ = next(result for result in results if result[2] == 2)
    assert "Traceback" not in loser_err
    last = loser_err.strip().splitlines()[-1]
    # It lost the race for the lock, or came after the winner had finished: either way it says so and stops.
    assert f"output_dir {out} is in use by another training run" in last or "holds a previous run" in last, last
    winner_out, _, _ = next(result for result in results if result[2] == 0)
    assert f"Model: {out}" in winner_out and (out / "model.safetensors").is_file()


# ---- 2. nested recipe keys ----


@pytest.mark.parametrize("text, match", [
    ("tiny_internvl: {num_hiden_layers: 8}", r"unknown key 'num_hiden_layers' \(did you mean num_hidden_layers\?\)"),
    ("tiny_internvl: {hidden_size: big}", r"tiny_internvl: hidden_size must be an integer >= 1, got 'big'"),
    ("tiny_internvl: {vision_layers: 0}", r"tiny_internvl: vision_layers must be an integer >= 1, got 0"),
    ("use_lora: true\nlora_target_modules: []", r"lora_target_modules must name at least one layer"),
    ("use_lora: true\nlora_dropout: 1.5", r"lora_dropout must be in \[0, 1\), got 1.5"),
    ("per_device_train_batch_size: 0", r"per_device_train_batch_size must be >= 1, got 0"),
    ("per_device_train_batch_size: -4", r"per_device_train_batch_size must be >= 1, got -4"),
    ("per_device_eval_batch_size: 0", r"per_device_eval_batch_size must be >= 1, got 0"),
    ("gradient_accumulation_steps: 0", r"gradient_accumulation_steps must be >= 1, got 0"),
    ("tiny_internvl: {hidden_size: 10000000, num_hidden_layers: 100000}",
     r"tiny_internvl: the config describes a model of about .* parameters \(text_config.hidden_size: 10000000, "
     r"text_config.num_hidden_layers: 100000"),
])
def test_bad_nested_and_size_values_are_refused_before_loading(tmp_path, no_loading, text, match):
    with pytest.raises(UserError, match=match):
        train_main([recipe(tmp_path, text)])


def test_known_tiny_internvl_keys_still_build(tmp_path):
    """The shipped recipes' keys (the tiny config's own arguments and Qwen2 fields such as rope_theta) pass."""
    from mmcoconut.training.checks import tiny_internvl_problems

    assert tiny_internvl_problems({"hidden_size": 128, "vision_layers": 2, "rope_theta": 10000.0,
                                   "max_position_embeddings": 512, "tie_word_embeddings": True}) == []


# ---- 3. EXIF orientation ----


def sideways_photo(path, orientation=6):
    """A 40x20 photo stored sideways, red left and blue right, with EXIF `Orientation=orientation`: a viewer shows it
    20x40, turned 90 degrees clockwise (red on top)."""
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, exif=exif)
    return path


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_exif_orientation_is_applied_wherever_an_image_enters(tmp_path, suffix):
    path = sideways_photo(tmp_path / f"phone{suffix}")
    upright = load_image(str(path), "q1")  # training data and evaluation (CurriculumDataset._image)
    assert upright.size == (20, 40) and image_size(str(path), "q1") == (20, 40)  # tiles are counted upright too
    red, blue = upright.getpixel((10, 5)), upright.getpixel((10, 35))
    assert red[0] > 200 and red[2] < 60 and blue[2] > 200 and blue[0] < 60, (red, blue)
    assert open_request_image(str(path)).size == (20, 40)  # predict and the app


# ---- 4, 8, 9, 12: requests and flags, one line before torch ----


@pytest.fixture(scope="module")
def absurd_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint (its files linked) with a config asking for 10^7 hidden units and 10^5 layers."""
    path = tmp_path_factory.mktemp("absurd") / "ckpt"
    path.mkdir()
    for item in Path(tiny_checkpoint).iterdir():
        (path / item.name).symlink_to(item)
    config = json.loads((Path(tiny_checkpoint) / "config.json").read_text())
    config["internvl_config"]["text_config"].update(hidden_size=10_000_000, num_hidden_layers=100_000)
    (path / "config.json").unlink()
    (path / "config.json").write_text(json.dumps(config))
    return path


def cli_cases(checkpoint, absurd, image, data_file):
    """(command, arguments, fragments of the one line it must print): each fails before torch is imported."""
    predict = ["--model", checkpoint, "--question"]
    evaluate = ["--model", checkpoint, "--data-file", data_file, "--output-dir", "unused"]
    return [
        ("predict", [*predict, ""], ["--question is empty"]),
        ("predict", [*predict, "   "], ["--question is empty"]),
        ("predict", [*predict, "x" * 100_000], ["--question is 100,000 characters long; at most 10,000"]),
        ("predict", [*predict, "Q?", "--num-latents", "100000"], ["--num-latents 100000: at most 8 thoughts"]),
        ("predict", [*predict, "Q?", "--image", image], ["at most 50 megapixels are taken"]),
        ("predict", ["--model", absurd, "--question", "Q?"], ["text_config.hidden_size: 10000000"]),
        ("evaluate", [*evaluate, "--split", "../../escape"], ["--split must be a name", "'../../escape'"]),
        ("evaluate", [*evaluate, "--limit", "0"], ["--limit must be >= 1"]),
        ("evaluate", [*evaluate, "--num-latents", "100000"], ["--num-latents 100000: at most 8 thoughts"]),
        ("evaluate", [*evaluate, "--max-thoughts", "5000"], ["--max-thoughts 5000: at most 8 thoughts"]),
        ("evaluate", ["--model", absurd, "--data-file", data_file, "--output-dir", "unused"],
         ["text_config.num_hidden_layers: 100000"]),
    ]


@pytest.mark.parametrize("index", range(11))
def test_bad_requests_and_flags_are_one_line_before_torch(index, tiny_checkpoint, absurd_checkpoint, tmp_path):
    image = bomb_png(tmp_path / "huge.png")  # 20000x20000
    data_file = tmp_path / "val.jsonl"
    data_file.write_text("")
    command, args, fragments = cli_cases(str(tiny_checkpoint), str(absurd_checkpoint), str(image), str(data_file))[
        index
    ]
    line = assert_one_line(run_command(f"mmcoconut.cli.{command}", *args), f"mmcoconut-{command}", *fragments)
    assert len(line) < 600  # never the 100,000-character question itself


def test_an_image_over_the_pixel_limit_but_under_pils_is_refused_from_its_header(tmp_path):
    """60 megapixels: PIL would decode it (its own bomb limit is 179); a request refuses it unread."""
    path = tmp_path / "wide.png"
    bomb_png(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", 10000, 6000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"10000x6000 = 60 megapixels; at most 50 megapixels are taken"):
        open_request_image(str(path))


@pytest.fixture(scope="module")
def loaded(inference_checkpoint):
    return load(inference_checkpoint)


def test_a_question_longer_than_the_model_can_take_is_refused_before_generating(loaded, monkeypatch):
    model, processor = loaded
    monkeypatch.setattr(model, "generate", lambda *a, **k: pytest.fail("generated for a refused question"))
    with pytest.raises(UserError, match=r"is 100,000 characters long"):
        predict(model, processor, None, "x" * 100_000)
    positions = model.config.internvl_config.text_config.max_position_embeddings
    with pytest.raises(UserError, match=rf"needs [0-9,]+ positions, and the model has {positions:,}"):
        predict(model, processor, None, "a " * 4999)
    with pytest.raises(UserError, match="the question is empty"):
        predict(model, processor, None, " ")


def test_a_question_that_fits_is_answered(loaded):
    model, processor = loaded
    assert predict(model, processor, None, "What is it?").generated_text is not None


# ---- 5. a save killed midway; resume ----


def fake_checkpoint(out, step, moment):
    """What a save killed at `moment` leaves (see tests/fault_train.py)."""
    path = out / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if moment == "start":
        return path
    (path / "model.safetensors").write_bytes(b"weights")
    if moment in ("optimizer", "state", "complete"):
        (path / "optimizer.pt").write_bytes(b"optimizer")
    if moment == "state":
        (path / "trainer_state.json").write_text('{"global_step": ')
    if moment == "complete":
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


@pytest.mark.parametrize("moment", ["start", "weights", "optimizer", "state"])
def test_resume_true_skips_incomplete_checkpoints_naming_them(tmp_path, caplog, moment):
    out = tmp_path / "run"
    complete = fake_checkpoint(out, 4, "complete")
    fake_checkpoint(out, 6, moment)
    assert latest_complete_checkpoint(out) == str(complete)
    assert "Skipping incomplete checkpoint(s) ['checkpoint-6']" in caplog.text
    args = parse_args(tiny_run(tmp_path, out, "--resume_from_checkpoint", "true"))[-1]
    assert prepare_output_dir(args) == str(complete)
    explicit = parse_args(tiny_run(tmp_path, out, "--resume_from_checkpoint", str(out / "checkpoint-6")))[-1]
    with pytest.raises(UserError, match=r"checkpoint-6: incomplete checkpoint"):
        prepare_output_dir(explicit)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The final weights of the tiny run, never interrupted (3 epochs, checkpoints 2, 4, 6)."""
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    proc = subprocess.run([sys.executable, "train.py", *tiny_run(tmp_path, tmp_path / "run")], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp_path / "run"


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["start", "weights", "optimizer", "state"])
def test_a_save_killed_midway_resumes_from_the_last_complete_checkpoint_bit_identically(
    tmp_path, uninterrupted, moment
):
    """kill -9 while checkpoint-4 is written; `--resume_from_checkpoint true` resumes from checkpoint-2 (before:
    from the broken checkpoint-4, "Can't find a valid checkpoint") and ends with the uninterrupted run's weights."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    killed = subprocess.run([sys.executable, "tests/fault_train.py", moment, "4", *tiny_run(tmp_path, out)],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (out / "checkpoint-4").is_dir() and not (out / "checkpoint-4" / "trainer_state.json").exists() or (
        moment == "state"
    )
    resumed = subprocess.run([sys.executable, "train.py", *tiny_run(tmp_path, out, "--resume_from_checkpoint",
                                                                      "true")],
                             cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Skipping incomplete checkpoint(s) ['checkpoint-4']" in resumed.stderr
    assert "taking over the lock of process" in resumed.stderr
    final, reference = load_file(out / "model.safetensors"), load_file(uninterrupted / "model.safetensors")
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[name], reference[name]) for name in final)


# ---- 6. records without an answer; a null id ----


def canonical_file(tmp_path, *records):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_a_training_record_without_an_answer_is_refused_before_the_model(tmp_path, no_model):
    good = {"id": "q1", "question": "Q?", "steps": ["One."], "answer": "A"}
    data = canonical_file(tmp_path, good, {**good, "id": "q2", "answer": None})
    text = f"data_source: canonical\ntrain_file: {data}\neval_strategy: 'no'\neval_accuracy: false"
    with pytest.raises(UserError, match=r"1 train record\(s\) have no answer \('q2'\).*skip_bad_samples"):
        train_main([recipe(tmp_path, text)])


def test_a_record_without_an_answer_is_skipped_and_counted_with_skip_bad_samples(latent_processor):
    good = {"id": "q1", "image": None, "question": "Q?", "steps": ["One."], "answer": "A"}
    records = [good, {**good, "id": "q2", "answer": None}]
    with pytest.raises(UserError, match=r"record 'q2' has no answer"):
        CurriculumDataset(records, latent_processor, mode="cot", require_answers=True)
    dataset = CurriculumDataset(records, latent_processor, mode="cot", require_answers=True, skip_bad_samples=True)
    assert len(dataset) == 1 and dataset.skipped["no_answer"] == 1 and dataset.skipped_ids["no_answer"] == ["q2"]
    assert len(CurriculumDataset(records, latent_processor, mode="cot")) == 2  # evaluation prompts them


@pytest.mark.parametrize("value", [None, "", True, 1.5, ["q1"]])
def test_an_id_that_is_not_a_name_is_refused_at_load(tmp_path, value):
    data = canonical_file(tmp_path, {"id": value, "question": "Q?", "steps": [], "answer": "A"})
    with pytest.raises(ValueError, match=r"'id' must be a non-empty string or an integer"):
        load_canonical(data)


# ---- 10. YAML alias bombs ----


def alias_bomb(levels, indent=""):
    """YAML list items (at `indent`) that expand to 10**levels strings from a few hundred bytes."""
    lines = [f'{indent}- &l0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for level in range(1, levels):
        lines.append(f"{indent}- &l{level} [" + ", ".join([f"*l{level - 1}"] * 10) + "]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("where", ["lora_target_modules", "tiny_internvl"])
def test_a_yaml_alias_bomb_is_refused_in_one_short_line(tmp_path, where):
    """Before: the type check's message repr'd 10**7 strings (a 50 MB line; at 10**9, MemoryError after 50 s)."""
    if where == "lora_target_modules":
        text = "lora_target_modules:\n" + alias_bomb(7, "  ")
    else:
        text = "tiny_internvl:\n  hidden_size: 64\n  bomb:\n" + alias_bomb(7, "    ")
    path = tmp_path / "bomb.yaml"
    path.write_text(f"base: {TINY}\n{text}")
    line = assert_one_line(run_command("train.py", str(path), kind="path"), "train.py",
                           f"expands to more than {MAX_RECIPE_VALUES:,} values", fast=False)
    assert len(line) < 600


def test_messages_quote_a_long_value_cut_short_with_its_length(tmp_path, no_loading):
    from mmcoconut.errors import shorten

    assert shorten("x" * 100_000).endswith("... (100,000 characters)") and len(shorten("x" * 100_000)) < 120
    assert shorten(["q_proj"] * 100_000).endswith("(100,000 items)")
    with pytest.raises(UserError, match=r"lora_target_modules: \[0, 1, 2, 3, 4, 5, \.\.\.\] \(5,000 items\)") as error:
        train_main([recipe(tmp_path, f"lora_target_modules: {list(range(5000))}")])
    assert len(str(error.value)) < 400


# ---- 11. absurd checkpoint configs ----


def test_an_absurd_checkpoint_config_is_refused_before_anything_is_built(absurd_checkpoint, tmp_path, no_loading):
    with pytest.raises(UserError, match=r"text_config.hidden_size: 10000000, .*num_hidden_layers: 100000"):
        check_checkpoint_dir(absurd_checkpoint)
    with pytest.raises(UserError, match=r"hidden_size: 10000000"):
        load_model(absurd_checkpoint)
    with pytest.raises(UserError, match=r"hidden_size: 10000000"):
        train_main([recipe(tmp_path, f"load_model_path: {absurd_checkpoint}")])


def test_an_absurd_hub_config_is_refused_before_its_weights_are_downloaded(absurd_checkpoint, monkeypatch):
    """A Hub id: only its config.json comes down before the check (here served from the absurd checkpoint)."""
    import huggingface_hub
    import transformers

    asked = []

    def download(repo_id, filename, **kwargs):
        asked.append(filename)
        return str(absurd_checkpoint / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained",
                        classmethod(lambda *a, **k: pytest.fail("weights loaded for an absurd config")))
    with pytest.raises(UserError, match=r"owner/absurd/config.json: .*hidden_size: 10000000"):
        load_model("owner/absurd")
    assert asked == ["config.json"]


# ---- held: never run code from a recipe or a checkpoint; the app binds loopback ----


def test_python_tags_in_a_recipe_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    path = recipe(tmp_path, f'output_dir: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(UserError, match=r"not a valid recipe .*python/object/apply:os.system"):
        parse_args([path])
    assert not marker.exists()


def test_auto_map_code_in_a_checkpoint_is_never_run_by_the_loader(inference_checkpoint, tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "ckpt"
    shutil.copytree(inference_checkpoint, path)
    (path / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.Config", "AutoModel": "evil.Model",
                          "AutoModelForImageTextToText": "evil.Model"}
    (path / "config.json").write_text(json.dumps(config))
    model, _ = load(path)
    assert type(model).__module__ == "modeling_mmcoconut" and not marker.exists()


class Payload:
    """Unpickled, it would create `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickled_weights_file_is_never_loaded(inference_checkpoint, tmp_path):
    """Only safetensors weights are taken: a checkpoint with a `pytorch_model.bin` is incomplete, not unpickled."""
    marker = tmp_path / "ran"
    path = tmp_path / "ckpt"
    shutil.copytree(inference_checkpoint, path)
    (path / "model.safetensors").unlink()
    torch.save({"payload": Payload(str(marker))}, path / "pytorch_model.bin")
    with pytest.raises(UserError, match="missing model.safetensors"):
        load_model(path)
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state.pth"])
def test_pickle_payloads_in_a_checkpoint_are_refused_on_resume(uninterrupted, tmp_path, name):
    marker = tmp_path / "ran"
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    torch.save({"payload": Payload(str(marker))}, out / "checkpoint-6" / name)
    proc = subprocess.run([sys.executable, "train.py", *tiny_run(tmp_path, out, "--num_train_epochs", "4",
                                                                   "--resume_from_checkpoint", "true")],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and not marker.exists(), proc.stderr[-2000:]
    assert "weights_only" in proc.stderr or "Weights only load failed" in proc.stderr, proc.stderr[-2000:]


def test_the_app_serves_on_loopback_by_default():
    from mmcoconut.cli import app as app_cli

    assert app_cli.build_parser().parse_args([]).host == "127.0.0.1"


# ---- 4, 7, 8: the web demo: bounded requests, every input error a message, the queue keeps answering ----


@pytest.fixture(scope="module")
def app_model(inference_checkpoint):
    return load(inference_checkpoint, attn_implementation="eager")


def app_cases(tmp_path, question_image):
    """(answer_question arguments after model and processor, fragment of the message the user sees)."""
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    huge = bomb_png(tmp_path / "huge.png")
    return [
        ((None, ""), "the question is empty"),
        ((None, "x" * 100_000), "the question is 100,000 characters long"),
        ((None, "a " * 4999), "the question is too long"),
        ((None, "Q?", "", 5000), "continuous thoughts 5000: at most 8 thoughts"),
        ((None, "Q?", "", -1), "continuous thoughts must be >= 0"),
        ((None, "Q?", "\n".join(f"c{i}" for i in range(30))), "at most 4 choices"),
        ((str(not_an_image), "Q?"), "cannot read image"),
        ((str(huge), "Q?"), "at most 50 megapixels are taken"),
    ]


@pytest.mark.parametrize("index", range(8))
def test_every_bad_app_input_is_refused_before_the_model_runs(app_model, tmp_path, question_image, monkeypatch,
                                                              index):
    from mmcoconut import app

    model, processor = app_model
    monkeypatch.setattr(model, "generate", lambda *a, **k: pytest.fail("generated for a refused request"))
    args, fragment = app_cases(tmp_path, question_image)[index]
    with pytest.raises(UserError, match=re.escape(fragment)):
        app.answer_question(model, processor, *args)


def test_an_answer_over_the_time_limit_is_refused_not_cut_short(app_model):
    from mmcoconut import app

    model, processor = app_model
    with pytest.raises(UserError, match=r"the answer took longer than the 1e-09 s this app allows"):
        app.answer_question(model, processor, None, "What is it?", time_limit_s=1e-9)


@pytest.fixture(scope="module")
def served_app(app_model):
    pytest.importorskip("gradio")
    from mmcoconut import app

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    model, processor = app_model
    demo = app.build_demo(model, processor, "tiny", queue_size=30)
    port = app.free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def test_the_app_shows_an_input_error_as_its_message(served_app):
    """Before: Gradio's generic "upstream app has raised an exception" for every bad input."""
    gradio_client = pytest.importorskip("gradio_client")
    client = gradio_client.Client(served_app, verbose=False)
    with pytest.raises(Exception, match=r"the question is empty: type a question") as error:
        client.predict(None, "  ", "", None, api_name="/answer")
    assert "upstream" not in str(error.value)
    # The thought field's maximum: Gradio checks it itself, with its own clear message.
    with pytest.raises(Exception, match=r"Value 5000 is greater than maximum value 8"):
        client.predict(None, "Q?", "", 5000, api_name="/answer")


@pytest.mark.slow
def test_the_app_keeps_answering_ten_users_beside_a_refused_and_a_largest_request(served_app, question_image):
    """Before: one request for 5000 thoughts held the only worker for over 10 minutes; 21 others timed out."""
    gradio_client = pytest.importorskip("gradio_client")
    client = gradio_client.Client(served_app, verbose=False)
    image = gradio_client.handle_file(str(question_image))
    refused = client.submit(image, "Q?", "", 5000, api_name="/answer")
    largest = client.submit(image, "Q?", "", 8, api_name="/answer")  # the most thoughts this checkpoint allows
    normal = [client.submit(image, f"Question {i}?", "", None, api_name="/answer") for i in range(10)]
    with pytest.raises(Exception, match="greater than maximum value 8"):
        refused.result(timeout=120)
    assert largest.result(timeout=120)[1] is not None
    answers = [job.result(timeout=120) for job in normal]
    assert len(answers) == 10 and all(answer[1] is not None for answer in answers)
