"""Calls a user writes with annotated variables, checked by mypy in ``make test`` (never run).

A mapping's key type is invariant, so an API typed ``Mapping[Site | str, ...]`` would refuse a
``dict[Site, ...]`` a user built; these calls must type-check as they are written.
"""

from __future__ import annotations

from typing import Any

import mechprobe as mp


def interventions_keyed_by_site(model: Any) -> None:
    spec: dict[mp.Site, mp.Ablate] = {mp.Site("mlp_out", 0): mp.Ablate()}
    mp.run(model, "Hi", spec)
    with mp.intervene(model, spec):
        pass


def interventions_keyed_by_hook_name(model: Any) -> None:
    spec: dict[str, list[mp.Intervention]] = {"blocks.0.hook_mlp_out": [mp.Ablate()]}
    mp.run(model, "Hi", spec)


def circuit_keyed_by_site(model: Any) -> None:
    circuit: dict[mp.Site, str] = {mp.Site("head", 1, head=0): "END"}
    named: dict[str, int | list[int]] = {"END": -1}
    mp.faithfulness(model, ["Hi cat"], circuit, mp.logit_diff(1, 2), positions=named)
