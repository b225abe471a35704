"""The compiled-model cache (medhier/infer/compiled.py): an entry is used only on the machine
type, code and variant it was built for, and only when its package is intact; everything else
is ignored and said so, never run. (Building and loading a real package: tests/infer/test_batch.py,
the int8 runs.)"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from medhier.infer import compiled
from medhier.infer.compiled import ModelCache, Variant, code_hash, fingerprint

CPU = torch.device("cpu")
VARIANT = Variant("int8", 32, (3, 224, 224), True, 64)
HERE = fingerprint(CPU, "c0de")


@pytest.fixture()
def stored(tmp_path) -> tuple[ModelCache, Path]:
    """An entry stored for this machine -> (the cache, the stored package file). The package is
    not a compiled model: every test here must turn it away before loading, or fail to load it."""
    cache = ModelCache(str(tmp_path / "cache"), None, HERE)
    package = tmp_path / "model.pt2"
    package.write_bytes(b"not a package, but stored like one")
    cache.store("m1", VARIANT, str(package), {"int8": {"images": 8}})
    return cache, Path(cache.folder("m1", VARIANT))


def test_fingerprint_names_versions_cpu_and_code():
    assert HERE["torch"] == torch.__version__ and HERE["code"] == "c0de" and HERE["device"] == "cpu"
    assert HERE["cpu"] and set(HERE["isa"].split(",")) <= set(compiled._ISA_FLAGS)
    assert "torchao" in HERE and HERE["python"].count(".") == 2


@pytest.mark.parametrize("variant,name", [
    (VARIANT, "int8-b32-3x224x224-cl-cal64"),
    (Variant("bf16", 8, (3, 64, 64), False, 64), "bf16-b8-3x64x64"),  # calibration counts only for int8
])
def test_variant_names(variant, name):
    assert variant.name == name


def test_the_entry_is_found_by_its_own_machine(stored):
    cache, folder = stored
    meta = cache.meta("m1", VARIANT)
    assert meta["fingerprint"] == HERE and meta["int8"] == {"images": 8} and meta["bytes"] == 34
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "model.pt2"]
    assert cache.fingerprints("m1", VARIANT) == [HERE]


@pytest.mark.parametrize("change,differs", [
    ({"torch": "2.13.0"}, "torch"),
    ({"cpu": "Intel(R) Xeon(R) Platinum 8480+", "isa": "avx2,avx512f,amx_tile,amx_bf16,amx_int8"}, "cpu, isa"),
    ({"code": "beef"}, "code"),
])
def test_an_entry_from_another_torch_cpu_or_code_is_ignored(stored, tmp_path, caplog, change, differs):
    """Copied under this machine's folder (as a shared cache URI could hold it), it is still refused."""
    cache, folder = stored
    meta = json.loads((folder / "meta.json").read_text())
    meta["fingerprint"] = {**HERE, **change}
    (folder / "meta.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="medhier.infer.compiled"):
        assert cache.meta("m1", VARIANT) is None and cache.load("m1", VARIANT, CPU) is None
    assert f"built for another machine, code or variant ({differs} differ); ignored" in caplog.text
    # a machine of that other kind has its own folder: never this one
    assert ModelCache(cache.root, None, meta["fingerprint"]).folder("m1", VARIANT) != str(folder)


def test_another_variant_or_model_finds_nothing(stored):
    cache, _ = stored
    assert cache.meta("m1", Variant("int8", 16, (3, 224, 224), True, 64)) is None
    assert cache.meta("m1", Variant("int8", 32, (3, 224, 224), True, 128)) is None
    assert cache.meta("m2", VARIANT) is None and cache.fingerprints("m2", VARIANT) == []


@pytest.mark.parametrize("damage,message", [
    (lambda folder: (folder / "model.pt2").write_bytes(b"not a package, but stored like onE"), "does not hash to its recorded sha256"),
    (lambda folder: (folder / "model.pt2").unlink(), "is missing beside its meta.json"),
    (lambda folder: (folder / "meta.json").write_text("{half a json"), "is unreadable"),
    (lambda folder: None, "failed to load"),  # intact, but not a package: the loader's own error
])
def test_a_damaged_entry_is_ignored_not_run(stored, caplog, damage, message):
    cache, folder = stored
    damage(folder)
    with caplog.at_level(logging.WARNING, logger="medhier.infer.compiled"):
        assert cache.load("m1", VARIANT, CPU) is None
    assert message in caplog.text and "ignored" in caplog.text


def test_code_hash_follows_the_source_it_names():
    assert code_hash(Variant) == code_hash(compiled) == code_hash(compiled, ModelCache)  # one module, one hash
    assert code_hash(compiled) != code_hash(json) and len(code_hash(compiled)) == 16
