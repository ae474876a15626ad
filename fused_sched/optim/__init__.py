"""Drop-in replacements for torch.optim's AdamW, Adam, SGD and Muon, their low-memory variants, and Muon with AdamW
in one optimizer."""

from .adam import Adam, AdamW
from .adam8bit import Adam8bit, AdamW8bit
from .muon import Muon
from .muon_with_adamw import MuonWithAdamW, muon_param_groups
from .sgd import SGD
from .sgd8bit import SGD8bit
from .state_format import to_torch_state_dict

__all__ = [
    "Adam",
    "AdamW",
    "SGD",
    "Muon",
    "MuonWithAdamW",
    "muon_param_groups",
    "Adam8bit",
    "AdamW8bit",
    "SGD8bit",
    "to_torch_state_dict",
]
