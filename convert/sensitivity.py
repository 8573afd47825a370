"""python -m convert sensitivity --run runs/NAME [--stage 1|2] [--calibration N] [--images N] [--top K]

Which layers lose the most to int8: TFLite's QuantizationDebugger runs the float and the quantized op side by
side on real images and reports, per quantized tensor, the RMSE of the dequantized result against float
in units of its quantization step (rmse/scale; ~0.29 is the floor of plain rounding, far above it means the
layer's range or per-tensor scale does not suit its values). What is quantized is what `--int8` quantizes:
each stage's backbone (the stage model up to its pooling; the dense head runs in float, in numpy, on the
board), calibrated as `--int8` does, on images at that stage's own input size.
Writes RUN/quant_sensitivity_stageN.csv and prints the worst layers.
"""
from __future__ import annotations

import argparse
import csv
import io
import logging
import sys

import numpy as np

log = logging.getLogger("convert.sensitivity")
ROUNDING_FLOOR = 1 / np.sqrt(12)   # rmse/scale of ideal rounding of a uniform value


def layer_sensitivity(model, calibration: np.ndarray, debug_images: np.ndarray) -> list[dict]:
    """Per quantized tensor: op, tensor name, rmse/scale, mean error; sorted worst first."""
    import tensorflow as tf

    def representative():
        for img in calibration:
            yield [img[None].astype(np.float32)]

    def debug_set():
        for img in debug_images:
            yield [img[None].astype(np.float32)]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    debugger = tf.lite.experimental.QuantizationDebugger(converter=converter, debug_dataset=debug_set)
    debugger.run()
    buffer = io.StringIO()
    debugger.layer_statistics_dump(buffer)
    rows = []
    for r in csv.DictReader(io.StringIO(buffer.getvalue())):
        scale = float(r["scale"])
        rmse = float(np.sqrt(float(r["mean_squared_error"])))
        rows.append({"op": r["op_name"], "tensor": r["tensor_name"], "elements": int(float(r["num_elements"])),
                     "rmse_over_scale": rmse / scale if scale > 0 else float("nan"),
                     "mean_error": float(r["mean_error"]), "scale": scale})
    rows.sort(key=lambda r: -np.nan_to_num(r["rmse_over_scale"], nan=-1))
    return rows


def main(argv: list[str] | None = None) -> int:
    from convert import calibration as calib
    from convert.export import split_stage_model
    from train.runs import RunError, load_models, read_run

    p = argparse.ArgumentParser(prog="python -m convert sensitivity", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, metavar="runs/NAME")
    p.add_argument("--stage", type=int, choices=[1, 2], action="append", help="default: both")
    p.add_argument("--calibration", type=int, default=200, help="calibration images (as --int8)")
    p.add_argument("--images", type=int, default=32, help="val images the float and int8 layers are compared on")
    p.add_argument("--top", type=int, default=10, help="layers to print")
    args = p.parse_args(argv)
    stages = args.stage or [1, 2]
    try:
        run = read_run(args.run)
        load_models(run)
        sets = {}
        for size in sorted({run.image_size_of(n) for n in stages}):   # the same files at each stage's size
            cal = calib.select(run.rows("train"), args.calibration, size, run.seed, resolve=run.resolve)
            debug = calib.select(run.rows("val"), args.images, size, run.seed, split="val", resolve=run.resolve)
            sets[size] = (calib.anchor_input_range(cal.images)[0], debug.images)
        backbones = {n: split_stage_model(run.models[n], run.stage1_classes if n == 1 else run.stage2_classes)[0]
                     for n in stages}
    except (RunError, calib.CalibrationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:           # not a stage model convert can split (no "gap" pooling layer)
        print(f"error: {run.path}: {exc}", file=sys.stderr)
        return 2
    for stage in stages:
        representative, debug_images = sets[run.image_size_of(stage)]
        rows = layer_sensitivity(backbones[stage], representative, debug_images)
        out = run.path / f"quant_sensitivity_stage{stage}.csv"
        with out.open("w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        print(f"Stage {stage} backbone at {run.image_size_of(stage)}x{run.image_size_of(stage)}: {len(rows)} "
              f"quantized tensors; worst by rmse/scale "
              f"(rounding alone gives {ROUNDING_FLOOR:.2f}); all in {out}")
        for r in rows[:args.top]:
            print(f"  {r['rmse_over_scale']:8.2f}  {r['op']:<20} {r['tensor'][:90]}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
