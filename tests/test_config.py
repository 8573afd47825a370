"""configs/default.yaml + train/config.py: strict loading, value checks, folder-name mapping."""
from __future__ import annotations

import copy

import pytest
import yaml

from train.config import DEFAULT_CONFIG, ConfigError, config_from_dict, load_config


@pytest.fixture()
def raw() -> dict:
    return yaml.safe_load(DEFAULT_CONFIG.read_text())


def write(tmp_path, data) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_default_config_loads():
    cfg = load_config()
    assert cfg.taxonomy.classes == ["clean", "bridges", "cracks", "opens", "shorts", "scratches", "vias", "other"]
    assert (cfg.split.train, cfg.split.val, cfg.split.test) == (0.70, 0.15, 0.15)
    assert cfg.audit.near_duplicate_correlation == 0.97
    assert isinstance(cfg.seed, int) and cfg.image_size == 224


def test_unknown_key_is_an_error(tmp_path, raw):
    raw["audit"]["near_dup_corr"] = 0.9
    with pytest.raises(ConfigError, match=r"cfg.yaml: audit: unknown key 'near_dup_corr'"):
        load_config(write(tmp_path, raw))
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw["sed"] = 1
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(write(tmp_path, raw))


def test_missing_key_is_an_error(raw):
    del raw["seed"]
    with pytest.raises(ConfigError, match=r"missing key 'seed'"):
        config_from_dict(raw)


@pytest.mark.parametrize("where, value, message", [
    (("seed",), "42", 'seed must be an integer, got "42"'),
    (("seed",), True, "seed must be an integer, got true"),
    (("image_size",), 224.5, "image_size must be an integer, got 224.5"),
    (("audit", "near_duplicate_correlation"), "high", "audit.near_duplicate_correlation must be a number"),
    (("taxonomy", "defects"), "bridges", "taxonomy.defects must be a list"),
    (("split",), [0.7, 0.15, 0.15], "split must be a mapping"),
    (("aliases",), {"cmp": 3}, r"aliases.cmp must be text, got 3"),
])
def test_wrong_type_is_an_error(raw, where, value, message):
    data = copy.deepcopy(raw)
    node = data
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


@pytest.mark.parametrize("defect", ["../../outside", "/abs", "Bridges", "two words", "", "x" * 40, "=1+1", "a/b"])
def test_class_names_follow_the_shared_rule(raw, defect):
    """Class names become folder names (edge_runtime/classnames.py): the training config refuses what a bundle
    or the review database would."""
    raw["taxonomy"]["defects"] = [*raw["taxonomy"]["defects"], defect]
    with pytest.raises(ConfigError, match=r"taxonomy.defects\[7\]: .* is not a class name"):
        config_from_dict(raw)


def test_bad_alias_target_is_an_error(raw):
    raw["aliases"]["blob"] = "blobs"
    with pytest.raises(ConfigError, match=r"aliases.blob: maps to 'blobs', which is not a taxonomy class"):
        config_from_dict(raw)


@pytest.mark.parametrize("split", [{"train": 0.7, "val": 0.2, "test": 0.2},
                                   {"train": 0.5, "val": 0.2, "test": 0.2},
                                   {"train": 1.0, "val": 0.0, "test": 0.0}])
def test_split_must_be_positive_and_sum_to_one(raw, split):
    raw["split"] = split
    with pytest.raises(ConfigError, match="split: fractions must be positive and sum to 1"):
        config_from_dict(raw)


def test_missing_or_invalid_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("taxonomy: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("folder, label", [
    ("clean", "clean"), ("Clean", "clean"), ("CLEAN_LAYER", "clean"), ("clean_via", "clean"), ("Clean-Crack", "clean"),
    ("bridge", "bridges"), ("Bridges", "bridges"), ("BRIDGE", "bridges"), ("crack", "cracks"), ("CRACK", "cracks"),
    ("open", "opens"), ("short", "shorts"), ("shorts", "shorts"), ("scratch", "scratches"), ("CMP", "scratches"),
    ("via", "vias"), ("VIA", "vias"), ("malformed_vias", "vias"), ("Malformed Vias", "vias"),
    ("LER", "other"), ("particle", "other"), ("Particles", "other"), ("others", "other"), ("OTHERS", "other"),
    ("Other", "other"),
])
def test_folder_names_map_to_taxonomy(folder, label):
    assert load_config().map_label(folder) == label


@pytest.mark.parametrize("folder", ["blobs", "defective", "unknown", "train"])
def test_unmapped_folder_names_give_none(folder):
    assert load_config().map_label(folder) is None


def test_profiles_name_their_backbone(raw):
    cfg = config_from_dict(copy.deepcopy(raw))
    assert cfg.profiles["real"].backbone == "efficientnet_lite0" and cfg.profiles["full"].backbone == "densenet121"
    for lite in ("efficientnet_lite1", "efficientnet_lite2"):
        raw["profiles"]["real"]["backbone"] = lite
        assert config_from_dict(copy.deepcopy(raw)).profiles["real"].backbone == lite
    raw["profiles"]["real"]["backbone"] = "resnet50"
    with pytest.raises(ConfigError, match=r"profiles.real.backbone: 'resnet50' is not one of"):
        config_from_dict(raw)
