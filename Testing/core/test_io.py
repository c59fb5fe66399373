"""Tests of uharmony.data.io: geometry round trips, DICOM, every refused input, safe outputs, resampling."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import stat

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from uharmony.data import io
from uharmony.data.io import (
    IMAGE_SUFFIXES,
    Volume,
    atomic_output,
    check_output_path,
    is_image_path,
    read_header,
    read_volume,
    resample_onto,
    write_json,
    write_volume,
)
from uharmony.errors import BadInputError, OutOfMemoryError, OutputError

LPS = np.diag([-1.0, -1.0, 1.0])  # the test's own statement of ITK's convention, independent of io.py


def rotation(axis, degrees) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    t = np.deg2rad(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def oblique_affine(spacing=(0.8, 1.1, 2.5), flip=(1, -1, 1), origin=(12.5, -30.0, 40.25)) -> np.ndarray:
    """Rotated off every axis, one axis flipped (det < 0), anisotropic."""
    a = np.eye(4)
    a[:3, :3] = rotation([1, 2, 3], 25) @ np.diag(np.multiply(flip, spacing))
    a[:3, 3] = origin
    return a


def sample(shape=(20, 16, 12), seed=0) -> np.ndarray:
    """No symmetry, so a transposed or flipped read cannot pass for the original."""
    rng = np.random.default_rng(seed)
    return (rng.normal(100, 30, shape) + np.arange(np.prod(shape)).reshape(shape) * 0.01).astype(np.float32)


def world(affine, ijk) -> np.ndarray:
    return (np.asarray(affine) @ np.r_[ijk, 1.0])[:3]


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def to_sitk_image(array, affine):
    """SimpleITK image with LPS geometry built here from first principles (not via io.py)."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    m = LPS @ affine[:3, :3]
    spacing = np.linalg.norm(m, axis=0)
    img.SetSpacing(spacing.tolist())
    img.SetDirection((m / spacing).ravel().tolist())
    img.SetOrigin((LPS @ affine[:3, 3]).tolist())
    return img


def save_nifti(path, array, affine, **header_fields):
    img = nib.Nifti1Image(array, affine)
    for key, value in header_fields.items():
        img.header[key] = value
    nib.save(img, str(path))
    return path


# ------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".mha"])
def test_round_trip_oblique_flipped_anisotropic(tmp_path, suffix):
    array, affine = sample(), oblique_affine()
    path = tmp_path / f"img{suffix}"
    write_volume(path, array, affine)
    vol = read_volume(path)

    assert vol.array.dtype == np.float32 and vol.shape == array.shape
    np.testing.assert_array_equal(vol.array, array)
    np.testing.assert_allclose(vol.affine, affine, atol=1e-4)
    np.testing.assert_allclose(vol.spacing, (0.8, 1.1, 2.5), atol=1e-5)
    ijk = (3, 5, 7)
    np.testing.assert_allclose(world(vol.affine, ijk), world(affine, ijk), atol=1e-4)
    # The file itself must hold the right geometry, as a third-party reader sees it.
    if suffix.startswith(".nii"):
        np.testing.assert_allclose(world(nib.load(path).affine, ijk), world(affine, ijk), atol=1e-4)
    else:
        img = sitk.ReadImage(str(path))
        lps = np.array(img.TransformIndexToPhysicalPoint(ijk))
        np.testing.assert_allclose(LPS @ lps, world(affine, ijk), atol=1e-4)
        assert sitk.GetArrayFromImage(img)[7, 5, 3] == array[3, 5, 7]
    assert read_header(path)[0] == array.shape
    np.testing.assert_allclose(read_header(path)[1], vol.affine)


