"""Learned update rules and the ``torch.optim`` adapter that applies them."""

from .adapter import LearnedOptimizer, state_dtype_for
from .base import RULES, LearnedRule, State, build_rule
from .dm import DMOptimizer, dm_features, dm_update
from .rnnprop import RNNprop, rnnprop_features, rnnprop_update

__all__ = [
    "RULES", "DMOptimizer", "LearnedOptimizer", "LearnedRule", "RNNprop", "State", "build_rule",
    "dm_features", "dm_update", "rnnprop_features", "rnnprop_update", "state_dtype_for",
]
