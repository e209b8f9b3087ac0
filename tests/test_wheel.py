"""The installed package works as well as the checkout: a wheel built from this tree, installed without `-e` into a
folder of its own and run from outside the checkout, scores A-OKVQA-shaped data and answers a question.

The checkout is never on the path here: each command runs with the temporary install folder first on PYTHONPATH,
in a working directory outside the repository, and checks that `mmcoconut` was imported from that folder.
"""

import configparser
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The wheel's top-level names: the package and the design card's flat modules, nothing generic.
TOP_LEVEL = {"mmcoconut", "configuration_mmcoconut", "modeling_mmcoconut", "pipeline_mmcoconut", "data_collator",
             "trainer_curriculum"}
COMMANDS = {"mmcoconut-train", "mmcoconut-evaluate", "mmcoconut-predict", "mmcoconut-app", "mmcoconut-analyze",
            "mmcoconut-probe", "mmcoconut-data", "mmcoconut-convert", "mmcoconut-intervene"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(install folder, wheel path): `pip wheel .` then `pip install --no-deps --target` (the dependencies are this
    environment's)."""
    wheels = tmp_path_factory.mktemp("wheels")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(REPO)],
        check=True, capture_output=True, text=True, timeout=600,
    )
    (wheel,) = wheels.glob("mmcoconut-*.whl")
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True, capture_output=True, text=True, timeout=600,
    )
    return target, wheel


def _run(installed, args, cwd):
    target, _ = installed
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_wheel_holds_the_package_and_the_card_modules_only(installed):
    _, wheel = installed
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = configparser.ConfigParser()
        entry_points.read_string(archive.read(next(n for n in names if n.endswith("entry_points.txt"))).decode())
    top = {name.split("/")[0].removesuffix(".py") for name in names if ".dist-info" not in name.split("/")[0]}
    assert top == TOP_LEVEL
    assert set(entry_points["console_scripts"]) == COMMANDS
    # the lmms-eval plug-in (the `lmms-eval` extra): `python -m lmms_eval --model mmcoconut`
    assert dict(entry_points["lmms_eval.models"]) == {"mmcoconut": "mmcoconut.integrations.lmms_eval:manifest"}


def test_installed_package_is_imported_from_the_install_not_the_checkout(installed, tmp_path):
    target, _ = installed
    out = _run(installed, [sys.executable, "-c", "import mmcoconut, modeling_mmcoconut; "
                           "print(mmcoconut.__file__); print(modeling_mmcoconut.__file__)"], tmp_path)
    assert all(Path(line).is_relative_to(target) for line in out.split()), out


def test_installed_evaluation_scores_and_predict_answers(installed, tmp_path, inference_checkpoint, synthetic_aokvqa,
                                                         question_image):
    """The evaluation command of the wheel, from a foreign directory: scores written, every question scored."""
    val = synthetic_aokvqa["canonical_dir"] / "val.jsonl"
    out = tmp_path / "eval"
    probe = ("import runpy, sys, mmcoconut; assert not mmcoconut.__file__.startswith(sys.argv[1]), mmcoconut.__file__; "
             "sys.argv = sys.argv[2:]; runpy.run_module('mmcoconut.cli.evaluate', run_name='__main__')")
    _run(installed, [sys.executable, "-c", probe, str(REPO), "mmcoconut-evaluate", "--model", str(inference_checkpoint),
                     "--data-file", str(val), "--split", "val", "--max-new-tokens", "4", "--output-dir", str(out)],
         tmp_path)
    metrics = json.loads((out / "metrics_val.json").read_text())
    assert metrics["num_samples"] == 3 and 0.0 <= metrics["mc_accuracy"] <= 1.0
    assert (out / "predictions_val.json").is_file() and (out / "samples_val.jsonl").is_file()

    target, _ = installed
    predict = target / "bin" / "mmcoconut-predict"
    answer = _run(installed, [sys.executable, str(predict), "--model", str(inference_checkpoint), "--image",
                              str(question_image), "--question", "What colour is the left square?",
                              "--max-new-tokens", "4"], tmp_path)
    assert answer.startswith("answer: "), answer
