"""Training step (forward + backward) of MMCoconut against its floor and the original Coconut algorithm.

    python -m benchmarks.bench_train_step --out outputs/bench_train_step.json

Same batch, same weights, in one run:
- ours: `MMCoconutForConditionalGeneration.forward` (passes over one KV cache, vectorised thought
  fill, LM head on the supervised positions only);
- floor: plain `InternVLForConditionalGeneration` on the same sequences with the latents as ordinary
  tokens: one pass, full logits, its own loss — what a step costs with no thoughts at all;
- original: the original Coconut algorithm (`benchmarks/original_coconut.py`): per-token Python
  lists to rebuild the embeddings each pass, full logits every pass.
Ours and the original compute the same loss (reported side by side); the floor's differs since its
latents are token embeddings.
"""

import argparse

from benchmarks.cli import add_common_args
from benchmarks.common import (
    LATENT_ID,
    MEMORY_METHOD,
    build_setup,
    collate_train,
    describe,
    format_table,
    make_samples,
    median,
    peak_memory_bytes,
    shape_summary,
    time_runs,
    write_json,
)
from benchmarks.original_coconut import original_coconut_forward
from mmcoconut.cli.help import DefaultsHelpFormatter


def build_parser():
    """The benchmark's flags."""
    parser = add_common_args(
        argparse.ArgumentParser(
            description=__doc__.split("\n")[0], formatter_class=DefaultsHelpFormatter
        )
    )
    return parser


TARGETS = {
    "time_ours_over_floor": ("<=", 1.0),
    "time_original_over_ours": (">=", 5.0),
    "memory_ours_over_floor": ("<=", 1.0),
}


def loss_functions(setup, batch):
    """The three implementations, each a function returning the loss of `batch`."""
    model, internvl = setup.model, setup.internvl
    plain = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "pixel_values", "labels")}
    return {
        "ours": lambda: model(**batch).loss,
        "floor": lambda: internvl(**plain).loss,
        "original": lambda: original_coconut_forward(
            internvl, batch["input_ids"], batch["attention_mask"], batch["position_ids"], batch["labels"],
            LATENT_ID, pixel_values=batch["pixel_values"],
        )[0],
    }


def run(args) -> dict:
    setup = build_setup(args)
    setup.model.train()
    batch = collate_train(make_samples(args, setup), setup)

    def zero_grad():
        setup.model.zero_grad(set_to_none=True)

    losses = {}

    def step_of(name, loss_fn):
        def step():
            loss = loss_fn()
            loss.backward()
            losses[name] = loss.item()
        return step

    steps = {name: step_of(name, fn) for name, fn in loss_functions(setup, batch).items()}
    results = {}
    for name, step in steps.items():
        repeats, warmup = (args.baseline_repeats, 0) if name == "original" else (args.repeats, args.warmup)
        times = time_runs(step, repeats, warmup, setup.device, before=zero_grad)
        results[name] = dict(time_s=median(times), times_s=times, loss=losses[name])
    # Memory last: on CPU it changes how malloc works, which would slow any later timed run.
    for name, step in steps.items():
        zero_grad()
        results[name]["peak_memory_bytes"] = peak_memory_bytes(step, setup.device)
    zero_grad()

    ratios = {
        "time_ours_over_floor": results["ours"]["time_s"] / results["floor"]["time_s"],
        "time_original_over_ours": results["original"]["time_s"] / results["ours"]["time_s"],
        "memory_ours_over_floor": results["ours"]["peak_memory_bytes"] / results["floor"]["peak_memory_bytes"],
        "memory_original_over_ours": results["original"]["peak_memory_bytes"] / results["ours"]["peak_memory_bytes"],
    }
    return dict(
        benchmark="train_step",
        shape=shape_summary(args, setup),
        sequence=dict(
            width=batch["input_ids"].shape[1],
            real_tokens=int(batch["attention_mask"].sum()),
            supervised_tokens=int((batch["labels"][:, 1:] != -100).sum()),
        ),
        memory_method=MEMORY_METHOD[setup.device.type],
        results=results,
        loss_abs_diff_ours_original=abs(results["ours"]["loss"] - results["original"]["loss"]),
        ratios=ratios,
        targets={k: dict(op=op, value=v, met=_met(ratios[k], op, v)) for k, (op, v) in TARGETS.items()},
    )


def _met(value, op, target):
    return value <= target if op == "<=" else value >= target


def report(payload: dict) -> str:
    results, ratios = payload["results"], payload["ratios"]
    ours = results["ours"]
    rows = [
        [
            name,
            f"{r['time_s']:.3f}",
            f"{r['time_s'] / ours['time_s']:.2f}×",
            f"{r['peak_memory_bytes'] / 2**20:,.0f}",
            f"{r['peak_memory_bytes'] / ours['peak_memory_bytes']:.2f}×",
            f"{r['loss']:.6f}",
        ]
        for name, r in results.items()
    ]
    table = format_table(["training step", "time (s)", "time vs ours", "peak memory (MiB)", "memory vs ours",
                          "loss"], rows)
    seq = payload["sequence"]
    lines = [
        f"Training step (forward + backward) — {describe(payload['shape'])}.",
        f"Batch width {seq['width']} columns, {seq['real_tokens']} real tokens, {seq['supervised_tokens']} supervised.",
        f"Peak memory: {payload['memory_method']}.",
        "",
        table,
        "",
        f"|loss(ours) - loss(original)| = {payload['loss_abs_diff_ours_original']:.2e} (same computation)",
    ]
    for key, target in payload["targets"].items():
        mark = "met" if target["met"] else "MISSED"
        lines.append(f"{key} = {ratios[key]:.2f} (target {target['op']} {target['value']}: {mark})")
    lines.append(f"memory_original_over_ours = {ratios['memory_original_over_ours']:.2f}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    """Parse flags, run the benchmark, print the table, write the JSON (`--out`); returns the payload."""
    args = build_parser().parse_args(argv)
    payload = run(args)
    print(report(payload))
    write_json(args.out, payload)
    return payload


__all__ = ["loss_functions", "main", "report", "run"]

if __name__ == "__main__":
    main()
