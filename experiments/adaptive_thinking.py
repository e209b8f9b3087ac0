"""Adaptive thinking on variable-depth visual reasoning: CoT vs fixed-max Coconut vs adaptive Coconut, per hop count.

    python -m experiments.adaptive_thinking --out outputs/adaptive

1. Generates the `colour_chain_depth` set of `synthetic_data.py` (visual pointer chasing with 1 to 4 hops, drawn
   per question and stated in it; the answer is decided by the image) and builds the recipe's tiny random
   InternVL3-shaped model once (`{out}/init`, as `learning_curve.py` does).
2. Trains, through `train.main` with `recipes/experiment_colour_chain.yaml`:
     cot          mode cot from the initial model, `--cot-epochs` epochs (Coconut stage 0 of both branches)
     fixed_k      from fixed_{k-1} (fixed_0 = cot), Coconut stage k with `pad_latent_to_max: true`: every question
                  gets k thoughts, however many hops it has (the original Coconut's layout), k = 1..4
     adaptive_k   from adaptive_{k-1} (adaptive_0 = cot), Coconut stage k with `pad_latent_to_max: false` and
                  `supervise_end_latent: true`: a question with n hops gets min(k, n) thoughts and learns to
                  predict `<|end-latent|>` after the last one
   Each stage trains `--stage-epochs` epochs, the last `--final-stage-epochs`.
3. Evaluates every run on the validation split with greedy generation, in its checkpoint's own way (CoT writes
   its steps; fixed_k thinks k thoughts; adaptive_k thinks until it predicts `<|end-latent|>`, at most k), and
   reports per hop count: multiple-choice accuracy, mean thoughts, mean generated tokens.
4. Once every run is trained (no `--only`), on the final stages: test-time scaling (each model forced to think
   0..`--max-forced` thoughts, and the adaptive one free to think up to `--max-forced`), the thoughts the adaptive
   model chose per hop count, and linear probes (`probe_latents.py`) from each thought to the colour reached
   after each hop (fixed: 4 thoughts for every question; adaptive: as many as the question has hops).

Writes `{out}/results.md`, `{out}/results.json`, `{out}/probe_fixed.png` and `{out}/probe_adaptive.png`. As in
`learning_curve.py`, a finished run (`{out}/runs/NAME/results.json`) is read back, not redone (`--force` redoes
it), unless its settings or the run it continued from changed; after `--prepare`, `--only cot`, then the two
branches as two `--only` invocations can share the machine. Extra `train.py` flags go after `--`.
"""

import argparse
import json
import logging
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import torch

from experiments.learning_curve import finished_run, parse_experiment_args, train_run, write_data, write_initial_model
from mmcoconut.analysis import probes as probe_latents
from mmcoconut.cli.help import DefaultsHelpFormatter
from mmcoconut.data.aokvqa import load_canonical
from mmcoconut.data.synthetic import TASKS
from mmcoconut.evaluation.aokvqa import build_eval_dataset, default_num_latents, evaluate_model
from mmcoconut.processing import load_internvl_processor
from mmcoconut.training.recipe import read_recipe
from modeling_mmcoconut import MMCoconutForConditionalGeneration

ROOT = Path(__file__).resolve().parent.parent


DEFAULT_RECIPE = ROOT / "recipes" / "experiment_colour_chain.yaml"
TASK = "colour_chain_depth"
BRANCHES = {  # branch → train.py flags of its Coconut stages
    "fixed": ["--pad_latent_to_max", "true"],
    "adaptive": ["--pad_latent_to_max", "false", "--supervise_end_latent", "true"],
}
# Generation budget: 4 written steps and the answer line are about 30 tokens; counting stops at EOS.
MAX_NEW_TOKENS = 64


