"""python -m train tta: flip averaging evaluated against the plain run, with the threshold recalibrated."""
from __future__ import annotations

import json

import numpy as np

from tests.support.runs import make_run


class Recorder:
    """A stand-in model that returns the mean of the left half minus the right half: flips change it."""
    def predict(self, x, batch_size=None, verbose=0):
        w = x.shape[2] // 2
        return (x[:, :, :w].mean(axis=(1, 2, 3)) - x[:, :, w:].mean(axis=(1, 2, 3)))[:, None]


def test_flip_average_uses_the_image_axes():
    from train.tta import predict

    x = np.zeros((1, 4, 4, 3), np.float32)
    x[0, :, :2] = 10.0                                 # bright left half
    assert predict(Recorder(), x, ["none"])[0, 0] == 10.0
    assert predict(Recorder(), x, ["lr"])[0, 0] == -10.0    # left-right flip swaps the halves
    assert predict(Recorder(), x, ["ud"])[0, 0] == 10.0     # up-down flip does not
    assert predict(Recorder(), x, ["none", "lr"])[0, 0] == 0.0


def test_tta_command_reports_plain_and_flipped(tmp_path, capsys):
    from train.__main__ import main

    run = make_run(tmp_path)
    assert main(["tta", "--run", str(run)]) == 0
    rows = json.loads((run / "tta.json").read_text())
    assert [r["invocations_per_stage"] for r in rows] == [1, 4]
    assert rows[0]["flips"] == ["none"] and rows[1]["flips"] == ["none", "lr", "ud", "both"]
    assert all(0 < r["macro_f1"] for r in rows)        # a trained tiny run decides something
    assert "| flips none+lr+ud+both | 4 |" in capsys.readouterr().out
    assert main(["tta", "--run", str(tmp_path / "missing")]) == 2
