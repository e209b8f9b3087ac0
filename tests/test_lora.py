"""PEFT LoRA: the latent forward stays exact, only adapters train, adapters save and merge for export."""

import pytest
import torch

from mmcoconut.training.arguments import ModelArguments
from mmcoconut.training.build import apply_lora, export_merged
from modeling_mmcoconut import MMCoconutForConditionalGeneration
from tests.test_modeling_mmcoconut import assert_matches_naive, mixed_batch
from tests.tiny_models import collate, make_model, make_sample


def lora_model(vision=False, tie=False):
    model = apply_lora(make_model(tie=tie), ModelArguments(use_lora=True, lora_vision=vision))
    # LoRA's B starts at zero (a no-op); give it weight so the adapters change the function.
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:  # as if trained
                param.normal_(0, 0.2)
    return model


def test_latent_forward_matches_naive_definition_with_lora():
    model = lora_model(vision=True).eval()  # no LoRA dropout, so both sides compute the same function
    inner = model.get_base_model()
    assert any("lora_A" in n for n, _ in inner.internvl.model.vision_tower.named_parameters())
    batch = mixed_batch()
    out = model(**batch)  # through the PeftModel wrapper
    torch.testing.assert_close(out.loss, inner(**batch).loss)
    assert_matches_naive(inner, batch)


def test_lora_training_step_changes_only_adapters_and_latent_rows():
    model = lora_model()
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    model(**mixed_batch()).loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed, "nothing trained"
    assert all("lora_" in n or "trainable_tokens" in n for n in changed), sorted(changed)[:5]
    assert any("trainable_tokens" in n for n in changed)  # the latent markers' embeddings learn


@pytest.mark.parametrize("tie", [False, True])
def test_lora_generate_save_and_merge(tmp_path, tie):
    model = lora_model(tie=tie).eval()
    batch = collate([make_sample(1, 2, steps_len=0), make_sample(0, 1, steps_len=0, seed=1)])
    with torch.no_grad():
        generated = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   pixel_values=batch["pixel_values"], max_new_tokens=4, eos_token_id=None)
        logits = model(**batch).logits
    model.save_pretrained(tmp_path / "adapters")
    assert (tmp_path / "adapters" / "adapter_model.safetensors").is_file()

    class NoProcessor:
        def save_pretrained(self, directory):
            (directory / "processor.marker").write_text("")

    export_merged(model, NoProcessor(), tmp_path / "merged")
    assert any("lora_" in n for n, _ in model.named_parameters()), "the merge must not strip the trained model"
    merged = MMCoconutForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, logits, atol=1e-5, rtol=1e-5)
        again = merged.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                pixel_values=batch["pixel_values"], max_new_tokens=4, eos_token_id=None)
    torch.testing.assert_close(again, generated)
