"""Aviary's drift statistics checked against SciPy on the same samples.

A demo version whose model card has `[drift]` with a reference file is served by the
real binary; reference-like and shifted rows are sent with tritonclient; `aviary ctl
drift --json` reports each feature's KS statistic and p-value, Benjamini-Hochberg
adjusted p-values, PSI, and the chi-square test of the predicted labels (the card
lists `label` in `classes`). The same
numbers are computed here with `scipy.stats.ks_2samp` (method="asymp", the asymptotic
distribution Aviary uses), `scipy.stats.false_discovery_control`,
`scipy.stats.chi2_contingency` and NumPy, and must agree to 1e-6.
"""

from __future__ import annotations

import json
import queue
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from scipy import stats

from test_tritonclient import MODELS, _pump, _stop, aviary_bin

LISTENING = re.compile(r"^aviary: (admin )?listening on (127\.0\.0\.1:\d+)$")
FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
MEAN = np.array([5.8, 3.0, 3.8, 1.2])
SD = np.array([0.8, 0.4, 1.7, 0.7])
TOLERANCE = 1e-6


def start(config: Path) -> tuple[subprocess.Popen, str, str]:
    """`aviary serve --config CONFIG` on port 0: the process, inference and admin addresses."""
    proc = subprocess.Popen(
        [str(aviary_bin()), "serve", "--config", str(config), "--listen", "127.0.0.1:0",
         "--admin-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_pump, args=(proc.stdout, lines.put), daemon=True).start()
    threading.Thread(target=_pump, args=(proc.stderr, lambda _: None), daemon=True).start()
    found: dict[str, str] = {}
    deadline = time.monotonic() + 60
    while len(found) < 2:
        if time.monotonic() > deadline or proc.poll() is not None:
            _stop(proc)
            pytest.fail(f"aviary did not start (found {found})")
        try:
            m = LISTENING.match(lines.get(timeout=0.2).rstrip())
        except queue.Empty:
            continue
        if m:
            found["admin" if m.group(1) else "inference"] = m.group(2)
    return proc, found["inference"], found["admin"]


@pytest.fixture(scope="module")
def drift_report(tmp_path_factory):
    """Serves demo 1 with a drift reference, sends the window, returns (reference,
    reference labels, window, the labels the window got, report)."""
    rng = np.random.default_rng(20261202)
    root = tmp_path_factory.mktemp("drift")
    version = root / "models" / "demo" / "1"
    version.mkdir(parents=True)
    shutil.copy(MODELS / "demo" / "1" / "model.onnx", version / "model.onnx")
    reference = MEAN + SD * rng.standard_normal((400, 4))
    reference_labels = rng.choice(3, size=400, p=[0.3, 0.3, 0.4])
    (version / "reference.json").write_text(json.dumps({
        "input": reference.tolist(),
        "label": [[int(label)] for label in reference_labels],
    }))
    (version / "model.toml").write_text(
        (MODELS / "demo" / "1" / "model.toml").read_text()
        + '\n[drift]\nreference = "reference.json"\nwindow = 300\nmin_samples = 50\nrows_per_request = 10\nclasses = ["label"]\n'
    )
    config = root / "aviary.toml"
    config.write_text(f'[repository]\npath = "{root / "models"}"\ninstances = 1\n')
    proc, inference, admin = start(config)
    try:
        # petal_length shifted by half a standard deviation; the rest as the reference.
        shift = np.array([0.0, 0.0, 0.5, 0.0])
        window = (MEAN + SD * (rng.standard_normal((300, 4)) + shift)).astype(np.float32)
        labels = []
        client = grpcclient.InferenceServerClient(url=inference)
        for rows in np.split(window, 30):
            inp = grpcclient.InferInput("input", list(rows.shape), "FP32")
            inp.set_data_from_numpy(rows)
            result = client.infer("demo", [inp], model_version="1")
            labels.extend(result.as_numpy("label").tolist())
        client.close()
        out = subprocess.run(
            [str(aviary_bin()), "ctl", "--admin", f"http://{admin}", "drift", "demo", "--json"],
            capture_output=True, text=True, timeout=60,
        )
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout)
    finally:
        _stop(proc)
    return reference, reference_labels, window.astype(np.float64), np.array(labels), report


def features(report: dict) -> list[dict]:
    (version,) = report["versions"]
    return version["features"]


def feature(report: dict, side: str, tensor: str, name: str) -> dict:
    return next(f for f in features(report)
                if f["side"] == side and f["tensor"] == tensor and f["feature"] == name)


def psi(reference: np.ndarray, current: np.ndarray, bins: int = 10) -> float:
    """PSI over reference-quantile bins, a value on an edge in the bin above it, empty
    bins at 1e-4 (as docs/metrics.md states)."""
    edges = np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1])
    def proportions(values):
        counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=bins)
        return np.maximum(counts / len(values), 1e-4)
    r, c = proportions(reference), proportions(current)
    return float(np.sum((c - r) * np.log(c / r)))


def test_ks_and_psi_of_every_input_feature_match_scipy(drift_report):
    reference, _, window, _, report = drift_report
    for column, name in enumerate(["column 0", "column 1", "column 2", "column 3"]):
        got = feature(report, "input", "input", name)
        want = stats.ks_2samp(reference[:, column], window[:, column], method="asymp")
        assert (got["reference"], got["window"]) == (400, 300), got
        assert abs(got["statistic"] - want.statistic) < TOLERANCE, (name, got, want)
        assert abs(got["p_value"] - want.pvalue) < TOLERANCE, (name, got, want)
        assert abs(got["psi"] - psi(reference[:, column], window[:, column])) < TOLERANCE, got


def test_benjamini_hochberg_matches_scipy_across_the_versions_tests(drift_report):
    *_, report = drift_report
    tested = [f for f in features(report) if f.get("p_value") is not None]
    adjusted = stats.false_discovery_control([f["p_value"] for f in tested], method="bh")
    for f, want in zip(tested, adjusted):
        assert abs(f["adjusted_p_value"] - want) < TOLERANCE, (f, want)


def test_only_the_shifted_feature_drifts(drift_report):
    *_, report = drift_report
    verdicts = {f["feature"]: f["verdict"] for f in features(report)
                if f["side"] == "input"}
    assert verdicts == {"column 0": "ok", "column 1": "ok", "column 2": "drift", "column 3": "ok"}


def test_predicted_labels_match_chi_square(drift_report):
    _, reference_labels, _, labels, report = drift_report
    got = feature(report, "output", "label", "predicted class")
    assert got["test"] == "chi-square", got
    classes = sorted(set(reference_labels.tolist()) | set(labels.tolist()))
    table = [[int(np.sum(reference_labels == c)) for c in classes],
             [int(np.sum(labels == c)) for c in classes]]
    want = stats.chi2_contingency(table, correction=False)
    assert abs(got["statistic"] - want.statistic) < TOLERANCE, (got, table)
    assert abs(got["p_value"] - want.pvalue) < TOLERANCE, (got, table)
    assert not any(f["tensor"] == "label" and f["test"] == "ks" for f in features(report)), \
        "a listed integer label is tested by its classes only"
