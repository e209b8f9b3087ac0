"""MMCoconut: an InternVL model that reasons in continuous latent space.

Coconut ("Chain of Continuous Thought", arXiv 2412.06769) replaces reasoning steps by `<|latent|>`
tokens whose input embedding is the last-layer hidden state of the position before them. This file
extends it to transformers' native `InternVLForConditionalGeneration`: image features are merged into
the embeddings once, then the sequence runs in passes over one KV cache — the prefix up to the first
latent column, one pass per latent column, then the rest — with gradients flowing through the thoughts.

This file and `configuration_mmcoconut.py` are saved beside the weights as remote code, so they
import nothing else of this project.
"""

import contextlib
import copy
import logging
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers
from packaging import version
from torch.utils.checkpoint import checkpoint
from transformers import (
    AutoModel,
    AutoModelForImageTextToText,
    DynamicCache,
    GenerationConfig,
    GenerationMixin,
    InternVLForConditionalGeneration,
    PretrainedConfig,
    PreTrainedModel,
    StaticCache,
)
from transformers.generation.utils import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput
from transformers.utils import ModelOutput, can_return_tuple

# The pipeline module is imported only so that it travels with this file as remote code: `config.custom_pipelines`
# names it, and transformers copies a remote module's relative imports beside the weights.
try:  # imported as remote code (a package next to the weights)
    from .configuration_mmcoconut import LATENT_TOKENS, MMCoconutConfig
    from .pipeline_mmcoconut import MMCoconutImageTextToTextPipeline  # noqa: F401
except ImportError:  # imported from a checkout or an installed mmcoconut
    from configuration_mmcoconut import LATENT_TOKENS, MMCoconutConfig
    from pipeline_mmcoconut import MMCoconutImageTextToTextPipeline  # noqa: F401

logger = logging.getLogger(__name__)

# transformers 5.24 renamed the KV cache `past_key_values` to `cache` in model outputs and in forward and
# generate arguments (the old name is deprecated until 5.40). This is the project's one version switch:
# every call into transformers passes the cache as `**{CACHE_KWARG: cache}`, and outputs name it `cache`.
CACHE_KWARG = "cache" if version.parse(transformers.__version__) >= version.parse("5.24.0.dev0") else "past_key_values"