def build_parser():
    """The CLI's arguments; needs no torch, so `--help` answers before the imports below."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter
    )
    parser.add_argument("--out", default="outputs/adaptive", help="output directory")
    parser.add_argument("--recipe", default=str(DEFAULT_RECIPE), help="train.py recipe the runs share")
    parser.add_argument("--n-train", type=int, default=4000)
    parser.add_argument("--n-val", type=int, default=1000, help="validation questions (about a quarter per hop count)")
    parser.add_argument("--seed", type=int, default=0, help="data seed")
    parser.add_argument("--cot-epochs", type=int, default=10, help="epochs of the CoT run (stage 0)")
    parser.add_argument("--stage-epochs", type=int, default=2, help="epochs of each Coconut stage but the last")
    parser.add_argument("--final-stage-epochs", type=int, default=6, help="epochs of the last Coconut stage")
    parser.add_argument(
        "--tokenizer", default="task", choices=("task", "internvl"),
        help="task: a small BPE trained on the training split (default); internvl: the real 151,674-id vocabulary",
    )
    parser.add_argument("--task-vocab-size", type=int, default=512, help="vocabulary cap of the task tokenizer")
    parser.add_argument("--eval-batch-size", type=int, default=50)
    parser.add_argument("--max-forced", type=int, default=6, help="test-time scaling: force 0..N thoughts")
    parser.add_argument("--probe-l2", type=float, default=1e-2, help="L2 penalty of the linear probes")
    parser.add_argument("--only", nargs="+", help="train only these runs (names as in the tables); no analysis")
    parser.add_argument("--force", action="store_true", help="redo runs that already have results")
    parser.add_argument("--prepare", action="store_true", help="only write the data and the initial model")
    return parser





logger = logging.getLogger("adaptive_thinking")


def plan_runs(hops, cot_epochs, stage_epochs, final_stage_epochs):
    """(name, branch, start from run, stage, epochs) in training order: cot, then each branch's stages."""
    runs = [("cot", "cot", None, 0, cot_epochs)]
    for branch in BRANCHES:
        previous = "cot"
        for stage in range(1, hops + 1):
            epochs = final_stage_epochs if stage == hops else stage_epochs
            runs.append((f"{branch}_{stage}", branch, previous, stage, epochs))
            previous = f"{branch}_{stage}"
    return runs


# ---------------------------------------------------------------------------------------------- evaluation


def by_hops(samples, hops_of):
    """Per hop count (and `all`): questions, MC accuracy, mean thoughts, mean generated tokens, and how many
    questions were answered after each number of thoughts (`thoughts_used`)."""
    groups = {"all": samples}
    for hops in sorted({hops_of[sample["question_id"]] for sample in samples}):
        groups[str(hops)] = [sample for sample in samples if hops_of[sample["question_id"]] == hops]
    return {
        key: {
            "n": len(group),
            "mc_accuracy": sum(bool(sample["correct"]) for sample in group) / len(group),
            "mean_thoughts": sum(sample["thoughts"] for sample in group) / len(group),
            "mean_generated_tokens": sum(sample["num_generated_tokens"] for sample in group) / len(group),
            "thoughts_used": dict(sorted(Counter(str(sample["thoughts"]) for sample in group).items())),
        }
        for key, group in groups.items()
    }


class Evaluator:
    """One checkpoint, loaded once, evaluated on the validation records in several ways."""

    def __init__(self, run_dir, records, batch_size):
        self.model = MMCoconutForConditionalGeneration.from_pretrained(run_dir, use_kernels=False)
        self.processor = load_internvl_processor(run_dir)  # the saved tiling
        self.records, self.batch_size = records, batch_size
        self.hops_of = {record["id"]: len(record["steps"]) for record in records}

    def __call__(self, mode, thinking=None, num_latents=None, max_thoughts=None):
        """`by_hops` of greedy answers, plus `seconds`. Mode coconut with no option thinks as the checkpoint was
        trained to (fixed: its latent_stage × c_thought thoughts; adaptive: until it stops, at most that many)."""
        result = self.run(mode, thinking, num_latents, max_thoughts)
        return {"seconds": result.metrics["seconds"], "per_hop": by_hops(result.samples, self.hops_of)}

    def run(self, mode, thinking=None, num_latents=None, max_thoughts=None):
        """`evaluate_model`'s result (every sample's answer) for the way of thinking `__call__` describes."""
        config = self.model.config
        thinking = thinking or (config.default_thinking if mode == "coconut" else None)
        if mode == "coconut" and thinking == "fixed" and num_latents is None:
            num_latents = default_num_latents(config)
        dataset = build_eval_dataset(self.records, self.processor, mode, config, thinking=thinking)
        with torch.inference_mode():
            result = evaluate_model(
                self.model, dataset, num_latents=num_latents, thinking=thinking, max_thoughts=max_thoughts,
                batch_size=self.batch_size, max_new_tokens=MAX_NEW_TOKENS, show_progress=False,
            )
        if result.metrics["num_without_eos"]:
            logger.warning("%d answers did not end within %d tokens", result.metrics["num_without_eos"], MAX_NEW_TOKENS)
        return result


def test_time_scaling(evaluator, max_forced):
    """Per way of thinking (forced 0..max_forced thoughts; for an adaptive checkpoint also free thinking up to
    max_forced): `Evaluator` results."""
    rows = {f"forced {n}": evaluator("coconut", thinking="fixed", num_latents=n) for n in range(max_forced + 1)}
    if evaluator.model.config.default_thinking == "adaptive":
        rows[f"adaptive, at most {max_forced}"] = evaluator("coconut", thinking="adaptive", max_thoughts=max_forced)
    return rows


