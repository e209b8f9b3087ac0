"""Original-format (`internvl_chat`) InternVL checkpoints load into the native model with identical outputs.

A tiny native model is written in OpenGVLab's layout by an inverse mapping spelled out here from OpenGVLab's module
names (InternVisionModel: embeddings.{class_embedding,patch_embedding,position_embedding},
encoder.layers.N.{attn.qkv,attn.proj,attn.q_norm,attn.k_norm,ls1,ls2,norm1,norm2,mlp.fc1,mlp.fc2}; mlp1 as
Sequential(LayerNorm, Linear, GELU, Linear); language_model as a Qwen2ForCausalLM), then loaded back.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import InternVLForConditionalGeneration

from mmcoconut.cli import convert as convert_cli
from mmcoconut.conversion import (
    convert_internvl_chat_state_dict,
    internvl_chat_config_to_hf,
    is_internvl_chat_checkpoint,
    load_internvl_chat,
    load_internvl_chat_tokenizer,
)
from mmcoconut.processing import load_internvl_processor, tiny_internvl_config

VOCAB = 320
IMAGE_TOKEN_ID = 300
TOKENS_PER_TILE = 4  # tiny_internvl_config: 28-px tiles, 7-px patches, pixel shuffle 0.5


def tiny_native_model(tie=False, vit_6b=False, select_layer=-1, seed=0):
    """A random native InternVL; `vit_6b` gives InternViT-6B's block (RMSNorm, qk-norm, no qkv bias)."""
    torch.manual_seed(seed)
    config = tiny_internvl_config(
        vocab_size=VOCAB, vision_layers=2, image_token_id=IMAGE_TOKEN_ID, tie_word_embeddings=tie
    )
    config.vision_feature_layer = select_layer
    config.vision_config.attention_bias = not vit_6b
    config.vision_config.use_qk_norm = vit_6b
    config.vision_config.norm_type = "rms_norm" if vit_6b else "layer_norm"
    model = InternVLForConditionalGeneration(config).eval()
    with torch.no_grad():
        # O(1) random weights everywhere (the default init gives near-uniform attention and unit norms/scales), so
        # that a swapped or dropped weight changes the outputs well beyond rounding.
        for param in model.parameters():
            scale = param.shape[-1] ** -0.5 if param.dim() > 1 else 1.0
            param.copy_(torch.randn_like(param) * scale)
    return model


def original_config(config) -> dict:
    """An `internvl_chat` config.json as OpenGVLab writes it (transformers 4.x key names)."""
    vision, text = config.vision_config, config.text_config
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig"},
        "downsample_ratio": config.downsample_ratio,
        "dynamic_image_size": True,
        "force_image_size": vision.image_size[0],
        "max_dynamic_patch": 12,
        "min_dynamic_patch": 1,
        "ps_version": "v2",
        "select_layer": config.vision_feature_layer,
        "template": "internvl2_5",
        "use_thumbnail": True,
        "torch_dtype": "float32",
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            "hidden_size": vision.hidden_size,
            "intermediate_size": vision.intermediate_size,
            "num_attention_heads": vision.num_attention_heads,
            "num_hidden_layers": vision.num_hidden_layers,
            "image_size": vision.image_size[0],
            "patch_size": vision.patch_size[0],
            "qkv_bias": vision.attention_bias,
            "qk_normalization": vision.use_qk_norm,
            "norm_type": vision.norm_type,
            "layer_norm_eps": vision.layer_norm_eps,
            "hidden_act": "gelu",
            "drop_path_rate": 0.0,
            "initializer_factor": 0.1,
            "use_flash_attn": False,
        },
        "llm_config": {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "hidden_size": text.hidden_size,
            "intermediate_size": text.intermediate_size,
            "num_hidden_layers": text.num_hidden_layers,
            "num_attention_heads": text.num_attention_heads,
            "num_key_value_heads": text.num_key_value_heads,
            "vocab_size": text.vocab_size,
            "max_position_embeddings": text.max_position_embeddings,
            "rms_norm_eps": text.rms_norm_eps,
            "rope_theta": text.rope_parameters["rope_theta"],
            "hidden_act": "silu",
            "tie_word_embeddings": config.tie_word_embeddings,
            "use_cache": False,
            "torch_dtype": "float32",
        },
    }


