"""`bayesflat compare` shows every run's gradient budget and warns when budgets differ."""

import numpy as np

from bayesflat import report
from bayesflat import trace as btrace
from bayesflat.cli import main


def _summary(steps, estimator="plain", **extra):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 30)
    logits = rng.normal(size=(4, 8, 30, 3)) + 3.0 * np.eye(3)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    trace = btrace.build_trace(
        posterior={"w": rng.normal(size=(4, 8, 2))},
        sample_stats={"lp": rng.normal(size=(4, 8))},
        predictions={"test": probs}, observed_data={"test": labels},
        attrs={"sampler": "sgld", "temperature": 1.0, "burn_in": 100, "draws": 8, "thin": 10,
               "planned_steps": steps, "estimator": estimator, "num_data": 100, **extra},
    )  # fmt: skip
    return report.build_report(trace, figures=False)


def test_equal_budgets_within_ten_percent_do_not_warn():
    a, b = _summary(3000), _summary(3300)
    comparison = report.compare({"a": a.summary, "b": b.summary})
    header, rows = comparison.rows()
    column = header.index("grad. evals/chain")
    assert [row[column] for row in rows] == ["3,000", "3,300"]
    assert comparison.summary["budget_warning"] is None
    assert "WARNING" not in comparison.table()


def test_unequal_budgets_warn_in_the_table_json_and_html(tmp_path):
    sgld = _summary(3000)
    # a cyclical sampler's exploration steps count: 10,000 steps, two evaluations each
    sam = _summary(10_000, estimator="sharpness_aware")
    fsgld = _summary(3000, estimator="coupled_perturbation", num_perturbations=2,
                     antithetic=True, clean_weight=0.0)  # fmt: skip
    runs = {"sgld": sgld.summary, "sam": sam.summary, "fsgld": fsgld.summary}
    comparison = report.compare(runs)
    header, rows = comparison.rows()
    column = header.index("grad. evals/chain")
    assert [row[column] for row in rows] == ["3,000", "20,000", "12,000"]
    warning = comparison.summary["budget_warning"]
    assert "6.67x" in warning and "sam (20000)" in warning and "sgld (3000)" in warning
    assert comparison.table().splitlines()[-1].startswith("WARNING: the runs differ in budget")
    assert "Warning:</b> the runs differ in budget" in comparison.to_html()
    for name, rep in (("sgld", sgld), ("sam", sam)):
        rep.save(tmp_path / name)
    assert main(["compare", str(tmp_path / "sgld"), str(tmp_path / "sam"),
                 "--output", str(tmp_path / "cmp")]) == 0  # fmt: skip


def test_cli_compare_prints_the_budget_warning(tmp_path, capsys):
    for name, steps in (("a", 3000), ("b", 4000)):
        _summary(steps).save(tmp_path / name)
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"),
                 "--output", str(tmp_path / "cmp")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "WARNING: the runs differ in budget: 1.33x" in out