@dataclass
class MMCoconutOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor`, *optional*):
        Shifted next-token cross-entropy over the supervised positions (sum / `num_items_in_batch`
        when given, else the mean).
    logits (`torch.FloatTensor`):
        With `labels`: `(num_supervised, vocab)`, the predictions for the supervised tokens in
        row-major (batch, position) order — the LM head is applied nowhere else. Without `labels`:
        `(batch, seq_len, vocab)`, or the last `logits_to_keep` positions.
    cache (`Cache`, *optional*):
        The KV cache of the whole sequence, when `use_cache=True` (transformers' name since 5.24; older
        releases read it as `past_key_values` too).
    last_hidden_state (`torch.FloatTensor`):
        `(batch, seq_len, hidden)`, the final-norm hidden states (the continuous thoughts' source).
    num_passes (`int`):
        Language-model passes run over the sequence.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*, with `output_hidden_states=True`):
        The language model's, one `(batch, seq_len, hidden)` tensor for the embeddings (thoughts filled in) and one
        per layer, as InternVL returns them; over the whole sequence they are the passes' joined along the sequence.
    attentions (`tuple(torch.FloatTensor)`, *optional*, with `output_attentions=True` and eager attention):
        The language model's, one `(batch, heads, seq_len, seq_len)` tensor per layer (future keys hold 0, as the
        causal softmax gives them).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: object | None = None
    last_hidden_state: torch.FloatTensor | None = None
    num_passes: int | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


if not hasattr(MMCoconutOutput, "past_key_values"):  # transformers < 5.24 has no alias of its own
    MMCoconutOutput.past_key_values = property(lambda self: self.cache)


THINKING_MODES = ("fixed", "adaptive")


@dataclass
class MMCoconutGenerateOutput(GenerateDecoderOnlyOutput):
    r"""
    transformers' `GenerateDecoderOnlyOutput` plus:

    num_thoughts (`torch.LongTensor` of shape `(num_sequences,)`):
        Continuous thoughts each returned sequence followed (adaptive: the row's own count; fixed: its prompt's
        `<|latent|>` tokens).
    """

    num_thoughts: torch.LongTensor | None = None


@dataclass
class MMCoconutGenerateBeamOutput(GenerateBeamDecoderOnlyOutput):
    r"""
    transformers' `GenerateBeamDecoderOnlyOutput` plus `num_thoughts` (see `MMCoconutGenerateOutput`).
    """

    num_thoughts: torch.LongTensor | None = None


class MMCoconutPreTrainedModel(PreTrainedModel):
    config_class = MMCoconutConfig
    base_model_prefix = "mmcoconut"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["InternVLVisionLayer", "Qwen2DecoderLayer"]
    _skip_keys_device_placement = CACHE_KWARG
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True


class MMCoconutForConditionalGeneration(MMCoconutPreTrainedModel, GenerationMixin):
    r"""
    InternVL with Coconut's continuous thoughts. `self.internvl` is the wrapped
    `InternVLForConditionalGeneration`; its weights are saved under the `internvl.` prefix.

    Example:

    ```python
    >>> from mmcoconut.processing import build_internvl_tokenizer, tiny_internvl_config
    >>> from transformers import InternVLForConditionalGeneration
    >>> tokenizer = build_internvl_tokenizer()
    >>> internvl = InternVLForConditionalGeneration(tiny_internvl_config())
    >>> model = MMCoconutForConditionalGeneration.from_internvl(internvl, tokenizer, c_thought=2)
    >>> model.config.latent_token_id == tokenizer.convert_tokens_to_ids("<|latent|>")
    True
    ```
    """

    # InternVL's own tie, seen from this level (applied only when `tie_word_embeddings` is set), so that
    # tools that look for ties on the top model (PEFT's trainable tokens, sharding) find it.
    _tied_weights_keys = {"internvl.lm_head.weight": "internvl.model.language_model.embed_tokens.weight"}
    # Set explicitly, not inferred from `forward`'s `**kwargs`: the Trainer then passes `num_items_in_batch` (the
    # loss is sum / that count, right under gradient accumulation) and does not rescale the loss itself. A model whose
    # forward took `**kwargs` but ignored the count would log a DDP loss multiplied by the number of processes
    # (tests/test_ddp_loss.py checks the logged loss).
    accepts_loss_kwargs = True

    def __init__(self, config: MMCoconutConfig, internvl: InternVLForConditionalGeneration | None = None):
        super().__init__(config)
        self.internvl = internvl if internvl is not None else InternVLForConditionalGeneration(config.internvl_config)
        self.config.internvl_config = self.internvl.config
        for sub_config in (self.internvl.config.text_config, self.internvl.config.vision_config):
            if sub_config._attn_implementation is None:
                raise ValueError(
                    f"InternVL's {type(sub_config).__name__} has no attention implementation; build the "
                    "InternVL with from_pretrained/_from_config or through MMCoconutForConditionalGeneration"
                )
        # The Trainer then counts `num_items_in_batch` over shifted labels, as the loss uses them.
        self.loss_type = "ForCausalLM"
        # Per-pass activation checkpointing (see `_set_gradient_checkpointing`).
        self.gradient_checkpointing = False
        self._gradient_checkpointing_func = None
        self.post_init()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_internvl(cls, internvl_or_path, tokenizer, c_thought=1, dtype=None, **load_kwargs):
        """Wrap an InternVL model (or load one from a path / Hub id) and add the latent tokens.

        Adds `<|start-latent|>`, `<|end-latent|>` and `<|latent|>` to `tokenizer` as special tokens
        (a tokenizer that already holds them is fine), grows the language model's embeddings (and the
        lm_head when untied) to `len(tokenizer)` when they are smaller (a padded matrix stays as it is),
        and initialises the three latent rows to the mean of the existing rows of the pieces their
        text splits into as plain text (e.g. `<|`, `latent`, `|>`). This starts a model, so the latent
        rows are always initialised (load a trained one with `from_pretrained`). Why: the rows start
        inside the trained embedding distribution with the same norm scale as real tokens (random rows
        from the initialiser are far smaller than trained ones), and the three markers start distinct
        from each other, unlike copying one token into all three. Original-format checkpoints
        (`model_type: internvl_chat`, as `OpenGVLab/InternVL3-1B-Pretrained`) are converted by
        `mmcoconut.inference.loading.load_base_internvl`; pass its model here.
        """
        if isinstance(internvl_or_path, InternVLForConditionalGeneration):
            internvl = internvl_or_path
        else:
            internvl = _load_internvl(str(internvl_or_path), dtype=dtype, **load_kwargs)

        # The pieces each text splits into as ordinary text, also when the tokenizer already holds the tokens.
        pieces = {
            token: tokenizer.encode(token, add_special_tokens=False, split_special_tokens=True)
            for token in LATENT_TOKENS
        }
        tokenizer.add_tokens(list(LATENT_TOKENS), special_tokens=True)
        token_ids = tokenizer.convert_tokens_to_ids(list(LATENT_TOKENS))
        for token, token_id in zip(LATENT_TOKENS, token_ids):
            if pieces[token] == [token_id]:
                raise ValueError(
                    f"The tokenizer holds {token} as an ordinary added token; add the latent tokens as special "
                    "tokens (tokenizer.add_special_tokens) or pass a tokenizer without them"
                )
        # Cover every id of the tokenizer; a matrix padded beyond it (Qwen's 151,936 rows) is never shrunk.
        if len(tokenizer) > internvl.get_input_embeddings().num_embeddings:
            internvl.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        rows = [internvl.get_input_embeddings().weight]
        if not internvl.config.tie_word_embeddings:
            rows.append(internvl.get_output_embeddings().weight)
        # A base InternVL was never trained on the latent tokens, so their rows are new to it whether the resize
        # appended them, they are padding rows, or the tokenizer already held the tokens: initialise all three.
        with _gathered_for_zero3(rows), torch.no_grad():
            for weight in rows:
                for token, token_id in zip(LATENT_TOKENS, token_ids):
                    weight[token_id] = weight[pieces[token]].mean(0)
        start_id, end_id, latent_id = token_ids
        config = MMCoconutConfig(
            # A copy: `PreTrainedModel.__init__` resets the attention implementation of the sub-configs it
            # is given, which on the live config would leave InternVL's attention without its causal mask.
            internvl_config=copy.deepcopy(internvl.config),
            latent_token_id=latent_id,
            start_latent_id=start_id,
            end_latent_id=end_id,
            c_thought=c_thought,
        )
        model = cls(config, internvl=internvl)
        # The config states the tokenizer's ids too: the Trainer would otherwise align them, with a warning per rank.
        for config_holder in (model.generation_config, model.config.get_text_config()):
            config_holder.eos_token_id = tokenizer.eos_token_id
            config_holder.pad_token_id = tokenizer.pad_token_id
        return model.to(dtype) if dtype is not None else model

    def save_pretrained(self, save_directory, *args, save_original_format=False, **kwargs):
        # Native parameter names by default. transformers would otherwise revert InternVL's names to
        # its legacy layout, which the Trainer's resume (a plain `load_state_dict`) cannot match.
        return super().save_pretrained(save_directory, *args, save_original_format=save_original_format, **kwargs)

    def get_input_embeddings(self):
        return self.internvl.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.internvl.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.internvl.get_output_embeddings()

    def _init_weights(self, module):
        # Every submodule belongs to the wrapped InternVL, which initialises its own weights.
        self.internvl._init_weights(module)

    def _set_gradient_checkpointing(self, enable=True, gradient_checkpointing_func=checkpoint, every_n_layers=1):
        # The language model's own per-layer checkpointing turns `use_cache` off in training and so
        # drops the KV cache the passes share. Instead each pass is checkpointed as a pure function
        # of its inputs (see `_language_model_pass`); the vision tower (no cache) uses the standard one.
        self.gradient_checkpointing = enable
        self._gradient_checkpointing_func = gradient_checkpointing_func if enable else None
        vision_tower = self.internvl.model.vision_tower
        vision_tower._set_gradient_checkpointing(enable, gradient_checkpointing_func, every_n_layers)

    # ------------------------------------------------------------------ forward

    @can_return_tuple
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        pixel_values=None,
        labels=None,
        num_items_in_batch=None,
        num_tiles=None,
        use_cache=False,
        logits_to_keep=None,
        inputs_embeds=None,
        output_attentions=None,
        output_hidden_states=None,
        thought_labels=None,
        edit_thoughts=None,
        **kwargs,
    ):
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch, seq_len)`):
                Image positions hold `internvl.config.image_token_id`; latents hold `config.latent_token_id`.
            attention_mask (`torch.LongTensor` of shape `(batch, seq_len)`, *optional*): 0 on padding.
            position_ids (`torch.LongTensor` of shape `(batch, seq_len)`, *optional*):
                Defaults to per-sample positions counted from each sample's first real token.
            pixel_values (`torch.FloatTensor` of shape `(total_tiles, 3, H, W)`, *optional*):
                The tiles of all samples, concatenated in batch order.
            labels (`torch.LongTensor` of shape `(batch, seq_len)`, *optional*): -100 where unsupervised.
            num_items_in_batch (`int` or `torch.Tensor`, *optional*):
                Supervised tokens in the whole (accumulated) batch; the loss is then sum / this count.
            num_tiles (`torch.LongTensor` of shape `(batch,)`, *optional*):
                Tiles per sample; when given, each sample's image-token count is checked on its own.
            use_cache (`bool`): return the KV cache of the whole sequence.
            logits_to_keep (`int` or 1-D `torch.LongTensor`, *optional*):
                Without labels: the logits of the last `logits_to_keep` positions (0: all), or of the positions
                a tensor lists. With labels the logits are those of the supervised positions, so it is refused.
            cache (`Cache`, *optional*; `past_key_values` before transformers 5.24):
                Continue the sequence it holds (generate's decoding steps): `input_ids` are the new tokens,
                `attention_mask` covers cached and new tokens, and the tokens run through InternVL as they
                are: every token, a `<|latent|>` included, gets its learned embedding, because no hidden
                state of the position before the first one is at hand. Continuous thoughts are filled only
                in a forward over the whole sequence.
            inputs_embeds (`torch.FloatTensor` of shape `(batch, new_len, hidden)`, *optional*):
                Only with a cache, instead of `input_ids`: continue the sequence with these input embeddings
                (adaptive generation feeds each continuous thought this way).
            output_attentions (`bool`, *optional*): return the language model's attention weights (eager attention
                only, as in transformers), over the whole sequence.
            output_hidden_states (`bool`, *optional*): return the language model's hidden states (embeddings with the
                thoughts filled in, then every layer), over the whole sequence.
            thought_labels (`torch.LongTensor` of shape `(batch, max_latents, step_len)`, *optional*):
                Step-level supervision (training, with `labels`): row k of sample b holds the token ids of the written
                step that sample b's k-th latent replaced (-100 padding; an all -100 row supervises nothing). Each
                thought, alone, is decoded by the language model into that step (teacher forcing) and the summed
                cross-entropy, times `config.thought_supervision_weight`, joins the loss's sum before its division.
            edit_thoughts (`callable`, *optional*):
                Causal tests: `edit_thoughts(thoughts, index)` gets each latent column's thoughts `(B, H)` and which
                latent of its row each one is `(B,)` (rows without a latent there are ignored), and returns the
                thoughts to place instead; later thoughts are computed from the edited ones.
            return_dict (`bool`, *optional*): `False` returns `MMCoconutOutput.to_tuple()` (`None` fields dropped).
        """
        cache = kwargs.pop(CACHE_KWARG, None)
        # `**kwargs` lets the Trainer pass `num_items_in_batch`; anything else would be silently ignored.
        if kwargs:
            raise TypeError(f"MMCoconutForConditionalGeneration.forward got unexpected arguments {sorted(kwargs)}")
        if cache is not None:
            if any(value is not None for value in (labels, pixel_values, thought_labels, edit_thoughts)):
                raise ValueError(
                    "forward with a cache continues a sequence with text tokens only: no labels, pixel_values, "
                    "thought_labels or edit_thoughts"
                )
            return self._forward_from_cache(
                input_ids, inputs_embeds, attention_mask, position_ids, cache, use_cache, logits_to_keep,
                bool(output_attentions), bool(output_hidden_states),
            )
        if inputs_embeds is not None or input_ids is None:
            raise ValueError(
                "forward over a whole sequence takes input_ids (they locate the images and latents); inputs_embeds "
                "only continue a cached sequence"
            )
        if thought_labels is not None and (labels is None or edit_thoughts is not None):
            raise ValueError("thought_labels supervise training: they need labels, and no edit_thoughts")
        if thought_labels is not None and not self.config.thought_supervision_weight:
            raise ValueError(
                "thought_labels were given but config.thought_supervision_weight is 0, so they would change nothing; "
                "set the weight (the recipe's thought_supervision: step) or leave them out"
            )
        if labels is not None and logits_to_keep is not None:
            raise ValueError(
                "logits_to_keep cannot be combined with labels: with labels the logits are those of the "
                "supervised positions"
            )
        self.config.validate_latent_ids()
        seq_len = input_ids.shape[1]
        if seq_len == 0:
            raise ValueError(f"forward needs at least one token; input_ids have shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = position_ids_from_attention_mask(attention_mask)

        inputs_embeds = self.embed_inputs(input_ids, pixel_values, num_tiles)
        latent_mask = self._latent_mask(input_ids, attention_mask)
        latent_index = latent_mask.cumsum(-1) - 1  # (B, T): at a latent, which thought of its row it is
        boundaries = self._pass_boundaries(latent_mask, seq_len)

        extras = {"output_attentions": bool(output_attentions), "output_hidden_states": bool(output_hidden_states)}
        hidden_chunks, past, pass_hidden_states, pass_attentions = [], [], [], []
        for start, end in zip(boundaries[:-1], boundaries[1:]):
            chunk = inputs_embeds[:, start:end]
            if hidden_chunks:
                # Continuous thought: the latent at `start` takes the last hidden state of `start - 1`.
                thought = hidden_chunks[-1][:, -1]  # (B, H)
                if edit_thoughts is not None:
                    thought = edit_thoughts(thought, latent_index[:, start])
                is_latent = latent_mask[:, start, None]  # (B, 1)
                first = torch.where(is_latent, thought.to(chunk.dtype), chunk[:, 0])
                chunk = torch.cat([first[:, None], chunk[:, 1:]], dim=1)
            hidden, *chunk_kv = self._language_model_pass(
                chunk, attention_mask[:, :end], position_ids[:, start:end], past, **extras
            )
            if output_attentions or output_hidden_states:
                *chunk_kv, chunk_hidden_states, chunk_attentions = chunk_kv
                pass_hidden_states.append(chunk_hidden_states)
                pass_attentions.append(chunk_attentions)
            hidden_chunks.append(hidden)
            past.append(chunk_kv)
        last_hidden_state = torch.cat(hidden_chunks, dim=1)  # (B, T, H)
        hidden_states = _join_hidden_states(pass_hidden_states) if output_hidden_states else None
        attentions = _join_attentions(pass_attentions, seq_len, attention_mask) if output_attentions else None

        loss = None
        lm_head = self.internvl.lm_head
        if labels is not None:
            shift_labels = labels[:, 1:]
            supervised = shift_labels != -100  # (B, T-1)
            logits = lm_head(last_hidden_state[:, :-1][supervised])  # (N, V)
            loss = F.cross_entropy(logits.float(), shift_labels[supervised], reduction="sum")
            if thought_labels is not None:
                # A sum over the decoded steps' tokens, divided below by the answer tokens' count like the rest, so
                # gradient accumulation and DDP weigh it exactly as one big batch would.
                step_loss = self._step_decoding_loss(last_hidden_state, latent_mask, latent_index, thought_labels)
                loss = loss + self.config.thought_supervision_weight * step_loss
            if num_items_in_batch is None:
                loss = loss / supervised.sum().clamp_min(1)
            else:
                loss = loss / num_items_in_batch
        else:
            logits = lm_head(last_hidden_state[:, _kept_positions(logits_to_keep, seq_len)])

        cache = self._assemble_cache(past) if use_cache else None
        return MMCoconutOutput(
            loss=loss,
            logits=logits,
            cache=cache,
            last_hidden_state=last_hidden_state,
            num_passes=len(boundaries) - 1,
            hidden_states=hidden_states,
            attentions=attentions,
        )

    def _step_decoding_loss(self, last_hidden_state, latent_mask, latent_index, thought_labels):
        """Summed cross-entropy of every supervised thought decoding its written step, teacher-forced.

        The decoder is the language model itself, reading `[thought, step tokens]` with no other context: the thought
        alone must hold the step. It adds no weights, so the checkpoint and inference are unchanged.
        """
        rows, columns = latent_mask.nonzero(as_tuple=True)  # row-major: each row's latents in order
        counts = latent_mask.sum(-1)  # (B,)
        beyond = torch.arange(thought_labels.shape[1], device=counts.device)[None] >= counts[:, None]  # (B, L)
        if thought_labels.shape[1] < int(counts.max()) or bool((thought_labels != -100)[beyond].any()):
            raise ValueError(
                f"thought_labels have rows for {thought_labels.shape[1]} latents per sample, but the samples hold "
                f"{counts.tolist()} continuous thoughts; each supervised row needs its latent"
            )
        targets = thought_labels[rows, latent_index[rows, columns]]  # (M, S)
        keep = (targets != -100).any(-1)
        thoughts = last_hidden_state[rows, columns - 1][keep]  # (M', H): the vector placed at each latent
        targets = targets[keep]
        decodes_here = targets.shape[0] > 0
        if not _agree_across_ranks(int(decodes_here), thoughts.device):
            return last_hidden_state.new_zeros((), dtype=torch.float32)
        if not decodes_here:  # another rank decodes: sharded models need every rank to run the pass (loss times 0)
            thoughts, targets = last_hidden_state[:1, 0], thought_labels.new_zeros(1, 1)
        step_embeds = self.get_input_embeddings()(targets[:, :-1].clamp_min(0))  # (M', S-1, H); pads never attended
        inputs_embeds = torch.cat([thoughts[:, None].to(step_embeds.dtype), step_embeds], dim=1)  # (M', S, H)
        hidden = self.internvl.model.language_model(inputs_embeds=inputs_embeds, use_cache=False).last_hidden_state
        supervised = targets != -100
        logits = self.internvl.lm_head(hidden[supervised])  # (N, V)
        loss = F.cross_entropy(logits.float(), targets[supervised], reduction="sum")
        return loss if decodes_here else loss * 0

    def _forward_from_cache(self, input_ids, inputs_embeds, attention_mask, position_ids, cache, use_cache,
                            logits_to_keep, output_attentions=False, output_hidden_states=False):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("forward with a cache continues the sequence with input_ids or inputs_embeds: give one")
        past_len = int(cache.get_seq_length())
        # Input that repeats tokens the cache already holds (assisted decoding's first step sends the whole prompt
        # plus the candidates, whatever the cache holds): only the tokens after the cached ones run. The sequence's
        # length is the 2-D attention mask's, or (no padding, no mask) the last position + 1.
        if input_ids is not None:
            if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
                total_len = attention_mask.shape[1]
            elif attention_mask is None and position_ids is not None and position_ids.ndim == 2:
                total_len = int(position_ids[:, -1].max()) + 1
            else:
                total_len = None
            repeated = 0 if total_len is None else past_len + input_ids.shape[1] - total_len
            if repeated > 0:
                input_ids = input_ids[:, repeated:]
                if position_ids is not None and position_ids.shape[-1] > input_ids.shape[1]:
                    position_ids = position_ids[..., -input_ids.shape[1] :]
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)  # (B, new_len, H)
        new_len = inputs_embeds.shape[1]
        # What generate's prefill left for its first step: the embedding of the prompt's last token when that is an
        # image token (its image feature), and the prompt's hidden states / attentions when they were asked for.
        prefill = getattr(cache, "_mmcoconut_prefill", None)
        if prefill is not None and past_len == prefill["length"]:
            del cache._mmcoconut_prefill
            if prefill.get("embeds") is not None:
                first = prefill["embeds"].to(device=inputs_embeds.device, dtype=inputs_embeds.dtype)
                inputs_embeds = torch.cat([first, inputs_embeds[:, 1:]], dim=1)
        else:
            prefill = None
        if position_ids is None and attention_mask is not None:  # per-sample positions, as in the full forward
            position_ids = position_ids_from_attention_mask(attention_mask)[:, -new_len:]
        extras = {}
        if output_attentions:
            extras["output_attentions"] = True
        if output_hidden_states:
            extras["output_hidden_states"] = True
        # InternVL's own forward for text, unrolled: the last hidden states are the next continuous thoughts.
        outputs = self.internvl.model.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **{CACHE_KWARG: cache},
            **extras,
        )
        hidden = outputs.last_hidden_state  # (B, new_len, H)
        logits = self.internvl.lm_head(hidden[:, _kept_positions(logits_to_keep, new_len)])
        hidden_states = outputs.hidden_states if output_hidden_states else None
        attentions = outputs.attentions if output_attentions else None
        if prefill is not None and hidden_states is not None and prefill.get("hidden_states") is not None:
            prompt_rows = tuple(layer[:, :past_len] for layer in prefill["hidden_states"])
            hidden_states = _join_hidden_states([prompt_rows, hidden_states])
        if prefill is not None and attentions and prefill.get("attentions"):
            prompt_rows = tuple(layer[:, :, :past_len] for layer in prefill["attentions"])
            attentions = _join_attentions([prompt_rows, attentions], past_len + new_len)
        return MMCoconutOutput(
            logits=logits,
            cache=cache if use_cache else None,
            last_hidden_state=hidden,
            num_passes=1,
            hidden_states=hidden_states,
            attentions=attentions,
        )

    def embed_inputs(self, input_ids, pixel_values=None, num_tiles=None):
        """Token embeddings with the projected image features at the image-token positions (before any thought is
        filled): what the forward and generate start from, and what analysis rebuilds the filled sequence from."""
        internvl = self.internvl
        inputs_embeds = internvl.get_input_embeddings()(input_ids)  # (B, T, H)
        image_mask = input_ids == internvl.config.image_token_id
        num_image_tokens = int(image_mask.sum())
        if pixel_values is None:
            if num_image_tokens:
                raise ValueError(
                    f"input_ids hold {num_image_tokens} image tokens but no pixel_values were given"
                )
            if _agree_across_ranks(0, input_ids.device):
                # Another rank runs the vision tower; sharded (FSDP, ZeRO-3) and DDP training need every
                # rank to run it too. One blank tile, its features added with weight zero.
                size = internvl.config.vision_config.image_size
                blank = inputs_embeds.new_zeros(1, internvl.config.vision_config.num_channels, size[0], size[1])
                features = internvl.model.get_image_features(pixel_values=blank).pooler_output
                inputs_embeds = inputs_embeds + features.sum().to(inputs_embeds.dtype) * 0
            return inputs_embeds
        _agree_across_ranks(1, input_ids.device)  # matches the collective of image-less ranks above

        per_tile = internvl.config.image_seq_length
        num_total_tiles = pixel_values.shape[0]
        if num_image_tokens != num_total_tiles * per_tile:
            raise ValueError(
                f"Image tokens and tiles do not match: input_ids hold {num_image_tokens} image tokens, "
                f"but pixel_values hold {num_total_tiles} tiles x {per_tile} tokens per tile = "
                f"{num_total_tiles * per_tile}"
            )
        if num_tiles is not None:
            per_sample = image_mask.sum(-1)
            expected = num_tiles.to(per_sample.device) * per_tile
            wrong = (per_sample != expected).nonzero().flatten().tolist()
            if wrong:
                b = wrong[0]
                raise ValueError(
                    f"Sample {b} of the batch holds {int(per_sample[b])} image tokens, but its "
                    f"{int(num_tiles[b])} tiles x {per_tile} tokens per tile = {int(expected[b])}"
                )
        features = internvl.model.get_image_features(pixel_values=pixel_values).pooler_output  # (tiles, per_tile, H)
        if features.shape[1] != per_tile:
            raise ValueError(
                f"The vision tower gives {features.shape[1]} tokens per tile but the config says "
                f"image_seq_length={per_tile}"
            )
        features = features.reshape(-1, features.shape[-1]).to(inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(image_mask[..., None], features)

    def _latent_mask(self, input_ids, attention_mask):
        if self.config.pause_as_thought:
            # Pause tokens: ordinary learned embeddings, one pass, no thoughts.
            return torch.zeros_like(input_ids, dtype=torch.bool)
        latent_mask = input_ids == self.config.latent_token_id
        # A thought is the hidden state of the token before it, so that token must be real context.
        after_padding = latent_mask[:, 1:] & (attention_mask[:, :-1] == 0)
        no_context = latent_mask[:, 0] | after_padding.any(-1)
        if bool(no_context.any()):
            b = int(no_context.nonzero()[0])
            raise ValueError(
                f"Sample {b} of the batch has a <|latent|> token before any context token "
                "(at position 0 or right after padding); a continuous thought needs a preceding token"
            )
        return latent_mask

    def _pass_boundaries(self, latent_mask, seq_len):
        """`[0, c_1, ..., c_k, seq_len]` for the columns c_i that hold a latent in any sample.

        Every latent column starts a pass, so its thought (the last hidden state of the previous
        pass) is known before the pass runs; the layout of latents across the batch can be anything.
        Under multi-process training the pass count is agreed across ranks (sharded models need every
        rank to run the same number of forward calls) by splitting segments, which leaves results unchanged.
        """
        columns = latent_mask.any(0).nonzero().flatten().tolist()
        boundaries = [0, *columns, seq_len]
        target = _agree_across_ranks(len(boundaries) - 1, latent_mask.device)
        while len(boundaries) - 1 < target:
            widths = [end - start for start, end in zip(boundaries[:-1], boundaries[1:])]
            widest = max(range(len(widths)), key=widths.__getitem__)
            if widths[widest] < 2:
                raise ValueError(
                    f"Cannot run {target} passes (the maximum over ranks) over a sequence of {seq_len} tokens"
                )
            boundaries.insert(widest + 1, boundaries[widest] + widths[widest] // 2)
        return boundaries

    def _language_model_pass(self, chunk, attention_mask, position_ids, past, output_attentions=False,
                             output_hidden_states=False):
        """One language-model pass over `chunk` after the cached `past` passes.

        `past` is a list (one per earlier pass) of per-layer key and value tensors. The cache is
        rebuilt from them inside the pass, so the pass is a pure function of its inputs and can be
        recomputed under activation checkpointing; only this pass's keys and values are returned.
        """
        flat_past = [tensor for chunk_kv in past for tensor in chunk_kv]
        if output_attentions or output_hidden_states:
            # Also returns the pass's hidden states and attentions (inspection, not training: not checkpointed).
            return self._pure_pass(
                chunk, attention_mask, position_ids, len(past), *flat_past,
                output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            )
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(
                self._pure_pass, chunk, attention_mask, position_ids, len(past), *flat_past
            )
        return self._pure_pass(chunk, attention_mask, position_ids, len(past), *flat_past)

    def _pure_pass(self, chunk, attention_mask, position_ids, num_past, *flat_past, output_attentions=False,
                   output_hidden_states=False):
        num_layers = self.internvl.config.text_config.num_hidden_layers
        per_pass = [flat_past[i * 2 * num_layers : (i + 1) * 2 * num_layers] for i in range(num_past)]
        cache = self._assemble_cache(per_pass)
        past_len = cache.get_seq_length()
        outputs = self.internvl.model.language_model(
            inputs_embeds=chunk,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{CACHE_KWARG: cache},
            **({"output_attentions": True} if output_attentions else {}),
            **({"output_hidden_states": True} if output_hidden_states else {}),
        )
        # Copies, not views: a view would keep the whole concatenated past alive for every pass.
        new_keys = [layer.keys[:, :, past_len:].clone() for layer in cache.layers]
        new_values = [layer.values[:, :, past_len:].clone() for layer in cache.layers]
        if output_attentions or output_hidden_states:
            return (outputs.last_hidden_state, *new_keys, *new_values, outputs.hidden_states, outputs.attentions)
        return (outputs.last_hidden_state, *new_keys, *new_values)

    def _assemble_cache(self, past):
        """A `DynamicCache` holding the per-layer keys and values of the passes in `past`, in order."""
        num_layers = self.internvl.config.text_config.num_hidden_layers
        cache = DynamicCache(config=self.internvl.config.text_config)
        if not past:
            return cache
        for layer in range(num_layers):
            keys = torch.cat([kv[layer] for kv in past], dim=-2)
            values = torch.cat([kv[num_layers + layer] for kv in past], dim=-2)
            cache.update(keys, values, layer)
        return cache

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(
        self,
        inputs=None,
        generation_config=None,
        logits_processor=None,
        stopping_criteria=None,
        prefix_allowed_tokens_fn=None,
        synced_gpus=None,
        assistant_model=None,
        streamer=None,
        negative_prompt_ids=None,
        negative_prompt_attention_mask=None,
        custom_generate=None,
        *,
        input_ids=None,
        attention_mask=None,
        pixel_values=None,
        num_tiles=None,
        thinking=None,
        max_thoughts=None,
        end_latent_threshold=None,
        edit_thoughts=None,
        **kwargs,
    ):
        """Batched generation with continuous thoughts; returns prompt + new tokens (HF convention).

        Prompts are left-padded. The latent forward prefills them (image features merged, latents filled with
        thoughts, one KV cache); transformers' own `GenerationMixin.generate` then decodes from that cache on this
        model, so every option means what it means there: `kwargs` (generation options, a `generation_config=`,
        `logits_processor`, `stopping_criteria`, `streamer`, `synced_gpus`, ...) override this model's
        `generation_config`, unset options come from it (the wrapped InternVL's is never read), and beam search and
        `num_return_sequences` expand the prefilled cache (see `_expand_inputs_for_generation`). A `<|latent|>` the
        model generates is fed its learned embedding, not a continuous thought (see `forward`'s `cache`), as in the
        original Coconut.

        The positional parameters are transformers' own, in its order (`inputs`, `generation_config`,
        `logits_processor`, ...); the prompt may also be given as `input_ids=`, and `attention_mask`, `pixel_values`
        and `num_tiles` are keyword-only. Which transformers options are supported, and which are refused before any
        work (with a `ValueError` that names them), is listed in docs/generation.md.

        Args:
            thinking (`str`, *optional*): how many continuous thoughts precede the answer.
                `"fixed"`: the prompt's `<|latent|>` tokens, its latent span closed by `<|end-latent|>`.
                `"adaptive"`: every prompt ends with `<|start-latent|>`; each row feeds its last hidden state back
                as its next input, one thought per step over the shared KV cache, until the model predicts
                `<|end-latent|>` from it or `max_thoughts` are reached; `<|end-latent|>` is then the row's next
                token and decoding goes on. Rows that stop early wait in masked-out columns (attention mask 0,
                `pad_token_id` in the returned sequences), so a row's answer is exactly the one it would get alone.
                `max_new_tokens` counts the tokens after `<|end-latent|>`.
                Default: `config.default_thinking` (adaptive for weights trained with `supervise_end_latent`).
            max_thoughts (`int`, *optional*): adaptive only; the most thoughts a row may think (default:
                `config.num_inference_latents`, the most the checkpoint was trained with).
            end_latent_threshold (`float`, *optional*): adaptive only; `None` stops a row where the argmax over the
                vocabulary is `<|end-latent|>`, a float where its probability is at least this. The stop decision
                reads the raw logits: sampling options and logits processors shape the decoded tokens only.
            edit_thoughts (`callable`, *optional*): fixed only; replaces thoughts as the prefill makes them (causal
                tests), as `forward`'s `edit_thoughts`.

        Returns:
            Like `GenerationMixin.generate`: the sequences (prompt + new tokens), or with
            `return_dict_in_generate=True` a `MMCoconutGenerateOutput` (`MMCoconutGenerateBeamOutput` for beam
            search) that adds `num_thoughts`, the thoughts each returned sequence followed, `(num_sequences,)`.
            In adaptive mode the new tokens of a row are `<|latent|>` × its thoughts, `pad_token_id` up to the
            batch's longest thinking, `<|end-latent|>`, then the decoded answer; so from plain sequences a row's
            thoughts are its `<|latent|>` tokens before the first `<|end-latent|>` after the prompt.
        """
        if {"cache", "past_key_values", "inputs_embeds"} & kwargs.keys():
            raise ValueError(
                "generate() builds its KV cache from the latent prefill, which embeds the prompt; it takes no cache "
                "or inputs_embeds argument"
            )
        if generation_config is not None and not isinstance(generation_config, GenerationConfig):
            raise TypeError(
                "generate()'s second positional parameter is generation_config, as in transformers, got a "
                f"{type(generation_config).__name__}; pass attention_mask (and pixel_values) by keyword"
            )
        if inputs is not None and input_ids is not None:
            raise ValueError("generate() got the prompt twice: pass it as `inputs` (first positional) or `input_ids`")
        input_ids = inputs if inputs is not None else input_ids
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
            raise ValueError("generate() needs the prompts as input_ids, a 2-D tensor of token ids")
        # The effective options, resolved as transformers resolves them (the call over our generation config).
        resolved, _ = self._prepare_generation_config(generation_config, **kwargs)
        self._refuse_unsupported_options(resolved, assistant_model, custom_generate, thinking, kwargs)
        thinking = self.config.default_thinking if thinking is None else thinking
        if thinking not in THINKING_MODES:
            raise ValueError(f"thinking must be one of {THINKING_MODES}, got {thinking!r}")
        if thinking == "fixed" and (max_thoughts is not None or end_latent_threshold is not None):
            raise ValueError("max_thoughts and end_latent_threshold apply to thinking='adaptive' only")
        if thinking == "adaptive" and edit_thoughts is not None:
            raise ValueError("edit_thoughts applies to thinking='fixed' only (the prompt's latents)")
        if thinking == "adaptive" and (resolved.output_attentions or resolved.output_hidden_states):
            raise ValueError(
                "output_attentions / output_hidden_states are supported with thinking='fixed' only; with adaptive "
                "thinking, run the model's forward (output_hidden_states=True) over the returned sequences"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("generate() needs left-padded prompts: some prompt ends with padding")
        if synced_gpus is None:
            # Every rank runs every decoding step until all have finished: sharded models (FSDP, ZeRO-3) need it,
            # and it keeps ranks in step with the prefill's agreed pass count. The caller's value wins.
            synced_gpus = _world_size() > 1
        if thinking == "adaptive":
            pad_token_id = resolved.pad_token_id
            if pad_token_id is None:
                raise ValueError(
                    "thinking='adaptive' writes pad_token_id into the thinking columns of rows that stop early; set "
                    "pad_token_id (in the call or in model.generation_config)"
                )
            input_ids, attention_mask, cache, num_thoughts = self._think(
                input_ids, attention_mask, pixel_values, num_tiles, max_thoughts, end_latent_threshold,
                pad_token_id, synced_gpus,
            )
        else:
            cache = self._prefill_fixed(
                input_ids, attention_mask, pixel_values, num_tiles,
                bool(resolved.output_attentions), bool(resolved.output_hidden_states), edit_thoughts,
            )
            if self.config.pause_as_thought:
                num_thoughts = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
            else:
                num_thoughts = ((input_ids == self.config.latent_token_id) & attention_mask.bool()).sum(-1)
        # Our prefill made the cache, so transformers must decode from it: it must not build one of its own
        # (`cache_implementation`) nor resend the whole sequence each step (`use_cache=False`); see
        # `_prepare_generation_config`. The cache type asked for is made in `_expand_inputs_for_generation`.
        cache._mmcoconut_generate = True
        if resolved.cache_implementation == "static":
            if resolved.max_new_tokens is not None:
                max_cache_len = input_ids.shape[1] + resolved.max_new_tokens
            else:
                max_cache_len = max(resolved.max_length, input_ids.shape[1] + 1)
            cache._mmcoconut_static_len = max(max_cache_len, resolved.max_cache_len or 0)
        outputs = super().generate(
            input_ids,
            generation_config,
            logits_processor,
            stopping_criteria,
            prefix_allowed_tokens_fn,
            synced_gpus,
            assistant_model,
            streamer,
            negative_prompt_ids,
            negative_prompt_attention_mask,
            attention_mask=attention_mask,
            **{CACHE_KWARG: cache},
            **kwargs,
        )
        if not isinstance(outputs, ModelOutput):
            return outputs
        if resolved.use_cache is False:  # as transformers returns it: no cache was asked for
            outputs[CACHE_KWARG] = None
        beams = isinstance(outputs, GenerateBeamDecoderOnlyOutput)
        output_class = MMCoconutGenerateBeamOutput if beams else MMCoconutGenerateOutput
        per_prompt = outputs.sequences.shape[0] // input_ids.shape[0]  # num_return_sequences, prompt-major
        return output_class(**outputs, num_thoughts=num_thoughts.repeat_interleave(per_prompt))

    def _refuse_unsupported_options(self, resolved, assistant_model, custom_generate, thinking, kwargs):
        """Refuse, before any work, the transformers options whose result would differ from the definition."""
        if custom_generate is not None:
            raise ValueError(
                "custom_generate replaces transformers' decoding loop, which this model's prefill (thoughts, images) "
                "feeds; it is not supported"
            )
        mode = resolved.get_generation_mode(assistant_model)
        hub_modes = {"contrastive_search", "dola_generation", "constrained_beam_search", "group_beam_search"}
        if str(getattr(mode, "value", mode)) in hub_modes:
            raise ValueError(
                f"The decoding strategy {getattr(mode, 'value', mode)!r} (penalty_alpha, dola_layers, constraints / "
                "force_words_ids or num_beam_groups) runs from a Hub repository's custom_generate code with its own "
                "prefill; it is not supported. Use greedy, sampling or beam search."
            )
        if resolved.assistant_early_exit is not None or getattr(resolved, "use_mtp", None):
            option = "assistant_early_exit" if resolved.assistant_early_exit is not None else "use_mtp"
            raise ValueError(
                f"{option} drafts with this model's own layers outside its forward, which would skip the continuous "
                "thoughts; it is not supported. Use prompt_lookup_num_tokens or an assistant_model instead"
            )
        implementation = resolved.cache_implementation
        if implementation not in (None, "dynamic", "static"):
            raise ValueError(
                f"cache_implementation={implementation!r} is not supported: generate() builds its KV cache in the "
                "latent prefill; use None/'dynamic' (the default) or 'static'"
            )
        if resolved.prefill_chunk_size is not None:
            raise ValueError(
                "prefill_chunk_size is not supported: the latent prefill runs the prompt in its own passes (one per "
                "latent column); leave it unset"
            )

    def _prepare_generation_config(self, generation_config, **kwargs):
        generation_config, model_kwargs = super()._prepare_generation_config(generation_config, **kwargs)
        if getattr(model_kwargs.get(CACHE_KWARG), "_mmcoconut_generate", False):
            # Called by transformers' generate on our prefilled cache: decode from it. `use_cache=False` would make
            # transformers resend the whole sequence on top of the cache, and a `cache_implementation` would make it
            # refuse the cache; generate() honours both itself (no cache returned; a static cache made from ours).
            generation_config.use_cache = True
            generation_config.cache_implementation = None
        return generation_config, model_kwargs

    def _prefill_fixed(self, input_ids, attention_mask, pixel_values, num_tiles, output_attentions=False,
                       output_hidden_states=False, edit_thoughts=None):
        """The KV cache of all but the last prompt token, its latents filled with thoughts.

        transformers' decoding loop runs the last token. When that is an image token, the prompt runs whole (its
        images all in place) and the cache is cropped; its image feature is left on the cache for that first step,
        as are the prompt's hidden states and attentions when asked for (see `_forward_from_cache`).
        """
        if bool((input_ids[:, -1] == self.config.latent_token_id).any()):
            raise ValueError(
                "A prompt ends with <|latent|>; close the latent span with <|end-latent|> before generating"
            )
        width = input_ids.shape[1]
        ends_with_image = bool((input_ids[:, -1] == self.internvl.config.image_token_id).any())
        whole = ends_with_image or output_attentions or output_hidden_states
        if width == 1 and not whole:
            if pixel_values is not None:
                raise ValueError("A one-token prompt has no image tokens, but pixel_values were given")
            # A one-token prompt leaves nothing to prefill: transformers runs that token into an empty cache.
            return self._assemble_cache([])
        run = width if whole else width - 1
        position_ids = position_ids_from_attention_mask(attention_mask)
        out = self(
            input_ids=input_ids[:, :run],
            attention_mask=attention_mask[:, :run],
            position_ids=position_ids[:, :run],
            pixel_values=pixel_values,
            num_tiles=num_tiles,
            use_cache=True,
            logits_to_keep=1,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states or ends_with_image,
            edit_thoughts=edit_thoughts,
            return_dict=True,
        )
        cache = out.cache
        if not whole:
            return cache
        cache.crop(-1)  # the last token: transformers' first step runs it (a negative count removes tokens)
        # Left for that first step: the prompt's hidden states and attentions from one forward over the whole prompt
        # (exactly InternVL's first-step outputs), and the last token's input embedding (its image feature).
        cache._mmcoconut_prefill = {
            "length": width - 1,
            "embeds": out.hidden_states[0][:, -1:] if ends_with_image else None,
            "hidden_states": out.hidden_states if output_hidden_states else None,
            "attentions": out.attentions if output_attentions else None,
        }
        return cache

    def _think(self, input_ids, attention_mask, pixel_values, num_tiles, max_thoughts, threshold, pad_token_id,
               synced_gpus):
        """Adaptive thinking: prefill the prompts, then one continuous thought per step for the rows that go on.

        Returns (the prompts + one column per step + `<|end-latent|>`, their attention mask, the KV cache of all
        but that last token, thoughts per row). A row's thinking columns hold `<|latent|>` while it thinks and
        `pad_token_id` (attention mask 0) after it stopped, so every row advances one column per step; its later
        tokens never see the masked columns, and positions count the attended tokens only.
        """
        config = self.config
        if config.pause_as_thought:
            raise ValueError(
                "thinking='adaptive' feeds hidden states back as thoughts; a pause_as_thought model has none"
            )
        if max_thoughts is None:
            max_thoughts = config.num_inference_latents
        if isinstance(max_thoughts, bool) or not isinstance(max_thoughts, numbers.Integral) or max_thoughts < 0:
            raise ValueError(f"max_thoughts must be an int >= 0, got {max_thoughts!r}")
        if threshold is not None and not 0.0 < threshold <= 1.0:
            raise ValueError(f"end_latent_threshold must be in (0, 1] or None (argmax), got {threshold!r}")
        open_span = input_ids[:, -1] == config.start_latent_id
        if not bool(open_span.all()):
            row = int((~open_span).nonzero()[0])
            raise ValueError(
                f"thinking='adaptive' needs every prompt to end with <|start-latent|> (the model decides how long to "
                f"think); prompt {row} ends with token {int(input_ids[row, -1])}. Prompts with a closed latent span "
                "need thinking='fixed'."
            )
        batch_size, device = input_ids.shape[0], input_ids.device
        position_ids = position_ids_from_attention_mask(attention_mask)
        prefill = self(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            pixel_values=pixel_values,
            num_tiles=num_tiles,
            use_cache=True,
            logits_to_keep=1,
            return_dict=True,
        )
        cache, logits = prefill.cache, prefill.logits[:, -1]  # (B, V)
        thought = prefill.last_hidden_state[:, -1]  # (B, H), from <|start-latent|>
        pad_embedding = self.get_input_embeddings()(torch.tensor([pad_token_id], device=device))  # (1, H)
        thinking = torch.ones(batch_size, dtype=torch.bool, device=device)
        num_thoughts = torch.zeros(batch_size, dtype=torch.long, device=device)
        columns = []
        for _ in range(max_thoughts):
            thinking &= ~self._predicts_end_latent(logits, threshold)
            any_thinking = int(thinking.any())
            # Sharded models need every rank to run the same steps: a rank whose rows all stopped runs masked ones.
            if not (_agree_across_ranks(any_thinking, device) if synced_gpus else any_thinking):
                break
            attention_mask = torch.cat([attention_mask, thinking[:, None].to(attention_mask.dtype)], dim=1)
            embeds = torch.where(thinking[:, None], thought.to(pad_embedding.dtype), pad_embedding)  # (B, H)
            step = self(
                inputs_embeds=embeds[:, None],
                attention_mask=attention_mask,
                use_cache=True,
                return_dict=True,
                **{CACHE_KWARG: cache},
            )
            logits, thought = step.logits[:, -1], step.last_hidden_state[:, -1]
            num_thoughts += thinking
            columns.append(torch.where(thinking, config.latent_token_id, pad_token_id))
        end = torch.full((batch_size, 1), config.end_latent_id, dtype=input_ids.dtype, device=device)
        input_ids = torch.cat([input_ids, *(column[:, None].to(input_ids.dtype) for column in columns), end], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(end, dtype=attention_mask.dtype)], dim=1)
        return input_ids, attention_mask, cache, num_thoughts

    def _predicts_end_latent(self, logits, threshold):
        """(B,) whether each row predicts `<|end-latent|>` next (argmax, or its probability >= threshold)."""
        end_latent_id = self.config.end_latent_id
        if threshold is None:
            return logits.argmax(-1) == end_latent_id
        return logits.float().softmax(-1)[:, end_latent_id] >= threshold

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        # transformers repeats each prompt `expand_size` times (beams, num_return_sequences) before its prefill;
        # our prefill already ran, so its cache is repeated the same way (sample-major).
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size, is_encoder_decoder, input_ids, **model_kwargs
        )
        cache = model_kwargs.get(CACHE_KWARG)
        if cache is None:
            return input_ids, model_kwargs
        prefill = getattr(cache, "_mmcoconut_prefill", None)
        if expand_size > 1:
            cache.batch_repeat_interleave(expand_size)
            if prefill is not None:
                for key in ("embeds", "hidden_states", "attentions"):
                    value = prefill[key]
                    if isinstance(value, torch.Tensor):
                        prefill[key] = value.repeat_interleave(expand_size, dim=0)
                    elif value:
                        prefill[key] = tuple(part.repeat_interleave(expand_size, dim=0) for part in value)
        static_len = getattr(cache, "_mmcoconut_static_len", None)
        if static_len is not None:  # cache_implementation="static": the same keys and values in a StaticCache
            static = StaticCache(config=self.internvl.config.text_config, max_cache_len=static_len)
            if cache.get_seq_length() > 0:
                for layer_idx, layer in enumerate(cache.layers):
                    static.update(layer.keys, layer.values, layer_idx)
            if prefill is not None:
                static._mmcoconut_prefill = prefill
            model_kwargs[CACHE_KWARG] = static
        return input_ids, model_kwargs


def position_ids_from_attention_mask(attention_mask):
    """`(B, T)` positions that count only attended tokens: padding never shifts a sample's positions (padded
    columns get 0). The one definition the project uses (collator-free inputs, generation, analysis, benchmarks)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def _join_hidden_states(parts):
    """Per-layer hidden states of consecutive chunks of a sequence, joined along the sequence."""
    parts = [part for part in parts if part]
    if not parts:
        return None
    return tuple(torch.cat(layer, dim=1) for layer in zip(*parts))