def test_nifti_from_nibabel_and_from_simpleitk_agree(tmp_path):
    """The same image written by nibabel (RAS) and by SimpleITK (LPS) must read back identically."""
    array, affine = sample(), oblique_affine()
    nib.save(nib.Nifti1Image(array, affine), str(tmp_path / "nib.nii.gz"))
    sitk.WriteImage(to_sitk_image(array, affine), str(tmp_path / "itk.nii.gz"))
    sitk.WriteImage(to_sitk_image(array, affine), str(tmp_path / "itk.mha"))
    a, b, c = (read_volume(tmp_path / n) for n in ("nib.nii.gz", "itk.nii.gz", "itk.mha"))
    np.testing.assert_allclose(a.affine, affine, atol=1e-4)
    np.testing.assert_allclose(b.affine, a.affine, atol=1e-4)
    np.testing.assert_allclose(c.affine, a.affine, atol=1e-4)
    np.testing.assert_array_equal(b.array, a.array)
    np.testing.assert_array_equal(c.array, a.array)


@pytest.mark.parametrize("suffix, endian", [(".nii", "<"), (".nii.gz", "<"), (".nii.gz", ">")])
def test_trailing_singleton_axis_and_scaling_and_units(tmp_path, suffix, endian):
    raw = np.arange(24 * 5, dtype=np.int16).reshape(4, 5, 6, 1)
    img = nib.Nifti1Image(raw, np.diag([0.002, 0.002, 0.003, 1.0]), header=nib.Nifti1Header(endianness=endian))
    img.header.set_data_dtype(np.int16)
    img.header.set_slope_inter(2.0, -10.0)
    img.header.set_xyzt_units(xyz="meter")  # ITK (Slicer) converts to mm; so must we
    path = tmp_path / f"s{suffix}"
    nib.save(img, str(path))
    assert nib.load(path).dataobj.slope == 2.0  # the file really is scaled
    shape, affine, dtype = read_header(path)
    vol = read_volume(path)
    assert shape == vol.shape == (4, 5, 6) and dtype == np.dtype(endian + "i2")
    np.testing.assert_allclose(vol.spacing, (2.0, 2.0, 3.0))
    np.testing.assert_array_equal(vol.array, raw[..., 0] * 2.0 - 10.0)
    assert isinstance(vol.header, nib.Nifti1Header)


def test_is_image_path(tmp_path):
    assert all(is_image_path(f"a{s.upper()}") for s in IMAGE_SUFFIXES)
    assert is_image_path(tmp_path)  # a folder: a DICOM series
    assert not is_image_path("a.png") and not is_image_path("nii") and not is_image_path(tmp_path / "no-such-dir")


# ------------------------------------------------------------------------------------------- DICOM


def write_dicom_series(folder, array, affine, *, uid="1.2.826.0.1.3680043.2.1125.7.1", modality="MR"):
    """One file per k-slice with the position/orientation tags a scanner writes (LPS, as DICOM is)."""
    os.makedirs(folder, exist_ok=True)
    m = LPS @ affine[:3, :3]
    spacing = np.linalg.norm(m, axis=0)
    d = m / spacing
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(array.shape[2]):
        s = sitk.GetImageFromArray(np.ascontiguousarray(array[:, :, k].T))
        s.SetSpacing(spacing[:2].tolist())
        position = LPS @ world(affine, (0, 0, k))
        for tag, value in {
            "0008|0060": modality,
            "0020|000e": uid,
            "0020|000d": uid + ".0",
            "0008|0018": f"{uid}.{k + 1}",
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": "\\".join(f"{v:.10f}" for v in (*d[:, 0], *d[:, 1])),
            "0018|0050": f"{spacing[2]:.6f}",
        }.items():
            s.SetMetaData(tag, value)
        writer.SetFileName(os.path.join(folder, f"slice{array.shape[2] - k:03d}.dcm"))  # names out of order
        writer.Execute(s)


def dicom_source():
    rng = np.random.default_rng(1)
    array = rng.integers(-500, 1500, (16, 12, 7)).astype(np.int16)
    return array, oblique_affine(spacing=(0.7, 0.9, 2.5), flip=(1, 1, 1))


