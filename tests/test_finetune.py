"""examples/finetune_with_trainer.py: Trainer fine-tuning lowers the held-out loss; LoRA saves, reloads and merges
into a model that generates exactly what the adapter model generates."""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.test_generate_cli import save_tiny_model, single_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
BLOCK_SIZE = 32


def load_example():
    spec = importlib.util.spec_from_file_location(
        "finetune_with_trainer", REPO_ROOT / "examples" / "finetune_with_trainer.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example():
    return load_example()


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny model whose tokenizer knows Shakespeare's characters, and new Shakespeare text it has not seen."""
    if not SHAKESPEARE.is_file():
        pytest.skip(f"real data missing: {SHAKESPEARE} (the shared tinyshakespeare corpus beside the checkout)")
    text = SHAKESPEARE.read_text(encoding="utf-8")
    folder = tmp_path_factory.mktemp("finetune")
    model_dir = save_tiny_model(folder / "model", text=text[:50_000])
    new_text = folder / "new_text.txt"
    new_text.write_text(text[50_000:60_000])
    return model_dir, new_text


def held_out_loss(model, tokenizer, text_file: Path, example) -> float:
    blocks = example.load_blocks(str(text_file), tokenizer, BLOCK_SIZE)["validation"]
    ids = torch.tensor(blocks["input_ids"], dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:]).item()


@pytest.mark.xdist_group("training")
def test_trainer_finetuning_lowers_the_loss_on_the_new_text(example, pretrained, tmp_path):
    model_dir, new_text = pretrained
    output_dir = tmp_path / "finetuned"
    result = example.finetune(
        str(model_dir), str(new_text), str(output_dir), block_size=BLOCK_SIZE, max_steps=30, learning_rate=3e-3
    )
    assert result.loss_after < result.loss_before - 1.0, result
    # The saved folder is the fine-tuned model: loaded back, it scores the held-out text as reported.
    model = AutoModelForCausalLM.from_pretrained(output_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    assert held_out_loss(model, tokenizer, new_text, example) == pytest.approx(result.loss_after, abs=1e-4)


@pytest.mark.xdist_group("training")
def test_lora_adapters_save_reload_and_merge_into_the_same_generator(example, pretrained, tmp_path):
    model_dir, new_text = pretrained
    adapter_dir = tmp_path / "lora"
    result = example.finetune(
        str(model_dir),
        str(new_text),
        str(adapter_dir),
        block_size=BLOCK_SIZE,
        max_steps=20,
        learning_rate=1e-2,
        lora=True,
        lora_rank=4,
    )
    assert result.loss_after < result.loss_before - 0.5, result
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    # Only the adapters trained: rank x (in + out) per wrapped Linear, for every target name.
    wrapped = [m for name, m in base.named_modules() if name.split(".")[-1] in example.LORA_TARGETS]
    assert result.trainable_parameters == sum(4 * (m.in_features + m.out_features) for m in wrapped)
    assert {p.name for p in adapter_dir.iterdir()} >= {"adapter_model.safetensors", "adapter_config.json"}

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base_loss = held_out_loss(base, tokenizer, new_text, example)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir).eval()
    assert held_out_loss(adapted, tokenizer, new_text, example) == pytest.approx(result.loss_after, abs=1e-4)
    assert result.loss_after < base_loss - 0.5  # the reloaded adapters carry the training

    prompts = tokenizer(
        ["First Citizen:", "Speak"], add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt"
    )
    settings = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        from_adapters = adapted.generate(**prompts, **settings)
        merged = example.merge_adapters(str(model_dir), str(adapter_dir), str(tmp_path / "merged")).eval()
        assert torch.equal(merged.generate(**prompts, **settings), from_adapters)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()  # a plain model folder
        assert torch.equal(reloaded.generate(**prompts, **settings), from_adapters)
        assert not torch.equal(base.generate(**prompts, **settings), from_adapters)
