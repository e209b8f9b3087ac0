"""Does the curriculum learn? no-CoT vs CoT vs Coconut vs no-image on a visual multi-hop task, same model and data.

    python -m experiments.learning_curve --out outputs/experiment

1. Generates the `colour_chain` set of `synthetic_data.py` (3-hop visual pointer chasing; the question and the
   four choices are identical for every image) and a text-only copy of it (images removed).
2. Builds the recipe's tiny random InternVL3-shaped model once (`{out}/init`; one 56-px tile = 16 image tokens,
   tied embeddings over a task tokenizer, `--tokenizer`) and trains, through `train.main` with
   `recipes/experiment_colour_chain.yaml`, every from-scratch run from those same weights:
     no_cot          mode no_cot, `--epochs` epochs over `--n-train` questions     (answer directly)
     cot             mode cot, the same budget                                     (Coconut stage 0)
     coconut_k       from coconut_{k-1} (coconut_0 = cot), mode coconut, `first_stage k`, `--stage-epochs` epochs
                     (`--final-stage-epochs` for k = hops) over the first `--stage-samples` questions: the first
                     k steps replaced by k·c_thought continuous thoughts, k = 1..hops
     no_image_no_cot as no_cot on the text-only copy (`--no-image-epochs`, default `--epochs`)
     no_image_cot    as cot on the text-only copy
3. Evaluates each on the validation split with greedy generation (`aokvqa_evaluation.evaluate_model`: vanilla for
   no_cot, cot for cot, coconut with the checkpoint's latent count) and writes `{out}/results.md` and
   `{out}/results.json`: multiple-choice accuracy, mean generated tokens per answer (up to and including EOS),
   training and evaluation seconds per method.

Runs whose `{out}/runs/{name}/results.json` exists are not redone (`--force` redoes them) as long as their recorded
settings match and the run they continued from was not redone since, so an interrupted experiment resumes where it
stopped, and after `--prepare` (data and initial model) two invocations with disjoint `--only` lists can share the
machine. Extra `train.py` flags go after `--`, e.g. `-- --learning_rate 1e-3`.
"""

import argparse
import json
import logging
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

import torch

from mmcoconut.cli.help import DefaultsHelpFormatter
from mmcoconut.cli.train import main as train_main
from mmcoconut.data.aokvqa import load_canonical
from mmcoconut.data.synthetic import TASKS, write_synthetic_aokvqa
from mmcoconut.evaluation.aokvqa import build_eval_dataset, default_num_latents, evaluate_model
from mmcoconut.processing import build_internvl_tokenizer, build_task_tokenizer, load_internvl_processor
from mmcoconut.text.prompt import tokenizer_texts
from mmcoconut.training.build import build_tiny_model
from mmcoconut.training.recipe import read_recipe
from modeling_mmcoconut import MMCoconutForConditionalGeneration

ROOT = Path(__file__).resolve().parent.parent


DEFAULT_RECIPE = ROOT / "recipes" / "experiment_colour_chain.yaml"


