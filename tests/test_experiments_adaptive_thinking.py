"""`experiments/adaptive_thinking.py`: the run plan, the per-hop breakdown and its tables, and a toy-size run."""

import json

import pytest

from configuration_mmcoconut import MMCoconutConfig
from experiments import adaptive_thinking


def test_both_branches_start_from_cot_and_chain_their_stages():
    plan = adaptive_thinking.plan_runs(hops=4, cot_epochs=6, stage_epochs=1, final_stage_epochs=4)
    assert plan[0] == ("cot", "cot", None, 0, 6)
    for branch in ("fixed", "adaptive"):
        runs = [run for run in plan if run[1] == branch]
        assert [run[0] for run in runs] == [f"{branch}_{k}" for k in (1, 2, 3, 4)]
        assert [run[2] for run in runs] == ["cot", f"{branch}_1", f"{branch}_2", f"{branch}_3"]
        assert [run[4] for run in runs] == [1, 1, 1, 4]
    # the adaptive branch is the one that learns to stop; the fixed one pads every question to the stage
    assert "--supervise_end_latent" in adaptive_thinking.BRANCHES["adaptive"]
    assert adaptive_thinking.BRANCHES["fixed"] == ["--pad_latent_to_max", "true"]


def sample(question_id, correct, thoughts, tokens):
    return {"question_id": question_id, "correct": correct, "thoughts": thoughts, "num_generated_tokens": tokens}


def test_by_hops_groups_by_the_question_hop_count():
    hops_of = {"a": 1, "b": 1, "c": 3, "d": 3}
    samples = [sample("a", True, 1, 6), sample("b", False, 2, 8), sample("c", True, 3, 6), sample("d", None, 3, 6)]
    table = adaptive_thinking.by_hops(samples, hops_of)
    assert list(table) == ["all", "1", "3"]
    assert table["1"] == {"n": 2, "mc_accuracy": 0.5, "mean_thoughts": 1.5, "mean_generated_tokens": 7.0,
                          "thoughts_used": {"1": 1, "2": 1}}
    assert table["3"]["mc_accuracy"] == 0.5  # an unscored (None) answer is not a correct one
    assert table["all"]["n"] == 4 and table["all"]["thoughts_used"] == {"1": 1, "2": 1, "3": 2}
    assert adaptive_thinking.chose_hops(table) == 3  # b thought 2 thoughts on a 1-hop question

    rendered = adaptive_thinking.per_hop_table([("adaptive", table)])
    assert "| 1 hop | 3 hops | all |" in rendered and "| adaptive | 50.0% · 1.50 · 7.0 |" in rendered
    assert "| 3 | 0 | 0 | 0 | 2 |" in adaptive_thinking.thoughts_table(table, 3)


def test_toy_run_trains_both_branches_and_reads_them_back(tmp_path, capsys):
    out = tmp_path / "adaptive"
    argv = [
        "--out", str(out), "--n-train", "8", "--n-val", "6", "--cot-epochs", "1", "--stage-epochs", "1",
        "--task-vocab-size", "320",
        "--only", "cot", "adaptive_1", "adaptive_2", "--",
        "--per_device_train_batch_size", "4", "--logging_steps", "100",
    ]
    summary = adaptive_thinking.main(argv)
    rows = {row["name"]: row for row in summary["runs"]}
    assert set(rows) == {"cot", "adaptive_1", "adaptive_2"}
    assert MMCoconutConfig.from_pretrained(out / "runs" / "adaptive_2").default_thinking == "adaptive"
    assert MMCoconutConfig.from_pretrained(out / "runs" / "adaptive_2").latent_stage == 2
    for name, row in rows.items():
        per_hop = row["eval"]["per_hop"]
        assert per_hop["all"]["n"] == 6 and sum(per_hop[k]["n"] for k in per_hop if k != "all") == 6
        if name == "cot":
            assert per_hop["all"]["mean_thoughts"] == 0
        else:  # adaptive thinking stops by itself or at the checkpoint's latent_stage × c_thought
            assert all(int(n) <= row["stage"] for n in per_hop["all"]["thoughts_used"])
    assert "| adaptive_2 | 2 | 1 × 8 |" in capsys.readouterr().out
    # only a full invocation writes the results files (two --only halves may run side by side)
    assert not (out / "results.md").exists() and not (out / "results.json").exists()
    # read back, not redone; another setting is refused
    assert adaptive_thinking.main(argv)["runs"] == summary["runs"]
    with pytest.raises(ValueError, match="other settings"):
        adaptive_thinking.main([*argv, "--learning_rate", "1e-4"])
    with pytest.raises(FileNotFoundError, match="has not been trained"):
        adaptive_thinking.main([*argv[: argv.index("--only")], "--only", "fixed_2"])


@pytest.mark.slow
def test_the_whole_experiment_at_toy_size(tmp_path):
    out = tmp_path / "adaptive"
    summary = adaptive_thinking.main([
        "--out", str(out), "--n-train", "8", "--n-val", "48", "--cot-epochs", "1", "--stage-epochs", "1",
        "--final-stage-epochs", "1",
        "--task-vocab-size", "320", "--max-forced", "2", "--", "--per_device_train_batch_size", "4",
    ])
    assert set(summary["scaling"]) == {"fixed_4", "adaptive_4"}
    assert list(summary["scaling"]["adaptive_4"]) == ["forced 0", "forced 1", "forced 2", "adaptive, at most 2"]
    forced = summary["scaling"]["fixed_4"]["forced 2"]["per_hop"]["all"]
    assert forced["mean_thoughts"] == 2 and forced["n"] == 48
    # the adaptive probe sees one thought per hop: thought 4 exists only on the 4-hop questions
    rows = {row["state"]: row["per_hop"] for row in summary["probes"]["adaptive"]["rows"]}
    assert list(rows) == ["prompt", "thought 1", "thought 2", "thought 3", "thought 4", "last latent"]
    assert rows["thought 1"][0]["n_train"] + rows["thought 1"][0]["n_test"] == 48
    for name in ("results.md", "probe_fixed.png", "probe_adaptive.png"):
        assert (out / name).is_file()
    assert json.loads((out / "results.json").read_text())["runs"] == summary["runs"]
    chose = adaptive_thinking.chose_hops(summary["runs"][-1]["eval"]["per_hop"])  # adaptive_4
    assert f"count for {chose} of 48 questions" in (out / "results.md").read_text()
    assert "Test-time scaling" in (out / "results.md").read_text()
