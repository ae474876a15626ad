"""Train a tiny GPT-2 with the Hugging Face Trainer, fused_sched.AdamW and fused_sched.get_cosine_schedule_with_warmup.

Nothing is downloaded: the model is built from a GPT2Config with random weights and the data are random token ids
(no tokenizer). The Trainer takes the optimizer and the scheduler through ``optimizers=(optimizer, scheduler)``;
fused_sched's cosine schedule is computed inside the update kernel, while ``scheduler.get_last_lr()`` (what the
Trainer logs) is transformers' own host value.

    python examples/hf_trainer_gpt2.py --steps 20

Needs ``transformers`` and ``accelerate``. Runs on the CPU.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import fused_sched


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    config = GPT2Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def random_tokens(samples: int, length: int, vocab: int, seed: int = 0) -> list[dict]:
    """A dataset the Trainer can batch with its default collator: causal LM, labels = input ids."""
    ids = torch.randint(vocab, (samples, length), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=None, help="warmup steps (default: steps // 10)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    warmup = args.steps // 10 if args.warmup is None else args.warmup

    model = tiny_gpt2()
    optimizer = fused_sched.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    scheduler = fused_sched.get_cosine_schedule_with_warmup(optimizer, warmup, args.steps)
    dataset = random_tokens(samples=64, length=16, vocab=model.config.vocab_size)

    with tempfile.TemporaryDirectory() as output_dir:
        training_args = TrainingArguments(
            output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
            logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
        )
        trainer = Trainer(model=model, args=training_args, train_dataset=dataset,
                          optimizers=(optimizer, scheduler))
        trainer.train()
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    for entry in history:
        print(f"step {entry['step']:4d}  loss {entry['loss']:.4f}  lr {entry['learning_rate']:.3e}")
    return history


if __name__ == "__main__":
    main()
