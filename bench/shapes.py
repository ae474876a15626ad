"""Parameter shapes of the benchmark cases (no model download: the shapes are written out)."""


def gpt2_124m() -> list[tuple[int, ...]]:
    """GPT-2 small (124M parameters, 148 tensors): token and position embeddings, 12 blocks, final LayerNorm."""
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    shapes += [(d,), (d,)]
    return shapes


def many_small(count: int = 2000, numel: int = 256) -> list[tuple[int, ...]]:
    """Many tiny tensors, where per-tensor host overhead dominates."""
    return [(numel,)] * count
