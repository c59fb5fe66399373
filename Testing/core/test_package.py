"""Model packages: round trip, and precise refusals of corrupt, truncated, mismatched or hostile ones."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_package
from uharmony.errors import BadModelError
from uharmony.model import registry
from uharmony.model.card import load_card
from uharmony.model.package import load_model


@pytest.fixture
def pkg(tmp_path) -> Path:
    return make_tiny_package(tmp_path / "m")


def _rehash(folder: Path) -> None:
    """Make the card's sha256 agree with whatever weights file is there (an attacker would)."""
    card = json.loads((folder / "card.json").read_text())
    card["weights"]["sha256"] = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    (folder / "card.json").write_text(json.dumps(card))


def test_round_trip_gives_the_same_outputs(pkg, tmp_path):
    model, card = load_model(pkg)
    again = make_tiny_package(tmp_path / "again")  # same seed, same weights
    model2, _ = load_model(again)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x, "dom-a"), model2(x, "dom-a"))
    assert card["weights"]["sha256"] == hashlib.sha256((pkg / "model.safetensors").read_bytes()).hexdigest()
    assert [d["name"] for d in card["domains"]] == model.domains == ["dom-a", "dom-b"]


def test_truncated_weights_are_refused(pkg):
    w = pkg / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-1000])
    with pytest.raises(BadModelError, match="do not match the card's sha256") as e:
        load_model(pkg)
    assert "model.safetensors" in str(e.value)
    _rehash(pkg)  # even with a matching hash, the file itself is incomplete
    with pytest.raises(BadModelError, match="safetensors"):
        load_model(pkg)


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(_Payload.marker),))


def test_a_pickle_is_never_unpickled(pkg, tmp_path):
    _Payload.marker = str(tmp_path / "pwned")
    (pkg / "model.safetensors").write_bytes(pickle.dumps({"weights": _Payload()}))
    _rehash(pkg)
    with pytest.raises(BadModelError, match="not a valid safetensors file"):
        load_model(pkg)
    with pytest.raises(BadModelError):
        registry.add_model(pkg, "evil")
    assert not (tmp_path / "pwned").exists()


def test_architecture_mismatch_names_the_tensor(pkg):
    card = json.loads((pkg / "card.json").read_text())
    card["architecture"]["filters"] = [4, 8, 32]
    (pkg / "card.json").write_text(json.dumps(card))
    with pytest.raises(BadModelError, match=r"wrong shape \(e\.g\. backbone\."):
        load_model(pkg)
    card["architecture"]["filters"] = [4, 8, 16]
    card["architecture"]["domains"] = card["architecture"]["domains"] + ["dom-c"]
    card["domains"].append({"name": "dom-c", "modality": "CT"})
    (pkg / "card.json").write_text(json.dumps(card))
    with pytest.raises(BadModelError, match="missing tensors"):
        load_model(pkg)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.pop("classes"), "'classes' is a required property"),
    (lambda c: c["input"].update(orientation="LPS"), "card field input/orientation"),
    (lambda c: c["classes"].append({"value": 9, "name": "extra"}), "class values"),
    (lambda c: c["domains"].pop(), "architecture.domains"),
    (lambda c: c.update(surprise=1), "Additional properties"),
    (lambda c: c["gate"].update(fov_views=[1.0, 0.0]), "card field gate/fov_views/1"),
    (lambda c: c.update(postprocess={"min_component_ml": {"tumour": 0.5}}), "names 'tumour', not a class"),
    (lambda c: c.update(postprocess={"min_component_ml": {"background": 0.5}}), "names 'background', not a class"),
    (lambda c: c.update(postprocess={"min_component_ml": {"lesion": -1}}), "card field postprocess/min_component_ml/lesion"),
])
def test_card_problems_are_named(pkg, edit, message):
    card = json.loads((pkg / "card.json").read_text())
    edit(card)
    (pkg / "card.json").write_text(json.dumps(card))
    with pytest.raises(BadModelError, match=message) as e:
        load_card(pkg)
    assert "card.json" in str(e.value)


def test_missing_parts(pkg, tmp_path):
    (pkg / "model.safetensors").unlink()
    with pytest.raises(BadModelError, match="model.safetensors is missing"):
        load_model(pkg)
    with pytest.raises(BadModelError, match="not a model folder"):
        load_card(tmp_path / "nothing")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "card.json").write_text("{not json")
    with pytest.raises(BadModelError, match="cannot be read"):
        load_card(tmp_path / "broken")


def test_model_folder_records_and_enforces_trust(pkg, isolated_model_folder):
    entry = registry.add_model(pkg, "site")
    assert entry.trusted and Path(entry.path).parent == isolated_model_folder
    trust = json.loads((isolated_model_folder / "trusted.json").read_text())
    assert trust["site"]["weights_sha256"] == entry.sha256
    assert registry.resolve_model("site") == isolated_model_folder / "site"
    # replace the weights by another valid model's weights and fix the card's hash: still refused
    other = make_tiny_package(pkg.parent / "other", seed=1)
    shutil.copy(other / "model.safetensors", isolated_model_folder / "site" / "model.safetensors")
    _rehash(isolated_model_folder / "site")
    with pytest.raises(BadModelError, match="changed since it was added"):
        registry.resolve_model("site")
    with pytest.raises(BadModelError, match="changed since it was added"):
        registry.resolve_model(isolated_model_folder / "site")  # by path too
    # a folder dropped in by hand was never added
    shutil.copytree(other, isolated_model_folder / "dropped")
    with pytest.raises(BadModelError, match="never added"):
        registry.resolve_model("dropped")
    registry.remove_model("site")
    assert not (isolated_model_folder / "site").exists()
    with pytest.raises(BadModelError, match="no such model"):
        registry.resolve_model("site")
