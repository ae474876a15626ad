"""Drop-in replacements for torch.optim's AdamW, Adam and SGD."""

from .adam import Adam, AdamW
from .sgd import SGD

__all__ = ["Adam", "AdamW", "SGD"]