def _join_attentions(parts, seq_len, attention_mask=None):
    """Per-layer attention weights `(B, heads, queries, keys)` of consecutive query chunks, joined along the queries;
    each chunk's keys are padded with zeros (the weight the causal softmax gives later positions) to `seq_len`.

    With the 2-D `attention_mask`, the rows of padding queries get what one pass over the whole sequence gives them:
    every key is masked, so the softmax spreads evenly over all `seq_len` keys (a chunk's pass spreads it over its own).
    """
    parts = [part for part in parts if part]
    if not parts or any(weights is None for part in parts for weights in part):
        return None
    joined = tuple(
        torch.cat([F.pad(weights, (0, seq_len - weights.shape[-1])) for weights in layer], dim=2)
        for layer in zip(*parts)
    )
    if len(parts) > 1 and isinstance(attention_mask, torch.Tensor) and attention_mask.shape[-1] == seq_len:
        padding = ~attention_mask.bool()[:, None, :, None]  # (B, 1, queries, 1)
        joined = tuple(torch.where(padding, torch.full_like(w, 1.0 / seq_len), w) for w in joined)
    return joined


def _kept_positions(logits_to_keep, seq_len):
    """transformers' `logits_to_keep`: the last n positions (0 or None: all), or a tensor of positions."""
    if isinstance(logits_to_keep, torch.Tensor):
        return logits_to_keep
    return slice(-(logits_to_keep or seq_len), None)


