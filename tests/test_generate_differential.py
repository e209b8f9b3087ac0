"""generate() option by option against references (issue 22).

Prompts without latents: our `generate` must give exactly what the wrapped `InternVLForConditionalGeneration.generate`
gives for the same weights, inputs, options and seed. Prompts with latents: what transformers' own `generate` gives on
a naive model that recomputes the whole sequence (thoughts filled in, no cache) for every token. Each case also checks
that its option changes the output (tokens, or the field or the work the option is about), so that no case passes
because the option was ignored by both sides.
"""

import copy
from dataclasses import dataclass, field

import pytest
import torch
from transformers import (
    DynamicCache,
    GenerationConfig,
    GenerationMixin,
    LogitsProcessor,
    LogitsProcessorList,
    StaticCache,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from configuration_mmcoconut import MMCoconutConfig
from mmcoconut.processing import tiny_internvl_config
from modeling_mmcoconut import CACHE_KWARG, MMCoconutForConditionalGeneration
from tests.tiny_models import END, EOS, IMAGE, LATENT, PAD, PER_TILE, START, VOCAB

STEPS = 6


def build_model(seed=2, attn=None, initializer_range=0.1):
    """A tiny random model whose greedy continuations vary (the default init repeats one token forever)."""
    torch.manual_seed(seed)
    internvl_config = tiny_internvl_config(vocab_size=VOCAB, image_token_id=IMAGE, initializer_range=initializer_range)
    config = MMCoconutConfig(internvl_config, latent_token_id=LATENT, start_latent_id=START, end_latent_id=END)
    model = MMCoconutForConditionalGeneration(config).float().eval()
    if attn is not None:
        model.set_attn_implementation(attn)
    model.generation_config.update(eos_token_id=EOS, pad_token_id=PAD)
    # The reference reads its own generation config: make it ours, so that both sides resolve the same options.
    model.internvl.generation_config = copy.deepcopy(model.generation_config)
    return model


class NaiveCoconut(MMCoconutForConditionalGeneration):
    """The definition, under transformers' own generate: no cache; every step recomputes the whole sequence, filling
    the prompt's latents left to right (one full recompute per latent). Generated tokens stay plain tokens."""

    generate = GenerationMixin.generate
    prompt_width = None

    def forward(self, input_ids, attention_mask=None, pixel_values=None, output_attentions=None,
                output_hidden_states=None, **kwargs):
        internvl = self.internvl
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        in_prompt = torch.arange(input_ids.shape[1]) < self.prompt_width
        embeds = internvl.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            features = internvl.model.get_image_features(pixel_values=pixel_values).pooler_output
            image_mask = (input_ids == IMAGE) & in_prompt
            embeds = embeds.masked_scatter(image_mask[..., None], features.reshape(-1, features.shape[-1]))

        def full_pass(embeds, **extras):
            return internvl.model.language_model(
                inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                **extras,
            )

        for t in range(input_ids.shape[1]):  # column order: each thought sees the thoughts before it
            rows = ((input_ids[:, t] == LATENT) & in_prompt[t] & attention_mask[:, t].bool()).nonzero().flatten()
            if len(rows):
                hidden = full_pass(embeds).last_hidden_state
                embeds = embeds.clone()
                embeds[rows, t] = hidden[rows, t - 1]
        extras = {k: True for k, v in (("output_attentions", output_attentions),
                                       ("output_hidden_states", output_hidden_states)) if v}
        out = full_pass(embeds, **extras)
        return CausalLMOutputWithPast(
            logits=internvl.lm_head(out.last_hidden_state), hidden_states=out.hidden_states, attentions=out.attentions
        )


def naive_copy(model):
    naive = NaiveCoconut(copy.deepcopy(model.config)).eval()
    naive.load_state_dict(model.state_dict())
    naive.generation_config = copy.deepcopy(model.generation_config)
    return naive


# ---------------------------------------------------------------- prompts


def text(n, g):
    return torch.randint(2, 280, (n,), generator=g).tolist()


def batch(rows, pixels):
    """Left-pad rows of ids; `pixels` are the tiles of the rows that hold image tokens, in order."""
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if pixels:
        inputs["pixel_values"] = torch.cat(pixels)
    return inputs


def prompts(kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    tile = lambda: torch.randn(1, 3, 28, 28, generator=g)  # noqa: E731  (one tile per image: see image_rows)
    if kind == "text":  # two left-padded rows
        return batch([text(7, g), text(4, g)], [])
    if kind == "text1":  # one row (assisted decoding takes batch size 1)
        return batch([text(7, g)], [])
    if kind == "image":  # an image row and a text row, left-padded
        return batch([[IMAGE] * PER_TILE + text(5, g), text(3, g)], [tile()])
    if kind == "image_last":  # prompts that end in image tokens
        return batch([text(5, g) + [IMAGE] * PER_TILE, text(2, g) + [IMAGE] * PER_TILE], [tile(), tile()])
    if kind == "latent":  # images and latents, different counts per row, left-padded
        rows = [[IMAGE] * PER_TILE + text(4, g) + [START, LATENT, LATENT, END],
                text(3, g) + [START, LATENT, END]]
        return batch(rows, [tile()])
    if kind == "latent1":
        return batch([[IMAGE] * PER_TILE + text(4, g) + [START, LATENT, LATENT, LATENT, END]], [tile()])
    raise ValueError(kind)


# ---------------------------------------------------------------- running and comparing


class CountCalls:
    """Forward calls of a module (the work a lossless option such as assisted decoding saves)."""

    def __init__(self, module):
        self.count = 0
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, *args):
        self.count += 1


def run(generate_owner, inputs, options, seed=0):
    """(output, forward calls) of `generate_owner.generate(**inputs, **options)` from a fixed seed; the calls count
    those of the assistant model instead when there is one (the work the option adds)."""
    options = {k: (v() if callable(v) and k in LAZY else v) for k, v in options.items()}
    counter = CountCalls(options.get("assistant_model") or generate_owner)
    try:
        torch.manual_seed(seed)
        args = options.pop("_positional", ())
        out = generate_owner.generate(*args, **inputs, **options)
    finally:
        counter.handle.remove()
    return out, counter.count


LAZY = ("logits_processor", "stopping_criteria", "assistant_model")  # built fresh for each call


def assert_same(ours, ref, naive=False):
    if not isinstance(ours, ModelOutput):
        assert isinstance(ref, torch.Tensor)
        assert ours.tolist() == ref.tolist()
        return
    assert ours.sequences.tolist() == ref.sequences.tolist()
    for name in ("scores", "logits"):
        if getattr(ref, name, None) is not None:
            assert len(getattr(ours, name)) == len(getattr(ref, name))
            for a, b in zip(getattr(ours, name), getattr(ref, name)):
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=name)
    if getattr(ref, "sequences_scores", None) is not None:
        torch.testing.assert_close(ours.sequences_scores, ref.sequences_scores, atol=1e-4, rtol=1e-4)
    for name in ("hidden_states", "attentions"):
        ref_steps = getattr(ref, name, None)
        if ref_steps is None:
            assert getattr(ours, name, None) is None
            continue
        ours_steps = getattr(ours, name)
        assert len(ours_steps) == len(ref_steps), name
        for step, (a_layers, b_layers) in enumerate(zip(ours_steps, ref_steps)):
            assert len(a_layers) == len(b_layers) and len(a_layers) > 0, name
            for a, b in zip(a_layers, b_layers):
                if naive and step > 0:  # the naive reference recomputes every position: its last one is the new one
                    b = b[:, -1:] if name == "hidden_states" else b[:, :, -1:]
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"{name} step {step}")


