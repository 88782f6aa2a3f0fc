"""examples/finetune_digits.py runs end to end (short: 2 seeds, 1 epoch; marked slow, it pretrains a
network first) and compares the methods at LoRA's budget; by default it writes where git does not
look, leaving the committed results alone."""
from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("sklearn.datasets")

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "examples" / "finetune_digits.py"


def load_recipe():
    spec = importlib.util.spec_from_file_location("finetune_digits", RECIPE)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    return recipe


def test_default_output_is_ignored_by_git_and_the_committed_results_need_a_flag(tmp_path):
    recipe = load_recipe()
    default = recipe.parse_args([]).out
    assert default.parent == ROOT / "examples" / "out"
    for suffix in (".json", ".md", ".png"):
        ignored = subprocess.run(["git", "check-ignore", "-q", str(default.with_suffix(suffix))], cwd=ROOT)
        assert ignored.returncode == 0, f"{default.with_suffix(suffix)} is not ignored by git"
    committed = recipe.parse_args(["--update-results"]).out
    assert committed == ROOT / "examples" / "results" / "finetune_digits"
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", str(committed.with_suffix(".md"))], cwd=ROOT,
                             capture_output=True)
    assert tracked.returncode == 0  # the flag writes the files the README shows
    assert recipe.parse_args(["--out", str(tmp_path / "x")]).out == tmp_path / "x"
    with pytest.raises(SystemExit):
        recipe.parse_args(["--out", str(tmp_path / "x"), "--update-results"])


@pytest.mark.slow
def test_recipe_runs_and_matches_budgets(tmp_path, capsys):
    recipe = load_recipe()
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
