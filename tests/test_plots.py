"""Figures are written from what the trainer logs, whatever signs the statistics take."""

import csv
import warnings

from bvpo.plots import gradient_telemetry


def test_gradient_plot_with_no_positive_bias_gap_writes_png_without_warnings(tmp_path):
    # The noise-corrected bias gap is <= 0 on every step of a short run (seen on an H200 in
    # gpu_scale.py): a log axis then has nothing to show and matplotlib warns.
    rows = [{"step": s, "alpha": 0.5, "alpha_star": 0.3, "grad/var_think": 2.0 + s, "grad/var_nothink": 1.0,
             "grad/var_mixed": 0.8, "grad/bias_gap_sq": -0.5 - s} for s in range(3)]
    csv_dir = tmp_path / "train"
    csv_dir.mkdir()
    with open(csv_dir / "bvpo_auto.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gradient_telemetry(csv_dir, tmp_path / "gradients.png")
    assert (tmp_path / "gradients.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