def probe(evaluator, l2):
    """`probe_latents` on the validation records with the thoughts the checkpoint thinks for each (fixed: its
    count; adaptive: one per hop)."""
    config = evaluator.model.config
    if config.default_thinking == "adaptive":
        counts = [len(record["steps"]) * config.c_thought for record in evaluator.records]
    else:
        counts = default_num_latents(config)
    states = probe_latents.collect_states(
        evaluator.model, evaluator.processor, evaluator.records, counts, evaluator.batch_size
    )
    targets = probe_latents.hop_targets(evaluator.records)
    return probe_latents.probe_table(states, targets, probe_latents.state_names(states.shape[1] - 2), l2=l2)


# ---------------------------------------------------------------------------------------------- tables


def chose_hops(per_hop):
    """Questions answered after exactly as many thoughts as they have hops."""
    return sum(metrics["thoughts_used"].get(key, 0) for key, metrics in per_hop.items() if key != "all")


def _hop_keys(per_hop):
    return [key for key in per_hop if key != "all"] + ["all"]


def _cell(metrics):
    accuracy, thoughts, tokens = metrics["mc_accuracy"], metrics["mean_thoughts"], metrics["mean_generated_tokens"]
    return f"{100 * accuracy:.1f}% · {thoughts:.2f} · {tokens:.1f}"