def build_parser():
    """The CLI's arguments; needs no torch, so `--help` answers before the imports below."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter
    )
    parser.add_argument("--out", default="outputs/experiment", help="output directory")
    parser.add_argument("--recipe", default=str(DEFAULT_RECIPE), help="train.py recipe the runs share")
    parser.add_argument("--task", default="colour_chain", choices=sorted(TASKS))
    parser.add_argument("--n-train", type=int, default=4000)
    parser.add_argument("--n-val", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="data seed")
    parser.add_argument("--epochs", type=int, default=8, help="epochs of the no-CoT, CoT and no-image runs")
    parser.add_argument("--no-image-epochs", type=int, help="epochs of the no-image runs (default: --epochs)")
    parser.add_argument(
        "--stage-epochs", type=int, default=2, help="epochs of each Coconut stage but the last (--final-stage-epochs)"
    )
    parser.add_argument(
        "--final-stage-epochs", type=int, default=6, help="epochs of the last Coconut stage (all steps latent)"
    )
    parser.add_argument("--train-samples", type=int, help="train no-CoT, CoT and no-image on the first N questions")
    parser.add_argument(
        "--stage-samples", type=int, help="train each Coconut stage on the first N questions (default: all)"
    )
    parser.add_argument(
        "--tokenizer", default="task", choices=("task", "internvl"),
        help="task: a small BPE trained on the training split (default); internvl: the real 151,674-id vocabulary",
    )
    parser.add_argument("--task-vocab-size", type=int, default=512, help="vocabulary cap of the task tokenizer")
    parser.add_argument("--eval-batch-size", type=int, default=50)
    parser.add_argument("--only", nargs="+", help="run only these methods (names as in the table)")
    parser.add_argument("--force", action="store_true", help="redo runs that already have results")
    parser.add_argument(
        "--prepare", action="store_true",
        help="only write the data and the initial model (then `--only` halves can run in parallel)",
    )
    return parser





logger = logging.getLogger("learning_curve")

# Generation budget per evaluation mode: an answer line is 6 tokens, a CoT chain of 3 steps 21; Coconut stages
# below the last still write their remaining steps. Counting stops at EOS, so the budget only caps runaways.
MAX_NEW_TOKENS = {"vanilla": 16, "cot": 48, "coconut": 48}
INIT_MANIFEST = "init_manifest.json"


def write_data(out, task, n_train, n_val, seed):
    """`{out}/data` (with images) and `{out}/data_no_image` (the same records, `image` removed); returns
    {"image": (train.jsonl, val.jsonl), "no_image": (...)}."""
    data = Path(out) / "data"
    manifest = {"task": task, "n_train": n_train, "n_val": n_val, "seed": seed}
    manifest_path = data / "manifest.json"
    if not (manifest_path.is_file() and json.loads(manifest_path.read_text()) == manifest):
        if manifest_path.is_file():
            raise ValueError(
                f"{data} holds a set generated with {manifest_path.read_text().strip()}, not {manifest}; "
                "choose another --out or delete it"
            )
        write_synthetic_aokvqa(data, n_train, n_val, seed=seed, task=task)
        manifest_path.write_text(json.dumps(manifest))
    no_image = Path(out) / "data_no_image"
    no_image.mkdir(parents=True, exist_ok=True)
    files = {"image": [], "no_image": []}
    for split in ("train", "val"):
        source = data / "canonical" / f"{split}.jsonl"
        target = no_image / f"{split}.jsonl"
        with open(source, encoding="utf-8") as f:
            text = "".join(json.dumps({**json.loads(line), "image": None}) + "\n" for line in f)
        if not (target.is_file() and target.read_text(encoding="utf-8") == text):
            # through a temporary file, so a run reading the copy in another process never sees it half written
            temporary = target.with_suffix(f".tmp{os.getpid()}")
            temporary.write_text(text, encoding="utf-8")
            os.replace(temporary, target)
        files["image"].append(source)
        files["no_image"].append(target)
    return files


def write_initial_model(out, recipe, train_file, tokenizer="task", task_vocab_size=512):
    """Build the recipe's tiny random model once and save it, with its processor, to `{out}/init`: every
    from-scratch run starts from these same weights (`--load_model_path`).

    `tokenizer="task"` gives the model a byte-level BPE of at most `task_vocab_size` ids trained on the training
    split (`build_task_tokenizer`): at InternVL3's 151,674 ids the vocabulary-sized work makes a CPU training step
    of this tiny model 6.5x slower (`experiments/step_time_by_vocabulary.py`). `tokenizer="internvl"` keeps the real
    vocabulary.

    Loading a saved checkpoint also sets the attention implementation on every sub-config, as every run does.
    """
    init = Path(out) / "init"
    manifest = {
        "recipe_tiny_internvl": recipe.get("tiny_internvl"),
        "seed": recipe.get("seed", 0),
        "max_tiles": recipe.get("max_tiles", 1),
        "tokenizer": tokenizer,
    }
    if tokenizer == "task":
        manifest["task_vocab_size"] = task_vocab_size
    if init.exists():
        return _check_initial_model(init, manifest)
    if recipe.get("tiny_internvl") is None:
        raise ValueError("the recipe must set tiny_internvl (the experiment trains a tiny model from scratch)")
    torch.manual_seed(recipe.get("seed", 0))
    overrides = recipe["tiny_internvl"]
    overrides = json.loads(overrides) if isinstance(overrides, str) else dict(overrides)
    if tokenizer == "task":
        text_tokenizer = build_task_tokenizer(tokenizer_texts(load_canonical(train_file)), task_vocab_size)
    elif tokenizer == "internvl":
        text_tokenizer = build_internvl_tokenizer()
    else:
        raise ValueError(f"tokenizer must be 'task' or 'internvl', got {tokenizer!r}")
    model, processor = build_tiny_model(overrides, text_tokenizer, recipe.get("max_tiles", 1))
    # Written under a temporary name and renamed, so `{out}/init` is either complete or absent.
    temporary = init.with_name(f"init.tmp{os.getpid()}")
    model.save_pretrained(temporary)
    processor.save_pretrained(temporary)
    (temporary / INIT_MANIFEST).write_text(json.dumps(manifest))
    try:
        temporary.rename(init)
    except OSError:  # another invocation finished first: use its model if it was built the same way
        shutil.rmtree(temporary)
        return _check_initial_model(init, manifest)
    logger.info(
        "initial model (%d parameters, vocabulary %d) written to %s",
        model.num_parameters(), len(processor.tokenizer), init,
    )
    return init


def _check_initial_model(init, manifest):
    manifest_path = init / INIT_MANIFEST
    if not manifest_path.is_file():
        raise ValueError(f"{init} has no {INIT_MANIFEST}, so it was not written by this script; delete it")
    found = json.loads(manifest_path.read_text())
    if found != manifest:
        raise ValueError(f"{init} holds a model built as {found}, not {manifest}; choose another --out or delete it")
    return init


def plan_runs(
    hops, epochs, stage_epochs, train_samples=None, stage_samples=None, no_image_epochs=None, final_stage_epochs=None
):
    """(name, train mode, eval mode, data key, start from run, first_stage, epochs, training questions) in order.

    The last Coconut stage trains `final_stage_epochs` (default `stage_epochs`): as in the original Coconut, whose
    training stays at the final stage for the epochs left after the curriculum.
    """
    runs = [
        ("no_cot", "no_cot", "vanilla", "image", None, 0, epochs, train_samples),
        ("cot", "cot", "cot", "image", None, 0, epochs, train_samples),
    ]
    previous = "cot"
    for stage in range(1, hops + 1):
        stage_budget = final_stage_epochs if stage == hops and final_stage_epochs is not None else stage_epochs
        runs.append((f"coconut_{stage}", "coconut", "coconut", "image", previous, stage, stage_budget, stage_samples))
        previous = f"coconut_{stage}"
    no_image_epochs = epochs if no_image_epochs is None else no_image_epochs
    runs += [
        ("no_image_no_cot", "no_cot", "vanilla", "no_image", None, 0, no_image_epochs, train_samples),
        ("no_image_cot", "cot", "cot", "no_image", None, 0, no_image_epochs, train_samples),
    ]
    return runs


def train_run(recipe, run_dir, mode, files, start_from, first_stage, epochs, samples, hops, extra_flags):
    argv = [
        str(recipe),
        "--data_source", "canonical",
        "--train_file", str(files[0]),
        "--eval_file", str(files[1]),
        "--mode", mode,
        "--output_dir", str(run_dir),
        "--num_train_epochs", str(epochs),
        "--first_stage", str(first_stage),
        "--max_latent_stage", str(hops),
        # one stage per run: the Coconut curriculum is the chain of runs coconut_1 .. coconut_hops
        "--epochs_per_stage", str(max(epochs, 1)),
        "--eval_strategy", "no",
        "--save_strategy", "no",
        # A run without results.json (interrupted, or redone with --force) is trained again from its start.
        "--overwrite_output_dir", "true",
    ]
    argv += ["--load_model_path", str(start_from)]
    if samples is not None:
        argv += ["--max_train_samples", str(samples)]
    start = time.perf_counter()
    train_main(argv + list(extra_flags))
    return time.perf_counter() - start


def evaluate_run(run_dir, eval_mode, val_file, max_tiles, batch_size):
    model = MMCoconutForConditionalGeneration.from_pretrained(run_dir, use_kernels=False)
    processor = load_internvl_processor(run_dir, max_tiles)
    dataset = build_eval_dataset(load_canonical(val_file), processor, eval_mode, model.config, max_tiles=max_tiles)
    # The checkpoint's own latent count (latent_stage × c_thought); the dataset alone would lay prompts out at stage 0.
    num_latents = default_num_latents(model.config) if eval_mode == "coconut" else None
    with torch.inference_mode():
        result = evaluate_model(
            model, dataset, num_latents=num_latents, batch_size=batch_size, max_new_tokens=MAX_NEW_TOKENS[eval_mode],
            show_progress=False,
        )
    return result


def check_reused_run(row, settings, start_row, path):
    """Refuse a finished run whose settings differ from this invocation's, or whose start run was redone since."""
    if "settings" not in row:
        logger.warning("%s: written before runs recorded their settings; reused without checking them", path)
        return
    if row["settings"] != settings:
        changed = {k: (row["settings"].get(k), v) for k, v in settings.items() if row["settings"].get(k) != v}
        raise ValueError(f"{path} was trained with other settings (recorded, now): {changed}; redo it with --force")
    if start_row is not None and row.get("start_run_id") != start_row.get("run_id"):
        raise ValueError(
            f"{path} was trained from an earlier {settings['start_from']} run, which has been redone since; "
            "redo it with --force"
        )