def test_dicom_series_geometry(tmp_path):
    array, affine = dicom_source()
    write_dicom_series(tmp_path / "dcm", array, affine)
    vol = read_volume(tmp_path / "dcm")
    assert vol.shape == (16, 12, 7) and vol.path == str(tmp_path / "dcm")
    np.testing.assert_allclose(vol.affine, affine, atol=1e-3)
    for ijk in [(0, 0, 0), (15, 11, 6), (3, 7, 5)]:
        np.testing.assert_allclose(world(vol.affine, ijk), world(affine, ijk), atol=1e-3)
        assert vol.array[ijk] == array[ijk]
    shape, h_affine, dtype = read_header(tmp_path / "dcm")
    assert shape == vol.shape and dtype == np.int16
    np.testing.assert_allclose(h_affine, vol.affine, atol=1e-6)


def test_dicom_folder_with_two_series_uses_the_largest(tmp_path, caplog):
    array, affine = dicom_source()
    write_dicom_series(tmp_path / "dcm", array, affine, uid="1.2.3.4.100")
    small = np.ascontiguousarray(array[:, :, :3]) + 1
    os.makedirs(tmp_path / "dcm" / "x", exist_ok=True)  # a stray subfolder must not disturb the scan
    write_dicom_series(tmp_path / "tmp2", small, affine, uid="1.2.3.4.200")
    for name in os.listdir(tmp_path / "tmp2"):
        os.replace(tmp_path / "tmp2" / name, tmp_path / "dcm" / f"b_{name}")
    with caplog.at_level(logging.WARNING, logger="uharmony.data.io"):
        vol = read_volume(tmp_path / "dcm")
    assert vol.shape == (16, 12, 7)
    assert "1.2.3.4.100" in caplog.text and "2 DICOM series" in caplog.text


def test_dicom_missing_slice_refused(tmp_path):
    array, affine = dicom_source()
    write_dicom_series(tmp_path / "dcm", array, affine)
    os.remove(tmp_path / "dcm" / "slice004.dcm")
    with pytest.raises(BadInputError, match="unevenly spaced"):
        read_volume(tmp_path / "dcm")


def test_dicom_bad_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInputError, match="empty folder") as e:
        read_volume(tmp_path / "empty")
    assert "empty" in str(e.value)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a scan")
    with pytest.raises(BadInputError, match="no DICOM series") as e:
        read_volume(tmp_path / "notes")
    assert "notes" in str(e.value)


# ------------------------------------------------------------------------------------- bad inputs


def _valid(tmp_path, suffix, **kw):
    path = tmp_path / f"good{suffix}"
    if suffix.startswith(".nii"):
        save_nifti(path, sample(), np.diag([1.0, 1.0, 2.0, 1.0]))
    else:
        sitk.WriteImage(to_sitk_image(sample(), np.diag([1.0, 1.0, 2.0, 1.0])), str(path), **kw)
    return path


def _cut(src, dst, keep=0.5, minus=None):
    data = open(src, "rb").read()
    open(dst, "wb").write(data[: len(data) - minus] if minus else data[: int(len(data) * keep)])
    os.remove(src)
    return dst


def case_missing(t):
    return t / "absent.nii.gz"


def case_garbage_gz(t):
    (t / "garbage.nii.gz").write_bytes(np.random.default_rng(2).bytes(4000))
    return t / "garbage.nii.gz"


def case_garbage_nrrd(t):
    (t / "garbage.nrrd").write_bytes(b"NRRD0004\nthis is not: a header\n" + bytes(100))
    return t / "garbage.nrrd"


def case_empty_file(t):
    (t / "zero.nii").write_bytes(b"")
    return t / "zero.nii"


def case_not_an_image(t):
    (t / "photo.png").write_bytes(b"\x89PNG....")
    return t / "photo.png"


def case_truncated_nii(t):
    return _cut(_valid(t, ".nii"), t / "cut.nii")


def case_truncated_nii_gz(t):
    return _cut(_valid(t, ".nii.gz"), t / "cut.nii.gz")


def case_gz_without_trailer(t):
    # Every voxel decodes; only gzip's CRC/length trailer is gone. Still a damaged file.
    return _cut(_valid(t, ".nii.gz"), t / "notrailer.nii.gz", minus=8)


