"""Reports: JSON fields and finite numbers, HTML content, rendering in Chromium, comparison."""

import base64
import json
import math
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from bayesflat import data as bdata
from bayesflat import metrics, models, predictive, report, sample
from bayesflat import trace as btrace

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ESTIMATE = re.compile(r"\d+\.\d{4} ± \d+\.\d{4}")


SHARES_SAMPLED = pytest.mark.xdist_group("test_report.sampled")
"""Tests that use ``sampled``: one xdist worker runs them all, so the fixture is built once
(``--dist loadgroup``)."""


@pytest.fixture(scope="module")
def sampled():
    digits = bdata.load_digits_split(val_size=0.1)
    sets = {"test": (digits.x_test, digits.y_test), "val": (digits.x_val, digits.y_val)}
    for name, x in bdata.ood_sets(digits, n=120).items():
        sets[f"ood_{name}"] = x
    torch.manual_seed(0)
    trace = sample(
        models.MLP(hidden=(32,)), (digits.x_train, digits.y_train), sampler="fsgld", chains=2,
        draws=3, burn_in=10, thin=2, eval_sets=sets, progress=False, lr=0.05, store_logits=True,
    )  # fmt: skip
    return trace, report.build_report(trace, n_boot=20)


def _synthetic(
    *, chains=3, draws=4, sampler="sgld", val=True, ood=True, temperature=1.0, claimed=None
):
    rng = np.random.default_rng(0)
    n, k = 50, 4
    labels = rng.integers(0, k, n)
    # Informative members: most mass on the true class.
    logits = rng.normal(size=(chains, draws, n, k)) + 3.0 * np.eye(k)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    predictions = {"test": probs}
    observed = {"test": labels}
    if val:
        predictions["val"], observed["val"] = probs[:, :, :30], labels[:30]
    if ood:
        predictions["ood_x"] = rng.dirichlet(np.ones(k), size=(chains, draws, 40))
    return btrace.build_trace(
        posterior={"w": rng.normal(size=(chains, draws, 3))},
        sample_stats={"lp": rng.normal(size=(chains, draws)),
                      "step_size": np.full((chains, draws), 0.01)},
        predictions=predictions, observed_data=observed,
        attrs={"sampler": sampler, "temperature": temperature, "chains": chains, "draws": draws,
               "burn_in": 10, "thin": 2, "num_data": 100, "seed": 0},
    )  # fmt: skip


def _metric_entries(node, path=""):
    if isinstance(node, dict):
        if set(node) == {"value", "mc_error"}:
            yield path, node
        else:
            for key, child in node.items():
                yield from _metric_entries(child, f"{path}/{key}")
    elif isinstance(node, list):
        for i, child in enumerate(node):
            yield from _metric_entries(child, f"{path}/{i}")


@SHARES_SAMPLED
def test_report_json_has_every_field_with_finite_numbers(sampled):
    _, rep = sampled
    s = json.loads(rep.to_json())
    assert s["format"] == report.FORMAT
    for key in (
        "sampler",
        "num_data",
        "temperature",
        "seed",
        "lr",
        "chains",
        "draws",
        "sigma_used",
    ):
        assert key in s["run"], key
    assert s["run"]["steps_per_chain"] == 10 + 3 * 2
    assert s["ensemble"]["kind"] == "bma" and s["mc_error"]["method"] == "batch"
    assert s["mc_error"]["chains"] == 2 and s["mc_error"]["few_chains"]
    assert "fewer than 4" in s["mc_error"]["description"]
    test = s["test"]
    assert set(test["metrics"]) == {"accuracy", "nll", "brier_score", "ece", "mce"}
    scaling = test["temperature_scaling"]
    assert scaling["fitted_on"] == "val" and set(scaling["metrics"]) == set(test["metrics"])
    rel = test["reliability"]
    assert len(rel["edges"]) == rel["n_bins"] + 1
    assert sum(rel["raw"]["count"]) == test["n"] == sum(rel["scaled"]["count"])
    assert set(s["ood"]) == {"ood_patches", "ood_noise"}
    for block in s["ood"].values():
        assert set(block["scores"]) == {"max_softmax", "entropy", "mutual_information", "energy"}
        for table in block["scores"].values():
            assert set(table) == {"auroc", "aupr_in", "aupr_out", "fpr95"}
    assert set(s["uncertainty"]) == {"test", "ood_patches", "ood_noise"}
    assert s["draws_curve"]["draws"] == [1, 2, 3]
    entries = list(_metric_entries(s))
    # 5 raw + 5 scaled + T; 5 uncertainties x 3 sets; 4 scores x 4 metrics x 2 sets; 3 x 3 curve
    assert len(entries) == 11 + 15 + 32 + 9
    for path, entry in entries:
        assert math.isfinite(entry["value"]), path
        assert math.isfinite(entry["mc_error"]) and entry["mc_error"] >= 0, path


