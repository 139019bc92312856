"""Example MODEL.py: an MLP regressor for tabular data (e.g. scikit-learn's bundled diabetes).

    autol2o fit autol2o/examples/regression.py diabetes
    autol2o fit autol2o/examples/regression.py my_table.csv --target price

Set ``N_FEATURES`` to your number of feature columns (diabetes has 10).  Features are
standardised by autol2o; targets are used as given, so keep them roughly unit-scale.  The loss
is mean squared error.
"""

from torch import nn

N_FEATURES = 10
task = "regression"


def build_model() -> nn.Module:
    return nn.Sequential(nn.Linear(N_FEATURES, 32), nn.Tanh(), nn.Linear(32, 1))