def per_hop_table(rows):
    """`rows`: [(label, per_hop)]; each cell is accuracy · mean thoughts · mean generated tokens."""
    keys = _hop_keys(rows[0][1])
    names = ["all" if k == "all" else f"{k} hop{'s' if k != '1' else ''}" for k in keys]
    header = "| method | " + " | ".join(names) + " |"
    lines = [header, "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(_cell(per_hop[k]) for k in keys) + " |" for label, per_hop in rows]
    return "\n".join(lines)


def curriculum_table(rows):
    lines = [
        "| run | stage | epochs × questions | MC accuracy | mean thoughts | mean generated tokens "
        "| train s | eval s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        overall = row["eval"]["per_hop"]["all"]
        lines.append(
            f"| {row['name']} | {row['stage']} | {row['epochs']} × {row['train_questions']} "
            f"| {100 * overall['mc_accuracy']:.1f}% | {overall['mean_thoughts']:.2f} "
            f"| {overall['mean_generated_tokens']:.1f} | {row['train_seconds']:.0f} | {row['eval']['seconds']:.0f} |"
        )
    return "\n".join(lines)


def scaling_table(scaling):
    """Accuracy per hop count for each way of thinking of each model."""
    first = next(iter(next(iter(scaling.values())).values()))["per_hop"]
    keys = _hop_keys(first)
    lines = ["| model | thoughts | " + " | ".join(keys) + " | mean thoughts |", "|---" * (len(keys) + 3) + "|"]
    for model, rows in scaling.items():
        for label, result in rows.items():
            per_hop = result["per_hop"]
            lines.append(
                f"| {model} | {label} | " + " | ".join(f"{100 * per_hop[k]['mc_accuracy']:.1f}%" for k in keys)
                + f" | {per_hop['all']['mean_thoughts']:.2f} |"
            )
    return "\n".join(lines)


def thoughts_table(per_hop, max_thoughts):
    """Questions per hop count (rows) answered after each number of thoughts (columns)."""
    keys = [key for key in per_hop if key != "all"]
    lines = ["| hops | " + " | ".join(f"{n} thoughts" for n in range(max_thoughts + 1)) + " |",
             "|---" * (max_thoughts + 2) + "|"]
    for key in keys:
        used = per_hop[key]["thoughts_used"]
        lines.append(f"| {key} | " + " | ".join(str(used.get(str(n), 0)) for n in range(max_thoughts + 1)) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main


def main(argv=None):
    parser = build_parser()
    args, extra_flags = parse_experiment_args(parser, argv)

    out = Path(args.out)
    hops = TASKS[TASK]().hops
    plan = plan_runs(hops, args.cot_epochs, args.stage_epochs, args.final_stage_epochs)
    unknown = sorted(set(args.only or ()) - {run[0] for run in plan})
    if unknown:
        parser.error(f"--only: unknown runs {unknown}; the runs are {[run[0] for run in plan]}")
    files = write_data(out, TASK, args.n_train, args.n_val, args.seed)["image"]
    recipe = read_recipe(args.recipe)
    init = write_initial_model(out, recipe, files[0], args.tokenizer, args.task_vocab_size)
    if args.prepare:
        logger.info("data and initial model ready under %s", out)
        return None
    val_records = list(load_canonical(files[1]))
    started = time.perf_counter()

    rows = []
    for name, branch, start_from, stage, epochs in plan:
        if args.only and name not in args.only:
            continue
        settings = {
            "recipe": str(args.recipe), "branch": branch, "start_from": start_from, "stage": stage, "epochs": epochs,
            "extra_train_flags": extra_flags, "n_val": args.n_val,
        }
        row, start_row = finished_run(out, name, settings, start_from, args.force)
        if row is not None:
            rows.append(row)
            continue
        run_dir = out / "runs" / name
        logger.info("%s: training (%s, stage %d, %d epochs)", name, branch, stage, epochs)
        mode = "cot" if branch == "cot" else "coconut"
        train_seconds = train_run(
            args.recipe, run_dir, mode, files, init if start_from is None else out / "runs" / start_from, stage,
            epochs, None, hops, BRANCHES.get(branch, []) + list(extra_flags),
        )
        evaluation = Evaluator(run_dir, val_records, args.eval_batch_size)(mode)
        row = {
            "name": name, "run_id": uuid.uuid4().hex,
            "start_run_id": None if start_row is None else start_row["run_id"],
            "settings": settings, "branch": branch, "stage": stage, "epochs": epochs, "train_questions": args.n_train,
            "train_seconds": train_seconds, "eval": evaluation,
        }
        (run_dir / "results.json").write_text(json.dumps(row, indent=1))
        overall = evaluation["per_hop"]["all"]
        logger.info("%s: MC accuracy %.3f, %.2f thoughts, %.1f generated tokens", name, overall["mc_accuracy"],
                    overall["mean_thoughts"], overall["mean_generated_tokens"])
        rows.append(row)

    summary = {
        "command": " ".join(["python -m experiments.adaptive_thinking", *(sys.argv[1:] if argv is None else argv)]),
        "task": TASK, "n_train": args.n_train, "n_val": args.n_val, "recipe": recipe, "extra_train_flags": extra_flags,
        "torch_threads": torch.get_num_threads(), "runs": rows,
    }
    sections = [f"`{summary['command']}` ({TASK}, {args.n_train} train / {args.n_val} val questions)",
                "## Every run (its own way of thinking)", curriculum_table(rows)]
    if not args.only:
        finals = {row["name"]: row for row in rows}
        main_rows = [("CoT", finals["cot"]["eval"]["per_hop"]),
                     (f"Coconut, fixed {hops} thoughts", finals[f"fixed_{hops}"]["eval"]["per_hop"]),
                     (f"Coconut, adaptive (at most {hops})", finals[f"adaptive_{hops}"]["eval"]["per_hop"])]
        analysis_start = time.perf_counter()
        scaling, probes = {}, {}
        for branch in BRANCHES:
            evaluator = Evaluator(out / "runs" / f"{branch}_{hops}", val_records, args.eval_batch_size)
            scaling[f"{branch}_{hops}"] = test_time_scaling(evaluator, args.max_forced)
            probes[branch] = probe(evaluator, args.probe_l2)
            probe_latents.plot_probe(
                probes[branch], out / f"probe_{branch}.png",
                f"{branch}_{hops}: linear probes, {len(val_records)} questions",
            )
        adaptive_free = scaling[f"adaptive_{hops}"][f"adaptive, at most {args.max_forced}"]["per_hop"]
        summary.update(main=dict(main_rows), scaling=scaling, probes=probes,
                       analysis_seconds=time.perf_counter() - analysis_start)
        sections += [
            "## Final stages per hop count (MC accuracy · mean thoughts · mean generated tokens)",
            per_hop_table(main_rows),
            f"## Thoughts the adaptive model chose (adaptive_{hops}, at most {hops}), questions per hop count",
            thoughts_table(finals[f"adaptive_{hops}"]["eval"]["per_hop"], hops),
            "## Test-time scaling: MC accuracy per hop count when forced to think N thoughts",
            scaling_table(scaling),
            f"Adaptive free to think up to {args.max_forced}, thoughts chosen per hop count:",
            thoughts_table(adaptive_free, args.max_forced),
            f"## Linear probes, fixed_{hops} (every question gets {hops} thoughts)",
            "```\n" + probe_latents.format_table(probes["fixed"]) + "\n```",
            f"## Linear probes, adaptive_{hops} (a question gets one thought per hop; the model itself chose that "
            f"count for {chose_hops(finals[f'adaptive_{hops}']['eval']['per_hop'])} of {len(val_records)} questions)",
            "```\n" + probe_latents.format_table(probes["adaptive"]) + "\n```",
        ]
    summary["wall_seconds_this_invocation"] = time.perf_counter() - started
    text = "\n\n".join(sections) + "\n"
    if not args.only:  # a partial invocation (possibly one of two in parallel) leaves the full results alone
        (out / "results.json").write_text(json.dumps(summary, indent=1))
        (out / "results.md").write_text(text)
    print(text)
    return summary


__all__ = ["plan_runs", "by_hops", "Evaluator", "test_time_scaling", "probe", "per_hop_table", "curriculum_table",
           "scaling_table", "thoughts_table", "chose_hops", "main"]

if __name__ == "__main__":
    main()
