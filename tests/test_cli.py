"""The command line and the documentation that goes with it."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from medhier.cli import EXIT_FAILED, EXIT_USAGE, main
from medhier.config import Config, load_config
from medhier.demo import demo_config

ROOT = Path(__file__).parent.parent


def test_demo_config_is_configs_demo_yaml():
    assert demo_config() == load_config(str(ROOT / "configs" / "demo.yaml"))


@pytest.mark.parametrize("name", ["smoke.yaml", "demo.yaml", "spine.yaml"])
def test_shipped_configs_load_with_every_value_they_set(name):
    path = ROOT / "configs" / name
    resolved = load_config(str(path)).to_dict()
    written = yaml.safe_load(path.read_text())
    assert written, f"{name} sets nothing"
    for section, values in written.items():
        for key, value in values.items():
            got = resolved[section][key]
            if isinstance(got, float):
                assert got == pytest.approx(float(value)), f"{section}.{key}"
            else:
                assert got == value, f"{section}.{key}"


def test_readme_documents_every_config_key():
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"`([a-z]+\.[a-z0-9_]+)`", readme))
    missing = []
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.type if isinstance(section.type, type) else getattr(Config(), section.name).__class__):
            key = f"{section.name}.{f.name}"
            if key not in documented:
                missing.append(key)
    assert not missing, f"config keys missing from the README's reference: {missing}"


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in readme


def test_synth_writes_an_archive_and_prints_its_summary(tmp_path, capsys):
    out = tmp_path / "archive"
    assert main(["synth", "--out", str(out), "--n", "6", "--size", "32", "--broken"]) == 0
    text = capsys.readouterr().out
    assert "6 DICOM files" in text and "broken files" in text
    assert len(list(out.rglob("*.dcm"))) >= 6 and (out / "labels.csv").exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["synth", "--out", "/tmp/x", "preprocess.imagesize=3"], "unknown key 'preprocess.imagesize'"),
        (["synth", "--out", "/tmp/x", "--config", "/nonexistent/c.yaml"], "config file '/nonexistent/c.yaml' not found"),
        (["evaluate", "--checkpoint", "/nonexistent/ckpt", "--archive", "/tmp", "--output", "/tmp/o"], "checkpoint '/nonexistent/ckpt' not found (no model.pt in it)"),
        (["prepare", "--archive", "/nonexistent/archive", "--output", "/tmp/o"], "archive '/nonexistent/archive' not found"),
    ],
)
def test_user_errors_exit_2_with_one_line_naming_the_input(argv, message, capsys):
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "argv,status,message",
    [
        (["score", "--sr-to", "s3://bucket/srs"], EXIT_USAGE, "--sr-to 's3://bucket/srs': a PACS's DICOMweb URI is needed"),
        (["score", "--sr-to", "dicomweb+http://user:pw@pacs/dicom-web"], EXIT_USAGE, "credentials in a URI end up in summaries and logs"),
        (["score", "--archive", "dicomweb+http://127.0.0.1:{port}/dicom-web"], EXIT_FAILED, "did not answer after 0 retries"),
        (["prepare", "--archive", "dicomweb+http://127.0.0.1:{port}/dicom-web"], EXIT_FAILED, "did not answer after 0 retries"),
    ],
)
def test_pacs_errors_exit_before_ray_starts_with_one_line(argv, status, message, tmp_path, capsys):
    from tests.orthanc import free_port  # a port nothing listens on

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.pt").write_bytes(b"")  # only its presence is checked before the archive
    base = {"score": ["score", "--archive", str(tmp_path), "--checkpoint", str(tmp_path / "ckpt"), "--output", str(tmp_path / "o")],
            "prepare": ["prepare", "--archive", str(tmp_path), "--output", str(tmp_path / "o")]}[argv[0]]
    args = base + [a.format(port=free_port()) for a in argv[1:]] + ["storage.dicomweb_retries=0"]
    assert main(args) == status
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
