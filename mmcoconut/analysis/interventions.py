"""Causal tests of continuous thoughts: does the answer depend on thought k?

    mmcoconut-intervene --model outputs/adaptive/runs/fixed_4 \\
        --data-file outputs/adaptive/data/canonical/val.jsonl --output-dir outputs/adaptive/causal_fixed_4

Linear probes (`probes`) show what a thought holds; they cannot show that the answer uses it. Here each question is
answered (greedy) once with its thoughts as the model computes them, and once per thought position k with thought k

    zeroed    replaced by the zero vector,
    noise     replaced by Gaussian noise of the kept thought's norm (one draw per question and position, seeded),
    swapped   replaced by thought k of a donor question: the next question of the set (cyclically) with as many
              steps and another answer,

while every later thought is computed from the edited one (`generate(edit_thoughts=...)`, as the model would go on
from it). A thought the answer ignores leaves accuracy where `kept` has it; for swaps, "follows donor" counts the
answers that are the donor's answer (possible only because the donor's answer differs), i.e. how often thought k
carries its question's chain into the answer.

The prompts are laid out as at evaluation, with a closed latent span of the checkpoint's thought count, or per record
`steps × c_thought` thoughts (what a checkpoint trained with `supervise_end_latent` thinks for it).
"""

import logging

import torch

from mmcoconut.analysis.attention import latent_positions, prompt_batches
from mmcoconut.text.answers import parse_answer

logger = logging.getLogger(__name__)

INTERVENTIONS = ("kept", "zeroed", "noise", "swapped")


def replace_thought(k, vectors):
    """An `edit_thoughts` that puts `vectors[b]` `(B, H)` in place of row b's thought k (0-based)."""

    def edit(thoughts, index):
        return torch.where((index == k)[:, None], vectors.to(thoughts), thoughts)

    return edit


def noise_of_norm(norms, keys, hidden_size, seed):
    """`(B, H)` Gaussian vectors scaled to `norms` `(B,)`; row b drawn from its own seed `(seed, keys[b])`, so a
    question's noise does not depend on the batch it is in."""
    rows = []
    for key in keys:
        generator = torch.Generator().manual_seed(hash((seed, *key)) % (2**63))
        rows.append(torch.randn(hidden_size, generator=generator, dtype=torch.float64))
    noise = torch.stack(rows)
    return (noise / noise.norm(dim=-1, keepdim=True)).to(norms) * norms[:, None]


def choose_donors(records):
    """Per record, its donor's index: the next record (cyclically) with as many steps and another correct choice,
    or None where no record qualifies."""
    donors = []
    for i, record in enumerate(records):
        order = [(i + j) % len(records) for j in range(1, len(records))]
        donors.append(next(
            (j for j in order if len(records[j]["steps"]) == len(record["steps"])
             and records[j]["correct_choice_idx"] != record["correct_choice_idx"]),
            None,
        ))
    return donors


def thought_counts(model, records, num_latents):
    """Latents per record: an int for all, or `"steps"` (each record's steps × c_thought)."""
    if num_latents == "steps":
        return [len(record["steps"]) * model.config.c_thought for record in records]
    return [int(num_latents)] * len(records)


def _inputs(batch):
    return {key: batch.get(key) for key in ("input_ids", "attention_mask", "pixel_values", "num_tiles")}


def kept_thoughts(model, batch):
    """`(B, K, H)`: the thoughts the model places at each prompt's K latents (the last hidden state before each)."""
    hidden = model(**_inputs(batch), position_ids=batch["position_ids"], logits_to_keep=1).last_hidden_state
    positions = latent_positions(batch["input_ids"], model.config.latent_token_id)  # (B, K)
    rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
    return hidden[rows, positions - 1]


def _answers(model, processor, batch, records, max_new_tokens, edit=None):
    """The choice index each row's greedy answer names (None when unparseable)."""
    out = model.generate(
        **_inputs(batch), thinking="fixed", edit_thoughts=edit, max_new_tokens=max_new_tokens, do_sample=False,
    )
    width = batch["input_ids"].shape[1]
    texts = processor.tokenizer.batch_decode(out[:, width:], skip_special_tokens=False)
    return [parse_answer(text, record["choices"]).index for text, record in zip(texts, records)]