def original_state_dict(model) -> dict:
    """The native weights under OpenGVLab's names (the inverse of the conversion, written independently)."""
    native = model.state_dict()
    used = set()

    def take(name):
        used.add(name)
        return native[name].clone()

    vision = model.config.vision_config
    tower = "model.vision_tower."
    sd = {
        "vision_model.embeddings.class_embedding": take(tower + "embeddings.cls_token"),
        "vision_model.embeddings.position_embedding": take(tower + "embeddings.position_embeddings"),
        "vision_model.embeddings.patch_embedding.weight": take(tower + "embeddings.patch_embeddings.projection.weight"),
        "vision_model.embeddings.patch_embedding.bias": take(tower + "embeddings.patch_embeddings.projection.bias"),
    }
    for i in range(vision.num_hidden_layers):
        new, old = f"{tower}encoder.layer.{i}.", f"vision_model.encoder.layers.{i}."
        parameters = ("weight", "bias") if vision.attention_bias else ("weight",)
        for p in parameters:
            sd[f"{old}attn.qkv.{p}"] = torch.cat([take(f"{new}attention.{x}_proj.{p}") for x in "qkv"])
        for p in ("weight", "bias"):
            sd[f"{old}attn.proj.{p}"] = take(f"{new}attention.projection_layer.{p}")
            sd[f"{old}mlp.fc1.{p}"] = take(f"{new}mlp.fc1.{p}")
            sd[f"{old}mlp.fc2.{p}"] = take(f"{new}mlp.fc2.{p}")
        norm_parameters = ("weight", "bias") if vision.norm_type == "layer_norm" else ("weight",)
        for p in norm_parameters:
            sd[f"{old}norm1.{p}"] = take(f"{new}layernorm_before.{p}")
            sd[f"{old}norm2.{p}"] = take(f"{new}layernorm_after.{p}")
        if vision.use_qk_norm:
            sd[f"{old}attn.q_norm.weight"] = take(f"{new}attention.q_norm.weight")
            sd[f"{old}attn.k_norm.weight"] = take(f"{new}attention.k_norm.weight")
        sd[f"{old}ls1"] = take(f"{new}lambda_1")
        sd[f"{old}ls2"] = take(f"{new}lambda_2")
    for index, module in ((0, "layer_norm"), (1, "linear_1"), (3, "linear_2")):
        for p in ("weight", "bias"):
            sd[f"mlp1.{index}.{p}"] = take(f"model.multi_modal_projector.{module}.{p}")
    for name in native:
        if name.startswith("model.language_model."):
            sd["language_model.model." + name.removeprefix("model.language_model.")] = take(name)
    if not model.config.tie_word_embeddings:
        sd["language_model.lm_head.weight"] = take("lm_head.weight")
    else:
        used.add("lm_head.weight")  # saved once, as the input embeddings
    assert used == set(native), f"inverse mapping missed {set(native) - used}"
    return sd