@SHARES_SAMPLED
def test_report_numbers_match_the_metrics(sampled):
    trace, rep = sampled
    test = predictive.from_trace(trace, "test")
    assert rep.summary["test"]["metrics"]["nll"]["value"] == pytest.approx(
        metrics.nll(test.mean(), test.labels), rel=1e-12
    )
    val = predictive.from_trace(trace, "val")
    t = metrics.fit_temperature(np.log(val.mean()), val.labels)
    assert rep.summary["test"]["temperature_scaling"]["temperature"]["value"] == pytest.approx(t)
    ood = predictive.from_trace(trace, "ood_noise")
    expected = metrics.auroc(metrics.entropy_score(test.mean()), metrics.entropy_score(ood.mean()))
    got = rep.summary["ood"]["ood_noise"]["scores"]["entropy"]["auroc"]["value"]
    assert got == pytest.approx(expected, rel=1e-9)


@SHARES_SAMPLED
def test_html_embeds_images_and_tables(sampled):
    _, rep = sampled
    page = rep.to_html()
    assert page.startswith("<!DOCTYPE html>") and "</html>" in page
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == len(rep.figures) == 4 + 2 * 2
    assert all(base64.b64decode(img).startswith(PNG_SIGNATURE) for img in images)
    assert "http://" not in page and "https://" not in page
    assert page.count("<table>") >= 8
    headings = ("Run settings", "calibration", "Uncertainty decomposition",
                "Out-of-distribution detection", "number of draws", "Sampler traces")  # fmt: skip
    for heading in headings:
        assert heading in page
    assert "temperature-scaled" in page and "ood_patches" in page and "AUROC" in page
    assert len(ESTIMATE.findall(page)) > 50


@SHARES_SAMPLED
def test_save_writes_json_and_html(sampled, tmp_path):
    _, rep = sampled
    paths = rep.save(tmp_path / "out")
    assert json.loads(paths["json"].read_text()) == rep.summary
    assert paths["html"].read_text(encoding="utf-8") == rep.to_html()


@SHARES_SAMPLED
def test_headline_table_lists_accuracy_nll_ece_and_auroc(sampled):
    _, rep = sampled
    text = rep.headline()
    for label in ("Accuracy", "NLL", "ECE", "AUROC ood_patches", "AUROC ood_noise", "temp."):
        assert label in text
    assert len(ESTIMATE.findall(text)) >= 8


@SHARES_SAMPLED
@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_report_renders_in_headless_chromium(sampled, tmp_path):
    from PIL import Image

    _, rep = sampled
    html_path = rep.save(tmp_path)["html"]
    shot = tmp_path / "report.png"
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
         "--window-size=1280,4000", html_path.as_uri()],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    image = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert image.shape == (4000, 1280)
    # Text, tables and figures cover a good part of the page, all the way down.
    for band in np.array_split(image, 4):
        assert np.mean(band < 200) > 0.02


def test_final_ensemble_for_optimisers_and_cold_runs():
    rep = report.build_report(_synthetic(sampler="sgd", temperature=0.0), n_boot=10, figures=False)
    s = rep.summary
    assert s["ensemble"]["kind"] == "final" and s["mc_error"]["method"] == "runs"
    assert "mutual_information" not in s["ood"]["ood_x"]["scores"]
    assert "epistemic" not in s["uncertainty"]["test"]
    assert sum(s["test"]["reliability"]["raw"]["count"]) == 3 * 50
    assert "final iterate" in rep.to_html()
    cold = report.build_report(_synthetic(temperature=0.0), n_boot=10, figures=False)
    assert cold.summary["ensemble"]["kind"] == "final"
    bma = report.build_report(_synthetic(sampler="sgd"), ensemble="bma", n_boot=10, figures=False)
    assert bma.summary["ensemble"]["kind"] == "bma"


def test_report_without_validation_or_ood_sets():
    rep = report.build_report(_synthetic(chains=1, val=False, ood=False), n_boot=10, figures=False)
    s = rep.summary
    assert s["test"]["temperature_scaling"] is None and s["ood"] == {}
    assert s["mc_error"]["method"] == "batch" and s["mc_error"]["few_chains"]
    page = rep.to_html()
    assert "no temperature scaling" in page and "no OOD detection" in page
    assert "temp." not in rep.headline()


