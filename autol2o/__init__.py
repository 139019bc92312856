"""autol2o: train your PyTorch model with a learned optimizer, and prove whether it beats tuned
Adam or SGD on your task."""

from autol2o.optimizers import DMOptimizer, LearnedOptimizer, RNNprop

__version__ = "0.1.0"
__all__ = ["DMOptimizer", "LearnedOptimizer", "RNNprop", "__version__", "optimize"]


def __getattr__(name: str):
    # `optimize` pulls in optuna and the fit pipeline; import it only when asked for.
    if name == "optimize":
        from autol2o.fit import optimize

        return optimize
    raise AttributeError(name)
