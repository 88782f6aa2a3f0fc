"""ranks_for_budget: the largest single rank whose trainable count fits the budget, counted as built."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import lrtensor_kernels as lk
from models import make_net
from test_serialization import assert_unchanged, snapshot


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3, groups=2), nn.ReLU(),
                         nn.Conv2d(32, 32, 1), nn.Flatten(), nn.Linear(32 * 16, 10))


def trainable_count(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_by_hand(model, r, names):
    """PEFT-style LoRA counts written out per layer type (dense A, as PEFT builds conv LoRA)."""
    total = 0
    for n in names:
        m = model.get_submodule(n)
        if isinstance(m, nn.Linear):
            total += r * m.in_features + m.out_features * r
        else:
            total += r * m.in_channels * math.prod(m.kernel_size) + m.out_channels * r
    return total


@pytest.mark.parametrize("method, kwargs", [
    ("flora", {}), ("liera", {}), ("liera", dict(delta="tucker", mode="first_order")), ("flora", dict(scale=1.0)),
], ids=["flora", "liera-lora", "liera-tucker", "flora-scale"])
@pytest.mark.parametrize("budget", [300, 2_000, 6_000, 40_000])
def test_largest_rank_within_budget(method, kwargs, budget):
    model = cnn()
    snap = snapshot(model)
    try:
        plan = lk.ranks_for_budget(model, method, budget=budget, **kwargs)
    except ValueError as err:  # rank 1 is over the smallest budget for some methods
        assert "at rank" in str(err) or "at ranks" in str(err)
        return
    assert_unchanged(model, snap)
    key = "ranks" if method == "flora" else "rank"
    r = plan.kwargs[key]
    assert plan.kwargs == {**kwargs, key: r}
    assert plan.total <= budget
    # the count is what inject builds
    injected = cnn()
    assert plan.inject(injected) == ["0", "2", "4", "6"]
    assert trainable_count(injected) == plan.total
    assert [layer.params for layer in plan.layers] == [
        sum(p.numel() for p in injected.get_submodule(n).adapter_parameters()) for n in ["0", "2", "4", "6"]]
    # and one more is over the budget, unless every rank is clipped already
    bigger = cnn()
    lk.inject(bigger, method, **{**kwargs, key: r + 1})
    assert trainable_count(bigger) > budget or trainable_count(bigger) == plan.total


def test_match_lora_rank_and_trained_in_full():
    model = cnn()
    plan = lk.ranks_for_budget(model, "liera", match_lora_rank=4, target_modules=["0", "2", "4"],
                               trainable_modules=["6"])
    head = 32 * 16 * 10 + 10
    assert plan.budget == lora_by_hand(model, 4, ["0", "2", "4"]) + head
    assert plan.trained_in_full == (("6", head),)
    assert plan.total <= plan.budget
    # LieRA's lora delta on a dense conv is PEFT's count; the grouped conv's A is smaller (in/groups)
    assert plan.kwargs["rank"] >= 4
    plan.inject(model)
    assert trainable_count(model) == plan.total
    assert type(model.get_submodule("6")) is nn.Linear and model.get_submodule("6").weight.requires_grad


def test_flora_ranks_are_clipped_and_counted_as_built():
    model = cnn()
    plan = lk.ranks_for_budget(model, "flora", budget=10 ** 9)  # every rank clipped: r up to the largest mode
    first = plan.layers[0]
    assert first.config["ranks"] == [16, 1, 2, 2]  # (out 16, in 1, k 3 -> 2, 2)
    assert first.params == 16 * 1 * 2 * 2 + 16 * 16 + 1 * 1 + 3 * 2 + 3 * 2
    assert plan.kwargs["ranks"] == 512  # the largest mode (the Linear's 512 inputs)


def test_fixed_count_methods():
    model = cnn()
    plan = lk.ranks_for_budget(model, "ssb", budget=10_000)
    assert plan.total == (1 + 16) + (16 // 2 + 32) + (32 + 32) + (512 + 10)  # in/groups for the grouped conv
    with pytest.raises(ValueError, match=r"ssl trains 553 parameters on these targets \(it has no rank to lower\), "
                       r"over the budget of 100"):
        lk.ranks_for_budget(model, "ssl", budget=100)


def test_table_lists_every_layer_and_the_total():
    plan = lk.ranks_for_budget(make_net(), "flora", match_lora_rank=2, exclude_modules=["pre"],
                               trainable_modules=["bn"])
    text = str(plan)
    lines = text.splitlines()
    assert lines[0].split() == ["layer", "type", "weight", "flora", "trainable"]
    for layer in plan.layers:
        assert any(line.startswith(layer.name + " ") and line.rstrip().endswith(f"{layer.params:,}") for line in lines)
    assert any(line.startswith("block.bn ") and "trained in full" in line for line in lines)
    assert lines[-1].startswith(f"total {plan.total:,} trainable parameters, budget {plan.budget:,}")


@pytest.mark.parametrize("kwargs, match", [
    (dict(), r"give exactly one of budget and match_lora_rank"),
    (dict(budget=10, match_lora_rank=2), r"give exactly one of budget and match_lora_rank"),
    (dict(budget=0), r"budget must be an integer >= 1, got 0"),
    (dict(match_lora_rank=2.5), r"match_lora_rank must be an integer >= 1, got 2\.5"),
    (dict(budget=10, ranks=3), r"'ranks' is what it chooses"),
    (dict(budget=10), r"flora at ranks=1 trains 679 parameters on these targets, over the budget of 10"),
    (dict(budget=10 ** 6, target_modules=["nothing"]), r"target_modules entry 'nothing' matched no module"),
], ids=["neither", "both", "zero", "float", "rank-given", "too-small", "bad-target"])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lk.ranks_for_budget(cnn(), "flora", **kwargs)


def test_lora_count_per_layer_type():
    model = cnn()
    names = ["0", "2", "4", "6"]
    assert [lk.lora_parameter_count(model.get_submodule(n), 3) for n in names] == [
        lora_by_hand(model, 3, [n]) for n in names]
    assert lk.ranks_for_budget(model, "ssl", match_lora_rank=3).budget == lora_by_hand(model, 3, names)


def test_lora_method_at_match_lora_rank_is_that_rank():
    """The "lora" method trains exactly what match_lora_rank counts on Linear and dense convs (so the
    plan is that rank, using the whole budget); on a grouped conv its A is smaller (in/groups * k)."""
    dense = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv1d(16, 8, 5), nn.Flatten(), nn.Linear(40, 10))
    for r in (1, 4, 7):
        plan = lk.ranks_for_budget(dense, "lora", match_lora_rank=r)
        assert plan.kwargs == {"rank": r} and plan.total == plan.budget
        for name in ("0", "2", "4"):
            module = dense.get_submodule(name)
            layer = lk.layers.LAYERS["lora"][type(module)].from_module(copy.deepcopy(module), rank=r)
            assert sum(p.numel() for p in layer.adapter_parameters()) == lk.lora_parameter_count(module, r)
    grouped = cnn()  # its second conv has groups=2
    plan = lk.ranks_for_budget(grouped, "lora", match_lora_rank=4)
    assert plan.kwargs["rank"] >= 4 and plan.total < plan.budget
    assert "rank 4" in str(lk.ranks_for_budget(dense, "lora", match_lora_rank=4))
