"""`experiments/thought_supervision.py` and `experiments/graph_search.py`: run plans, flags, reuse of
adaptive_thinking's runs, the target check, per-size tables, and toy-size runs."""

import json

import pytest

from configuration_mmcoconut import MMCoconutConfig
from experiments import adaptive_thinking, graph_search, thought_supervision


def test_plan_chains_each_branch_from_cot_and_step_branches_add_the_supervision():
    plan = thought_supervision.plan_runs(["fixed", "fixed_step"], hops=4, cot_epochs=10, stage_epochs=2,
                                         final_stage_epochs=6)
    assert plan[0] == ("cot", "cot", None, 0, 10)
    assert [run[0] for run in plan if run[1] == "fixed_step"] == [f"fixed_step_{k}" for k in (1, 2, 3, 4)]
    assert [run[2] for run in plan if run[1] == "fixed_step"] == ["cot", "fixed_step_1", "fixed_step_2", "fixed_step_3"]
    assert thought_supervision.branch_flags("fixed", 0.5) == ["--pad_latent_to_max", "true"]
    assert thought_supervision.branch_flags("adaptive_step", 0.5) == [
        *adaptive_thinking.BRANCHES["adaptive"], "--thought_supervision", "step", "--thought_supervision_weight", "0.5"]


def test_baseline_runs_have_adaptive_thinkings_settings_so_they_are_shared():
    args = thought_supervision.build_parser().parse_args([])
    # the settings adaptive_thinking.main records for the same run (see its main)
    expected = {"recipe": str(adaptive_thinking.DEFAULT_RECIPE), "branch": "fixed", "start_from": "cot", "stage": 1,
                "epochs": 2, "extra_train_flags": [], "n_val": 1000}
    assert thought_supervision.run_settings(args, "fixed", "cot", 1, 2, []) == expected
    assert thought_supervision.run_settings(args, "fixed_step", "cot", 1, 2, [])["thought_supervision_weight"] == 1.0


def test_target_check_reads_the_diagonal_probes_and_the_last_hops_swap():
    def cell(accuracy):
        return {"accuracy": accuracy, "chance": 0.25, "n_train": 10, "n_test": 10}

    probes = {"hops": 2, "rows": [
        {"state": "prompt", "per_hop": [cell(0.9), cell(0.3)]},
        {"state": "thought 1", "per_hop": [cell(0.97), cell(0.5)]},
        {"state": "thought 2", "per_hop": [cell(0.5), cell(0.8)]},
    ]}
    assert {hop: c["accuracy"] for hop, c in thought_supervision.diagonal(probes).items()} == {1: 0.97, 2: 0.8}
    causal = {"all": [], "1": [{"follows_donor": 0.6}], "2": [{"follows_donor": 0.1}, {"follows_donor": 0.7}]}
    per_hop = {"all": {"mc_accuracy": 0.9}, "1": {"mc_accuracy": 1.0}, "2": {"mc_accuracy": 0.8}}
    check = thought_supervision.target_check(per_hop, probes, causal)
    assert check == {"worst_hop_accuracy": 0.8, "worst_diagonal_probe": 0.8, "least_follows_donor_at_last_hop": 0.6}
    row = thought_supervision.format_target_check("m", check)
    assert row == "| m | 80.0% (15.0 points short) | 80.0% (10.0 points short) | 60.0% (met) |"
    assert "| m | 97.0% | 80.0% |" in thought_supervision.diagonal_table({"m": probes})


def test_toy_step_run_trains_with_the_weight_and_is_read_back(tmp_path):
    out = tmp_path / "ts"
    argv = ["--out", str(out), "--n-train", "8", "--n-val", "6", "--cot-epochs", "1", "--stage-epochs", "1",
            "--task-vocab-size", "320", "--weight", "0.3", "--only", "cot", "fixed_step_1", "--",
            "--per_device_train_batch_size", "4", "--logging_steps", "100"]
    summary = thought_supervision.main(argv)
    assert [row["name"] for row in summary["runs"]] == ["cot", "fixed_step_1"]
    assert MMCoconutConfig.from_pretrained(out / "runs" / "fixed_step_1").thought_supervision_weight == 0.3
    assert MMCoconutConfig.from_pretrained(out / "runs" / "cot").thought_supervision_weight == 0.0
    assert thought_supervision.main(argv)["runs"] == summary["runs"]  # read back, not redone
    with pytest.raises(ValueError, match="other settings"):
        thought_supervision.main([a if a != "0.3" else "0.5" for a in argv])


def test_graph_sizes_are_read_from_the_images(tmp_path):
    from mmcoconut.data.aokvqa import load_canonical
    from mmcoconut.data.synthetic import write_synthetic_aokvqa

    paths = write_synthetic_aokvqa(tmp_path, 1, 12, seed=0, task="graph_search")
    records = load_canonical(paths["canonical_dir"] / "val.jsonl")
    sizes = graph_search.graph_sizes(records)
    assert set(sizes) == {r["id"] for r in records} and set(sizes.values()) <= {8, 9, 10}
    groups = {"8": {"mc_accuracy": 0.5, "mean_thoughts": 3, "mean_generated_tokens": 6.0},
              "all": {"mc_accuracy": 0.25, "mean_thoughts": 3, "mean_generated_tokens": 6.0}}
    table = graph_search.per_size_table([("CoT", groups)])
    assert "| method | 8 nodes | all |" in table and "| CoT | 50.0% · 3.00 · 6.0 | 25.0% · 3.00 · 6.0 |" in table


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["thought_supervision", "graph_search"])
def test_the_whole_experiment_at_toy_size(tmp_path, experiment):
    module = {"thought_supervision": thought_supervision, "graph_search": graph_search}[experiment]
    out = tmp_path / experiment
    summary = module.main(["--out", str(out), "--n-train", "8", "--n-val", "24", "--cot-epochs", "1",
                           "--stage-epochs", "1", "--final-stage-epochs", "1", "--task-vocab-size", "320", "--",
                           "--per_device_train_batch_size", "4"])
    results = out / "thought_supervision" if experiment == "thought_supervision" else out
    text = (results / "results.md").read_text()
    assert json.loads((results / "results.json").read_text())["runs"] == summary["runs"]
    for branch, analysis in summary["analyses"].items():
        assert (results / f"causal_{branch}.png").is_file()
        assert analysis["causal"]["all"][0]["n"] == 24
        assert f"## Causal tests, {branch}_" in text
    if experiment == "graph_search":
        assert "## Final stages per graph size" in text
    else:
        assert set(summary["targets"]) == {f"{b}_4" for b in thought_supervision.BRANCHES}
