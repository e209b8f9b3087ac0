"""Configuration for MMCoconut: an InternVL model that reasons in continuous latent space."""

from transformers import AutoConfig, InternVLConfig, PretrainedConfig

LATENT_TOKEN = "<|latent|>"
START_LATENT_TOKEN = "<|start-latent|>"
END_LATENT_TOKEN = "<|end-latent|>"
LATENT_TOKENS = (START_LATENT_TOKEN, END_LATENT_TOKEN, LATENT_TOKEN)


CUSTOM_PIPELINE = {
    "impl": "pipeline_mmcoconut.MMCoconutImageTextToTextPipeline",
    "pt": ["AutoModelForImageTextToText"],
    "type": "multimodal",
}


class MMCoconutConfig(PretrainedConfig):
    r"""
    Configuration of [`MMCoconutForConditionalGeneration`]: the wrapped InternVL configuration plus
    the ids of the three latent tokens and the curriculum settings the checkpoint was trained with.

    Args:
        internvl_config (`InternVLConfig` or `dict`):
            Configuration of the wrapped `InternVLForConditionalGeneration`.
        latent_token_id (`int`):
            Id of `<|latent|>`; each one is filled with the last hidden state of the position before it.
        start_latent_id (`int`), end_latent_id (`int`):
            Ids of `<|start-latent|>` and `<|end-latent|>` that delimit the continuous thoughts.
        c_thought (`int`, defaults to 1):
            Continuous thoughts per replaced reasoning step.
        latent_stage (`int`, defaults to 0):
            Curriculum stage the weights were trained at; `latent_stage * c_thought` latents are the
            default at evaluation.
        training_mode (`str`, defaults to `"coconut"`):
            The curriculum mode the weights were trained in (`cot`, `coconut`, `no_cot`, `no_thoughts`,
            `pause`); `no_thoughts` models are prompted with an empty latent span.
        supervise_end_latent (`bool`, defaults to False):
            The weights were trained to stop thinking (the curriculum's `supervise_end_latent`): each
            thought predicts `<|latent|>` (go on) or `<|end-latent|>` (stop). `generate` then thinks
            adaptively by default (see `default_thinking`).
        thought_supervision_weight (`float`, defaults to 0.0):
            Weight of step-level supervision of the thoughts in the training loss (the recipe's
            `thought_supervision: step`): with `thought_labels`, the forward adds this weight times the
            cross-entropy of each thought decoding the written step it replaced. 0 for checkpoints trained
            without it (and saved before it existed). Training only: inference never reads it.

    Example:

    ```python
    >>> from transformers import InternVLConfig
    >>> from configuration_mmcoconut import MMCoconutConfig
    >>> config = MMCoconutConfig(InternVLConfig(), latent_token_id=151676, start_latent_id=151674,
    ...                          end_latent_id=151675, c_thought=2)
    ```
    """

    model_type = "mmcoconut"
    sub_configs = {"internvl_config": InternVLConfig}

    def __init__(
        self,
        internvl_config=None,
        latent_token_id=None,
        start_latent_id=None,
        end_latent_id=None,
        c_thought=1,
        latent_stage=0,
        training_mode="coconut",
        supervise_end_latent=False,
        thought_supervision_weight=0.0,
        **kwargs,
    ):
        if internvl_config is None:
            internvl_config = InternVLConfig()
        elif isinstance(internvl_config, dict):
            internvl_config = InternVLConfig(**internvl_config)
        self.internvl_config = internvl_config
        self.latent_token_id = latent_token_id
        self.start_latent_id = start_latent_id
        self.end_latent_id = end_latent_id
        self.c_thought = c_thought
        self.latent_stage = latent_stage
        self.training_mode = training_mode
        # Derived from training_mode (the `pause_as_thought` property); checkpoints saved before it was derived
        # store it too, always equal to `training_mode == "pause"`.
        stored = kwargs.pop("pause_as_thought", None)
        if stored is not None and bool(stored) != (training_mode == "pause"):
            raise ValueError(
                f"config has pause_as_thought={stored} but training_mode={training_mode!r}; pause_as_thought is "
                "derived from training_mode (the 'pause' mode): drop it from config.json"
            )
        self.supervise_end_latent = supervise_end_latent
        self.thought_supervision_weight = thought_supervision_weight
        kwargs.setdefault("tie_word_embeddings", internvl_config.tie_word_embeddings)
        # `register_for_auto_class` records one auto class per model (AutoModel, see modeling_mmcoconut); the
        # image-text-to-text pipeline loads through AutoModelForImageTextToText, which needs its own entry.
        auto_map = dict(kwargs.pop("auto_map", None) or {})
        auto_map.setdefault("AutoModelForImageTextToText", "modeling_mmcoconut.MMCoconutForConditionalGeneration")
        kwargs["auto_map"] = auto_map
        # `pipeline("image-text-to-text", ..., trust_remote_code=True)` builds pipeline_mmcoconut's pipeline, which
        # refuses a plain prompt the model was never trained on (transformers' own would fail late or answer it).
        kwargs.setdefault("custom_pipelines", {"image-text-to-text": CUSTOM_PIPELINE})
        super().__init__(**kwargs)

    @property
    def pause_as_thought(self):
        """The "pause as thought" ablation (`training_mode="pause"`): `<|latent|>` tokens keep their learned
        embedding (no continuous thought) and the sequence runs in one pass."""
        return self.training_mode == "pause"

    @property
    def num_inference_latents(self):
        """Latents to prompt with: `latent_stage * c_thought`, none for the `no_thoughts` ablation."""
        if self.training_mode == "no_thoughts":
            return 0
        return int(self.latent_stage) * int(self.c_thought)

    @property
    def default_thinking(self):
        """`generate`'s `thinking` when the caller gives none: `"adaptive"` for weights trained to stop
        thinking (`supervise_end_latent`), else `"fixed"` (the prompt's latents)."""
        return "adaptive" if self.supervise_end_latent else "fixed"

    def get_text_config(self, decoder=None, encoder=None):
        """The wrapped InternVL's text config (its Qwen2 language model). transformers reads the language model's
        settings through this method (`vocab_size` in `compute_transition_scores` and `resize_token_embeddings`,
        `num_hidden_layers` and the layer types for caches, the special token ids the Trainer aligns), and
        this config holds none of them itself."""
        return self.internvl_config.get_text_config(decoder=decoder, encoder=encoder)

    @property
    def latent_ids(self):
        """`(start_latent_id, end_latent_id, latent_token_id)`."""
        return (self.start_latent_id, self.end_latent_id, self.latent_token_id)

    def validate_latent_ids(self):
        missing = [
            name
            for name in ("latent_token_id", "start_latent_id", "end_latent_id")
            if getattr(self, name) is None
        ]
        if missing:
            raise ValueError(
                f"MMCoconutConfig is missing {', '.join(missing)}; build the model with "
                "MMCoconutForConditionalGeneration.from_internvl(internvl, tokenizer), which adds the "
                "latent tokens to the tokenizer and records their ids."
            )

    def to_dict(self):
        output = super().to_dict()
        output["internvl_config"] = self.internvl_config.to_dict()
        return output


AutoConfig.register("mmcoconut", MMCoconutConfig)

__all__ = ["MMCoconutConfig", "LATENT_TOKEN", "START_LATENT_TOKEN", "END_LATENT_TOKEN", "LATENT_TOKENS"]
