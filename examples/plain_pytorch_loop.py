"""A plain PyTorch training loop: a small GPT-style language model trained with fused_sched.AdamW and
fused_sched.get_cosine_schedule_with_warmup on CPU.

The data is synthetic (nothing is downloaded): arithmetic sequences modulo the vocabulary with a random start and
stride, so the next token is predictable from the context and the loss falls quickly. ``--optimizer torch`` runs the
same loop with torch.optim.AdamW and transformers' get_cosine_schedule_with_warmup (the only lines that differ).

    python examples/plain_pytorch_loop.py --steps 200
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

import fused_sched


class Block(torch.nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln1 = torch.nn.LayerNorm(dim)
        self.attn = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = torch.nn.LayerNorm(dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyGPT(torch.nn.Module):
    def __init__(self, vocab: int = 64, context: int = 32, dim: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, dim)
        self.pos = torch.nn.Embedding(context, dim)
        self.blocks = torch.nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied, as in GPT-2
        for module in self.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                torch.nn.init.normal_(module.weight, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        mask = torch.triu(torch.full((t, t), float("-inf")), diagonal=1)
        x = self.tok(ids) + self.pos(torch.arange(t))
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln(x))


def batch(gen: torch.Generator, size: int, context: int, vocab: int) -> torch.Tensor:
    """Arithmetic sequences modulo `vocab` with a random start and stride: the model must read the stride from the
    context to predict the next token."""
    start = torch.randint(vocab, (size, 1), generator=gen)
    stride = torch.randint(1, 8, (size, 1), generator=gen)
    return (start + stride * torch.arange(context + 1)) % vocab


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on biases, norms), the usual GPT recipe."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=None, help="warmup steps (default: steps // 10)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--optimizer", choices=["fused_sched", "torch"], default="fused_sched")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    warmup = args.steps // 10 if args.warmup is None else args.warmup

    torch.manual_seed(args.seed)
    model = TinyGPT()
    vocab, context = model.tok.num_embeddings, model.pos.num_embeddings
    groups = param_groups(model, weight_decay=0.1)
    if args.optimizer == "fused_sched":
        opt = fused_sched.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
        sched = fused_sched.get_cosine_schedule_with_warmup(opt, warmup, args.steps)
    else:
        from transformers import get_cosine_schedule_with_warmup

        opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
        sched = get_cosine_schedule_with_warmup(opt, warmup, args.steps)

    gen = torch.Generator().manual_seed(args.seed)
    losses = []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        tokens = batch(gen, args.batch_size, context, vocab)
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        lr = sched.get_last_lr()[0]  # the lr this step uses
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % args.log_every == 0 or step in (1, args.steps):
            print(f"step {step:5d}  loss {loss.item():.4f}  lr {lr:.3e}", flush=True)
    elapsed = time.perf_counter() - start
    print(f"{args.steps} steps in {elapsed:.1f} s, final loss {losses[-1]:.4f} (uniform guess: {math.log(vocab):.4f})")
    return losses


if __name__ == "__main__":
    main()
