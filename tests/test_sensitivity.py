"""python -m convert sensitivity: per-layer int8 error of a real (tiny) run, measured against float."""
from __future__ import annotations

import csv

import pytest

from test_convert import make_run


def test_sensitivity_ranks_quantized_layers_of_both_stages(tmp_path, capsys):
    from convert.cli import main

    run = make_run(tmp_path)
    assert main(["sensitivity", "--run", str(run), "--calibration", "16", "--images", "4", "--top", "3"]) == 0
    printed = capsys.readouterr().out
    for stage in (1, 2):
        rows = list(csv.DictReader((run / f"quant_sensitivity_stage{stage}.csv").open()))
        ops = {r["op"] for r in rows}
        assert "CONV_2D" in ops and "FULLY_CONNECTED" in ops, ops
        errors = [float(r["rmse_over_scale"]) for r in rows]
        assert errors == sorted(errors, reverse=True)          # worst first
        assert errors[0] > 0.05                                 # a real measurement, not zeros
        assert f"Stage {stage}: {len(rows)} quantized tensors" in printed


def test_sensitivity_on_a_missing_run_is_a_clear_error(tmp_path, capsys):
    from convert.cli import main

    assert main(["sensitivity", "--run", str(tmp_path / "nope")]) == 2
    assert "error:" in capsys.readouterr().err
