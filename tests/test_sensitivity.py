"""python -m convert sensitivity: per-layer int8 error of a real (tiny) run, measured against float."""
from __future__ import annotations

import csv

from tests.support.runs import make_run


def test_sensitivity_ranks_quantized_layers_of_both_backbones_at_their_sizes(tmp_path, capsys):
    """What `--int8` quantizes: each stage's backbone (the dense head stays float, in numpy), fed at that
    stage's own input size (Stage 1 at 24x24 here, Stage 2 at 32x32)."""
    from convert.cli import main

    run = make_run(tmp_path, train_models=False, stage1_size=24)
    assert main(["sensitivity", "--run", str(run), "--calibration", "16", "--images", "4", "--top", "3"]) == 0
    printed = capsys.readouterr().out
    for stage, size in ((1, 24), (2, 32)):
        rows = list(csv.DictReader((run / f"quant_sensitivity_stage{stage}.csv").open()))
        ops = {r["op"] for r in rows}
        assert "CONV_2D" in ops and "FULLY_CONNECTED" not in ops, ops
        errors = [float(r["rmse_over_scale"]) for r in rows]
        assert errors == sorted(errors, reverse=True)          # worst first
        assert errors[0] > 0.05                                 # a real measurement, not zeros
        assert f"Stage {stage} backbone at {size}x{size}: {len(rows)} quantized tensors" in printed


def test_sensitivity_on_a_missing_run_is_a_clear_error(tmp_path, capsys):
    from convert.cli import main

    assert main(["sensitivity", "--run", str(tmp_path / "nope")]) == 2
    assert "error:" in capsys.readouterr().err
