"""Parameter shapes of the benchmark cases (no model download: the shapes are written out)."""


def gpt2_124m() -> list[tuple[int, ...]]:
    """GPT-2 small (124M parameters, 148 tensors): token and position embeddings, 12 blocks, final LayerNorm."""
    return gpt2()


GPT2_LAYERS = 12


def gpt2(layers: int = GPT2_LAYERS, d: int = 768, vocab: int = 50257, ctx: int = 1024) -> list[tuple[int, ...]]:
    """A GPT-2-style model (the head tied to the token embedding); the defaults are GPT-2 small's. `layers` < 12
    gives the embeddings, that many blocks and the final LayerNorm (the Muon rows on a CPU)."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    shapes += [(d,), (d,)]
    return shapes


def many_small(count: int = 2000, numel: int = 256) -> list[tuple[int, ...]]:
    """Many tiny tensors, where per-tensor host overhead dominates."""
    return [(numel,)] * count


def llama(layers: int, d: int, ffn: int, vocab: int, kv: int, tied: bool) -> list[tuple[int, ...]]:
    """A Llama-style decoder: token embedding, per block RMSNorm + q/k/v/o + RMSNorm + gate/up/down (no biases),
    final RMSNorm, and an output projection unless it is tied to the embedding."""
    shapes: list[tuple[int, ...]] = [(vocab, d)]
    for _ in range(layers):
        shapes += [(d,), (d, d), (kv, d), (kv, d), (d, d), (d,), (ffn, d), (ffn, d), (d, ffn)]
    shapes.append((d,))
    if not tied:
        shapes.append((vocab, d))
    return shapes


def llama_1b(scale: float = 1.0) -> list[tuple[int, ...]]:
    """Llama-3.2-1B (1.24B parameters, 146 tensors: d 2048, 16 blocks, ffn 8192, 8 kv heads of 64, vocab 128256,
    tied embedding). `scale` < 1 keeps every tensor's shape but takes that fraction of the blocks and of the
    vocabulary rows (at least one block), for machines that cannot hold a full copy per implementation."""
    layers = max(1, round(16 * scale))
    vocab = max(256, round(128256 * scale))
    return llama(layers, 2048, 8192, vocab, 512, tied=True)


LLAMA_7B_LAYERS = 32


def llama_7b(layers: int = LLAMA_7B_LAYERS) -> list[tuple[int, ...]]:
    """Llama-2-7B (6.74B parameters, 291 tensors: d 4096, 32 blocks, ffn 11008, vocab 32000, untied output);
    `layers` < 32 gives a shard: the embeddings, the output and that many blocks."""
    return llama(layers, 4096, 11008, 32000, 4096, tied=False)


def tiny() -> list[tuple[int, ...]]:
    """A few small tensors for smoke tests of the benchmark machinery."""
    return [(64, 32), (32,), (1000,), (7,), (16, 16)]


def tiny_gpt() -> list[tuple[int, ...]]:
    """A two-block GPT-2-style shape list of a few thousand elements, for smoke tests of the Muon rows."""
    return gpt2(layers=2, d=32, vocab=64, ctx=16)
