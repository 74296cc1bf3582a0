"""Param-store names: one prefix per model or guide instance.

``pyro.module(name, m)`` registers parameters in Pyro's global param store by
name: two models (or guides) built in one session under the same name would
share or clobber each other's parameters. Every instance gets its own prefix.
"""

from __future__ import annotations

import itertools

import pyro
from torch import nn

_counter = itertools.count()


def unique_name(prefix: str, name: str | None) -> str:
    """``name`` if given, else ``prefix`` with a number no other instance has."""
    if name is None:
        return f"{prefix}_{next(_counter)}"
    if not isinstance(name, str) or not name or "$$$" in name:
        raise ValueError(f"name: expected a non-empty str without '$$$', got {name!r}")
    return name


def register_module(name: str, module: nn.Module) -> None:
    """``pyro.module``, refusing to train another module's parameters.

    Pyro's param store is global: if ``name`` already holds the parameters of
    another module, ``pyro.module`` returns those and SVI would silently
    optimise the wrong tensors.
    """
    pyro.module(name, module)
    stored = dict(pyro.get_param_store().named_parameters())  # unconstrained, as registered
    for param_name, param in module.named_parameters():
        if stored[f"{name}$$${param_name}"] is not param:
            raise ValueError(
                f"name: the Pyro param store holds another tensor under {name!r}$$${param_name};"
                " a second module of that name, or a component swapped in after training"
                " began, would never be trained. Give each model and guide its own name,"
                " or call pyro.clear_param_store() first"
            )
