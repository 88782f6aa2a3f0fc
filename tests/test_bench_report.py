"""The main job's summary, Markdown report and plot, on made-up rows whose answers are known, and
one short real run of ``bench.run`` end to end."""
from __future__ import annotations

import json
import math

import pytest

from bench import report, run, summary

SHAPES = ("resnet50/a", "resnet50/b", "linear/c")
# fwd+bwd ms per provider and shape
TIMES = {
    "frozen": (1.0, 2.0, 4.0),
    "full_ft": (2.0, 2.0, 8.0),
    "torch_lora": (4.0, 4.0, 4.0),
    "peft_lora": (3.0, None, 6.0),  # refused on the second shape
    "flora_reference": (2.0, 8.0, 4.0),
    "flora_reference:merged": (3.0, 8.0, 5.0),
    "flora_reference:two_branch": (4.0, 9.0, 6.0),
    "flora_reference:bypass": (2.0, 6.0, 8.0),
    "flora_reference:hybrid": (5.0, 9.0, 7.0),  # never the fastest here
    "ssl_native": (1.0, 4.0, 4.0),
}
KEPT = {"frozen": 2.0, "full_ft": 2.0, "torch_lora": 3.0, "peft_lora": 3.0, "flora_reference": 4.0,
        "flora_reference:merged": 4.0, "flora_reference:two_branch": 4.0, "flora_reference:bypass": 2.0, "flora_reference:hybrid": 4.0,
        "ssl_native": 1.0}
META = {"mode": "cpu", "device": "Test CPU", "cpu_threads": 1, "dtype": "float32", "torch": "2.x",
        "repeats": 10, "warmup": 3, "shape_scaling": "test shapes"}


def made_up_rows() -> list:
    rows = []
    for provider, times in TIMES.items():
        for shape, ms in zip(SHAPES, times):
            if ms is None:
                rows.append(report.Row(shape, provider, status="skipped", note="refused"))
                continue
            strategy = "merged" if provider == "flora_reference" and shape == "linear/c" else "bypass"
            strategy = "" if provider in ("frozen", "full_ft") else strategy  # as bench.run leaves them
            rows.append(report.Row(shape, provider, strategy=strategy, ms={"fwd": ms / 2, "bwd": ms / 2, "fwd_bwd": ms},
                                   kept_mib={"total": KEPT[provider] * (1 + SHAPES.index(shape))}))
    floors = {r.shape: r for r in rows if r.provider == "frozen"}
    for r in rows:
        r.set_ratios(floors[r.shape])
    return rows


def geomean(*values):
    return math.exp(sum(map(math.log, values)) / len(values))


def test_summary_is_the_geometric_mean_of_per_shape_ratios():
    rows = summary.Rows(made_up_rows())
    lines = {line.provider: line for line in summary.summary_lines(rows, "torch_lora")}
    flora = lines["flora_reference"]
    assert (flora.method, flora.backend, flora.strategy, flora.shapes) == ("flora", "reference", "auto", 3)
    assert flora.x_frozen == pytest.approx(geomean(2 / 1, 8 / 2, 4 / 4))
    assert flora.x_full_ft == pytest.approx(geomean(2 / 2, 8 / 2, 4 / 8))
    assert flora.x_lora == pytest.approx(geomean(2 / 4, 8 / 4, 4 / 4))
    assert flora.kept_x_frozen == pytest.approx(2.0)
    # a provider that did not run on a shape is averaged over the shapes where it ran, and says so
    assert lines["peft_lora"].shapes == 2
    assert lines["peft_lora"].x_frozen == pytest.approx(geomean(3 / 1, 6 / 4))
    # only auto providers and the baselines: the forced strategies have their own table
    assert "flora_reference:merged" not in lines
    assert list(lines) == ["frozen", "full_ft", "torch_lora", "peft_lora", "flora_reference", "ssl_native"]
    assert lines["full_ft"].method == "full fine-tuning" and lines["ssl_native"].backend == "native"


def test_strategy_table_compares_auto_with_the_fastest_forced_strategy():
    rows = summary.Rows(made_up_rows())
    ((method, backend, x_frozen, auto_over_best),) = summary.strategy_lines(rows)
    assert (method, backend) == ("flora", "reference")
    assert x_frozen["bypass"] == pytest.approx(geomean(2 / 1, 6 / 2, 8 / 4))
    # per shape: auto / min(merged, two_branch, bypass) = 2/2, 8/6, 4/5
    assert auto_over_best == pytest.approx(geomean(1.0, 8 / 6, 4 / 5))
    # without every strategy that can run the method, "the best" is unknown: no figure
    partial = summary.Rows([r for r in made_up_rows() if r.provider != "flora_reference:two_branch"])
    assert summary.strategy_lines(partial)[0][3] is None


def test_lora_baseline_is_real_peft_where_it_ran_else_the_plain_one():
    rows = made_up_rows()
    assert summary.lora_baseline(summary.Rows(rows)) == "peft_lora"
    without_peft = [r for r in rows if r.provider != "peft_lora"]
    assert summary.lora_baseline(summary.Rows(without_peft)) == "torch_lora"
    assert summary.lora_baseline(summary.Rows(rows), "torch_lora") == "torch_lora"
    assert summary.lora_baseline(summary.Rows(without_peft), "peft_lora") is None
    text = summary.explanation(summary.Rows(rows), "peft_lora")
    assert "`peft_lora`, over the 2 shapes where it ran" in text


