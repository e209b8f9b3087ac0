"""Step-level supervision of continuous thoughts on variable-depth visual reasoning: accuracy, probes, causal tests.

    python -m experiments.thought_supervision --out outputs/adaptive

The task, model, recipe and schedule of `experiments/adaptive_thinking.py` (`colour_chain_depth`: 1 to 4 hops; CoT
10 epochs, then Coconut stages 1..4 of 2 epochs each and 6 at the last), with four Coconut branches from the one
CoT run:
    fixed            `pad_latent_to_max: true` (every question thinks k thoughts at stage k)
    adaptive         `pad_latent_to_max: false`, `supervise_end_latent: true` (min(k, hops) thoughts, learns to stop)
    fixed_step       fixed + `thought_supervision: step` (weight `--weight`): each thought is decoded by the model
    adaptive_step    adaptive + `thought_supervision: step`          itself into the written step it replaced
`fixed` and `adaptive` are `adaptive_thinking`'s runs under the same names and settings: with the same `--out`, the
runs that experiment finished are read back, not redone (and the other way round).

Every run is evaluated on the validation split per hop count (its own way of thinking). Once every run is trained
(no `--only`), the final stage of each branch gets the linear probes of `mmcoconut.analysis.probes` and the causal
tests of `mmcoconut.analysis.interventions` (thought k kept / zeroed / noise / swapped, on the first
`--causal-limit` validation questions); each run's analysis is kept in `{out}/runs/NAME/analysis.json` and read back
while the run and the analysis settings are the same. Writes `{out}/thought_supervision/results.{md,json}`,
`probe_BRANCH.png` and `causal_BRANCH.png`. Extra `train.py` flags go after `--`.
"""

import argparse
import json
import logging
import sys
import time
import uuid
from pathlib import Path

import torch

from experiments import adaptive_thinking
from experiments.adaptive_thinking import Evaluator, curriculum_table, per_hop_table, probe
from experiments.learning_curve import finished_run, parse_experiment_args, train_run, write_data, write_initial_model
from mmcoconut.analysis import probes as probe_latents
from mmcoconut.analysis.interventions import causal_table, format_causal_table, intervene, plot_causal
from mmcoconut.cli.help import DefaultsHelpFormatter
from mmcoconut.data.aokvqa import load_canonical
from mmcoconut.data.synthetic import TASKS
from mmcoconut.training.recipe import read_recipe

logger = logging.getLogger("thought_supervision")

TASK = "colour_chain_depth"
STEP_FLAGS = ["--thought_supervision", "step"]
BRANCHES = {  # branch → train.py flags of its Coconut stages (the weight is added by `branch_flags`)
    "fixed": adaptive_thinking.BRANCHES["fixed"],
    "adaptive": adaptive_thinking.BRANCHES["adaptive"],
    "fixed_step": [*adaptive_thinking.BRANCHES["fixed"], *STEP_FLAGS],
    "adaptive_step": [*adaptive_thinking.BRANCHES["adaptive"], *STEP_FLAGS],
}
# The targets (docs/experiments/thought_supervision.md): accuracy at every hop count with 4 thoughts, the
# probe of thought k for the colour after hop k, and swapped thoughts carrying the donor's answer.
TARGETS = {"accuracy": 0.95, "probe": 0.90, "follows_donor": 0.5}


def build_parser(description=None, default_out="outputs/adaptive", branches=tuple(BRANCHES)):
    parser = argparse.ArgumentParser(
        description=description or __doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter
    )
    parser.add_argument("--out", default=default_out, help="output directory (runs are shared with adaptive_thinking)")
    parser.add_argument("--recipe", default=str(adaptive_thinking.DEFAULT_RECIPE), help="train.py recipe of the runs")
    parser.add_argument("--n-train", type=int, default=4000)
    parser.add_argument("--n-val", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0, help="data seed (and the noise's)")
    parser.add_argument("--cot-epochs", type=int, default=10, help="epochs of the CoT run (stage 0)")
    parser.add_argument("--stage-epochs", type=int, default=2, help="epochs of each Coconut stage but the last")
    parser.add_argument("--final-stage-epochs", type=int, default=6, help="epochs of the last Coconut stage")
    parser.add_argument("--tokenizer", default="task", choices=("task", "internvl"))
    parser.add_argument("--task-vocab-size", type=int, default=512)
    parser.add_argument("--weight", type=float, default=1.0, help="thought_supervision_weight of the step branches")
    parser.add_argument("--branches", nargs="+", default=list(branches), choices=list(BRANCHES),
                        help="Coconut branches to train and analyse")
    parser.add_argument("--eval-batch-size", type=int, default=50)
    parser.add_argument("--causal-limit", type=int, default=None,
                        help="causal tests on the first N validation questions (default: all)")
    parser.add_argument("--probe-l2", type=float, default=1e-2, help="L2 penalty of the linear probes")
    parser.add_argument("--only", nargs="+", help="train only these runs (names as in the tables); no analysis")
    parser.add_argument("--force", action="store_true", help="redo runs that already have results")
    parser.add_argument("--prepare", action="store_true", help="only write the data and the initial model")
    return parser


