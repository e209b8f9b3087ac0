"""Look inside continuous thoughts: what each one decodes to, and where it attends.

    mmcoconut-analyze --model outputs/demo --data-file outputs/demo/data/canonical/val.jsonl \\
        --limit 8 --top-k 5 --output-dir outputs/demo/latent_analysis

For every sample the prompt is laid out as at evaluation, `question <|start-latent|> <|latent|>×K <|end-latent|>`,
and the latent forward fills the K thoughts. Then:

- **decoding**: thought k is the vector placed at latent position p_k, i.e. the last hidden state of p_k - 1
  (already final-normed); it goes through the LM head and the top-k tokens and probabilities are kept.
- **attention**: the filled sequence is run once more in a single eager pass (it gives the same hidden states as
  the multi-pass forward; checked on every batch), and for the query at each latent position p_k the attention
  probabilities of every layer, averaged over heads, are summed per key category (`ATTENTION_CATEGORIES`):
  `image` (<IMG_CONTEXT> tokens), `text` (question and chat-template words), `special` (special tokens such as
  <|im_start|>, <img>, <|start-latent|>), `thoughts` (earlier latent positions) and `self` (p_k itself). Padding is
  masked out, so the five shares of one thought and layer sum to 1.

Writes `latents.json` (everything), `attention_share.png` (heatmaps) and `top_k_decodings.png` (a table) to
`--output-dir` and prints a short summary.
"""

import logging

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from data_collator import MMCoconutCollator
from mmcoconut.data.curriculum import CurriculumDataset
from mmcoconut.text.prompt import step_text

logger = logging.getLogger(__name__)

ATTENTION_CATEGORIES = ("image", "text", "special", "thoughts", "self")
_IMAGE, _TEXT, _SPECIAL, _THOUGHTS, _SELF = range(len(ATTENTION_CATEGORIES))
_PADDING = -1
# Largest relative difference (max |Δh| / max |h|) allowed between the single-pass recompute and the latent forward.
RECOMPUTE_RTOL = {torch.float64: 1e-8, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


# ---------------------------------------------------------------------------------------------- per batch


def latent_positions(input_ids, latent_token_id):
    """`(B, K)` column of every `<|latent|>`, in order; every sample must have the same number K."""
    is_latent = input_ids == latent_token_id
    counts = is_latent.sum(-1)
    if bool((counts != counts[0]).any()):
        raise ValueError(f"every sample needs the same number of latents, got {counts.tolist()}")
    if int(counts[0]) == 0:
        raise ValueError("the batch has no <|latent|> tokens, so there are no thoughts to analyze")
    columns = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    return columns[is_latent].view(input_ids.shape[0], -1)  # row-major, so each row is in column order


def key_categories(input_ids, attention_mask, image_token_id, latent_token_id, special_ids):
    """`(B, T)` category index of every key position (`ATTENTION_CATEGORIES`; -1 on padding).

    Latents are `thoughts` here; relative to a query the latent at the query's own position is `self`, which
    `thought_attention` splits off.
    """
    categories = torch.full_like(input_ids, _TEXT)
    special = torch.isin(input_ids, torch.tensor(sorted(special_ids), device=input_ids.device))
    categories[special] = _SPECIAL
    categories[input_ids == image_token_id] = _IMAGE
    categories[input_ids == latent_token_id] = _THOUGHTS
    categories[attention_mask == 0] = _PADDING
    return categories


def _category_one_hot(categories):
    """`(B, T, C)` float indicator of each key's category; padding keys belong to none."""
    one_hot = torch.zeros(*categories.shape, len(ATTENTION_CATEGORIES), device=categories.device)
    valid = categories != _PADDING
    one_hot[valid, categories[valid]] = 1.0
    return one_hot


def visible_key_counts(categories, positions):
    """`(B, K, C)` how many keys of each category the query at each latent position can attend to (a uniform
    attention's shares are these counts over their sum)."""
    causal = torch.arange(categories.shape[1], device=positions.device) <= positions[..., None]  # (B, K, T)
    counts = torch.einsum("bkt,btc->bkc", causal.float(), _category_one_hot(categories))
    counts[..., _THOUGHTS] -= 1
    counts[..., _SELF] = 1
    return counts.long()


def filled_inputs_embeds(model, input_ids, pixel_values, last_hidden_state, positions):
    """The input embeddings the latent forward ran on: image features merged, latent p = `last_hidden_state[p - 1]`.

    The image merge is the model's own (`embed_inputs`), so analysis sees exactly the embeddings the forward ran on.
    """
    embeds = model.embed_inputs(input_ids, pixel_values)  # (B, T, H): the model's own image merge
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None]
    embeds = embeds.clone()
    embeds[rows, positions] = last_hidden_state[rows, positions - 1].to(embeds.dtype)
    return embeds