def test_markdown_report_has_the_summary_first_and_every_row():
    rows = made_up_rows()
    text = report.markdown_report(rows, META, [], "torch_lora")
    headings = [line for line in text.splitlines() if line.startswith("#")]
    assert headings[:3] == ["# One training step of one layer: CPU run", "## Summary",
                            "## Every shape: fwd+bwd time / frozen (lower is better)"]
    assert "### flora" in headings and "### ssl" in headings
    assert "| resnet50/a | 1.000 | 2.00 | 4.00 [bypass] | 3.00 [bypass] |" in text  # a LoRA baseline says what it ran
    assert "| resnet50/a | 1.000 | 2.00 [bypass] | 3.00 | 4.00 | 2.00 |" in text  # a forced strategy needs no label
    for row in rows:
        if row.status == "ok":
            assert f"{row.ratio_to_frozen['fwd_bwd']:.2f}" in text
    # every table line has as many cells as its header
    for block in text.split("\n\n"):
        lines = [line for line in block.splitlines() if line.startswith("|")]
        assert len({line.count("|") for line in lines}) <= 1, block
    assert report.summary_markdown(rows, META, "torch_lora").startswith("# Summary of a CPU run")


def test_aligned_text_table():
    text = report.format_table(("name", "x"), [("a", "1.00"), ("long name", "10.00")])
    lines = text.splitlines()
    assert len({len(line) for line in lines}) == 1 and lines[2].startswith("a ") and lines[3].endswith("10.00")


def test_plot_has_one_panel_per_method_and_says_what_it_shows():
    pytest.importorskip("matplotlib")
    import matplotlib
    matplotlib.use("Agg")
    from bench import plot

    fig = plot.figure(made_up_rows(), META, "torch_lora")
    axes = fig.axes
    assert [ax.get_title(loc="left") for ax in axes] == [
        summary.BASELINE_GROUP, "flora: every backend and strategy", "ssl: every backend and strategy"]
    title = fig._suptitle.get_text()
    assert "lower is better" in title and "Test CPU" in title and "float32" in title and "test shapes" in title
    for ax in axes:
        assert ax.get_yscale() == "log"
        assert plot.FROZEN_LABEL in [t.get_text() for t in ax.texts]
        assert any(list(line.get_ydata()) == [1.0, 1.0] for line in ax.get_lines())  # the frozen line
        series = [line for line in ax.get_lines() if line.get_label() and not line.get_label().startswith("_")]
        colours = [matplotlib.colors.to_hex(line.get_color()) for line in series]
        assert len(colours) == len(set(colours)), ax.get_title(loc="left")
    flora = {line.get_label(): line for line in axes[1].get_lines()}
    assert list(flora["reference, auto (default)"].get_ydata()) == [2.0, 4.0, 1.0]
    assert "full_ft: full fine-tuning" in flora and "torch_lora: the LoRA baseline" in flora
    # the same backend and strategy has the same colour in every method's panel
    ssl = {line.get_label(): line.get_color() for line in axes[2].get_lines()}
    assert ssl["native, auto (default)"] != flora["reference, auto (default)"].get_color()


def test_short_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "r.json"
    status = run.main(["--shapes", "linear/4096-1024_t4096", "--providers", "full_ft,torch_lora,ssl_reference",
                       "--strategies", "auto,merged", "--warmup", "0", "--repeats", "2", "--verify", "--no-plot",
                       "--out", str(out)])
    assert status == 0
    printed = capsys.readouterr().out
    assert len(printed.splitlines()) < 40, printed  # one line per shape, then the summary
    document = json.loads(out.read_text())
    assert {r["provider"] for r in document["results"]} == {"frozen", "full_ft", "torch_lora", "ssl_reference",
                                                           "ssl_reference:merged"}
    assert all(r["status"] == "ok" and r["kept_mib"]["total"] > 0 for r in document["results"])
    assert all(c["status"] == "ok" for c in document["verify"])
    assert document["summary"]["lora_baseline"] == "torch_lora"
    assert document["meta"]["wall_s"] > 0 and "timing_s" in document["meta"]
    summary_text = (tmp_path / "r_summary.md").read_text()
    assert "| ssl_reference | ssl | reference | 1 |" in summary_text
    assert out.with_suffix(".md").read_text().startswith("# One training step of one layer")
    assert "== summary ==" in printed and "time: " in printed


def test_plot_colours_stay_distinct_with_every_cuda_route():
    """On CUDA a method has 4 backends x 4 strategies: 16 series in one panel, none the same colour."""
    pytest.importorskip("matplotlib")
    import matplotlib
    matplotlib.use("Agg")
    from bench import plot

    rows = [report.Row("linear/c", "frozen", ms={"fwd_bwd": 1.0}), report.Row("linear/c", "full_ft", ms={"fwd_bwd": 2.0})]
    providers = [f"flora_{route}" + (f":{st}" if st != "auto" else "")
                 for route in ("reference", "native", "triton", "compiled")
                 for st in ("auto", "merged", "two_branch", "bypass")]
    rows += [report.Row("linear/c", p, ms={"fwd_bwd": 1.0 + i / 10}) for i, p in enumerate(providers)]
    for r in rows:
        r.set_ratios(rows[0])
    fig = plot.figure(rows, {**META, "mode": "cuda"}, None)
    flora = fig.axes[-1]
    colours = [matplotlib.colors.to_hex(line.get_color()) for line in flora.get_lines()
               if line.get_label().startswith(("reference", "native", "triton", "compiled"))]
    assert len(colours) == 16 == len(set(colours))