def plan_runs(branches, hops, cot_epochs, stage_epochs, final_stage_epochs):
    """(name, branch, start from run, stage, epochs) in training order: cot, then each branch's stages 1..hops."""
    runs = [("cot", "cot", None, 0, cot_epochs)]
    for branch in branches:
        previous = "cot"
        for stage in range(1, hops + 1):
            epochs = final_stage_epochs if stage == hops else stage_epochs
            runs.append((f"{branch}_{stage}", branch, previous, stage, epochs))
            previous = f"{branch}_{stage}"
    return runs


def is_step(branch):
    return branch.endswith("_step")


def branch_flags(branch, weight):
    flags = list(BRANCHES.get(branch, []))
    return flags + (["--thought_supervision_weight", f"{weight:g}"] if is_step(branch) else [])


def run_settings(args, branch, start_from, stage, epochs, extra_flags):
    """What a finished run must match to be reused: `adaptive_thinking`'s settings, plus the weight of a step run."""
    settings = {
        "recipe": str(args.recipe), "branch": branch, "start_from": start_from, "stage": stage, "epochs": epochs,
        "extra_train_flags": extra_flags, "n_val": args.n_val,
    }
    if is_step(branch):
        settings["thought_supervision_weight"] = args.weight
    return settings


def train_runs(out, plan, args, files, init, hops, extra_flags, evaluate):
    """Train (or read back) every planned run; `evaluate(run_dir, mode)` gives each new run's `eval` entry."""
    rows = []
    for name, branch, start_from, stage, epochs in plan:
        if args.only and name not in args.only:
            continue
        settings = run_settings(args, branch, start_from, stage, epochs, extra_flags)
        row, start_row = finished_run(out, name, settings, start_from, args.force)
        if row is not None:
            rows.append(row)
            continue
        run_dir = out / "runs" / name
        logger.info("%s: training (%s, stage %d, %d epochs)", name, branch, stage, epochs)
        mode = "cot" if branch == "cot" else "coconut"
        train_seconds = train_run(
            args.recipe, run_dir, mode, files, init if start_from is None else out / "runs" / start_from, stage,
            epochs, None, hops, branch_flags(branch, args.weight) + list(extra_flags),
        )
        row = {
            "name": name, "run_id": uuid.uuid4().hex,
            "start_run_id": None if start_row is None else start_row["run_id"],
            "settings": settings, "branch": branch, "stage": stage, "epochs": epochs, "train_questions": args.n_train,
            "train_seconds": train_seconds, "eval": evaluate(run_dir, mode),
        }
        (run_dir / "results.json").write_text(json.dumps(row, indent=1))
        overall = row["eval"]["per_hop"]["all"]
        logger.info("%s: MC accuracy %.3f, %.2f thoughts", name, overall["mc_accuracy"], overall["mean_thoughts"])
        rows.append(row)
    return rows


def analyse(out, row, records, args, with_probes=True):
    """Causal tests (and probes) of a finished run, read back from `{run}/analysis.json` when already made."""
    run_dir = out / "runs" / row["name"]
    path = run_dir / "analysis.json"
    key = {"run_id": row["run_id"], "questions": len(records), "causal_limit": args.causal_limit,
           "seed": args.seed, "probe_l2": args.probe_l2 if with_probes else None}
    if path.is_file() and json.loads(path.read_text())["key"] == key:
        logger.info("%s: analysis done before, reading %s", row["name"], path)
        return json.loads(path.read_text())
    evaluator = Evaluator(run_dir, records, args.eval_batch_size)
    config = evaluator.model.config
    num_latents = "steps" if config.default_thinking == "adaptive" else config.num_inference_latents
    started = time.perf_counter()
    questions = intervene(
        evaluator.model, evaluator.processor, records[: args.causal_limit], num_latents, args.eval_batch_size,
        adaptive_thinking.MAX_NEW_TOKENS, args.seed,
    )
    analysis = {"key": key, "causal": causal_table(questions), "causal_seconds": time.perf_counter() - started}
    if with_probes:
        analysis["probes"] = probe(evaluator, args.probe_l2)
    (run_dir / "causal_questions.json").write_text(json.dumps(questions))
    path.write_text(json.dumps(analysis, indent=1))
    return analysis


def diagonal(probe_table):
    """{hop k: held-out accuracy of the probe from thought k to the colour after hop k} (None where not probed)."""
    rows = {row["state"]: row["per_hop"] for row in probe_table["rows"]}
    return {hop: (rows.get(f"thought {hop}") or [None] * hop)[hop - 1] for hop in range(1, probe_table["hops"] + 1)}


def diagonal_table(probes):
    hops = range(1, next(iter(probes.values()))["hops"] + 1)
    lines = ["| model | " + " | ".join(f"thought {k} → hop {k}" for k in hops) + " |", "|---" * (len(hops) + 1) + "|"]
    for name, table in probes.items():
        cells = diagonal(table)
        lines.append(f"| {name} | " + " | ".join(
            "-" if cells[k] is None else f"{100 * cells[k]['accuracy']:.1f}%" for k in hops) + " |")
    return "\n".join(lines)


