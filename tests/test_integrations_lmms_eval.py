"""The lmms-eval plug-in (mmcoconut/integrations/lmms_eval.py) and the A-OKVQA tasks in lmms_eval_tasks/.

Needs the `lmms-eval` extra (`make test-lmms-eval` installs it into .venv-lmms and runs this file, slow tests
included); skipped where it is not installed. lmms-eval's CLI exits 0 even when the run failed, so the runs are
judged by their results files, never by the exit code.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmcoconut.cli.evaluate import main as evaluate_main
from mmcoconut.errors import UserValueError

plugin = pytest.importorskip("mmcoconut.integrations.lmms_eval", reason="needs the lmms-eval extra")

REPO = Path(__file__).resolve().parents[1]
DEMO_COT = REPO / "checkpoints" / "demo-cot"
TASKS_DIR = REPO / "lmms_eval_tasks"


@pytest.fixture(scope="module")
def depth_set(tmp_path_factory):
    """8 val questions of the variable-depth pointer task in the official A-OKVQA layout: checkpoints/demo-cot was
    trained on 3 hops only, so its answers here are a mix of right, wrong and (with thoughts) unparseable."""
    from mmcoconut.data.synthetic import write_synthetic_aokvqa

    return write_synthetic_aokvqa(tmp_path_factory.mktemp("depth"), n_train=0, n_val=8, seed=0,
                                  task="colour_chain_depth")


def run_lmms_eval(data, model_args, tasks, out, launcher=(sys.executable,), batch_size=4, env=None):
    """`python -m lmms_eval` offline on `data`; returns (results dict or None, {task: [sample, ...]}, output)."""
    env = {**os.environ, "AOKVQA_DIR": str(data["aokvqa_dir"]), "COCO_DIR": str(data["coco_dir"]),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    command = [*launcher, "-m", "lmms_eval", "--model", plugin.MODEL_ID, "--model_args", model_args, "--tasks", tasks,
               "--include_path", str(TASKS_DIR), "--batch_size", str(batch_size), "--output_path", str(out),
               "--log_samples"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    results_files = sorted(Path(out).rglob("*_results.json"))
    if not results_files:
        return None, {}, output
    samples = {}
    for path in Path(out).rglob("*_samples_*.jsonl"):
        task = path.stem.split("_samples_")[1]
        samples[task] = sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])
    return json.loads(results_files[-1].read_text())["results"], samples, output


# ---- agreement with evaluate_aokvqa.py ----

AGREEMENT_CASES = {
    # a checkpoint that writes its steps (no latent span)
    "cot": ("", ["--mode", "cot"]),
    # 2 continuous thoughts before the answer
    "thoughts": (",num_latents=2", ["--mode", "coconut", "--num-latents", "2"]),
    # adaptive thinking, at most 2 thoughts
    "adaptive": (",thinking=adaptive,max_thoughts=2",
                 ["--mode", "coconut", "--thinking", "adaptive", "--max-thoughts", "2"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(AGREEMENT_CASES))
def test_lmms_eval_scores_as_evaluate_aokvqa_does(case, depth_set, tmp_path):
    """The same answer per question and the same MC and DA accuracy and unparseable count, from lmms-eval's
    aokvqa_mc / aokvqa_da and from evaluate_aokvqa.py, on the same official-layout set."""
    model_args, evaluate_flags = AGREEMENT_CASES[case]
    results, samples, output = run_lmms_eval(depth_set, f"pretrained={DEMO_COT}{model_args}",
                                             "aokvqa_mc,aokvqa_da", tmp_path / "lmms")
    assert results is not None, f"lmms-eval wrote no results file:\n{output[-3000:]}"
    metrics = evaluate_main([
        "--model", str(DEMO_COT), *evaluate_flags, "--aokvqa-dir", str(depth_set["aokvqa_dir"]),
        "--coco-dir", str(depth_set["coco_dir"]), "--output-dir", str(tmp_path / "evaluate"), "--batch-size", "3",
    ])
    expected = [json.loads(line) for line in (tmp_path / "evaluate" / "samples_val.jsonl").read_text().splitlines()]
    assert len(expected) == 8
    for task, metric in (("aokvqa_mc", "mc_accuracy"), ("aokvqa_da", "da_accuracy")):
        assert results[task][f"{metric},none"] == metrics[metric], task
        assert results[task]["unparseable,none"] == metrics["num_unparseable"], task
        assert [s[metric]["question_id"] for s in samples[task]] == [e["question_id"] for e in expected]
        assert [s["filtered_resps"] for s in samples[task]] == [e["generated_text"] for e in expected]
        assert [s[metric]["parsed_letter"] for s in samples[task]] == [e["parsed_letter"] for e in expected]
        assert [s[metric]["prediction"] for s in samples[task]] == [e["prediction"] for e in expected]
    thoughts = {"cot": 0, "thoughts": 2, "adaptive": 2}[case]  # demo-cot never learned to stop thinking
    assert [e["thoughts"] for e in expected] == [thoughts] * 8


@pytest.mark.slow
def test_accelerate_launch_two_processes_matches_one(depth_set, tmp_path):
    """Under `accelerate launch`, lmms-eval splits the requests across the processes; the answers are the same."""
    model_args = f"pretrained={DEMO_COT},num_latents=2"
    one, one_samples, output = run_lmms_eval(depth_set, model_args, "aokvqa_mc", tmp_path / "one")
    assert one is not None, output[-3000:]
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no")
    two, two_samples, output = run_lmms_eval(depth_set, model_args, "aokvqa_mc", tmp_path / "two", launcher=launcher,
                                             env={"ACCELERATE_USE_CPU": "1"})
    assert two is not None, output[-3000:]
    assert "Running on rank 1" in output
    assert two["aokvqa_mc"] == one["aokvqa_mc"]
    assert [s["filtered_resps"] for s in two_samples["aokvqa_mc"]] == [s["filtered_resps"]
                                                                       for s in one_samples["aokvqa_mc"]]


# ---- what the plug-in refuses; lmms-eval's exit code ----


def test_a_failed_run_exits_0_and_writes_no_results_file(depth_set, tmp_path):
    """Why the tests read results files: an unknown model argument fails the run, and the CLI still exits 0."""
    results, _, output = run_lmms_eval(depth_set, f"pretrained={DEMO_COT},num_latent=2", "aokvqa_mc", tmp_path)
    assert results is None
    assert "--model_args num_latent: not an mmcoconut model argument" in output


def test_loglikelihood_and_multi_round_tasks_are_refused_by_name():
    class Request:
        task_name = "mmbench_ll"

    model = plugin.MMCoconutLMM.__new__(plugin.MMCoconutLMM)  # the refusals need no checkpoint
    with pytest.raises(UserValueError, match="task 'mmbench_ll' scores answers by loglikelihood"):
        model.loglikelihood([Request()])
    with pytest.raises(UserValueError, match="task 'mmbench_ll' is a multi-round task"):
        model.generate_until_multi_round([Request()])


@pytest.mark.parametrize(
    ("gen_kwargs", "options", "until"),
    [
        ({}, {"max_new_tokens": None, "do_sample": None}, []),  # the checkpoint's generation_config decides
        ({"until": ["\n\n"], "max_new_tokens": 16, "temperature": 0, "do_sample": False, "num_beams": 1},
         {"max_new_tokens": 16, "do_sample": False}, ["\n\n"]),
        ({"temperature": 0}, {"max_new_tokens": None, "do_sample": False}, []),  # lmms-eval: temperature 0 is greedy
        ({"temperature": 0.7, "top_p": 0.9, "until": "Q:"},
         {"max_new_tokens": None, "do_sample": True, "temperature": 0.7, "top_p": 0.9}, ["Q:"]),
        ({"temperature": 0.7, "do_sample": False}, {"max_new_tokens": None, "do_sample": False}, []),
    ],
)
def test_gen_kwargs_become_generate_options(gen_kwargs, options, until):
    assert plugin.decoding_options(gen_kwargs, "t") == (options, until)


@pytest.mark.parametrize(
    ("gen_kwargs", "message"),
    [
        ({"image_aspect_ratio": "pad"}, r"does not support the generation options \['image_aspect_ratio'\]"),
        ({"num_beams": 4}, "not with beam search"),
        ({"do_sample": True, "temperature": 0}, "sampling needs a temperature > 0"),
        ({"until": 3}, "until must be a string or a list of strings"),
    ],
)
def test_gen_kwargs_that_would_change_the_results_are_refused(gen_kwargs, message):
    with pytest.raises(UserValueError, match=message):
        plugin.decoding_options(gen_kwargs, "t")


def test_until_cuts_at_the_first_stop_string():
    assert plugin.cut_at("a\nAnswer: B. blue\n\nmore", ["\n\n", "zzz"]) == "a\nAnswer: B. blue"
    assert plugin.cut_at("Answer: B", []) == "Answer: B"


# ---- another benchmark: lmms-eval's own ScienceQA-IMG task on a generated local copy ----


@pytest.mark.slow
def test_lmms_evals_own_scienceqa_img_task_runs_offline_on_a_local_copy(tmp_path):
    from mmcoconut.integrations.scienceqa_copy import lmms_eval_task_yaml, write_scienceqa_copy

    copy = write_scienceqa_copy(tmp_path / "sqa", n=4)
    assert f"include: {lmms_eval_task_yaml()}" in (copy / "scienceqa_img_local.yaml").read_text()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "lmms_eval", "--model", plugin.MODEL_ID, "--model_args", f"pretrained={DEMO_COT}",
               "--tasks", "scienceqa_img_local", "--include_path", str(copy), "--reasoning_tags",
               '[["<think>", "Answer:"]]', "--gen_kwargs", "max_new_tokens=64", "--batch_size", "4",
               "--output_path", str(tmp_path / "out"), "--log_samples"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    results_files = list((tmp_path / "out").rglob("*_results.json"))
    assert results_files, (done.stdout + done.stderr)[-3000:]
    results = json.loads(results_files[0].read_text())
    assert 0.0 <= results["results"]["scienceqa_img_local"]["exact_match,none"] <= 1.0
    (samples_file,) = (tmp_path / "out").rglob("*_samples_scienceqa_img_local.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(samples) == 4
    # lmms-eval's --reasoning_tags hands its parser what follows the checkpoint's last `Answer:`
    for sample in samples:
        assert sample["filtered_resps"] == sample["resps"].rsplit("Answer:", 1)[1].strip()
