"""Fine-tune a saved hybrid model on new text with `transformers.Trainer`, fully or with LoRA adapters (PEFT).

A model trained with `hybrid-lm train` is a regular transformers model, so the standard tools apply unchanged:

    # full fine-tuning: every weight trains; the output folder is a complete model (+ tokenizer)
    python examples/finetune_with_trainer.py --model runs/shakespeare --text new_text.txt --output-dir runs/ft

    # LoRA on the linear layers (attention q/k/v/o, MLP up/down, the recurrent mixer's out_proj): only the
    # adapters train and are saved (a few hundred KB); --merge also writes the merged full model to OUT/merged
    python examples/finetune_with_trainer.py --model runs/shakespeare --text new_text.txt --output-dir runs/lora \
        --lora --merge

The text file is split 90/10 (the last 10% is held out) and cut into blocks of --block-size tokens with the
model's own tokenizer; the held-out loss is printed before and after training. The fused GRU/LSTM cells
themselves cannot carry LoRA adapters (PEFT wraps nn.Linear layers), so they stay frozen under --lora.

To use the adapters later:

    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    import hybrid_rnn_lm  # registers the model class (or pass trust_remote_code=True)

    base = AutoModelForCausalLM.from_pretrained("runs/shakespeare")
    model = PeftModel.from_pretrained(base, "runs/lora")      # adapters on top of the frozen base
    merged = model.merge_and_unload()                         # a plain model with the adapters folded in
"""

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from hybrid_rnn_lm import LORA_TARGET_MODULES  # importing the package registers the model with the Auto classes
from training.data import collate_blocks, load_corpus, tokenize_corpus

# Every nn.Linear of the model (peft's default for hybrid_rnn_lm once the package is imported).
LORA_TARGETS = LORA_TARGET_MODULES


@dataclass
class FinetuneResult:
    loss_before: float  # held-out loss (nats/token) of the saved model
    loss_after: float  # held-out loss after fine-tuning
    trainable_parameters: int
    output_dir: str


def load_blocks(text_file: str, tokenizer, block_size: int):
    """The text as train/validation blocks of token ids (the last 10% of the characters held out)."""
    corpus = load_corpus(text_file, validation_fraction=0.1)
    return tokenize_corpus(corpus, tokenizer, block_size)


def add_lora(model, rank: int):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config)


def finetune(
    model_dir: str,
    text_file: str,
    output_dir: str,
    *,
    block_size: int = 128,
    max_steps: int = 200,
    learning_rate: float = 1e-3,
    batch_size: int = 8,
    lora: bool = False,
    lora_rank: int = 8,
    seed: int = 0,
) -> FinetuneResult:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if lora:
        model = add_lora(model, lora_rank)
    blocks = load_blocks(text_file, tokenizer, block_size)
    arguments = TrainingArguments(
        output_dir=output_dir,
        max_steps=max_steps,
        learning_rate=learning_rate,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        lr_scheduler_type="cosine",
        warmup_steps=max_steps // 10,
        logging_steps=max(1, max_steps // 10),
        save_strategy="no",  # the final model is saved below, once
        report_to=[],
        seed=seed,
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,  # collate_blocks builds input_ids and labels from the blocks
    )
    trainer = Trainer(
        model=model,
        args=arguments,
        train_dataset=blocks["train"],
        eval_dataset=blocks["validation"],
        data_collator=collate_blocks,
    )
    loss_before = trainer.evaluate()["eval_loss"]
    trainer.train()
    loss_after = trainer.evaluate()["eval_loss"]
    trainer.save_model(output_dir)  # the full model, or only the adapters under LoRA
    tokenizer.save_pretrained(output_dir)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result = FinetuneResult(loss_before, loss_after, trainable, output_dir)
    (Path(output_dir) / "finetune_results.json").write_text(json.dumps(result.__dict__, indent=2) + "\n")
    return result


def merge_adapters(model_dir: str, adapter_dir: str, output_dir: str):
    """Base model + LoRA adapters -> one plain model folder (loads without PEFT)."""
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(output_dir)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(output_dir)
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="saved model folder (output of hybrid-lm train)")
    parser.add_argument("--text", required=True, help="a .txt file with the new text")
    parser.add_argument("--output-dir", required=True, help="where the fine-tuned model (or adapters) go")
    parser.add_argument("--block-size", type=int, default=128, help="tokens per training sequence")
    parser.add_argument("--max-steps", type=int, default=200, help="optimizer steps")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters instead of every weight")
    parser.add_argument("--lora-rank", type=int, default=8, help="rank of the LoRA adapters")
    parser.add_argument("--merge", action="store_true", help="with --lora: also write the merged model to OUT/merged")
    args = parser.parse_args()
    result = finetune(
        args.model,
        args.text,
        args.output_dir,
        block_size=args.block_size,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        lora=args.lora,
        lora_rank=args.lora_rank,
    )
    print(f"held-out loss: {result.loss_before:.4f} -> {result.loss_after:.4f} nats/token")
    print(f"trained {result.trainable_parameters:,} parameters; saved to {result.output_dir}")
    if args.lora and args.merge:
        merge_adapters(args.model, args.output_dir, str(Path(args.output_dir) / "merged"))
        print(f"merged model saved to {Path(args.output_dir) / 'merged'}")


if __name__ == "__main__":
    main()
