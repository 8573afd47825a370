"""The one strict-document reader (edge_runtime/strict.py) as each document uses it: an unknown key, a bool where
a number goes, a value out of range and a wrong type are refused with the file (or message) and the key named."""
from __future__ import annotations

import copy
import json
import shutil

import pytest
import yaml

from edge_runtime import strict
from edge_runtime.bundle import BundleError, load_bundle
from edge_runtime.config.service_config import ConfigError as ServiceConfigError, load_service_config
from edge_runtime.fleet.messages import Rejected, parse_result
from edge_runtime.fleet.rollout_message import MessageError, parse
from edge_runtime.preprocess import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from train.config import DEFAULT_CONFIG, ConfigError, config_from_dict, load_config


def test_the_reader_names_every_problem_and_converts():
    spec = strict.Keys({"t": strict.Number(0, 1), "n": strict.Field(strict.Number(integer=True, above=0), 3),
                        "xs": strict.ListOf(strict.Text())})
    assert strict.read({"t": 1, "xs": ["a"]}, spec) == {"t": 1.0, "n": 3, "xs": ["a"]}
    found = strict.problems({"t": True, "n": 0, "xs": ["a", 2], "z": 1}, spec, root="doc")
    assert found == ["doc: unknown key 'z' (allowed: t, n, xs)", "doc.t must be a number in [0, 1], got true",
                     "doc.n must be an integer > 0, got 0", "doc.xs[1] must be text, got 2"]
    with pytest.raises(strict.StrictError, match=r"^f.yaml: missing key 't'; xs must be a list, got \{\}$"):
        strict.read({"xs": {}}, spec, "f.yaml")
    for bad in (float("nan"), float("inf"), "1", None, True):
        assert strict.problems(bad, strict.Number()) != []


# ---- the manifest ------------------------------------------------------------------------------------------

def _bundle(tiny_bundle_v2, tmp_path, edit):
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle_v2, b)
    m = yaml.safe_load((b / "manifest.yaml").read_text())
    edit(m)
    (b / "manifest.yaml").write_text(yaml.safe_dump(m, sort_keys=False))
    return b


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["gating"].update(threshold=0.5), "gating: unknown key 'threshold'"),
    (lambda m: m["gating"].update(stage1_threshold=True), "gating.stage1_threshold must be a number in [0, 1], got true"),
    (lambda m: m["gating"].update(stage2_review_floor=1.5),
     "gating.stage2_review_floor must be a number in [0, 1], got 1.5"),
    (lambda m: m["variants"]["int8"]["stage1"].update(bytes="many"),
     'variants.int8.stage1.bytes must be an integer >= 0, got "many"'),
    (lambda m: m["stages"]["stage1"]["head"].update(colour="red"), "stages.stage1.head: unknown key 'colour'"),
])
def test_the_manifest_is_strict(tiny_bundle_v2, tmp_path, edit, message):
    b = _bundle(tiny_bundle_v2, tmp_path, edit)
    with pytest.raises(BundleError) as exc:
        load_bundle(b)
    assert str(exc.value).startswith(f"{b / 'manifest.yaml'}: ") and message in str(exc.value)


def test_a_stage_image_size_that_is_not_its_model_input_is_refused(tiny_bundle_v2, tmp_path):
    size = load_bundle(tiny_bundle_v2).image_sizes[1]
    b = _bundle(tiny_bundle_v2, tmp_path, lambda m: m["stages"]["stage1"].update(image_size=[size[0] + 1, size[1]]))
    with pytest.raises(BundleError, match=r"stages\.stage1\.image_size .* does not match the Stage-1 model's input"):
        load_bundle(b)
    # absent (older bundles), it is taken from the model
    b = _bundle(tiny_bundle_v2, tmp_path / "2", lambda m: m["stages"]["stage2"].pop("image_size"))
    assert load_bundle(b).image_sizes[1] == size


def test_the_reference_bundle_writes_image_sizes_that_match():
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent / "models" / "real-lite0"
    b = load_bundle(root)
    assert {n: tuple(b.manifest["stages"][f"stage{n}"]["image_size"]) for n in (1, 2)} == b.image_sizes


# ---- the training config -----------------------------------------------------------------------------------

@pytest.fixture()
def raw():
    return yaml.safe_load(DEFAULT_CONFIG.read_text())


