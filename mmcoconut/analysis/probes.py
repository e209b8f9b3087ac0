"""Linear probes: do the continuous thoughts hold the intermediate states of the chain they replace?

    mmcoconut-probe --model outputs/experiment/coconut_3 \\
        --data-file outputs/experiment/data/canonical/val.jsonl --output-dir outputs/experiment/probe

`analyze_latents.py` decodes each thought through the LM head; a thought can carry the chain without decoding to
it. This fits a linear probe, the field's standard test, from hidden states to the colour reached after each hop
of a `colour_chain` / `colour_chain_depth` question (read from the record's steps, `ColourChainTask.parse_step`).

The prompts are laid out as at evaluation (`... <|start-latent|> <|latent|>×K <|end-latent|>`), K the same for every
record, or its own step count (`--num-latents steps`, the default for checkpoints trained to stop thinking, which
think that many thoughts for it). Probed states:
`prompt` (the last hidden state before `<|start-latent|>`: what the model holds before thinking, the baseline),
`thought k` (the vector placed at latent k, i.e. the last hidden state of the position before it, as in
`analyze_latents`) and `last latent` (the last latent's output, from which `<|end-latent|>` is predicted).

For every state × hop: a multinomial logistic regression (standardised features, L2, L-BFGS) is fitted on one part
of the questions that have that hop and scored on the held-out rest; `chance` is the held-out accuracy of always
answering the training part's most frequent colour. Writes `probe.json` and `probe_accuracy.png` (a heat map of
held-out accuracy minus chance) and prints the table.
"""

import logging

logger = logging.getLogger("probe_latents")


# ---------------------------------------------------------------------------------------------- the probe


def fit_probe(features, labels, num_classes, l2=1e-2, max_iter=200):
    """A multinomial logistic regression `(weight (D, C), bias (C,), mean, std)` fitted on standardised features."""
    import torch

    x = features.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    weight = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, labels) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach(), mean, std


def probe_accuracy(features, labels, num_classes, test_fraction=0.5, seed=0, l2=1e-2):
    """Held-out accuracy of a linear probe from `features` `(N, D)` to `labels` `(N,)` and its chance level.

    The split is a seeded permutation; `chance` is the held-out accuracy of the training part's majority class.
    Returns `{accuracy, chance, n_train, n_test}`.
    """
    import torch

    n = features.shape[0]
    n_test = int(round(n * test_fraction))
    if n_test < 1 or n - n_test < 2:
        raise ValueError(f"{n} samples are too few for a held-out probe (test fraction {test_fraction})")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    train, test = order[n_test:], order[:n_test]
    weight, bias, mean, std = fit_probe(features[train], labels[train], num_classes, l2=l2)
    predicted = (((features[test].double() - mean) / std) @ weight + bias).argmax(-1)
    majority = torch.bincount(labels[train], minlength=num_classes).argmax()
    return {
        "accuracy": float((predicted == labels[test]).double().mean()),
        "chance": float((labels[test] == majority).double().mean()),
        "n_train": int(train.numel()),
        "n_test": n_test,
    }


# ---------------------------------------------------------------------------------------------- the data


def hop_targets(records):
    """Per record, the colours reached after hops 1..n, read from its steps (a ValueError names a bad record)."""
    from mmcoconut.data.synthetic import ColourChainTask

    targets = []
    for record in records:
        try:
            targets.append([ColourChainTask.parse_step(step)[1] for step in record["steps"]])
        except ValueError as error:
            raise ValueError(f"record {record.get('id')!r}: {error}") from error
    return targets


def collect_states(model, processor, records, num_latents, batch_size=8, max_tiles=None):
    """`(N, K + 2, H)` float32 states per record: `prompt`, `thought 1..K`, `last latent` (see module doc).

    `num_latents` is the latents of every prompt (K), or one count per record (K is the largest; a record with
    fewer thoughts has NaN in the columns of the thoughts it does not have, and its `last latent` in the last
    column), e.g. its step count, the thoughts an adaptive checkpoint was trained to think for it."""
    import torch

    counts = [num_latents] * len(records) if isinstance(num_latents, int) else list(num_latents)
    if len(counts) != len(records):
        raise ValueError(f"{len(counts)} latent counts for {len(records)} records")
    if min(counts) < 1:
        raise ValueError(f"every prompt needs at least one latent to probe, got a count of {min(counts)}")
    width = max(counts) + 2
    states = None
    for count in sorted(set(counts)):  # one layout per count: the positions of a batch's thoughts line up
        indices = [i for i, c in enumerate(counts) if c == count]
        group = _states_at(model, processor, [records[i] for i in indices], count, batch_size, max_tiles)
        if states is None:
            states = torch.full((len(records), width, group.shape[-1]), float("nan"))
        states[indices, : count + 1] = group[:, :-1]
        states[indices, -1] = group[:, -1]
    return states