def thought_attention(model, inputs_embeds, attention_mask, position_ids, positions, categories, keep_keys=False):
    """Attention shares of the queries at `positions`: `(B, K, layers, len(ATTENTION_CATEGORIES))`, and the
    last hidden state of the single pass; with `keep_keys`, a third value: the per-key attention `(B, K, T)`,
    averaged over heads and layers (e.g. to draw where a thought looks inside the image).

    One eager pass of the language model over the filled `inputs_embeds`; a forward hook on every attention module
    reduces its `(B, heads, T, T)` probabilities to the latent rows at once, so no layer's full matrix is kept.
    """
    language_model = model.internvl.model.language_model
    if language_model.config._attn_implementation != "eager":
        raise ValueError(
            "attention probabilities need eager attention; load the model with attn_implementation='eager' "
            f"(this one uses {language_model.config._attn_implementation!r})"
        )
    batch_size, num_latents = positions.shape
    rows = torch.arange(batch_size, device=positions.device)[:, None]
    columns = torch.arange(num_latents, device=positions.device)
    one_hot = _category_one_hot(categories)  # (B, T, C)
    shares, per_key = [], []

    def record(module, args, output):
        weights = output[1] if isinstance(output, tuple) and len(output) == 2 else None
        if weights is None or weights.dim() != 4:
            raise RuntimeError(f"{type(module).__name__} returned no attention probabilities (B, heads, T, T)")
        per_thought = weights[rows, :, positions].float().mean(2)  # (B, K, T), mean over heads
        if keep_keys:
            per_key.append(per_thought.clone())
        self_share = per_thought[rows, columns, positions]  # (B, K)
        per_thought[rows, columns, positions] = 0.0  # the own latent key counts as `self`, not `thoughts`
        share = torch.einsum("bkt,btc->bkc", per_thought, one_hot)
        share[..., _SELF] = self_share
        shares.append(share)

    handles = [layer.self_attn.register_forward_hook(record) for layer in language_model.layers]
    try:
        outputs = language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
    finally:
        for handle in handles:
            handle.remove()
    if keep_keys:
        return torch.stack(shares, dim=2), outputs.last_hidden_state, torch.stack(per_key).mean(0)
    return torch.stack(shares, dim=2), outputs.last_hidden_state


@torch.no_grad()
def analyze_batch(model, batch, special_ids, top_k=5, keep_keys=False):
    """Thoughts, their top-k decodings and attention shares for one collated batch of latent prompts.

    Args:
        model: an `MMCoconutForConditionalGeneration` loaded with `attn_implementation="eager"`.
        batch: `MMCoconutCollator` output (`input_ids`, `attention_mask`, `position_ids`, `num_tiles`, optional
            `pixel_values`); every sample has the same number K of latents.
        special_ids: token ids counted as `special` keys (the image and latent tokens are categorised first).
        top_k: decodings kept per thought.
        keep_keys: also return `key_attention` `(B, K, T)`, each thought's attention over every key position
            (mean over heads and layers; see `thought_attention`).

    Returns a dict of tensors: `positions` `(B, K)`, `thoughts` `(B, K, H)` (= the forward's `last_hidden_state` at
    `positions - 1`), `top_ids`/`top_probs` `(B, K, top_k)` (descending), `attention` `(B, K, layers, categories)`,
    `key_counts` `(B, K, categories)` (keys each thought can attend to) and `recompute_rel_diff` (a float: how far
    the single eager pass is from the latent forward).
    """
    config = model.config
    input_ids = batch["input_ids"]
    positions = latent_positions(input_ids, config.latent_token_id)
    forward = model(
        input_ids=input_ids,
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        pixel_values=batch.get("pixel_values"),
        num_tiles=batch.get("num_tiles"),
        logits_to_keep=1,  # the full-vocabulary logits of every position are not needed
    )
    hidden = forward.last_hidden_state  # (B, T, H)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None]
    thoughts = hidden[rows, positions - 1]  # (B, K, H)

    probs = model.internvl.lm_head(thoughts).float().softmax(-1)  # (B, K, V)
    top_probs, top_ids = probs.topk(top_k, dim=-1)

    categories = key_categories(
        input_ids, batch["attention_mask"], model.internvl.config.image_token_id, config.latent_token_id, special_ids
    )
    embeds = filled_inputs_embeds(model, input_ids, batch.get("pixel_values"), hidden, positions)
    attention, recomputed, *key_attention = thought_attention(
        model, embeds, batch["attention_mask"], batch["position_ids"], positions, categories, keep_keys=keep_keys
    )
    real = batch["attention_mask"].bool()
    rel_diff = float((recomputed[real] - hidden[real]).abs().max() / hidden[real].abs().max())
    if hidden.dtype not in RECOMPUTE_RTOL:
        raise ValueError(f"unsupported dtype {hidden.dtype}; use one of {sorted(map(str, RECOMPUTE_RTOL))}")
    tolerance = RECOMPUTE_RTOL[hidden.dtype]
    if rel_diff > tolerance:
        raise RuntimeError(
            f"the single-pass recompute differs from the latent forward by {rel_diff:.2e} (relative, > "
            f"{tolerance:.0e} for {hidden.dtype}); its attention would not be the forward's"
        )
    result = {
        "positions": positions,
        "thoughts": thoughts,
        "top_ids": top_ids,
        "top_probs": top_probs,
        "attention": attention,
        "key_counts": visible_key_counts(categories, positions),
        "recompute_rel_diff": rel_diff,
    }
    if keep_keys:
        result["key_attention"] = key_attention[0]
    return result