def _gathered_for_zero3(params):
    """Under DeepSpeed ZeRO-3 the parameters are partitioned: gather them to write into them."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return contextlib.nullcontext()
    try:  # in a `try` so that the remote-code import check does not require deepspeed
        import deepspeed
    except ImportError as error:
        raise ImportError("DeepSpeed ZeRO-3 is enabled but deepspeed cannot be imported") from error
    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def _world_size():
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    return torch.distributed.get_world_size()


def _agree_across_ranks(value, device):
    """The maximum of `value` over all ranks (itself outside distributed runs)."""
    if _world_size() == 1:
        return value
    backend = torch.distributed.get_backend()
    tensor_device = device if backend != "gloo" else torch.device("cpu")
    count = torch.tensor([value], device=tensor_device)
    torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
    return int(count.item())


def _load_internvl(name_or_path, dtype=None, **load_kwargs):
    """A native InternVL from an `-hf` checkpoint path or Hub id.

    OpenGVLab's original format (`model_type: internvl_chat`) needs the mmcoconut package's converter, which this
    file (remote code: it imports nothing but the configuration) cannot call: that is the loader's job.
    """
    config_dict, _ = PretrainedConfig.get_config_dict(name_or_path, **{
        key: load_kwargs[key] for key in ("revision", "token", "cache_dir", "local_files_only") if key in load_kwargs
    })
    if config_dict.get("model_type") == "internvl_chat":
        raise ValueError(
            f"{name_or_path} is in OpenGVLab's original internvl_chat format; load it with "
            "`mmcoconut.inference.loading.load_base_internvl(path)` (which converts it) and pass the model to "
            "from_internvl, or convert it once with `mmcoconut-convert SOURCE DESTINATION`"
        )
    return InternVLForConditionalGeneration.from_pretrained(
        name_or_path, dtype=dtype, **{"use_kernels": False, **load_kwargs}
    )


AutoModel.register(MMCoconutConfig, MMCoconutForConditionalGeneration)
AutoModelForImageTextToText.register(MMCoconutConfig, MMCoconutForConditionalGeneration)
# save_pretrained then writes `auto_map` and copies this file and the configuration file beside the
# weights, so `AutoModel.from_pretrained(path, trust_remote_code=True)` works without mmcoconut installed.
MMCoconutConfig.register_for_auto_class()
MMCoconutForConditionalGeneration.register_for_auto_class("AutoModel")

__all__ = [
    "CACHE_KWARG",
    "position_ids_from_attention_mask",
    "THINKING_MODES",
    "MMCoconutForConditionalGeneration",
    "MMCoconutPreTrainedModel",
    "MMCoconutOutput",
    "MMCoconutGenerateOutput",
    "MMCoconutGenerateBeamOutput",
]