def write_original(directory, model, state_dict=None, shards=1):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(original_config(model.config), indent=2))
    state_dict = original_state_dict(model) if state_dict is None else state_dict
    if shards == 1:
        save_file(state_dict, directory / "model.safetensors")
        return directory
    names = sorted(state_dict)
    weight_map = {}
    for shard in range(shards):
        file_name = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        part = names[shard::shards]
        save_file({name: state_dict[name] for name in part}, directory / file_name)
        weight_map.update(dict.fromkeys(part, file_name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


def load(directory):
    return load_internvl_chat(directory, image_token_id=IMAGE_TOKEN_ID)


def inputs(seed=1):
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(3, 3, 28, 28, generator=generator)
    text = torch.randint(0, IMAGE_TOKEN_ID, (2, 13), generator=generator)
    image = torch.full((2, 2 * TOKENS_PER_TILE), IMAGE_TOKEN_ID)
    input_ids = torch.cat([text[:, :3], image, text[:, 3:]], dim=1)
    input_ids[1, 3 + TOKENS_PER_TILE : 3 + 2 * TOKENS_PER_TILE] = 5  # sample 1 has one tile, sample 0 two
    return input_ids, pixel_values


def assert_same_outputs(loaded, native):
    input_ids, pixel_values = inputs()
    with torch.no_grad():
        features = loaded.get_image_features(pixel_values).pooler_output
        expected_features = native.get_image_features(pixel_values).pooler_output
        logits = loaded(input_ids=input_ids, pixel_values=pixel_values).logits
        expected_logits = native(input_ids=input_ids, pixel_values=pixel_values).logits
    assert features.shape == (3, TOKENS_PER_TILE, native.config.text_config.hidden_size)
    assert torch.equal(features, expected_features)
    assert torch.equal(logits, expected_logits)


@pytest.mark.parametrize("vit_6b", [False, True], ids=["internvit-300m", "internvit-6b"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_loaded_model_equals_native(tmp_path, tie, vit_6b):
    native = tiny_native_model(tie=tie, vit_6b=vit_6b)
    loaded = load(write_original(tmp_path / "original", native))

    assert isinstance(loaded, InternVLForConditionalGeneration)
    assert loaded.config.tie_word_embeddings is tie
    head_is_embedding = loaded.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
    assert head_is_embedding is tie
    assert_same_outputs(loaded, native)


def test_sharded_checkpoint(tmp_path):
    native = tiny_native_model()
    directory = write_original(tmp_path / "original", native, shards=3)
    assert not (directory / "model.safetensors").exists()
    assert_same_outputs(load(directory), native)


def test_dtype_reaches_from_pretrained(tmp_path):
    directory = write_original(tmp_path / "original", tiny_native_model())
    assert load(directory).dtype == torch.float32  # the config's torch_dtype, as from_pretrained picks for -hf
    assert load_internvl_chat(directory, dtype=torch.bfloat16, image_token_id=IMAGE_TOKEN_ID).dtype == torch.bfloat16


def test_hub_id_is_downloaded(tmp_path, monkeypatch):
    import huggingface_hub

    native = tiny_native_model()
    directory = write_original(tmp_path / "original", native)
    requests = []

    def snapshot_download(repo_id, allow_patterns):
        requests.append(("snapshot", repo_id))
        assert "*.safetensors" in allow_patterns and "*.json" in allow_patterns
        return str(directory)

    def hf_hub_download(repo_id, filename):
        requests.append((filename, repo_id))
        return str(directory / filename)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    assert is_internvl_chat_checkpoint("OpenGVLab/InternVL3-1B-Pretrained")
    loaded = load("OpenGVLab/InternVL3-1B-Pretrained")
    repo = "OpenGVLab/InternVL3-1B-Pretrained"
    assert requests == [("config.json", repo), ("snapshot", repo)]
    assert loaded.config._name_or_path == "OpenGVLab/InternVL3-1B-Pretrained"
    assert_same_outputs(loaded, native)


def test_sharded_index_naming_a_missing_shard_fails(tmp_path):
    directory = write_original(tmp_path / "original", tiny_native_model(), shards=2)
    (directory / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load(directory)


def test_unknown_keys_are_listed(tmp_path):
    native = tiny_native_model()
    state_dict = original_state_dict(native)
    state_dict["vision_model.encoder.layers.0.attn.rel_pos_bias"] = torch.zeros(4)
    state_dict["img_context_embedding"] = torch.zeros(2)
    directory = write_original(tmp_path / "original", native, state_dict=state_dict)
    with pytest.raises(ValueError, match="2 checkpoint keys") as error:
        load(directory)
    assert "vision_model.encoder.layers.0.attn.rel_pos_bias" in str(error.value)
    assert "img_context_embedding" in str(error.value)


def test_missing_and_unused_weights_are_listed(tmp_path):
    native = tiny_native_model()
    state_dict = original_state_dict(native)
    del state_dict["vision_model.encoder.layers.1.ls2"]
    del state_dict["language_model.lm_head.weight"]  # the config says untied
    state_dict["language_model.model.layers.7.mlp.up_proj.weight"] = torch.zeros(1)  # a layer the config lacks
    config = internvl_chat_config_to_hf(original_config(native.config), image_token_id=IMAGE_TOKEN_ID)
    with pytest.raises(ValueError) as error:
        convert_internvl_chat_state_dict(state_dict, config)
    message = str(error.value)
    assert "2 missing" in message
    assert "model.vision_tower.encoder.layer.1.lambda_2" in message and "'lm_head.weight'" in message
    assert "1 unused" in message and "model.language_model.layers.7.mlp.up_proj.weight" in message


def test_wrong_shape_is_an_error(tmp_path):
    native = tiny_native_model()
    state_dict = original_state_dict(native)
    state_dict["mlp1.1.bias"] = torch.zeros(3)
    config = internvl_chat_config_to_hf(original_config(native.config), image_token_id=IMAGE_TOKEN_ID)
    with pytest.raises(ValueError, match=r"model.multi_modal_projector.linear_1.bias: checkpoint \(3,\)"):
        convert_internvl_chat_state_dict(state_dict, config)


def test_tied_checkpoint_that_also_stores_the_head(tmp_path):
    native = tiny_native_model(tie=True)
    state_dict = original_state_dict(native)
    config = internvl_chat_config_to_hf(original_config(native.config), image_token_id=IMAGE_TOKEN_ID)
    embeddings = state_dict["language_model.model.embed_tokens.weight"]

    equal_copy = convert_internvl_chat_state_dict({**state_dict, "language_model.lm_head.weight": embeddings}, config)
    assert "lm_head.weight" not in equal_copy
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        convert_internvl_chat_state_dict({**state_dict, "language_model.lm_head.weight": embeddings + 1}, config)


def internvit_reference_features(state_dict, config, pixel_values):
    """OpenGVLab's `InternVLChatModel.extract_feature` on original-named weights, written from its published code."""
    vision = config["vision_config"]
    hidden, heads = vision["hidden_size"], vision["num_attention_heads"]
    eps = vision["layer_norm_eps"]
    w = lambda name: state_dict[name]  # noqa: E731
    b = lambda name: state_dict.get(name)  # noqa: E731

    def norm(x, prefix):
        if vision["norm_type"] == "layer_norm":
            return F.layer_norm(x, (hidden,), w(prefix + ".weight"), w(prefix + ".bias"), eps)
        return w(prefix + ".weight") * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def rms(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    x = F.conv2d(pixel_values, w("vision_model.embeddings.patch_embedding.weight"),
                 w("vision_model.embeddings.patch_embedding.bias"), stride=vision["patch_size"])  # fmt: skip
    x = x.flatten(2).transpose(1, 2)  # (B, patches, C)
    batch, patches = x.shape[:2]
    cls = w("vision_model.embeddings.class_embedding").expand(batch, 1, hidden)
    x = torch.cat([cls, x], dim=1) + w("vision_model.embeddings.position_embedding")
    states = [x]
    for i in range(vision["num_hidden_layers"]):
        p = f"vision_model.encoder.layers.{i}."
        n, d = patches + 1, hidden // heads
        qkv = F.linear(norm(x, p + "norm1"), w(p + "attn.qkv.weight"), b(p + "attn.qkv.bias"))
        q, k, v = qkv.reshape(batch, n, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, d) each
        if vision["qk_normalization"]:
            q = rms(q.transpose(1, 2).flatten(-2), w(p + "attn.q_norm.weight")).view(batch, n, heads, d).transpose(1, 2)
            k = rms(k.transpose(1, 2).flatten(-2), w(p + "attn.k_norm.weight")).view(batch, n, heads, d).transpose(1, 2)
        attention = ((q * d**-0.5) @ k.transpose(-2, -1)).softmax(-1)
        out = (attention @ v).transpose(1, 2).reshape(batch, n, hidden)
        x = x + F.linear(out, w(p + "attn.proj.weight"), w(p + "attn.proj.bias")) * w(p + "ls1")
        mlp = F.linear(F.gelu(F.linear(norm(x, p + "norm2"), w(p + "mlp.fc1.weight"), w(p + "mlp.fc1.bias"))),
                       w(p + "mlp.fc2.weight"), w(p + "mlp.fc2.bias"))  # fmt: skip
        x = x + mlp * w(p + "ls2")
        states.append(x)

    features = states[config["select_layer"]][:, 1:]  # drop CLS
    side = int(features.shape[1] ** 0.5)
    features = features.reshape(batch, side, side, -1)
    # pixel_shuffle, ps_version v2
    s = config["downsample_ratio"]
    n, wd, ht, c = features.shape
    features = features.view(n, wd, int(ht * s), int(c / s)).permute(0, 2, 1, 3)
    features = features.reshape(n, int(ht * s), int(wd * s), int(c / (s * s))).permute(0, 2, 1, 3)
    features = features.reshape(batch, -1, features.shape[-1])
    features = F.layer_norm(features, features.shape[-1:], w("mlp1.0.weight"), w("mlp1.0.bias"), 1e-5)
    features = F.gelu(F.linear(features, w("mlp1.1.weight"), w("mlp1.1.bias")))
    return F.linear(features, w("mlp1.3.weight"), w("mlp1.3.bias"))


@pytest.mark.parametrize(("vit_6b", "select_layer"), [(False, -1), (True, -1), (False, -2)])
def test_vision_features_match_internvit_reference(tmp_path, vit_6b, select_layer):
    native = tiny_native_model(vit_6b=vit_6b, select_layer=select_layer)
    state_dict = original_state_dict(native)
    loaded = load(write_original(tmp_path / "original", native, state_dict=state_dict))
    _, pixel_values = inputs()
    with torch.no_grad():
        expected = internvit_reference_features(state_dict, original_config(native.config), pixel_values)
        features = loaded.get_image_features(pixel_values).pooler_output
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)


# InternVL3-1B-Pretrained's published config.json, trimmed of fields that do not affect the mapping.
INTERNVL3_1B_CONFIG = {
    "architectures": ["InternVLChatModel"],
    "model_type": "internvl_chat",
    "downsample_ratio": 0.5,
    "force_image_size": 448,
    "ps_version": "v2",
    "select_layer": -1,
    "template": "internvl2_5",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "llm_config": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151674,
        "max_position_embeddings": 32768, "max_window_layers": 70, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
        "rope_scaling": {"factor": 2.0, "rope_type": "dynamic", "type": "dynamic"}, "bos_token_id": 151643,
        "eos_token_id": 151643, "use_cache": False, "torch_dtype": "bfloat16", "moe_config": None,
    },
    "vision_config": {
        "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": 1024,
        "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24, "image_size": 448,
        "patch_size": 14, "qkv_bias": True, "qk_normalization": False, "norm_type": "layer_norm",
        "layer_norm_eps": 1e-06, "drop_path_rate": 0.1, "initializer_factor": 0.1, "use_moe": False,
        "num_experts": 8, "use_flash_attn": False,
    },
}  # fmt: skip


def test_internvl3_1b_config_mapping():
    config = internvl_chat_config_to_hf(INTERNVL3_1B_CONFIG)
    vision, text = config.vision_config, config.text_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.intermediate_size) == (1024, 24, 4096)
    assert vision.attention_bias and not vision.use_qk_norm and vision.norm_type == "layer_norm"
    assert vision.image_size == (448, 448) and vision.patch_size == (14, 14) and vision.use_mean_pooling
    assert (text.model_type, text.hidden_size, text.num_hidden_layers, text.vocab_size) == ("qwen2", 896, 24, 151674)
    assert text.rope_parameters["rope_theta"] == 1e6 and text.use_cache
    assert config.tie_word_embeddings is False and text.tie_word_embeddings is False
    assert (config.image_token_id, config.image_seq_length, config.downsample_ratio) == (151667, 256, 0.5)
    assert config.vision_feature_layer == -1 and config.vision_feature_select_strategy == "default"
    with torch.device("meta"):
        parameters = sum(p.numel() for p in InternVLForConditionalGeneration(config).parameters())
    assert parameters == 938_193_024  # InternVL3-1B's published size (0.9B: 0.3B InternViT + Qwen2.5-0.5B)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ps_version": "v1"}, "ps_version"),
        ({"model_type": "internvl"}, "internvl_chat"),
        ({"force_image_size": 224}, "force_image_size"),
        ({"llm_config": {**INTERNVL3_1B_CONFIG["llm_config"], "model_type": "internlm2"}}, "internlm2"),
        ({"vision_config": {**INTERNVL3_1B_CONFIG["vision_config"], "use_moe": True}}, "use_moe"),
    ],
)
def test_unsupported_configs_raise(change, message):
    with pytest.raises(ValueError, match=message):
        internvl_chat_config_to_hf({**INTERNVL3_1B_CONFIG, **change})


def test_absent_vision_keys_take_internvit_defaults():
    vision = {k: v for k, v in INTERNVL3_1B_CONFIG["vision_config"].items() if k not in ("norm_type", "qkv_bias")}
    config = internvl_chat_config_to_hf({**INTERNVL3_1B_CONFIG, "vision_config": vision})
    # InternVisionConfig's defaults, not InternVLVisionConfig's.
    assert config.vision_config.norm_type == "rms_norm" and config.vision_config.attention_bias is False


def test_is_internvl_chat_checkpoint(tmp_path):
    native = tiny_native_model()
    assert is_internvl_chat_checkpoint(write_original(tmp_path / "original", native))
    native.save_pretrained(tmp_path / "native")
    assert not is_internvl_chat_checkpoint(tmp_path / "native")


def write_original_tokenizer(directory):
    """A tiny byte-level tokenizer in the original layout: Qwen2Tokenizer files, InternVL's tokens, no `<video>`."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    chars = [chr(c) for c in printable] + [chr(256 + i) for i in range(len(others))]  # GPT-2's byte-to-unicode
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({c: i for i, c in enumerate(chars)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"]
    added = {
        str(256 + i): {"content": s, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False,
                       "special": True}
        for i, s in enumerate(specials)
    }  # fmt: skip
    config = {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "added_tokens_decoder": added}  # fmt: skip
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def test_tokenizer_gets_internvl_attributes(tmp_path):
    write_original_tokenizer(tmp_path / "original")
    tokenizer = load_internvl_chat_tokenizer(tmp_path / "original")
    assert (tokenizer.start_image_token, tokenizer.end_image_token) == ("<img>", "</img>")
    assert tokenizer.context_image_token_id == 261
    assert tokenizer.video_token == "<video>" and tokenizer.video_token_id == 262  # appended after the vocabulary
    assert tokenizer("a<img><IMG_CONTEXT></img>").input_ids == [64, 259, 261, 260]


def test_tokenizer_without_image_tokens_fails(tmp_path):
    write_original_tokenizer(tmp_path / "original")
    config_file = tmp_path / "original" / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["added_tokens_decoder"] = {k: v for k, v in config["added_tokens_decoder"].items() if int(k) < 259}
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="IMG_CONTEXT"):
        load_internvl_chat_tokenizer(tmp_path / "original")


def test_command_line_writes_a_native_checkpoint(tmp_path):
    native = tiny_native_model()
    source = write_original(tmp_path / "original", native)
    write_original_tokenizer(source)

    convert_cli.main([str(source), str(tmp_path / "native")])
    reloaded = InternVLForConditionalGeneration.from_pretrained(tmp_path / "native").eval()
    reloaded_weights = reloaded.state_dict()
    for name, tensor in native.state_dict().items():
        assert torch.equal(reloaded_weights[name], tensor), name
    assert reloaded.config.image_token_id == 261  # the tokenizer's <IMG_CONTEXT>
    processor = load_internvl_processor(tmp_path / "native")
    assert processor.tokenizer.video_token_id == 262 and processor.image_seq_length == TOKENS_PER_TILE