def case_gzip_of_truncated_nii(t):
    data = open(_valid(t, ".nii"), "rb").read()
    (t / "short.nii.gz").write_bytes(gzip.compress(data[: len(data) // 2]))  # a valid gzip, short content
    return t / "short.nii.gz"


def case_truncated_nrrd(t):
    return _cut(_valid(t, ".nrrd", useCompression=True), t / "cut.nrrd")


def case_truncated_mha(t):
    return _cut(_valid(t, ".mha"), t / "cut.mha")


def case_truncated_mha_compressed(t):
    return _cut(_valid(t, ".mha", useCompression=True), t / "cutz.mha")


def case_2d(t):
    return save_nifti(t / "flat.nii.gz", sample((20, 16)), np.eye(4))


def case_single_slice(t):
    return save_nifti(t / "slice.nii.gz", sample((20, 16, 1)), np.eye(4))


def case_4d(t):
    return save_nifti(t / "series.nii.gz", sample((8, 8, 8, 3)), np.eye(4))


def case_empty_dimension(t):
    return save_nifti(t / "nothing.nii.gz", np.zeros((0, 8, 8), np.float32), np.eye(4))


def case_constant(t):
    return save_nifti(t / "flat_grey.nii.gz", np.full((8, 8, 8), 7, np.float32), np.eye(4))


def case_nan(t):
    a = sample((8, 8, 8))
    a[1, 2, 3] = np.nan
    a[4, 4, 4] = np.inf
    return save_nifti(t / "nan.nii.gz", a, np.eye(4))


def _patched_header(t, name, **fields):
    path = save_nifti(t / name, sample((8, 8, 8)), np.eye(4))
    img = nib.load(path)
    hdr = img.header.copy()
    for key, value in fields.items():
        hdr[key] = value
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), None, header=hdr), str(path))
    return path


def case_zero_spacing(t):
    return _patched_header(t, "zero_spacing.nii.gz", srow_x=[0, 0, 0, 0], sform_code=1, qform_code=0)


def case_absurd_spacing(t):
    return _patched_header(t, "huge_spacing.nii.gz", srow_x=[100, 0, 0, 0], sform_code=1, qform_code=0)


def case_tiny_spacing(t):
    return _patched_header(t, "tiny_spacing.nii.gz", srow_x=[0.001, 0, 0, 0], sform_code=1, qform_code=0)


def case_singular_affine(t):
    return _patched_header(t, "singular.nii.gz", srow_x=[1, 1, 0, 0], srow_y=[0, 0, 0, 0], sform_code=1, qform_code=0)


BAD_INPUTS = [
    (case_missing, "does not exist"),
    (case_garbage_gz, "not a readable NIfTI"),
    (case_garbage_nrrd, "not a readable image"),
    (case_empty_file, "empty file"),
    (case_not_an_image, "not a supported image"),
    (case_truncated_nii, "truncated"),
    (case_truncated_nii_gz, "truncated"),
    (case_gz_without_trailer, "truncated"),
    (case_gzip_of_truncated_nii, "truncated"),
    (case_truncated_nrrd, "truncated"),
    (case_truncated_mha, "truncated"),
    (case_truncated_mha_compressed, "truncated"),
    (case_2d, "is 2D"),
    (case_single_slice, "is 2D"),
    (case_4d, "is 4D with 3 volumes; give one 3D volume per file"),
    (case_empty_dimension, "is empty"),
    (case_constant, "is constant"),
    (case_nan, "contains 2 NaN/Inf voxels"),
    (case_zero_spacing, "spacing 0 x 1 x 1 mm"),
    (case_absurd_spacing, "spacing 100 x 1 x 1 mm"),
    (case_tiny_spacing, "between 0.01 and 50 mm"),
    (case_singular_affine, "singular"),
]


@pytest.mark.parametrize("make, fragment", BAD_INPUTS, ids=[m.__name__[5:] for m, _ in BAD_INPUTS])
def test_bad_input_refused_untouched(tmp_path, capfd, make, fragment):
    path = make(tmp_path)
    before = sha(path) if path.exists() else None
    with pytest.raises(BadInputError) as e:
        read_volume(path)
    message = str(e.value)
    assert fragment in message
    assert path.name in message and "\n" not in message
    assert e.value.code == 3
    if before is not None:
        assert sha(path) == before
    assert capfd.readouterr().err == ""  # ITK/MetaIO chatter must not reach the terminal