def intervene(model, processor, records, num_latents, batch_size=8, max_new_tokens=16, seed=0, max_tiles=None):
    """Answers of every record under every intervention at every thought position.

    Returns one dict per record: `id`, `hops` (its steps), `num_thoughts`, `correct` (the correct choice index),
    `donor` (its index in `records`, or None), `donor_correct`, and `answers`: `kept` (a choice index or None) and,
    for `zeroed`, `noise` and `swapped`, a list with one answer per thought position (None where unparseable;
    `swapped` is None throughout without a donor).
    """
    counts = thought_counts(model, records, num_latents)
    if min(counts) < 1:
        raise ValueError(f"every prompt needs at least one thought to intervene on, got a count of {min(counts)}")
    donors = choose_donors(records)
    results = [None] * len(records)
    with torch.no_grad():
        groups = {count: [i for i, c in enumerate(counts) if c == count] for count in sorted(set(counts))}
        for count, members in groups.items():  # one layout per count: a batch's thought positions line up
            group = [records[i] for i in members]
            thoughts = torch.cat([
                kept_thoughts(model, batch) for _, _, batch in
                prompt_batches(model, processor, group, count, batch_size, max_tiles)
            ])  # (len(group), count, H)
            where = {index: position for position, index in enumerate(members)}
            for positions, _, batch in prompt_batches(model, processor, group, count, batch_size, max_tiles):
                indices = [members[p] for p in positions]
                batch_records = [records[i] for i in indices]
                own = thoughts[list(positions)]  # (B, count, H)
                answers = {"kept": _answers(model, processor, batch, batch_records, max_new_tokens)}
                for name in INTERVENTIONS[1:]:
                    answers[name] = [[] for _ in indices]
                for k in range(count):
                    vectors = {
                        "zeroed": torch.zeros_like(own[:, k]),
                        "noise": noise_of_norm(own[:, k].norm(dim=-1), [(i, k) for i in indices], own.shape[-1], seed),
                        "swapped": torch.stack([
                            thoughts[where[donors[i]], k] if donors[i] is not None else own[b, k]
                            for b, i in enumerate(indices)
                        ]),
                    }
                    for name, replacement in vectors.items():
                        got = _answers(model, processor, batch, batch_records, max_new_tokens,
                                       replace_thought(k, replacement))
                        for b, i in enumerate(indices):
                            answers[name][b].append(None if name == "swapped" and donors[i] is None else got[b])
                for b, i in enumerate(indices):
                    results[i] = {
                        "id": records[i]["id"], "hops": len(records[i]["steps"]), "num_thoughts": count,
                        "correct": records[i]["correct_choice_idx"], "donor": donors[i],
                        "donor_correct": None if donors[i] is None else records[donors[i]]["correct_choice_idx"],
                        "answers": {"kept": answers["kept"][b], **{name: answers[name][b] for name in INTERVENTIONS[1:]}},
                    }
            logger.info("%d thoughts: %d questions done", count, len(members))
    return results


def causal_table(results):
    """Per hop count (and `all`) and thought position: questions, accuracy under each intervention, and for swaps
    how many had a donor and the share of those answers that were the donor's. `{group: [row per position]}`."""
    groups = {"all": results}
    for hops in sorted({r["hops"] for r in results}):
        groups[str(hops)] = [r for r in results if r["hops"] == hops]
    table = {}
    for name, group in groups.items():
        rows = []
        for k in range(max(r["num_thoughts"] for r in group)):
            have = [r for r in group if r["num_thoughts"] > k]
            with_donor = [r for r in have if r["donor"] is not None]
            row = {"thought": k + 1, "n": len(have), "n_swapped": len(with_donor),
                   "kept": sum(r["answers"]["kept"] == r["correct"] for r in have) / len(have)}
            for intervention in ("zeroed", "noise"):
                row[intervention] = sum(r["answers"][intervention][k] == r["correct"] for r in have) / len(have)
            swapped = [r["answers"]["swapped"][k] for r in with_donor]
            row["swapped"] = sum(a == r["correct"] for a, r in zip(swapped, with_donor)) / max(len(with_donor), 1)
            row["follows_donor"] = sum(a == r["donor_correct"] for a, r in zip(swapped, with_donor)) / max(
                len(with_donor), 1)
            rows.append(row)
        table[name] = rows
    return table


def format_causal_table(table):
    """A Markdown table: accuracy per hop count and thought position under each intervention."""
    lines = ["| hops | thought | questions | kept | zeroed | noise | swapped | swapped: donor's answer |",
             "|---|---|---|---|---|---|---|---|"]
    for group, rows in table.items():
        for row in rows:
            cells = [f"{100 * row[name]:.1f}%" for name in ("kept", "zeroed", "noise", "swapped", "follows_donor")]
            lines.append(f"| {group} | {row['thought']} | {row['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_causal(table, path, title):
    """Accuracy against thought position, one panel per hop count, one line per intervention."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = [g for g in table if g != "all"] or ["all"]
    fig = Figure(figsize=(2.6 * len(groups) + 1, 3), layout="constrained")
    axes = fig.subplots(1, len(groups), sharey=True, squeeze=False)[0]
    for ax, group in zip(axes, groups):
        rows = table[group]
        x = [row["thought"] for row in rows]
        for name in ("kept", "zeroed", "noise", "swapped"):
            ax.plot(x, [row[name] for row in rows], marker="o", label=name)
        ax.plot(x, [row["follows_donor"] for row in rows], marker="x", linestyle="--", label="follows donor")
        ax.set_title(f"{group} hop{'s' if group != '1' else ''}" if group != "all" else "all")
        ax.set_xlabel("thought edited")
        ax.set_xticks(x)
        ax.set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("share of questions")
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(title)
    FigureCanvasAgg(fig).print_png(str(path))


__all__ = ["INTERVENTIONS", "replace_thought", "noise_of_norm", "choose_donors", "thought_counts", "kept_thoughts",
           "intervene", "causal_table", "format_causal_table", "plot_causal"]
