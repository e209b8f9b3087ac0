"""probe_latents: the linear probe finds a planted signal and reports chance on noise; the CLI on a tiny checkpoint."""

import json

import pytest
import torch
from PIL import Image

from mmcoconut.analysis import probes as probe_latents
from mmcoconut.analysis.probes import hop_targets, probe_accuracy, probe_table
from mmcoconut.cli import probe as probe_cli


def planted(n, dim, labels_per_state, strength=3.0, seed=0):
    """States `(n, len(labels_per_state), dim)`: state s is noise plus `strength` × one-hot of its labels."""
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(n, len(labels_per_state), dim, generator=g)
    for s, labels in enumerate(labels_per_state):
        if labels is not None:
            states[torch.arange(n), s, labels] += strength
    return states


def test_probe_recovers_a_planted_signal():
    labels = torch.randint(0, 5, (300,), generator=torch.Generator().manual_seed(1))
    result = probe_accuracy(planted(300, 16, [labels])[:, 0], labels, num_classes=5)
    assert result["accuracy"] > 0.9, result
    assert result["chance"] < 0.35 and (result["n_train"], result["n_test"]) == (150, 150)


def test_probe_reports_chance_on_noise():
    g = torch.Generator().manual_seed(2)
    features, labels = torch.randn(400, 16, generator=g), torch.randint(0, 4, (400,), generator=g)
    result = probe_accuracy(features, labels, num_classes=4)
    assert abs(result["accuracy"] - 0.25) < 0.1 and abs(result["chance"] - 0.25) < 0.1, result


def test_probe_table_tells_which_state_holds_which_hop():
    # State 1 holds hop 1's colour, state 2 hop 2's, state 0 nothing: the table's diagonal stands out.
    colours = ["green", "blue", "yellow", "purple"]
    g = torch.Generator().manual_seed(3)
    hop1, hop2 = torch.randint(0, 4, (240,), generator=g), torch.randint(0, 4, (240,), generator=g)
    states = planted(240, 12, [None, hop1, hop2])
    targets = [[colours[a], colours[b]] for a, b in zip(hop1.tolist(), hop2.tolist())]
    table = probe_table(states, targets, ["prompt", "thought 1", "thought 2"])
    accuracy = [[r["accuracy"] for r in row["per_hop"]] for row in table["rows"]]
    assert table["classes"] == sorted(colours) and table["hops"] == 2
    assert accuracy[1][0] > 0.9 and accuracy[2][1] > 0.9
    assert max(accuracy[0]) < 0.4 and accuracy[1][1] < 0.4 and accuracy[2][0] < 0.4, accuracy


def test_a_hop_too_few_questions_reach_is_not_probed():
    states = planted(30, 8, [None])
    targets = [["green"]] * 10 + [["blue", "green"]] * 10 + [["green", "blue"]] * 10
    table = probe_table(states, targets, ["prompt"], min_samples=25)
    assert table["rows"][0]["per_hop"][0]["n_test"] == 15 and table["rows"][0]["per_hop"][1] is None


def test_targets_come_from_the_steps_and_other_records_are_named():
    records = [{"id": "q1", "steps": ["red points to blue.", "blue points to green."]}]
    assert hop_targets(records) == [["blue", "green"]]
    with pytest.raises(ValueError, match="record 'q2'"):
        hop_targets([{"id": "q2", "steps": ["The circle is in row 2, column 1."]}])