def test_truncated_gzip_header_is_still_readable_but_data_is_refused(tmp_path):
    """read_header reads no voxels: it succeeds where only the voxel data is cut off."""
    path = case_truncated_nii_gz(tmp_path)
    assert read_header(path)[0] == (20, 16, 12)
    with pytest.raises(BadInputError, match="truncated"):
        read_volume(path)


def test_max_bytes_refused_before_reading(tmp_path):
    # A truncated file: reaching the voxels would raise BadInputError instead.
    path = case_truncated_nii_gz(tmp_path)
    before = sha(path)
    with pytest.raises(OutOfMemoryError, match="needs about 15 KiB of memory, 1 KiB available") as e:
        read_volume(path, max_bytes=1024)
    assert path.name in str(e.value) and e.value.code == 7 and sha(path) == before
    good = _valid(tmp_path, ".nii.gz")
    assert read_volume(good, max_bytes=20 * 16 * 12 * 4).shape == (20, 16, 12)


# ----------------------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("action", ["write", "check"])
def test_existing_output_refused_without_overwrite(tmp_path, action):
    path = tmp_path / "seg.nii.gz"
    path.write_bytes(b"old")
    labels = np.zeros((4, 4, 4), np.uint8)

    def run(overwrite):
        if action == "write":
            write_volume(path, labels, np.eye(4), overwrite=overwrite)
        else:
            check_output_path(path, overwrite=overwrite)

    with pytest.raises(OutputError, match="already exists") as e:
        run(False)
    assert "seg.nii.gz" in str(e.value) and e.value.code == 6 and path.read_bytes() == b"old"
    run(True)
    assert (path.read_bytes() == b"old") == (action == "check")


def _write_or_check(action, path):
    if action == "write":
        write_volume(path, np.zeros((4, 4, 4), np.uint8), np.eye(4))
    else:
        check_output_path(path, overwrite=False)


@pytest.mark.parametrize("action", ["write", "check"])
def test_missing_folder_refused(tmp_path, action):
    with pytest.raises(OutputError, match="does not exist") as e:
        _write_or_check(action, tmp_path / "no-such-folder" / "seg.nii.gz")
    assert "seg.nii.gz" in str(e.value) and os.listdir(tmp_path) == []


@pytest.mark.parametrize("action", ["write", "check"])
def test_unwritable_folder_refused(tmp_path, action):
    run = lambda path: _write_or_check(action, path)  # noqa: E731
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: chmod does not stop writing here")
        with pytest.raises(OutputError, match="not writable") as e:
            run(locked / "seg.nii.gz")
        assert "seg.nii.gz" in str(e.value) and os.listdir(locked) == []
    finally:
        locked.chmod(stat.S_IRWXU)


@pytest.mark.parametrize("name", ["dicom_out", "dicom_new", "seg.dcm", "seg.nhdr", "seg.mhd", "seg.png"])
def test_non_writable_formats_refused(tmp_path, name):
    (tmp_path / "dicom_out").mkdir()
    with pytest.raises(OutputError, match=r"write \.nii\.gz, \.nrrd or \.mha") as e:
        write_volume(tmp_path / name, np.zeros((4, 4, 4), np.uint8), np.eye(4))
    assert name in str(e.value) and sorted(os.listdir(tmp_path)) == ["dicom_out"]
    if name != "seg.png":  # check_output_path also vets report/preview paths: only image kinds are refused
        with pytest.raises(OutputError, match=r"write \.nii\.gz, \.nrrd or \.mha"):
            check_output_path(tmp_path / name, overwrite=True)


def test_check_output_path_accepts_other_outputs(tmp_path):
    for name in ("report.json", "preview.png", "seg.nii.gz", "seg.NRRD", "seg.mha", "seg.nii"):
        check_output_path(tmp_path / name, overwrite=False)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("interrupt", [RuntimeError("boom"), KeyboardInterrupt()])