def finished_run(out, name, settings, start_from, force=False):
    """(the recorded row of run `name` to reuse, or None to train it; the row of the run it continues from, or None).

    A run continues from a finished run only; a finished run is reused unless `force`, after `check_reused_run`."""
    start_row = None
    if start_from is not None:
        start_path = Path(out) / "runs" / start_from / "results.json"
        if not start_path.is_file():
            raise FileNotFoundError(f"{name} continues from {start_path.parent}, which has not been trained; run it first")
        start_row = json.loads(start_path.read_text())
    result_path = Path(out) / "runs" / name / "results.json"
    if force or not result_path.is_file():
        return None, start_row
    logger.info("%s: done before, reading %s", name, result_path)
    row = json.loads(result_path.read_text())
    check_reused_run(row, settings, start_row, result_path)
    return row, start_row


def format_table(rows):
    header = (
        "| method | trained as | image | epochs × questions | latents | MC accuracy | mean generated tokens "
        "| unparseable | train s | eval s |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['name']} | {row['train_mode']}"
            + (f" stage {row['stage']}" if row["train_mode"] == "coconut" else "")
            + f" | {'yes' if row['image'] else 'no'} | {row['epochs']} × {row['train_questions']} "
            f"| {row['num_latents']} | {100 * row['mc_accuracy']:.1f}% "
            f"| {row['mean_generated_tokens']:.1f} | {row['num_unparseable']} | {row['train_seconds']:.0f} "
            f"| {row['eval_seconds']:.0f} |"
        )
    return "\n".join(lines)