@pytest.mark.parametrize("where, value, message", [
    (("gating", "colour"), 1, "gating: unknown key 'colour'"),
    (("gating", "target_defect_recall"), True, "gating.target_defect_recall must be a number in (0, 1], got true"),
    (("audit", "near_duplicate_correlation"), 1.5, "audit.near_duplicate_correlation must be a number in (0, 1]"),
    (("audit", "max_image_pixels"), DEFAULT_MAX_PIXELS + 1,
     f"audit.max_image_pixels must be an integer in (0, {DEFAULT_MAX_PIXELS}]"),
    (("profiles", "real", "batch_size"), "32", 'profiles.real.batch_size must be an integer, got "32"'),
])
def test_the_training_config_is_strict(tmp_path, raw, where, value, message):
    node = raw
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value).startswith(f"{path}: ") and message in str(exc.value)


def test_the_audit_limits_are_the_runtime_decode_limits(raw):
    cfg = config_from_dict(copy.deepcopy(raw))
    assert (cfg.audit.max_image_pixels, cfg.audit.max_file_bytes) == (DEFAULT_MAX_PIXELS, DEFAULT_MAX_BYTES)
    del raw["audit"]["max_image_pixels"], raw["audit"]["max_file_bytes"]
    cfg = config_from_dict(raw)
    assert (cfg.audit.max_image_pixels, cfg.audit.max_file_bytes) == (DEFAULT_MAX_PIXELS, DEFAULT_MAX_BYTES)


def test_the_taxonomy_rule_is_shared(raw):
    raw["taxonomy"]["defects"] = [*raw["taxonomy"]["defects"], "cracks"]
    with pytest.raises(ConfigError, match="taxonomy must be at least two distinct class names"):
        config_from_dict(raw)


# ---- the service config ------------------------------------------------------------------------------------

@pytest.mark.parametrize("line, message", [
    ("colour: red", "unknown key 'colour'"),
    ("settle_seconds: true", "settle_seconds must be a number >= 0, got true"),
    ("shadow_fraction: 1.5", "shadow_fraction must be a number in [0, 1], got 1.5"),
    ("max_pending: 2.5", "max_pending must be an integer > 0, got 2.5"),
    ("leave_in_place: 1", "leave_in_place must be true or false, got 1"),
])
def test_the_service_config_is_strict(tmp_path, line, message):
    path = tmp_path / "service.yaml"
    path.write_text(f"models: m\nwatch: w\n{line}\n")
    with pytest.raises(ServiceConfigError) as exc:
        load_service_config(path)
    assert str(exc.value).startswith(f"{path}: ") and message in str(exc.value)


# ---- the messages ------------------------------------------------------------------------------------------

RESULT = {"id": 7, "board": "tool-01", "outcome": "inspected", "name": "a.png", "recorded_at": "2026-12-01T10:00:00Z",
          "label": "clean", "stage1_score": 0.1, "confidence": 0.9, "review": False}


@pytest.mark.parametrize("change, message", [
    ({"stage1_score": True}, "stage1_score must be a number in [0, 1], got true"),
    ({"confidence": 1.5}, "confidence must be a number in [0, 1], got 1.5"),
    ({"id": "7"}, 'id must be an integer in [1, 9223372036854775807], got "7"'),
    ({"review": 0}, "review must be true or false, got 0"),
    ({"stage2_probs": {"cracks": True}}, "stage2_probs.cracks must be a number in [0, 1], got true"),
])
def test_a_result_message_is_strict(change, message):
    with pytest.raises(Rejected) as exc:
        parse_result("tool-01", json.dumps({**RESULT, **change}).encode())
    assert message in str(exc.value)
    assert parse_result("tool-01", json.dumps({**RESULT, "newer_key": 1}).encode()).id == 7   # a newer board's key


ROLLOUT = {"action": "rollout", "id": "r-1", "bundle_id": "a" * 64, "sha256": "b" * 64, "bytes": 1000,
           "url": "https://files.fab.local/b.tar",
           "signature": {"format": "f", "algorithm": "ed25519", "key_id": "0" * 16, "signature": "c2ln"}}


@pytest.mark.parametrize("change, message", [
    ({"bounds": {"max_error": 0.1}}, "bounds: unknown key 'max_error'"),
    ({"bounds": {"min_agreement": True}}, "bounds.min_agreement must be a number in [0, 1], got true"),
    ({"shadow": {"fraction": 0}}, "shadow.fraction must be a number in [0.001, 1], got 0"),
    ({"shadow": {"minutes": "5"}}, 'shadow.minutes must be a number in [0.01, 10080], got "5"'),
])
def test_a_rollout_message_is_strict(change, message):
    with pytest.raises(MessageError) as exc:
        parse(json.dumps({**ROLLOUT, **change}).encode())
    assert message in str(exc.value)