def test_atomic_output_leaves_nothing_on_failure(tmp_path, interrupt):
    target = tmp_path / "seg.nii.gz"
    with pytest.raises(type(interrupt)):
        with atomic_output(target) as tmp:
            assert os.path.dirname(tmp) == str(tmp_path)
            assert os.path.basename(tmp).startswith(".seg.tmp-") and tmp.endswith(".nii.gz")
            nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4)), tmp)
            assert os.path.exists(tmp) and not target.exists()
            raise interrupt
    assert os.listdir(tmp_path) == []


def test_atomic_output_moves_into_place(tmp_path):
    target = tmp_path / "report.json"
    with atomic_output(target) as tmp:
        assert tmp.endswith(".json")
        open(tmp, "w").write("{}")
    assert os.listdir(tmp_path) == ["report.json"] and target.read_text() == "{}"


def test_write_json_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "results.json"
    write_json(target, {"runs": {"0": 0.5}})
    assert json.loads(target.read_text()) == {"runs": {"0": 0.5}} and target.read_text().endswith("\n")
    # An object json cannot encode fails half-way through the dump: the old file stays, no temporary left.
    with pytest.raises(TypeError):
        write_json(target, {"a": 1, "b": object()})
    assert os.listdir(tmp_path) == ["results.json"] and json.loads(target.read_text()) == {"runs": {"0": 0.5}}
    write_json(target, {"b": object()}, default=lambda o: "obj")
    assert json.loads(target.read_text()) == {"b": "obj"}


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def half_then_disk_full(img, filename):
        open(filename, "wb").write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.nib, "save", half_then_disk_full)
    with pytest.raises(OutputError, match="No space left") as e:
        write_volume(tmp_path / "seg.nii.gz", np.zeros((4, 4, 4), np.uint8), np.eye(4))
    assert "seg.nii.gz" in str(e.value) and os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "values, dtype",
    [((0, 3), np.uint8), ((0, 255), np.uint8), ((0, 300), np.int16), ((0, 40000), np.uint16), ((-1, 2), np.int16)],
)
def test_label_dtype_on_disk(tmp_path, values, dtype):
    labels = np.zeros((5, 5, 5), np.int64)
    labels[1, 1, 1], labels[2, 2, 2] = values
    for suffix in (".nii.gz", ".nrrd"):
        path = tmp_path / f"l{suffix}"
        write_volume(path, labels, oblique_affine())
        if suffix == ".nii.gz":
            assert nib.load(path).get_data_dtype() == dtype
        else:
            assert sitk.GetArrayViewFromImage(sitk.ReadImage(str(path))).dtype == dtype
        np.testing.assert_array_equal(read_volume(path).array, labels)


def test_write_like_keeps_the_input_header(tmp_path):
    array, affine = sample(), oblique_affine()
    img = nib.Nifti1Image((array * 10).astype(np.int16), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=2)
    img.header.set_slope_inter(0.1, 5.0)
    img.header["descrip"] = b"scanner X"
    nib.save(img, str(tmp_path / "in.nii.gz"))
    source = read_volume(tmp_path / "in.nii.gz")

    labels = (source.array > 105).astype(np.uint8)
    write_volume(tmp_path / "seg.nii.gz", labels, source.affine, like=source)
    out = nib.load(tmp_path / "seg.nii.gz")
    assert out.get_data_dtype() == np.uint8
    assert int(out.header["qform_code"]) == 1 and int(out.header["sform_code"]) == 2
    assert np.isnan(out.header["scl_slope"]) or out.header["scl_slope"] in (0, 1)
    assert out.header["descrip"].tobytes().rstrip(b"\0") == b"scanner X"
    np.testing.assert_array_equal(np.asanyarray(out.dataobj), labels)  # unscaled: 0/1, not 5.0/5.1
    back = read_volume(tmp_path / "seg.nii.gz")
    np.testing.assert_allclose(back.affine, source.affine, atol=1e-4)


def test_default_nifti_header_is_scanner_space_in_mm(tmp_path):
    write_volume(tmp_path / "a.nii", sample(), oblique_affine())
    hdr = nib.load(tmp_path / "a.nii").header
    assert int(hdr["sform_code"]) == 1 and int(hdr["qform_code"]) == 1
    assert hdr.get_xyzt_units()[0] == "mm"
    assert nib.load(tmp_path / "a.nii").get_data_dtype() == np.float32


