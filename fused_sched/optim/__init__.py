"""Drop-in replacements for torch.optim's AdamW, Adam and SGD, and their low-memory variants."""

from .adam import Adam, AdamW
from .adam8bit import Adam8bit, AdamW8bit
from .sgd import SGD
from .sgd8bit import SGD8bit
from .state_format import to_torch_state_dict

__all__ = ["Adam", "AdamW", "SGD", "Adam8bit", "AdamW8bit", "SGD8bit", "to_torch_state_dict"]
