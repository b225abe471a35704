"""Config: defaults < YAML < overrides, strict keys and types, errors that name the key."""

from __future__ import annotations

import pytest
import yaml

from medhier.config import Config, ConfigError, load_config


def test_defaults_yaml_overrides_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("preprocess:\n  image_size: 128\n  hflip: 0.0\ndata:\n  train_fraction: 0.6\n")
    cfg = load_config(str(path), ["preprocess.image_size=96", "dicom.windows.CT=bone"])
    assert cfg.preprocess.image_size == 96  # override beats YAML
    assert cfg.preprocess.hflip == 0.0  # YAML beats default
    assert cfg.data.train_fraction == 0.6
    assert cfg.data.val_fraction == 0.15  # default
    assert cfg.dicom.windows == {"CT": "bone"}


OVERRIDE_TYPES = [
    ("preprocess.image_size=128", ("preprocess", "image_size"), 128),
    ("preprocess.hflip=1", ("preprocess", "hflip"), 1.0),  # int -> float is lossless
    ("preprocess.rotation_deg=1e1", ("preprocess", "rotation_deg"), 10.0),  # YAML 1.1 reads 1e1 as text
    ("storage.s3_anonymous=true", ("storage", "s3_anonymous"), True),
    ("dicom.percentiles=[1, 99]", ("dicom", "percentiles"), [1.0, 99.0]),
    ("dicom.frames=all", ("dicom", "frames"), "all"),
    ("data.archive=s3://bucket/prefix", ("data", "archive"), "s3://bucket/prefix"),
    ("taxonomy.classes={a: [x], b: [y, z]}", ("taxonomy", "classes"), {"a": ["x"], "b": ["y", "z"]}),
]


@pytest.mark.parametrize("override,key,value", OVERRIDE_TYPES)
def test_override_types(override, key, value):
    cfg = load_config(None, [override])
    assert getattr(getattr(cfg, key[0]), key[1]) == value


BAD = [
    (["preprocess.imagesize=128"], "preprocess.imagesize", "did you mean 'image_size'"),
    (["prepocess.image_size=128"], "prepocess", "did you mean 'preprocess'"),
    (["preprocess.image_size=big"], "preprocess.image_size", "expected an integer"),
    (["preprocess.image_size=12.5"], "preprocess.image_size", "expected an integer"),
    (["storage.s3_anonymous=maybe"], "storage.s3_anonymous", "true/false"),
    (["dicom.frames=some"], "dicom.frames", "not one of"),
    (["dicom.windows.CT=bones"], "dicom.windows.CT", "unknown window preset"),
    (["dicom.windows.CT=[40, -1]"], "dicom.windows.CT", "width must be > 0"),
    (["dicom.window_order=[file, guess]"], "dicom.window_order", "unknown source"),
    (["data.train_fraction=0.9", "data.val_fraction=0.2"], "data.train_fraction", "must be <= 1"),
    (["preprocess.hflip=1.5"], "preprocess.hflip", "probability"),
    (["preprocess.zoom=[1.1, 0.9]"], "preprocess.zoom", "low <= high"),
    (["taxonomy.classes={a: []}"], "taxonomy.classes.a", "at least one subclass"),
    (["taxonomy.severity=[a/x]"], "taxonomy.severity", "not a leaf"),
    (["image_size=3"], "image_size=3", "section.key=value"),
    (["storage.s3_endpoint=127.0.0.1:9000"], "storage.s3_endpoint", "http://"),
]


@pytest.mark.parametrize("overrides,key,hint", BAD, ids=[b[1] + ":" + b[2] for b in BAD])
def test_bad_values_fail_naming_the_key(overrides, key, hint):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert key in str(info.value)
    assert hint in str(info.value)


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("preprocess: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(str(tmp_path / "missing.yaml"))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("preprocess:\n  image_sise: 3\n")
    with pytest.raises(ConfigError, match=r"preprocess\.image_sise"):
        load_config(str(unknown))


def test_round_trip_and_redaction():
    cfg = load_config(None, ["dicom.patient_salt=s3cret", "preprocess.image_size=64"])
    again = Config.from_dict(cfg.to_dict())
    assert again == cfg
    assert again.dicom.patient_salt == "s3cret"  # workers get the real value
    public = yaml.safe_load(cfg.to_yaml())
    assert public["dicom"]["patient_salt"] == "<redacted>"
    assert "s3cret" not in cfg.to_yaml()
    assert public["preprocess"]["image_size"] == 64
    # The written config loads back as a config (minus the secret).
    assert load_config(None, text=cfg.to_yaml()).preprocess.image_size == 64


def test_config_from_s3(s3_bucket, storage_cfg):
    from medhier.io import storage

    uri = f"{s3_bucket}/configs/run.yaml"
    storage.write_text(uri, "preprocess:\n  image_size: 80\n", storage_cfg)
    # The endpoint for reading the config itself comes from the environment here.
    import os

    os.environ["AWS_ENDPOINT_URL_S3"] = storage_cfg.s3_endpoint
    try:
        storage._s3_filesystem.cache_clear()
        assert load_config(uri).preprocess.image_size == 80
    finally:
        del os.environ["AWS_ENDPOINT_URL_S3"]
        storage._s3_filesystem.cache_clear()
