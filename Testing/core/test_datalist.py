"""MSD-style datalists: a good one loads; every problem is reported, all of them at once."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from uharmony.data.datalist import (
    Dataset,
    check_against_model,
    check_compatible,
    label_values,
    load_datalist,
    union_label_space,
)
from uharmony.errors import BadDatalistError, ExitCode

AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])
LABELS = {"0": "background", "1": "grey matter", "2": "white matter"}


def _write(path: Path, array: np.ndarray, affine=AFFINE) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return str(path)


def _image(path: Path, shape=(8, 8, 8), affine=AFFINE, seed=0) -> None:
    _write(path, np.random.default_rng(seed).random(shape, dtype=np.float32), affine)


def _label(path: Path, shape=(8, 8, 8), values=(0, 1, 2), affine=AFFINE) -> None:
    lab = np.zeros(shape, np.uint8)
    for i, v in enumerate(values):
        lab[i % shape[0], :, :] = v
    _write(path, lab, affine)


def make_dataset(root: Path, n=3, channels=("T1",), labels=LABELS, domain="mri-t1", name="toy",
                 validation=1, **extra) -> Path:
    """A good dataset of n training (+ validation) cases of 8^3 voxels in root/dataset.json."""
    entries = []
    for i in range(n + validation):
        images = []
        for c in range(len(channels)):
            rel = f"imagesTr/case{i}_{c:04d}.nii.gz"
            _image(root / rel, seed=i * 10 + c)
            images.append(rel)
        _label(root / f"labelsTr/case{i}.nii.gz", values=(0, 1, 2) if i else (0,))  # case 0: background only
        entries.append({"image": images if len(images) > 1 else images[0], "label": f"labelsTr/case{i}.nii.gz"})
    doc = {"name": name, "domain": domain, "description": "toy data", "tensorImageSize": "3D",
           "modality": {str(i): c for i, c in enumerate(channels)}, "labels": labels,
           "numTraining": n, "training": entries[:n], "validation": entries[n:], **extra}
    path = root / "dataset.json"
    path.write_text(json.dumps(doc, indent=1))
    return path


def _edit(path: Path, change) -> Path:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))
    return path


def _problems(path, **kw) -> list[str]:
    with pytest.raises(BadDatalistError) as info:
        load_datalist(path, **kw)
    err = info.value
    assert err.code == ExitCode.BAD_DATALIST
    lines = str(err).splitlines()
    n = len(err.problems)
    assert lines[0] == f"{path}: {n} problem{'s' if n != 1 else ''}"
    assert lines[1:] == err.problems
    return err.problems


def test_good_dataset_loads(tmp_path):
    path = make_dataset(tmp_path, n=3, validation=1)
    ds = load_datalist(path)
    assert isinstance(ds, Dataset)
    assert (ds.name, ds.domain, ds.channels) == ("toy", "mri-t1", ["T1"])
    assert ds.labels == {0: "background", 1: "grey matter", 2: "white matter"}
    assert ds.annotated == ["grey matter", "white matter"]
    assert len(ds.training) == 3 and len(ds.validation) == 1
    case = ds.training[0]
    assert case.image == [(tmp_path / "imagesTr/case0_0000.nii.gz").resolve()]
    assert case.label == (tmp_path / "labelsTr/case0.nii.gz").resolve()
    assert (case.dataset, case.domain) == ("toy", "mri-t1")
    assert all(p.is_absolute() for c in ds.training + ds.validation for p in [*c.image, c.label])
    assert ds.path == path.resolve()


def test_multichannel_dataset_and_json_only_load(tmp_path):
    path = make_dataset(tmp_path, n=2, channels=("T1", "FLAIR"))
    ds = load_datalist(path)
    assert ds.channels == ["T1", "FLAIR"] and len(ds.training[1].image) == 2
    (tmp_path / "imagesTr/case1_0001.nii.gz").unlink()
    assert load_datalist(path, check_files=False).channels == ["T1", "FLAIR"]  # opens no file


def test_label_maps_may_be_all_background(tmp_path):
    path = make_dataset(tmp_path, n=1, validation=0)  # case 0's label map is all zeros
    assert load_datalist(path).training[0].label.name == "case0.nii.gz"
    assert list(label_values(tmp_path / "labelsTr/case0.nii.gz")) == [0]
    from uharmony.data.io import write_volume

    write_volume(tmp_path / "empty.nrrd", np.zeros((8, 8, 8), np.uint8), AFFINE)  # read through SimpleITK
    assert list(label_values(tmp_path / "empty.nrrd")) == [0]
    _edit(path, lambda d: d["training"][0].update(label="empty.nrrd"))
    assert load_datalist(path).training[0].label.name == "empty.nrrd"


def test_malformed_json(tmp_path):
    path = tmp_path / "dataset.json"
    path.write_text('{"name": "x", "training": [}')
    with pytest.raises(BadDatalistError, match=r"dataset.json: is not valid JSON \(.*line 1"):
        load_datalist(path)
    path.write_text("[1, 2]")
    with pytest.raises(BadDatalistError, match="must hold a JSON object"):
        load_datalist(path)
    with pytest.raises(BadDatalistError, match="does not exist"):
        load_datalist(tmp_path / "nope.json")


def test_missing_and_unknown_keys(tmp_path):
    path = make_dataset(tmp_path)
    _edit(path, lambda d: (d.pop("domain"), d.pop("labels"), d.update(channels=["T1"], spacing=2)))
    problems = _problems(path)
    assert any("missing key 'domain'" in p for p in problems)
    assert any("missing key 'labels'" in p for p in problems)
    assert any("unknown keys 'channels', 'spacing'" in p for p in problems)
    assert all(p.startswith(f"{path}: ") for p in problems)


def test_unknown_case_key_and_missing_label(tmp_path):
    path = make_dataset(tmp_path)
    _edit(path, lambda d: (d["training"][0].update(mask="x.nii.gz"), d["training"][1].pop("label")))
    problems = _problems(path)
    assert any("training[0]: unknown key 'mask'" in p for p in problems)
    assert any("training[1]: missing key 'label'" in p for p in problems)
    # Without labels required (adaptation without labels), the case without a label is fine.
    _edit(path, lambda d: d["training"][0].pop("mask"))
    ds = load_datalist(path, require_labels=False)
    assert ds.training[1].label is None


def test_missing_file(tmp_path):
    path = make_dataset(tmp_path)
    (tmp_path / "imagesTr/case2_0000.nii.gz").unlink()
    (problem,) = _problems(path)
    assert problem == f"{tmp_path / 'imagesTr/case2_0000.nii.gz'}: does not exist (training[2] image)"


def test_shape_mismatch(tmp_path):
    path = make_dataset(tmp_path)
    _label(tmp_path / "labelsTr/case1.nii.gz", shape=(8, 8, 6))
    (problem,) = _problems(path)
    assert problem.startswith(str(tmp_path / "labelsTr/case1.nii.gz"))
    assert "has shape 8x8x6 but case1_0000.nii.gz has 8x8x8 (training[1] label)" in problem


def test_affine_mismatch_beyond_tolerance(tmp_path):
    path = make_dataset(tmp_path)
    shifted = AFFINE.copy()
    shifted[0, 3] += 5e-4  # within 1e-3 mm: fine
    _label(tmp_path / "labelsTr/case1.nii.gz", affine=shifted)
    load_datalist(path)
    shifted[0, 3] += 0.5
    _label(tmp_path / "labelsTr/case1.nii.gz", affine=shifted)
    (problem,) = _problems(path)
    assert "voxel-to-world matrix that differs" in problem and "(training[1] label)" in problem


def test_label_values_not_in_table(tmp_path):
    path = make_dataset(tmp_path)
    _label(tmp_path / "labelsTr/case2.nii.gz", values=(0, 1, 5, 7))
    (problem,) = _problems(path)
    assert problem == (f"{tmp_path / 'labelsTr/case2.nii.gz'}: has label values 5, 7 not in the label table "
                       "(0, 1, 2) (training[2] label)")
    _write(tmp_path / "labelsTr/case2.nii.gz", np.full((8, 8, 8), 0.5, np.float32))
    (problem,) = _problems(path)
    assert "non-integer values" in problem


def test_empty_training_split(tmp_path):
    path = make_dataset(tmp_path)
    _edit(path, lambda d: d.update(training=[]))
    (problem,) = _problems(path)
    assert problem == f"{path}: the training split is empty"


def test_duplicate_cases(tmp_path):
    path = make_dataset(tmp_path, validation=1)
    _edit(path, lambda d: (d["training"].append(dict(d["training"][0])), d["validation"].append(d["training"][1])))
    problems = _problems(path)
    assert f"{path}: training[3]: repeats training[0] (same image)" in problems
    assert f"{path}: validation[1]: repeats training[1] (same image)" in problems
    assert len(problems) == 2
    # A repeated case's files are checked (and reported) once.
    _label(tmp_path / "labelsTr/case0.nii.gz", values=(0, 4))
    problems = _problems(path)
    assert len(problems) == 3 and sum("has label value 4" in p for p in problems) == 1


def test_channel_count_differs_between_cases(tmp_path):
    path = make_dataset(tmp_path, channels=("T1", "T2"))
    _edit(path, lambda d: d["training"][1].update(image=d["training"][1]["image"][0]))
    (problem,) = _problems(path)
    assert problem == f"{path}: training[1]: has 1 image (channels) but 'modality' declares 2"
    # Without a usable 'modality', the cases are compared with each other.
    _edit(path, lambda d: d.update(modality={"x": "T1"}))
    problems = _problems(path)
    assert any("'modality' key 'x' is not a channel index" in p for p in problems)
    assert any("training[1]: has 1 image (channels) but most cases have 2" in p for p in problems)


def test_bad_label_table_and_domain(tmp_path):
    path = make_dataset(tmp_path)
    _edit(path, lambda d: d.update(labels={"1": "GM", "2": "gm", "x": "y"}, domain="MRI T1"))
    problems = _problems(path)
    text = "\n".join(problems)
    assert "'domain' must be a name" in text
    assert "'labels' key 'x' is not a label value" in text
    assert "'labels' must name value 0" in text
    assert "'labels' names 'gm' more than once" in text
    assert len(problems) == 4


def test_several_problems_are_all_reported(tmp_path):
    path = make_dataset(tmp_path, n=4)
    (tmp_path / "imagesTr/case1_0000.nii.gz").unlink()                       # missing file
    _label(tmp_path / "labelsTr/case2.nii.gz", shape=(8, 8, 7))               # shape mismatch
    _label(tmp_path / "labelsTr/case3.nii.gz", values=(0, 9))                 # value not in table
    _edit(path, lambda d: (d.update(extra=1),                                 # unknown key
                           d["validation"].append(d["training"][0])))         # duplicate
    problems = _problems(path)
    assert len(problems) == 5, problems
    expected = ["unknown key 'extra'", "does not exist (training[1] image)", "has shape 8x8x7",
                "has label value 9 not in the label table", "validation[1]: repeats training[0]"]
    for fragment in expected:
        assert sum(fragment in p for p in problems) == 1, fragment
    with pytest.raises(BadDatalistError) as info:
        load_datalist(path)
    assert str(info.value).splitlines()[0] == f"{path}: 5 problems"


def test_truncated_label_is_reported_not_raised(tmp_path):
    path = make_dataset(tmp_path)
    label = tmp_path / "labelsTr/case1.nii.gz"
    data = label.read_bytes()
    label.write_bytes(data[: len(data) // 2])
    problems = _problems(path)
    assert len(problems) == 1 and str(label) in problems[0] and "(training[1] label)" in problems[0]


# ------------------------------------------------------------------------------------ label space


def _ds(name, labels, channels=("T1",), path=None) -> Dataset:
    return Dataset(name=name, domain="mri-t1", channels=list(channels), labels=labels, training=[], validation=[],
                   path=Path(path or f"/data/{name}/dataset.json"))


def test_union_label_space_matches_names_case_insensitively():
    a = _ds("a", {0: "background", 1: "Grey Matter", 2: "white matter"})
    b = _ds("b", {0: "bg", 1: "lesion", 3: "grey  matter"})
    union, maps = union_label_space([a, b])
    assert union == ["background", "Grey Matter", "white matter", "lesion"]
    assert maps == {"a": {0: 0, 1: 1, 2: 2}, "b": {0: 0, 1: 3, 3: 1}}


def test_union_label_space_keeps_base_order_and_appends_new_classes():
    base = ["background", "cerebrospinal fluid", "grey matter", "white matter", "lesion"]
    new = _ds("new", {0: "background", 1: "Grey Matter", 2: "tumour", 3: "oedema"})
    union, maps = union_label_space([new], base=base)
    assert union[:5] == base and union[5:] == ["tumour", "oedema"]
    assert maps == {"new": {0: 0, 1: 2, 2: 5, 3: 6}}
    with pytest.raises(ValueError):
        union_label_space([new], base=["background", "GM", "gm"])


def test_union_refuses_one_name_with_two_label_tables():
    with pytest.raises(BadDatalistError, match="different label table"):
        union_label_space([_ds("x", {0: "bg", 1: "a"}), _ds("x", {0: "bg", 1: "b"}, path="/other/dataset.json")])


# ------------------------------------------------------------------------------------ vs the model


def _card(channels=("image",)):
    return {"name": "tiny-test", "input": {"channels": [{"name": c} for c in channels]}}


def test_check_against_model_refuses_two_channels_for_a_one_channel_card(tmp_path):
    ds = load_datalist(make_dataset(tmp_path, n=1, channels=("T1", "T2")))
    with pytest.raises(BadDatalistError) as info:
        check_against_model([ds], _card())
    err = info.value
    assert err.code == ExitCode.BAD_DATALIST
    lines = str(err).splitlines()
    assert lines[0] == "datalists do not fit model 'tiny-test': 1 problem"
    assert lines[1] == f"{ds.path}: has 2 channels ('T1', 'T2') but model 'tiny-test' takes 1 ('image')"
    check_against_model([_ds("one", {0: "bg"})], _card())  # 1 channel with another name: fine


def test_check_against_model_refuses_swapped_channels_and_lists_every_dataset():
    swapped = _ds("s", {0: "bg"}, channels=("t2", "T1"))
    three = _ds("t", {0: "bg"}, channels=("T1", "T2", "FLAIR"))
    good = _ds("g", {0: "bg"}, channels=("T1", "T2"))
    with pytest.raises(BadDatalistError) as info:
        check_against_model([swapped, good, three], _card(("T1", "T2")))
    problems = info.value.problems
    assert len(problems) == 3
    assert sum("/data/s/dataset.json: channel" in p for p in problems) == 2
    assert any(p.startswith("/data/t/dataset.json: has 3 channels") for p in problems)


def test_check_compatible():
    check_compatible([_ds("a", {0: "bg"}), _ds("b", {0: "bg"}, channels=("t1",))])
    with pytest.raises(BadDatalistError, match="has channels"):
        check_compatible([_ds("a", {0: "bg"}), _ds("b", {0: "bg"}, channels=("T1", "T2"))])