def test_cli_on_variable_depth_questions(tiny_checkpoint, tmp_path):
    from mmcoconut.data.synthetic import write_synthetic_aokvqa

    paths = write_synthetic_aokvqa(tmp_path / "data", n_train=0, n_val=48, seed=0, task="colour_chain_depth")
    data_file = paths["canonical_dir"] / "val.jsonl"
    results = probe_cli.main([
        "--model", str(tiny_checkpoint), "--data-file", str(data_file), "--output-dir", str(tmp_path / "probe"),
        "--num-latents", "2",
    ])
    saved = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert [row["state"] for row in saved["rows"]] == ["prompt", "thought 1", "thought 2", "last latent"]
    assert saved["hops"] == 4 and saved["num_records"] == 48
    hop1 = saved["rows"][0]["per_hop"][0]
    assert hop1["n_train"] + hop1["n_test"] == 48 and 0 <= hop1["accuracy"] <= 1
    Image.open(tmp_path / "probe" / "probe_accuracy.png").verify()


def test_per_record_thought_counts_line_up_with_one_count_at_a_time(tiny_checkpoint, tmp_path):
    # An adaptive checkpoint thinks one thought per hop: each record's states equal those of its own layout,
    # the thoughts it does not have are NaN, and its last latent sits in the last column.
    from mmcoconut.data.aokvqa import load_canonical
    from mmcoconut.data.synthetic import write_synthetic_aokvqa
    from mmcoconut.inference.loading import load_model
    from mmcoconut.processing import load_internvl_processor

    paths = write_synthetic_aokvqa(tmp_path / "data", n_train=0, n_val=6, seed=1, task="colour_chain_depth")
    records = load_canonical(paths["canonical_dir"] / "val.jsonl")
    model, processor = load_model(tiny_checkpoint, dtype="float32", device="cpu", attn_implementation="eager"), load_internvl_processor(tiny_checkpoint)
    counts = [len(record["steps"]) for record in records]
    assert len(set(counts)) > 1, counts
    states = probe_latents.collect_states(model, processor, records, counts, batch_size=4)
    assert states.shape[:2] == (6, max(counts) + 2)
    for i, count in enumerate(counts):
        alone = probe_latents.collect_states(model, processor, [records[i]], count)[0]
        torch.testing.assert_close(states[i, : count + 1], alone[:-1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(states[i, -1], alone[-1], rtol=1e-4, atol=1e-5)
        assert torch.isnan(states[i, count + 1 : -1]).all()
    with pytest.raises(ValueError, match="at least one latent"):
        probe_latents.collect_states(model, processor, records, [0] * 6)


def test_a_state_is_probed_only_on_the_records_that_have_it():
    # Thought 2 exists only for the two-hop records (NaN elsewhere): its probe sees those alone.
    colours = ["green", "blue", "yellow", "purple"]
    g = torch.Generator().manual_seed(4)
    hop1 = torch.randint(0, 4, (200,), generator=g)
    states = planted(200, 8, [None, hop1, hop1])
    states[:80, 2] = float("nan")
    targets = [[colours[a]] if i < 80 else [colours[a], "red"] for i, a in enumerate(hop1.tolist())]
    table = probe_table(states, targets, ["prompt", "thought 1", "thought 2"])
    thought1, thought2 = (table["rows"][s]["per_hop"][0] for s in (1, 2))
    assert thought1["n_train"] + thought1["n_test"] == 200 and thought2["n_train"] + thought2["n_test"] == 120
    assert thought2["accuracy"] > 0.9


def test_cli_lays_out_one_thought_per_step_on_request(tiny_checkpoint, tmp_path):
    from mmcoconut.data.synthetic import write_synthetic_aokvqa

    paths = write_synthetic_aokvqa(tmp_path / "data", n_train=0, n_val=40, seed=0, task="colour_chain_depth")
    results = probe_cli.main([
        "--model", str(tiny_checkpoint), "--data-file", str(paths["canonical_dir"] / "val.jsonl"),
        "--output-dir", str(tmp_path / "probe"), "--num-latents", "steps", "--batch-size", "20",
    ])
    # c_thought 2: a 4-hop question gets 8 latents
    assert results["num_latents"] == "steps" and len(results["rows"]) == 8 + 2
    with pytest.raises(SystemExit):
        probe_cli.main(["--model", "m", "--data-file", "d", "--output-dir", "o", "--num-latents", "many"])