def parse_experiment_args(parser, argv=None):
    """(the experiment's arguments, the extra `train.py` flags after them, without a leading `--`); sets up logging."""
    args, extra_flags = parser.parse_known_args(argv)
    if extra_flags and extra_flags[0] == "--":
        extra_flags = extra_flags[1:]
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    return args, extra_flags


def main(argv=None):
    parser = build_parser()
    args, extra_flags = parse_experiment_args(parser, argv)

    out = Path(args.out)
    hops = getattr(TASKS[args.task](), "hops", None)
    if hops is None:
        raise ValueError(f"task {args.task!r} has no `hops`; the Coconut curriculum needs one stage per step")
    files = write_data(out, args.task, args.n_train, args.n_val, args.seed)
    recipe = read_recipe(args.recipe)
    max_tiles = recipe.get("max_tiles", 1)

    plan = plan_runs(
        hops, args.epochs, args.stage_epochs, args.train_samples, args.stage_samples, args.no_image_epochs,
        args.final_stage_epochs,
    )
    unknown = sorted(set(args.only or ()) - {run[0] for run in plan})
    if unknown:
        parser.error(f"--only: unknown runs {unknown}; the runs are {[run[0] for run in plan]}")
    init = write_initial_model(out, recipe, files["image"][0], args.tokenizer, args.task_vocab_size)
    if args.prepare:
        logger.info("data and initial model ready under %s", out)
        return None
    rows, started = [], time.perf_counter()
    for name, mode, eval_mode, data_key, start_from, first_stage, epochs, samples in plan:
        run_dir = out / "runs" / name
        result_path = run_dir / "results.json"
        if args.only and name not in args.only:
            continue
        settings = {
            "recipe": str(args.recipe), "train_mode": mode, "data": data_key, "start_from": start_from,
            "first_stage": first_stage, "epochs": epochs, "train_questions": samples, "extra_train_flags": extra_flags,
        }
        row, start_row = finished_run(out, name, settings, start_from, args.force)
        if row is not None:
            rows.append(row)
            continue
        start_dir = init if start_from is None else out / "runs" / start_from
        logger.info("%s: training (%s, first_stage %d, %d epochs, %s)", name, mode, first_stage, epochs, data_key)
        train_seconds = train_run(
            args.recipe, run_dir, mode, files[data_key], start_dir, first_stage, epochs, samples, hops, extra_flags
        )
        result = evaluate_run(run_dir, eval_mode, files[data_key][1], max_tiles, args.eval_batch_size)
        row = {
            "name": name,
            "run_id": uuid.uuid4().hex,
            "start_run_id": None if start_row is None else start_row.get("run_id"),
            "settings": settings,
            "train_mode": mode,
            "eval_mode": eval_mode,
            "stage": first_stage,
            "image": data_key == "image",
            "epochs": epochs,
            "train_questions": samples if samples is not None else args.n_train,
            "num_latents": result.samples[0]["num_latents"],
            "mc_accuracy": result.metrics["mc_accuracy"],
            "mean_generated_tokens": result.metrics["mean_generated_tokens"],
            "num_unparseable": result.metrics["num_unparseable"],
            "num_samples": result.metrics["num_samples"],
            "train_seconds": train_seconds,
            "eval_seconds": result.metrics["seconds"],
            "example": {k: result.samples[0][k] for k in ("generated_text", "parsed_letter", "correct")},
        }
        result_path.write_text(json.dumps(row, indent=1))
        logger.info(
            "%s: MC accuracy %.3f, %.1f generated tokens", name, row["mc_accuracy"], row["mean_generated_tokens"]
        )
        rows.append(row)

    table = format_table(rows)
    wall = time.perf_counter() - started
    summary = {
        "command": " ".join(["python -m experiments.learning_curve", *(sys.argv[1:] if argv is None else argv)]),
        "task": args.task,
        "n_train": args.n_train,
        "n_val": args.n_val,
        "recipe": recipe,
        "extra_train_flags": extra_flags,
        "wall_seconds_this_invocation": wall,
        "torch_threads": torch.get_num_threads(),
        "runs": rows,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    (out / "results.md").write_text(
        f"`{summary['command']}` ({args.task}, {args.n_train} train / {args.n_val} val questions)\n\n{table}\n"
    )
    print(table)
    return summary


__all__ = [
    "build_parser", "write_data", "write_initial_model", "plan_runs", "train_run", "evaluate_run", "check_reused_run", "finished_run", "parse_experiment_args",
    "format_table", "main",
]

if __name__ == "__main__":
    main()
