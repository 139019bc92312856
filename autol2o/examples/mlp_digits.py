"""Example MODEL.py: a small MLP for scikit-learn's 8x8 digits (the embedded default).

    autol2o fit                                   # this model on the bundled digits
    autol2o fit autol2o/examples/mlp_digits.py path/to/data

Any input shape works as long as it flattens to 64 features.
"""

from torch import nn

task = "classification"


def build_model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