def _states_at(model, processor, records, num_latents, batch_size, max_tiles):
    """`collect_states` for prompts with `num_latents` latents each: `(N, num_latents + 2, H)`."""
    import torch

    from mmcoconut.analysis.attention import latent_positions, prompt_batches

    states = []
    with torch.no_grad():
        for _, _, batch in prompt_batches(model, processor, records, num_latents, batch_size, max_tiles):
            hidden = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], pixel_values=batch.get("pixel_values"),
                num_tiles=batch.get("num_tiles"), logits_to_keep=1,
            ).last_hidden_state  # (B, T, H)
            positions = latent_positions(batch["input_ids"], model.config.latent_token_id)  # (B, K)
            columns = torch.cat([positions[:, :1] - 2, positions - 1, positions[:, -1:]], dim=1)  # (B, K + 2)
            rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
            states.append(hidden[rows, columns].float().cpu())
    return torch.cat(states)


def state_names(num_latents):
    return ["prompt", *(f"thought {k + 1}" for k in range(num_latents)), "last latent"]


def probe_table(states, targets, names, test_fraction=0.5, seed=0, l2=1e-2, min_samples=20):
    """For each state × hop, the probe from that state to the colour reached after the hop, on the records that
    have the hop (`None` where fewer than `min_samples` do). Returns `{classes, hops, rows: [{state, per_hop}]}`."""
    import torch

    classes = sorted({colour for chain in targets for colour in chain})
    index = {colour: i for i, colour in enumerate(classes)}
    max_hops = max(len(chain) for chain in targets)
    rows = []
    for s, name in enumerate(names):
        per_hop = []
        for hop in range(max_hops):
            # the records that have the hop and this state (a record with fewer thoughts has NaN in the others)
            present = ~torch.isnan(states[:, s]).any(-1)
            have = [i for i, chain in enumerate(targets) if len(chain) > hop and present[i]]
            if len(have) < min_samples:
                per_hop.append(None)
                continue
            labels = torch.tensor([index[targets[i][hop]] for i in have])
            result = probe_accuracy(states[have, s], labels, len(classes), test_fraction, seed, l2)
            per_hop.append({"hop": hop + 1, **result})
        rows.append({"state": name, "per_hop": per_hop})
    return {"classes": classes, "hops": max_hops, "rows": rows}


# ---------------------------------------------------------------------------------------------- output


def format_table(table):
    hops = range(1, table["hops"] + 1)
    lines = ["held-out probe accuracy (chance) per hop: the colour reached after that hop",
             f"{'state':<12}" + "".join(f"{f'hop {h}':>16}" for h in hops)]
    for row in table["rows"]:
        cells = ["-" if r is None else f"{100 * r['accuracy']:.1f}% ({100 * r['chance']:.1f}%)" for r in row["per_hop"]]
        lines.append(f"{row['state']:<12}" + "".join(f"{cell:>16}" for cell in cells))
    return "\n".join(lines)


def plot_probe(table, path, title):
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = table["rows"]
    gain = np.array([[np.nan if r is None else r["accuracy"] - r["chance"] for r in row["per_hop"]] for row in rows])
    fig = Figure(figsize=(2.5 + 1.2 * table["hops"], 1.2 + 0.45 * len(rows)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(gain, vmin=-0.25, vmax=1.0, cmap="viridis", aspect="auto")
    for s, row in enumerate(rows):
        for h, r in enumerate(row["per_hop"]):
            if r is not None:
                colour = "white" if r["accuracy"] - r["chance"] < 0.5 else "black"
                ax.text(h, s, f"{100 * r['accuracy']:.0f}%", ha="center", va="center", color=colour, fontsize=8)
    ax.set_xticks(range(table["hops"]), [f"hop {h + 1}" for h in range(table["hops"])])
    ax.set_yticks(range(len(rows)), [row["state"] for row in rows])
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="held-out accuracy − chance")
    FigureCanvasAgg(fig).print_png(str(path))


__all__ = ["fit_probe", "probe_accuracy", "hop_targets", "collect_states", "state_names", "probe_table",
           "format_table", "plot_probe"]