def test_report_rejects_traces_without_labelled_sets():
    trace = btrace.build_trace(
        posterior={"w": np.zeros((1, 2, 1))}, sample_stats={},
        predictions={"ood": np.full((1, 2, 3, 2), 0.5)},
    )  # fmt: skip
    with pytest.raises(ValueError, match="no labelled evaluation set"):
        report.build_report(trace)
    with pytest.raises(ValueError, match="not a labelled"):
        report.build_report(_synthetic(), test="ood_x")
    with pytest.raises(ValueError, match="held-out"):
        report.build_report(_synthetic(), val="test")


@SHARES_SAMPLED
def test_compare_puts_runs_side_by_side(sampled, tmp_path):
    _, rep = sampled
    other = report.build_report(
        _synthetic(sampler="sgd", temperature=0.0), n_boot=10, figures=False
    )
    other = other.summary
    with pytest.raises(ValueError, match=r"runs 'fsgld-run' and 'sgd-run' are scored on "
                       r"different test sets \(\d+ and 50 examples\)"):  # fmt: skip
        report.compare({"fsgld-run": rep.summary, "sgd-run": other})
    other = {**other, "test": {**rep.summary["test"], "metrics": other["test"]["metrics"]}}
    comparison = report.compare({"fsgld-run": rep.summary, "sgd-run": other})
    table = comparison.table()
    assert "fsgld-run" in table and "sgd-run" in table and "AUROC ood_patches" in table
    header, rows = comparison.rows()
    assert rows[1][header.index("AUROC ood_patches")] == "n/a"
    assert comparison.summary["ood_sets"] == ["ood_patches", "ood_noise", "ood_x"]
    paths = comparison.save(tmp_path)
    assert paths["png"].read_bytes().startswith(PNG_SIGNATURE)
    assert json.loads(paths["json"].read_text())["runs"][0]["name"] == "fsgld-run"
    assert "data:image/png;base64," in paths["html"].read_text(encoding="utf-8")


@SHARES_SAMPLED
def test_load_summary_reads_run_folders_json_and_traces(sampled, tmp_path):
    trace, rep = sampled
    rep.save(tmp_path / "run")
    assert report.load_summary(tmp_path / "run") == rep.summary
    assert report.load_summary(tmp_path / "run" / "metrics.json") == rep.summary
    btrace.save(trace, tmp_path / "t.nc")
    assert report.load_summary(tmp_path / "t.nc", n_boot=20) == json.loads(rep.to_json())
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a bayesflat report"):
        report.load_summary(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="neither"):
        report.load_summary(tmp_path)


@SHARES_SAMPLED
def test_report_carries_the_diagnostics_table(sampled):
    from bayesflat.diagnostics.report import diagnose

    trace, rep = sampled
    expected = diagnose(trace).to_dict()
    assert rep.summary["diagnostics"]["counts"] == expected["counts"]
    assert rep.summary["diagnostics"]["thresholds"] == expected["thresholds"]
    html = rep.to_html()
    assert 'id="diagnostics"' in html and 'href="#diagnostics"' in html
    assert "R-hat" in html


def test_report_counts_chains_and_draws_from_the_arrays():
    # A trace merged from one-chain runs keeps the first part's attributes (chains=1, draws=1
    # here); the report must count what the arrays hold.
    trace = _synthetic(chains=3, draws=4, claimed=1)
    rep = report.build_report(trace, n_boot=20)
    assert rep.summary["run"]["chains"] == 3
    assert rep.summary["run"]["draws"] == 4
    assert rep.summary["ensemble"]["chains"] == 3


@SHARES_SAMPLED
def test_figure_text_stays_inside_the_figure_and_panels_do_not_overlap(sampled, monkeypatch):
    """Fixed margins replace a layout engine: every label, tick label, title and legend must
    still fall inside its figure, and no two panels (with their labels) may overlap."""
    trace, _ = sampled
    figures = []
    png = report._png

    def keep(fig):
        figures.append(fig)
        return png(fig)

    monkeypatch.setattr(report, "_png", keep)
    report.build_report(trace, n_boot=20)
    assert len(figures) >= 6
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    for fig in figures:
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        renderer = canvas.get_renderer()
        # everything drawn (labels, tick labels in view, titles, legends), in inches
        drawn = fig.get_tightbbox(renderer)
        width, height = fig.get_size_inches()
        slack = 0.5 / fig.dpi
        assert drawn.x0 >= -slack and drawn.y0 >= -slack
        assert drawn.x1 <= width + slack and drawn.y1 <= height + slack
        boxes = [ax.get_tightbbox(renderer) for ax in fig.axes]
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                overlap_w = min(a.x1, b.x1) - max(a.x0, b.x0)
                overlap_h = min(a.y1, b.y1) - max(a.y0, b.y0)
                assert overlap_w <= 1.0 or overlap_h <= 1.0
