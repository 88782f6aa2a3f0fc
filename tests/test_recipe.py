"""examples/finetune_digits.py runs end to end (short: 2 seeds, 1 epoch) and compares the methods at
LoRA's budget. Marked slow (it pretrains a network first)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("sklearn.datasets")
pytestmark = pytest.mark.slow

RECIPE = Path(__file__).resolve().parent.parent / "examples" / "finetune_digits.py"


def test_recipe_runs_and_matches_budgets(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("finetune_digits", RECIPE)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    out = tmp_path / "digits"
    recipe.main(["--seeds", "2", "--epochs", "1", "--timing-rounds", "2", "--out", str(out)])
    result = json.loads(out.with_suffix(".json").read_text())
    rows = {r["method"]: r for r in result["summary"]}
    assert list(rows) == recipe.METHODS
    assert all(len(result["runs"][m]) == 2 for m in recipe.METHODS)
    budget = rows["lora"]["trainable"]
    for method in ("flora", "liera_exp", "liera_first_order"):
        assert rows[method]["trainable"] <= budget
    assert rows["liera_exp"]["trainable"] == budget  # LieRA's lora delta counts as PEFT's LoRA here
    assert rows["head"]["trainable"] == 64 * 5 + 5 < rows["ssl"]["trainable"] < budget < rows["full"]["trainable"]
    assert all(0.0 <= r["accuracy_mean"] <= 1.0 and r["step_ms"] > 0 for r in rows.values())
    assert out.with_suffix(".md").read_text().startswith("Digits 5-9")
    if importlib.util.find_spec("matplotlib") is not None:
        assert out.with_suffix(".png").stat().st_size > 0
    else:  # the plot is optional: the recipe says so and writes everything else
        assert not out.with_suffix(".png").exists()
        assert "matplotlib is not installed: no plot" in capsys.readouterr().out
