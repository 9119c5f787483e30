"""Policy regularizers for PPO, as plug-ins. PPO does not know which one it runs.

from wprctl.regularizers import build_regularizer, RegBatch
reg = build_regularizer(manifest.ppo.regularizer)
"""

from wprctl.regularizers.base import BetaController, RegBatch, Regularizer, build_regularizer

__all__ = ["BetaController", "RegBatch", "Regularizer", "build_regularizer"]
