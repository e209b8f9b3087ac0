"""Reading a generation back: where the thinking ends and where the answer stops.

Shared by `predict` (one question) and the A-OKVQA evaluation (a batch), so both cut a completion the same way.
"""


def eos_ids(model):
    """The set of token ids that end a completion (the model's `generation_config.eos_token_id`)."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        raise ValueError("the model's generation_config has no eos_token_id; generation could not stop")
    return {eos} if isinstance(eos, int) else set(eos)


def until_eos(new_ids, eos):
    """(tokens before the first EOS, generated-token count including that EOS, whether an EOS was generated).

    Finished rows of a batched generate are padded after their EOS; those columns are not counted."""
    for i, token in enumerate(new_ids):
        if token in eos:
            return new_ids[:i], i + 1, True
    return new_ids, len(new_ids), False


def after_thinking(prompt_ids, new_ids, start_latent_id, end_latent_id):
    """The new tokens after the thinking: all of them, or after an open-span prompt (adaptive thinking: the new
    columns are the thoughts, the masked columns of rows that stopped earlier and `<|end-latent|>`) those after
    that `<|end-latent|>`."""
    if prompt_ids[-1] != start_latent_id:
        return new_ids
    return new_ids[new_ids.index(end_latent_id) + 1 :]


__all__ = ["eos_ids", "until_eos", "after_thinking"]