def target_check(per_hop, probe_table, causal):
    """How far a final model is from the targets: its worst hop count, its worst diagonal probe, and the share of
    answers that follow the donor when the thought of the question's last hop is swapped (per hop count)."""
    accuracy = min(metrics["mc_accuracy"] for key, metrics in per_hop.items() if key != "all")
    cells = [cell["accuracy"] for cell in diagonal(probe_table).values() if cell is not None] if probe_table else []
    follows = [rows[int(group) - 1]["follows_donor"] for group, rows in causal.items()
               if group != "all" and len(rows) >= int(group)]
    return {
        "worst_hop_accuracy": accuracy,
        "worst_diagonal_probe": min(cells) if cells else None,
        "least_follows_donor_at_last_hop": min(follows) if follows else None,
    }


def format_target_check(name, check):
    def cell(value, target):
        if value is None:
            return "-"
        return f"{100 * value:.1f}% ({'met' if value >= target else f'{100 * (target - value):.1f} points short'})"

    return (f"| {name} | {cell(check['worst_hop_accuracy'], TARGETS['accuracy'])} "
            f"| {cell(check['worst_diagonal_probe'], TARGETS['probe'])} "
            f"| {cell(check['least_follows_donor_at_last_hop'], TARGETS['follows_donor'])} |")


def main(argv=None):
    parser = build_parser()
    args, extra_flags = parse_experiment_args(parser, argv)
    out = Path(args.out)
    hops = TASKS[TASK]().hops
    plan = plan_runs(args.branches, hops, args.cot_epochs, args.stage_epochs, args.final_stage_epochs)
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

    def evaluate(run_dir, mode):
        return Evaluator(run_dir, val_records, args.eval_batch_size)(mode)

    rows = train_runs(out, plan, args, files, init, hops, extra_flags, evaluate)
    command = " ".join(["python -m experiments.thought_supervision", *(sys.argv[1:] if argv is None else argv)])
    summary = {"command": command, "task": TASK, "n_train": args.n_train, "n_val": args.n_val, "recipe": recipe,
               "weight": args.weight, "extra_train_flags": extra_flags, "torch_threads": torch.get_num_threads(),
               "runs": rows}
    sections = [f"`{command}` ({TASK}, {args.n_train} train / {args.n_val} val questions)",
                "## Every run (its own way of thinking)", curriculum_table(rows)]
    if not args.only:
        finals = {row["name"]: row for row in rows}
        analyses = {branch: analyse(out, finals[f"{branch}_{hops}"], val_records, args) for branch in args.branches}
        results = out / "thought_supervision"
        results.mkdir(parents=True, exist_ok=True)
        main_rows = [("CoT", finals["cot"]["eval"]["per_hop"])] + [
            (f"{branch}_{hops}", finals[f"{branch}_{hops}"]["eval"]["per_hop"]) for branch in args.branches]
        checks = {}
        for branch, analysis in analyses.items():
            name = f"{branch}_{hops}"
            probe_latents.plot_probe(analysis["probes"], results / f"probe_{branch}.png", f"{name}: linear probes")
            plot_causal(analysis["causal"], results / f"causal_{branch}.png", f"{name}: edited thoughts")
            checks[name] = target_check(finals[name]["eval"]["per_hop"], analysis["probes"], analysis["causal"])
        summary.update(main=dict(main_rows), analyses=analyses, targets=checks)
        sections += [
            "## Final stages per hop count (MC accuracy · mean thoughts · mean generated tokens)",
            per_hop_table(main_rows),
            f"## Targets (>= {100 * TARGETS['accuracy']:.0f}% per hop count, >= {100 * TARGETS['probe']:.0f}% for "
            "thought k → hop k, swapped thought of the last hop followed in most cases)",
            "| model | worst hop count | worst thought k → hop k probe | least follows-donor (last hop's thought) |\n"
            "|---|---|---|---|\n" + "\n".join(format_target_check(name, check) for name, check in checks.items()),
            "## Linear probes: thought k → colour after hop k (held-out accuracy)",
            diagonal_table({f"{branch}_{hops}": analysis["probes"] for branch, analysis in analyses.items()}),
        ]
        for branch, analysis in analyses.items():
            sections += [f"## Causal tests, {branch}_{hops} ({analysis['causal']['all'][0]['n']} questions, "
                         f"{analysis['causal_seconds']:.0f} s)", format_causal_table(analysis["causal"]),
                         f"Probes, {branch}_{hops}:", "```\n" + probe_latents.format_table(analysis["probes"]) + "\n```"]
    summary["wall_seconds_this_invocation"] = time.perf_counter() - started
    text = "\n\n".join(sections) + "\n"
    if not args.only:  # a partial invocation (possibly one of several in parallel) leaves the results alone
        (out / "thought_supervision" / "results.json").write_text(json.dumps(summary, indent=1))
        (out / "thought_supervision" / "results.md").write_text(text)
    print(text)
    return summary


__all__ = ["BRANCHES", "TARGETS", "build_parser", "plan_runs", "branch_flags", "run_settings", "train_runs", "analyse",
           "diagonal", "diagonal_table", "target_check", "main"]

if __name__ == "__main__":
    main()