# -------------------------------------------------------------------------------------- resampling


def blob_volume(path, affine, shape, centre, sigma=2.0) -> Volume:
    """A Gaussian blob placed at `centre` in world mm, whatever the grid."""
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    values = np.exp(-np.sum((xyz - centre) ** 2, axis=1) / (2 * sigma**2)).reshape(shape)
    return Volume(array=values.astype(np.float32), affine=affine, path=str(path))


def world_centroid(vol: Volume) -> np.ndarray:
    w = vol.array.astype(np.float64)
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in vol.shape], indexing="ij"), axis=-1).reshape(-1, 3)
    c = (ijk * w.reshape(-1, 1)).sum(0) / w.sum()
    return world(vol.affine, c)


def test_resample_keeps_world_position(tmp_path):
    centre = np.array([3.0, -4.0, 6.0])
    ref_affine = np.eye(4)
    ref_affine[:3, :3] = np.diag([1.5, 1.5, 2.0])
    ref_affine[:3, 3] = [-20, -25, -18]
    reference = Volume(np.zeros((28, 28, 20), np.float32) + np.arange(20), ref_affine, str(tmp_path / "t1.nii.gz"))
    moving_affine = oblique_affine(spacing=(1.0, 1.2, 1.1), origin=(0, 0, 0))
    # Put moving's grid centre near the blob, rotated, flipped and shifted relative to the reference.
    moving_affine[:3, 3] = centre - moving_affine[:3, :3] @ np.array([15.5, 13.0, 14.0]) + [1.7, -0.6, 0.9]
    moving = blob_volume(tmp_path / "flair.nii.gz", moving_affine, (32, 28, 30), centre)
    np.testing.assert_allclose(world_centroid(moving), centre, atol=0.05)

    out = resample_onto(moving, reference)
    assert out.shape == reference.shape and out.path == moving.path
    np.testing.assert_allclose(out.affine, reference.affine)
    assert np.linalg.norm(world_centroid(out) - centre) < min(reference.spacing)
    peak = np.unravel_index(np.argmax(out.array), out.shape)
    assert np.linalg.norm(world(out.affine, peak) - centre) <= np.linalg.norm(reference.spacing) / 2 + 1e-6

    labels = Volume((moving.array > 0.5).astype(np.uint8) * 4, moving_affine, moving.path)
    nearest = resample_onto(labels, reference, order=0)
    assert set(np.unique(nearest.array)) == {0, 4} and nearest.array.dtype == np.uint8


def test_resample_refuses_volumes_that_do_not_overlap(tmp_path):
    reference = Volume(sample((10, 10, 10)), np.eye(4), str(tmp_path / "t1.nii.gz"))
    far = np.eye(4)
    far[:3, 3] = [500.0, 0, 0]
    moving = Volume(sample((10, 10, 10)), far, str(tmp_path / "flair.nii.gz"))
    with pytest.raises(BadInputError, match="does not overlap") as e:
        resample_onto(moving, reference)
    assert "flair.nii.gz" in str(e.value)
    # Oblique grids whose bounding boxes overlap although no voxel of one lies in the other.
    tilted = np.eye(4)
    tilted[:3, :3] = rotation([0, 0, 1], 45) * 1.0
    tilted[:3, 3] = [13.0, 7.0, 0.0]  # every centre has x + y >= 20; the reference's corner is at 19
    assert np.all(io._world_box(Volume(sample((10, 10, 10)), tilted, "x"))[0][:2] < 9.5)  # boxes overlap
    with pytest.raises(BadInputError, match="does not overlap"):
        resample_onto(Volume(sample((10, 10, 10)), tilted, moving.path), reference)


def test_voxel_ml_is_the_affine_volume_oblique_and_flipped_included():
    c, s = np.cos(0.3), np.sin(0.3)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([2.0, -2.0, 3.0])  # a flipped axis: negative determinant
    assert Volume(np.zeros((2, 2, 2), np.float32), affine, "x").voxel_ml == pytest.approx(0.012)