# ---------------------------------------------------------------------------------------------- a data set


def special_token_ids(tokenizer, config):
    """Ids counted as `special` keys: the tokenizer's special added tokens except <IMG_CONTEXT> and <|latent|>."""
    excluded = {config.internvl_config.image_token_id, config.latent_token_id}
    return {i for i, token in tokenizer.added_tokens_decoder.items() if token.special and i not in excluded}


def default_num_latents(config):
    """Latents the checkpoint is prompted with, as evaluation uses (`MMCoconutConfig.num_inference_latents`)."""
    return config.num_inference_latents


def analysis_num_latents(requested, config):
    """The analysis commands' `--num-latents`: as given; else `steps` (each record's own count) for a checkpoint that
    thinks adaptively, else the checkpoint's fixed count."""
    if requested is not None:
        return requested
    return "steps" if config.default_thinking == "adaptive" else default_num_latents(config)


def prompt_batches(model, processor, records, num_latents, batch_size=4, max_tiles=None):
    """Yield `(record indices, sample ids, batch)` for `records` laid out as at evaluation with `num_latents`
    latents each (`question <|start-latent|> <|latent|>×K <|end-latent|>`), collated and on the model's device.
    Every record must be kept (a skipped one is an error: the results would no longer line up with `records`)."""
    config = model.config
    dataset = CurriculumDataset(
        records, processor, mode="coconut", c_thought=config.c_thought,
        max_latent_stage=config.latent_stage, max_tiles=max_tiles,
    )
    if len(dataset) != len(records):
        raise ValueError(f"the dataset kept {len(dataset)} of {len(records)} records")
    collator = MMCoconutCollator(processor.tokenizer.pad_token_id, config.latent_token_id, pad_to="end")
    device = model.device
    for start in range(0, len(dataset), batch_size):
        indices = range(start, min(start + batch_size, len(dataset)))
        batch = collator([dataset.prompt_features(i, num_latents) for i in indices])
        ids = batch.pop("ids")
        batch = {k: v.to(device) if k != "pixel_values" else v.to(device, model.dtype) for k, v in batch.items()}
        yield indices, ids, batch


