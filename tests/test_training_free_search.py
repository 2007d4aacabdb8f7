"""The searcher of the training-free page (scripts/search_training_free.py): TFG's doubling beam search, its selection
rule, and the data it selects on."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@pytest.fixture(scope="module")
def search():
    # scripts/ is not a package: its modules import each other by name, as when a script runs.
    sys.path.insert(0, str(SCRIPTS))
    try:
        yield importlib.import_module("search_training_free")
    finally:
        sys.path.remove(str(SCRIPTS))


def toy_objective(calls: list):
    """A smooth objective on (rho, sigma), highest at rho = 2, sigma = 0.1: two doublings and two decades away from
    the start, on the grid the search walks."""

    def evaluate(settings: dict) -> dict:
        calls.append(dict(settings))
        rho, sigma = settings["rho"], settings["sigma"]
        return {"score": -((math.log2(rho) - 1) ** 2) - (math.log10(sigma) + 1) ** 2}

    return evaluate


def test_beam_search_finds_the_known_optimum_within_the_budget(search):
    axes = {"rho": search.SearchAxis(0.25, 2.0, 8.0), "sigma": search.SearchAxis(0.001, 10.0, 1.0)}
    calls = []
    trace = search.beam_search(toy_objective(calls), axes, lambda r: (r["score"],), beam_width=2, budget=14)
    best = search.best_of(trace, lambda r: (r["score"],))
    assert best["settings"] == {"rho": 2.0, "sigma": 0.1}
    assert len(calls) == len(trace) <= 14  # the full grid holds 6 x 4 = 24 settings
    assert len({tuple(sorted(c.items())) for c in calls}) == len(calls)  # no setting evaluated twice
    assert trace[0]["settings"] == {"rho": 0.25, "sigma": 0.001} and trace[0]["round"] == 0
    # Round 0: the start and its children, one parameter multiplied at a time.
    assert [e["settings"] for e in trace if e["round"] == 0] == [
        {"rho": 0.25, "sigma": 0.001},
        {"rho": 0.5, "sigma": 0.001},
        {"rho": 0.25, "sigma": 0.01},
    ]


def test_beam_search_stops_at_the_budget_and_when_the_beam_has_no_new_child(search):
    axes = {"rho": search.SearchAxis(0.25, 2.0, 8.0), "sigma": search.SearchAxis(0.001, 10.0, 1.0)}
    calls = []
    search.beam_search(toy_objective(calls), axes, lambda r: (r["score"],), beam_width=2, budget=4)
    assert len(calls) == 4
    # One axis whose score falls past 1: the beam holds 0.5 and 1 once 2 is worse, their children are known, stop.
    calls = []
    trace = search.beam_search(
        lambda s: calls.append(s) or {"score": -abs(math.log2(s["s"]))},
        {"s": search.SearchAxis(0.25, 2.0, 16.0)},
        lambda r: (r["score"],),
        beam_width=2,
        budget=10,
    )
    assert [e["settings"]["s"] for e in trace] == [0.25, 0.5, 1.0, 2.0]


def test_a_beam_of_two_follows_the_second_best_setting_where_the_best_leads_nowhere(search):
    # The rho child beats the sigma child in round 0, but only the sigma direction keeps improving.
    scores = {(0.25, 0.001): 0.0, (0.5, 0.001): 3.0, (0.25, 0.01): 2.0, (0.25, 0.1): 5.0}
    axes = {"rho": search.SearchAxis(0.25, 2.0, 8.0), "sigma": search.SearchAxis(0.001, 10.0, 1.0)}

    def best_with(beam_width: int) -> dict:
        trace = search.beam_search(
            lambda s: {"score": scores.get((s["rho"], s["sigma"]), 1.0)}, axes, lambda r: (r["score"],), beam_width, 20
        )
        return search.best_of(trace, lambda r: (r["score"],))["settings"]

    assert best_with(1) == {"rho": 0.5, "sigma": 0.001}
    assert best_with(2) == {"rho": 0.25, "sigma": 0.1}


def test_search_axis_caps_at_its_maximum_and_refuses_a_bad_range(search):
    axis = search.SearchAxis(0.001, 10.0, 1.0)
    assert [axis.child(v) for v in (0.001, 0.01, 0.1, 1.0)] == [0.01, 0.1, 1.0, 1.0]
    with pytest.raises(ValueError, match="factor"):
        search.SearchAxis(1.0, 1.0, 8.0)


def test_selection_key_ranks_as_the_best_scale_rule_and_failures_last(search):
    from plugguide.metrics.reporting import best_scale

    unguided = {"fid_autoencoder": 5.0, "intervals": {"fid_autoencoder": (4.0, 6.0)}}
    sweep = {
        "1": {"guided_accuracy": 0.5, "fid_autoencoder": 5.5},
        "2": {"guided_accuracy": 0.8, "fid_autoencoder": 5.9},
        "4": {"guided_accuracy": 0.95, "fid_autoencoder": 9.0},
        "8": {"guided_accuracy": math.nan, "fid_autoencoder": math.nan},
        "16": {"error": "FloatingPointError: ..."},
    }
    ranked = sorted(sweep, key=lambda s: search.selection_key(sweep[s], 6.0), reverse=True)
    assert ranked[0] == best_scale({k: v for k, v in sweep.items() if k in "124"}, unguided)[0] == "2"
    assert ranked[:3] == ["2", "1", "4"] and set(ranked[3:]) == {"8", "16"}
    # No setting inside the bound: the lowest distance first, as the rule's starred fallback.
    assert max(["2", "4"], key=lambda s: search.selection_key(sweep[s], 5.0)) == "2"


class RecordingDigits:
    """Stands in for `DigitsDataModule`, recording which splits were read."""

    def __init__(self) -> None:
        self.splits = []

    def split_images(self, split: str):
        self.splits.append(split)
        generator = torch.Generator().manual_seed(len(self.splits))
        return torch.rand(20, 1, 16, 16, generator=generator) * 2 - 1, torch.arange(20) % 10


def test_selection_reads_the_validation_split_and_a_judge_that_neither_guides_nor_evaluates(search):
    protocol = importlib.import_module("protocol")
    rows = importlib.import_module("training_free_rows")
    digits = RecordingDigits()
    metrics = search.validation_metrics(digits)
    assert digits.splits == ["val"] and search.SEARCH_SPLIT != protocol.REFERENCE_SPLIT
    assert search.JUDGE not in (protocol.EVALUATOR, rows.RESNET)
    assert metrics.real.compute()["labels"].numel() == 20  # the recorded split is the reference it scores against


def test_dense_search_targets_come_from_training_digits(search, monkeypatch):
    requested = {}

    class RecordingTargets:
        def __init__(self, model_path, splits, num_samples):
            requested.update(splits=splits, num_samples=num_samples)

        def setup(self, stage):
            maps = torch.zeros(num := requested["num_samples"], 16, 16, dtype=torch.long)
            self.dataset = type("Rows", (), {"rows": {"target_map": maps, "target_class": torch.arange(num) % 10}})

    monkeypatch.setattr(search, "TargetMapDataModule", RecordingTargets)
    labels, seeds, rows = search.search_targets("segmentation", 2)
    assert requested == {"splits": ["train"], "num_samples": 20}
    assert seeds.min() >= search.SEARCH_SEED > 499  # the tables' seeds are 0..499
    labels, seeds, rows = search.search_targets("label", 3)
    assert rows is None and len(labels) == 30 and seeds.min() == search.SEARCH_SEED