# ---------------------------------------------------------------- options


class Scale(LogitsProcessor):
    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, ::2] -= 3.0  # even ids penalised
        return scores


class StopAfterNewTokens(StoppingCriteria):
    """Stops every row `n` tokens after the width of the first call (the prompt plus one)."""

    def __init__(self, n):
        self.n, self.width = n, None

    def __call__(self, input_ids, scores, **kwargs):
        self.width = input_ids.shape[1] - 1 if self.width is None else self.width
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.width + self.n, dtype=torch.bool)


def only_odd(batch_id, input_ids):
    return list(range(1, VOCAB, 2))


def sequences(out):
    return (out.sequences if isinstance(out, ModelOutput) else out).tolist()


@dataclass
class Case:
    options: dict
    base: dict = field(default_factory=dict)  # the same call without the option (greedy by default)
    # "tokens": the option changes the sequences; or the name of what it changes instead
    changes: str = "tokens"
    model: dict = field(default_factory=dict)  # build_model arguments
    prompt_kinds: tuple = ("text", "image", "latent")
    naive_drops: tuple = ()  # options a no-cache naive reference cannot take; lossless, so it runs without them


GREEDY = dict(max_new_tokens=STEPS, do_sample=False, eos_token_id=None)
SAMPLE = dict(GREEDY, do_sample=True, temperature=1.5)
DICT = dict(return_dict_in_generate=True)