def analyze(model, processor, records, num_latents=None, top_k=5, batch_size=4, max_tiles=None):
    """Analyze the continuous thoughts of `model` on canonical `records`; returns a JSON-serialisable dict.

    Keys: `num_latents`, `top_k`, `c_thought`, `latent_stage`, `num_layers`, `categories`,
    `max_recompute_rel_diff`, `samples` (per sample: `id`, `question`, `answer`, `thoughts`, each with `index`,
    `position`, the `step` it replaces (or None), `top1_in_step` (whether the top-1 token is one of that step's
    tokens; None without a step), `top_k` decodings `[{token, token_id, prob}]`, `attention`
    `{per_layer: [{category: share}], mean: {category: share}}` and `key_counts` `{category: keys it can attend
    to}`), and `mean_attention` (the same two attention views averaged over samples, one entry per thought).
    """
    config = model.config
    num_latents = default_num_latents(config) if num_latents is None else num_latents
    if num_latents < 1:
        raise ValueError(
            f"num_latents must be >= 1 (the checkpoint's latent_stage={config.latent_stage} × "
            f"c_thought={config.c_thought} gives {default_num_latents(config)}); pass it explicitly"
        )
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    tokenizer = processor.tokenizer
    special_ids = special_token_ids(tokenizer, config)

    samples, attention, max_diff = [], [], 0.0
    for positions, ids, batch in prompt_batches(model, processor, records, num_latents, batch_size, max_tiles):
        result = analyze_batch(model, batch, special_ids, top_k=top_k)
        max_diff = max(max_diff, result["recompute_rel_diff"])
        attention.append(result["attention"].cpu())
        for b, (position, sample_id) in enumerate(zip(positions, ids)):
            record = records[position]
            samples.append({
                "id": sample_id,
                "question": record["question"],
                "answer": record.get("answer"),
                "thoughts": [
                    thought_entry(k, result, b, record["steps"], config.c_thought, tokenizer)
                    for k in range(num_latents)
                ],
            })
        logger.info("analyzed %d / %d samples", len(samples), len(records))

    mean = torch.cat(attention).mean(0)  # (K, L, C)
    return {
        "num_latents": num_latents,
        "top_k": top_k,
        "c_thought": config.c_thought,
        "latent_stage": config.latent_stage,
        "num_layers": mean.shape[1],
        "categories": list(ATTENTION_CATEGORIES),
        "max_recompute_rel_diff": max_diff,
        "samples": samples,
        "mean_attention": [_attention_entry(mean[k]) for k in range(num_latents)],
    }


def thought_entry(k, result, b, steps, c_thought, tokenizer):
    step_index = k // c_thought
    ids = result["top_ids"][b, k].tolist()
    step = steps[step_index] if step_index < len(steps) else None
    # Does the thought decode to a token of the step it replaces (tokenized as training lays it out)?
    step_ids = None if step is None else tokenizer(step_text(step), add_special_tokens=False)["input_ids"]
    return {
        "index": k,
        "position": int(result["positions"][b, k]),
        "step": step,
        "top1_in_step": None if step is None else ids[0] in step_ids,
        "top_k": [
            {"token": tokenizer.decode([token_id]), "token_id": token_id, "prob": float(prob)}
            for token_id, prob in zip(ids, result["top_probs"][b, k].tolist())
        ],
        "attention": _attention_entry(result["attention"][b, k]),
        "key_counts": dict(zip(ATTENTION_CATEGORIES, result["key_counts"][b, k].tolist())),
    }


def _attention_entry(per_layer):
    """`(layers, C)` shares → `{per_layer: [{category: share}], mean: {category: share}}`."""
    as_dict = lambda row: dict(zip(ATTENTION_CATEGORIES, (float(x) for x in row)))  # noqa: E731
    return {"per_layer": [as_dict(row) for row in per_layer], "mean": as_dict(per_layer.mean(0))}


# ---------------------------------------------------------------------------------------------- plots


def display_token(token):
    # repr shows whitespace and newlines; non-Latin glyphs are escaped since the default font lacks most of them.
    return repr(token) if all(ord(c) < 0x2000 for c in token) else ascii(token)


