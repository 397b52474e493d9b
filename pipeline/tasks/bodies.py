"""The grammar of `build_model` bodies the warm start teaches, and the ceiling grid drawn from it.

A dozen scikit-learn estimators with a few hyperparameter values each and an optional scaler:
the warm start samples bodies uniformly from it (so nothing says which model is best), and the
ceiling stage scores a thinned grid of it on every task (bodies the policy could write), so
"fraction of the ceiling" compares the policy's best body with a reachable one.
"""

from __future__ import annotations

import itertools
import random

# (import line, estimator expression with {} slots, choices per slot, needs scaling)
ESTIMATORS: list[tuple[str, str, list[list[object]], bool]] = [
    (
        "from sklearn.linear_model import LogisticRegression",
        "LogisticRegression(C={}, max_iter=1000)",
        [[0.1, 0.5, 1.0, 2.0, 10.0]],
        True,
    ),
    (
        "from sklearn.ensemble import RandomForestClassifier",
        "RandomForestClassifier(n_estimators={}, max_depth={}, random_state=0)",
        [[50, 100, 200, 300], [None, 4, 8, 16]],
        False,
    ),
    (
        "from sklearn.ensemble import ExtraTreesClassifier",
        "ExtraTreesClassifier(n_estimators={}, min_samples_leaf={}, random_state=0)",
        [[50, 100, 200], [1, 2, 5]],
        False,
    ),
    (
        "from sklearn.ensemble import GradientBoostingClassifier",
        "GradientBoostingClassifier(n_estimators={}, learning_rate={}, random_state=0)",
        [[50, 100, 200], [0.03, 0.1, 0.3]],
        False,
    ),
    (
        "from sklearn.ensemble import HistGradientBoostingClassifier",
        "HistGradientBoostingClassifier(max_iter={}, learning_rate={}, random_state=0)",
        [[100, 200], [0.05, 0.1, 0.2]],
        False,
    ),
    (
        "from sklearn.ensemble import AdaBoostClassifier",
        "AdaBoostClassifier(n_estimators={}, random_state=0)",
        [[50, 100, 200]],
        False,
    ),
    (
        "from sklearn.tree import DecisionTreeClassifier",
        "DecisionTreeClassifier(max_depth={}, random_state=0)",
        [[3, 5, 10, None]],
        False,
    ),
    (
        "from sklearn.neighbors import KNeighborsClassifier",
        "KNeighborsClassifier(n_neighbors={}, weights={!r})",
        [[3, 5, 7, 15], ["uniform", "distance"]],
        True,
    ),
    (
        "from sklearn.svm import SVC",
        "SVC(C={}, kernel={!r}, probability=True, random_state=0)",
        [[0.5, 1.0, 5.0], ["rbf", "linear", "poly"]],
        True,
    ),
    ("from sklearn.naive_bayes import GaussianNB", "GaussianNB()", [], False),
    (
        "from sklearn.neural_network import MLPClassifier",
        "MLPClassifier(hidden_layer_sizes=({},), alpha={}, max_iter=500, random_state=0)",
        [[16, 32, 64, 128], [1e-4, 1e-3, 1e-2]],
        True,
    ),
    (
        "from sklearn.discriminant_analysis import LinearDiscriminantAnalysis",
        "LinearDiscriminantAnalysis()",
        [],
        False,
    ),
]
SCALERS = ["StandardScaler", "MinMaxScaler", "RobustScaler"]


def random_body(rng: random.Random) -> str:
    """One body drawn uniformly from the grammar."""
    import_line, template, choices, scale = rng.choice(ESTIMATORS)
    estimator = template.format(*(rng.choice(c) for c in choices))
    scaler = rng.choice(SCALERS) if scale and rng.random() < 0.7 else None
    return grammar_body(import_line, estimator, scaler)


def grammar_body(import_line: str, estimator: str, scaler: str | None) -> str:
    """A body of the grammar: the import, an optional scaler pipeline, fit, return."""
    lines = [import_line]
    if scaler:
        lines += ["from sklearn.pipeline import make_pipeline", f"from sklearn.preprocessing import {scaler}"]
        lines.append(f"model = make_pipeline({scaler}(), {estimator})")
    else:
        lines.append(f"model = {estimator}")
    lines += ["model.fit(x_train, y_train)", "return model"]
    return "".join(f"    {line}\n" for line in lines)


def grid_bodies() -> list[str]:
    """Every estimator of the grammar with every other value of each of its hyperparameters."""
    bodies = []
    for import_line, template, choices, scale in ESTIMATORS:
        for values in itertools.product(*(c[::2] for c in choices)):
            bodies.append(
                grammar_body(import_line, template.format(*values), "StandardScaler" if scale else None)
            )
    return bodies