CASES = {
    "max_new_tokens": Case(dict(GREEDY, max_new_tokens=3)),
    "sampling": Case(SAMPLE),
    "top_k": Case(dict(SAMPLE, top_k=3), base=SAMPLE),
    "top_p": Case(dict(SAMPLE, top_p=0.3), base=SAMPLE),
    "min_p": Case(dict(SAMPLE, min_p=0.5), base=SAMPLE),
    "repetition_penalty": Case(dict(GREEDY, repetition_penalty=3.0, max_new_tokens=12), base=dict(GREEDY, max_new_tokens=12),
                               model=dict(seed=0, initializer_range=0.1)),
    "no_repeat_ngram_size": Case(dict(GREEDY, no_repeat_ngram_size=1)),
    "bad_words_ids": Case(dict(GREEDY, bad_words_ids=[[t] for t in range(2, 280, 3)])),
    "sequence_bias": Case(dict(GREEDY, sequence_bias={(t,): 4.0 for t in range(100, 120)})),
    "eos_list_min_new_tokens": Case(dict(GREEDY, eos_token_id=list(range(100, 200)), min_new_tokens=2),
                                    base=dict(GREEDY, eos_token_id=list(range(100, 200)))),
    "beams": Case(dict(GREEDY, num_beams=3, length_penalty=0.5, num_return_sequences=2, **DICT, output_scores=True),
                  base=dict(GREEDY, num_return_sequences=2, do_sample=True, top_k=1)),
    "scores_logits": Case(dict(GREEDY, **DICT, output_scores=True, output_logits=True), base=dict(GREEDY, **DICT),
                          changes="scores"),
    "logits_processor": Case(dict(GREEDY, logits_processor=lambda: LogitsProcessorList([Scale()]))),
    "stopping_criteria": Case(dict(GREEDY, stopping_criteria=lambda: StoppingCriteriaList([StopAfterNewTokens(2)]))),
    "prefix_allowed_tokens_fn": Case(dict(GREEDY, prefix_allowed_tokens_fn=only_odd)),
    "max_length": Case(dict(GREEDY, max_new_tokens=None, max_length=14)),
    "use_cache_false": Case(dict(GREEDY, **DICT, use_cache=False), base=dict(GREEDY, **DICT), changes="cache"),
    "positional_generation_config": Case(
        dict(_positional=(None, GenerationConfig(max_new_tokens=3, do_sample=False, eos_token_id=None)))
    ),
    "output_hidden_states": Case(dict(GREEDY, **DICT, output_hidden_states=True), base=dict(GREEDY, **DICT),
                                 changes="hidden_states"),
    "output_attentions": Case(dict(GREEDY, **DICT, output_attentions=True), base=dict(GREEDY, **DICT),
                              changes="attentions", model=dict(attn="eager")),
    "static_cache": Case(dict(GREEDY, **DICT, cache_implementation="static"), base=dict(GREEDY, **DICT),
                         changes="cache", naive_drops=("cache_implementation",)),
    "prompt_lookup": Case(dict(GREEDY, max_new_tokens=12, prompt_lookup_num_tokens=3), base=dict(GREEDY, max_new_tokens=12),
                          changes="calls", model=dict(seed=1, initializer_range=0.02),
                          prompt_kinds=("text1", "latent1"), naive_drops=("prompt_lookup_num_tokens",)),
    "assistant_model": Case(dict(GREEDY, max_new_tokens=12, assistant_model="internvl copy"),
                            base=dict(GREEDY, max_new_tokens=12), changes="assistant",
                            prompt_kinds=("text1", "latent1"), naive_drops=("assistant_model",)),
    "image_last": Case(dict(GREEDY), prompt_kinds=("image_last",), changes="image"),
}


def changed(case, ours, base, calls, base_calls):
    if case.changes == "tokens":
        return sequences(ours) != sequences(base)
    if case.changes == "calls":  # lossless: the same tokens from fewer forward calls
        return sequences(ours) == sequences(base) and calls < base_calls
    if case.changes == "assistant":  # lossless: the same tokens, the assistant drafted them
        return sequences(ours) == sequences(base) and calls > 0
    if case.changes == "cache":
        return type(getattr(ours, CACHE_KWARG)) is not type(getattr(base, CACHE_KWARG))
    return getattr(base, case.changes) is None and getattr(ours, case.changes) is not None


def resolve(options, model):
    if options.get("assistant_model") == "internvl copy":  # greedy drafts from the same weights: all accepted
        options = dict(options, assistant_model=lambda: copy.deepcopy(model.internvl))
    return options