def _save(fig, path):
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def plot_attention(results, path):
    """Heatmaps of the sample-averaged attention shares: thought × category (mean over layers), and the share on
    image tokens per layer × thought."""
    shares = torch.tensor([[t["mean"][c] for c in ATTENTION_CATEGORIES] for t in results["mean_attention"]])
    image_by_layer = torch.tensor([[layer["image"] for layer in t["per_layer"]] for t in results["mean_attention"]]).T
    num_latents, num_layers = shares.shape[0], image_by_layer.shape[0]
    thought_labels = [f"thought {k + 1}" for k in range(num_latents)]

    fig = Figure(figsize=(5.5 + 0.8 * num_latents, 1.6 + 0.5 * max(num_latents, num_layers)), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[len(ATTENTION_CATEGORIES), max(num_latents, 2)])
    image = left.imshow(shares.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    left.set_xticks(range(len(ATTENTION_CATEGORIES)), ATTENTION_CATEGORIES)
    left.set_yticks(range(num_latents), thought_labels)
    left.set_title("attention share (mean over layers, heads)")
    for k in range(num_latents):
        for c in range(len(ATTENTION_CATEGORIES)):
            value = float(shares[k, c])
            left.text(c, k, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black")
    right.imshow(image_by_layer.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    if num_layers * num_latents <= 64:
        for layer in range(num_layers):
            for k in range(num_latents):
                value = float(image_by_layer[layer, k])
                colour = "white" if value < 0.6 else "black"
                right.text(k, layer, f"{value:.2f}", ha="center", va="center", color=colour, fontsize=8)
    right.set_xticks(range(num_latents), [str(k + 1) for k in range(num_latents)])
    right.set_yticks(range(num_layers), [str(layer) for layer in range(num_layers)])
    right.set_xlabel("thought")
    right.set_ylabel("layer")
    right.set_title("share on image tokens")
    fig.colorbar(image, ax=[left, right], shrink=0.8)
    fig.suptitle(f"{len(results['samples'])} samples, {num_latents} thoughts")
    _save(fig, path)


def plot_top_k(results, path, max_samples=8):
    """A table of each thought's top-k decodings (token and probability; shaded by probability) for the first
    `max_samples` samples."""
    samples = results["samples"][:max_samples]
    row_labels, cells, colours = [], [], []
    for sample in samples:
        for thought in sample["thoughts"]:
            row_labels.append(f"{sample['id']} · {thought['index'] + 1}")
            cells.append([f"{display_token(d['token'])} {d['prob']:.3g}" for d in thought["top_k"]])
            colours.append([(1.0, 1.0 - 0.6 * d["prob"], 1.0 - 0.6 * d["prob"]) for d in thought["top_k"]])
    top_k = results["top_k"]
    fig = Figure(figsize=(2.5 + 1.9 * top_k, 0.6 + 0.25 * (len(cells) + 1)))
    ax = fig.subplots()
    ax.axis("off")
    table = ax.table(
        cellText=cells, cellColours=colours, rowLabels=row_labels,
        colLabels=[f"top {r + 1}" for r in range(top_k)], cellLoc="left", bbox=[0, 0, 1, 1],
    )
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    total = len(results["samples"])
    shown = f"first {len(samples)} of {total} samples" if len(samples) < total else f"{total} samples"
    ax.set_title(f"continuous thoughts decoded through the LM head ({shown}; row = sample · thought)")
    _save(fig, path)


# ---------------------------------------------------------------------------------------------- CLI


def format_summary(results):
    """A plain-text table: per thought, the mean attention shares, the shares a uniform attention over the same
    keys would give (in parentheses), how often the top-1 token is a token of the replaced step, and the most
    frequent top-1 token."""
    lines = [
        "thought  " + "  ".join(f"{c:>14}" for c in ATTENTION_CATEGORIES) + "  top-1 in step  most frequent top-1"
    ]
    for k, mean in enumerate(results["mean_attention"]):
        thoughts = [sample["thoughts"][k] for sample in results["samples"]]
        uniform = {
            c: sum(t["key_counts"][c] / sum(t["key_counts"].values()) for t in thoughts) / len(thoughts)
            for c in ATTENTION_CATEGORIES
        }
        tops = [t["top_k"][0]["token"] for t in thoughts]
        common = max(set(tops), key=tops.count)
        shares = "  ".join(f"{mean['mean'][c]:6.3f} ({uniform[c]:.3f})" for c in ATTENTION_CATEGORIES)
        in_step = [t["top1_in_step"] for t in thoughts if t["top1_in_step"] is not None]
        in_step = f"{sum(in_step)}/{len(in_step)}" if in_step else "-"
        lines.append(f"{k + 1:>7}  {shares}  {in_step:>13}  {display_token(common)} ({tops.count(common)}/{len(tops)})")
    return "\n".join(lines)


__all__ = [
    "ATTENTION_CATEGORIES",
    "latent_positions",
    "key_categories",
    "filled_inputs_embeds",
    "thought_attention",
    "visible_key_counts",
    "analyze_batch",
    "analysis_num_latents",
    "thought_entry",
    "prompt_batches",
    "special_token_ids",
    "default_num_latents",
    "analyze",
    "display_token",
    "plot_attention",
    "plot_top_k",
    "format_summary",
]