CASE_IDS = [(name, kind) for name, case in CASES.items() for kind in case.prompt_kinds]


@pytest.mark.parametrize("name,kind", CASE_IDS, ids=[f"{n}-{k}" for n, k in CASE_IDS])
def test_generate_matches_the_reference(name, kind, caplog):
    case = CASES[name]
    model = build_model(**case.model)
    inputs = prompts(kind)
    options = resolve(case.options, model)
    ours, calls = run(model, inputs, options)
    if "latent" in kind:
        naive = naive_copy(model)
        naive.prompt_width = inputs["input_ids"].shape[1]
        naive_options = {k: v for k, v in options.items() if k not in case.naive_drops}
        if naive_options.get("_positional"):  # no cache: in the config itself (a config and options log a warning)
            config = copy.deepcopy(naive_options["_positional"][1])
            config.use_cache = False
            naive_options["_positional"] = (None, config)
        else:
            naive_options["use_cache"] = False
        ref, _ = run(naive, inputs, naive_options)
        assert_same(ours, ref, naive=True)
    else:
        reference_options = dict(options)
        if reference_options.get("_positional"):
            reference_options["_positional"] = (inputs["input_ids"], *reference_options["_positional"][1:])
            reference_inputs = {k: v for k, v in inputs.items() if k != "input_ids"}
        else:
            reference_inputs = inputs
        ref, _ = run(model.internvl, reference_inputs, reference_options)
        assert_same(ours, ref)
    if case.changes == "image":  # the last tile's content reaches the answer
        other = dict(inputs, pixel_values=inputs["pixel_values"].flip(0))
        base, base_calls = run(model, other, options)
        assert sequences(ours) != sequences(base), "the option changes nothing here: the case would be vacuous"
        return
    base, base_calls = run(model, inputs, resolve(case.base or GREEDY, model))
    assert changed(case, ours, base, calls, base_calls), "the option changes nothing here: the case would be vacuous"
    if name == "assistant_model":
        # transformers' own assisted decoding calls the assistant's generate with a config and options, which logs a
        # deprecation for InternVL alone as well; it is not ours (conftest fails a test on a logged deprecation).
        caplog.handler.records[:] = [
            r for r in caplog.handler.records if "Passing `generation_config` together with" not in r.getMessage()
        ]


# ---------------------------------------------------------------- refused up front


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(custom_generate=lambda *a, **k: None), "custom_generate"),
        (dict(penalty_alpha=0.6, top_k=4), "contrastive_search"),
        (dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.0), "group_beam_search"),
        (dict(dola_layers="low"), "dola_generation"),
        (dict(assistant_early_exit=1), "assistant_early_exit"),
        (dict(cache_implementation="offloaded"), "cache_implementation='offloaded'"),
        (dict(prefill_chunk_size=4), "prefill_chunk_size"),
    ],
    ids=["custom_generate", "contrastive", "group_beams", "dola", "early_exit", "offloaded_cache", "chunked_prefill"],
)
def test_unsupported_options_are_refused_before_any_work(options, match):
    model = build_model()
    calls = CountCalls(model)
    with pytest.raises(ValueError, match=match):
        model.generate(**prompts("text"), max_new_tokens=2, **options)
    assert calls.count == 0


def test_a_tensor_as_second_positional_argument_is_refused():
    inputs = prompts("text")
    with pytest.raises(TypeError, match="second positional parameter is generation_config"):
        build_model().generate(inputs["input_ids"], inputs["attention_mask"])


def test_use_cache_false_saved_in_the_generation_config_is_exact():
    """from_internvl saves use_cache=False when InternVL's text config has it: a plain call must stay exact."""
    model = build_model()
    inputs = prompts("text")
    expected = model.generate(**inputs, **GREEDY)
    model.generation_config.use_cache = False
    assert model.generate(**inputs, **GREEDY).tolist() == expected.tolist()
    assert model.internvl.generate(**inputs, **GREEDY, use_cache=False).tolist() == expected.tolist()


def test_static_cache_with_beams_matches_the_dynamic_cache():
    model = build_model()
    inputs = prompts("latent")
    options = dict(GREEDY, num_beams=2, num_return_sequences=2, return_dict_in_generate=True)
    static = model.generate(**inputs, **options, cache_implementation="static")
    assert isinstance(getattr(static, CACHE_KWARG), StaticCache)
    dynamic = model.generate(**inputs, **options)
    assert isinstance(getattr(dynamic, CACHE_KWARG), DynamicCache)
    assert static.sequences.tolist() == dynamic.sequences.tolist()
