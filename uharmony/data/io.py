"""Reading, writing and validating 3D images: NIfTI (nibabel), NRRD/MetaImage (SimpleITK), DICOM folders.

Every volume is held in one convention: `array[i, j, k]` with a 4x4 `affine` mapping voxel (i, j, k) to
world RAS millimetres, as nibabel does. SimpleITK works in LPS with (z, y, x) arrays, so everything read
or written through it is converted here and nowhere else.

Every expected problem with an input is a one-line `BadInputError(message, path)` (or `OutOfMemoryError`),
raised before any output is written; outputs go through `atomic_output`, so a failure never leaves a
partial file behind. Nothing here modifies an input file.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import re
import secrets
import sys
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np

from uharmony.errors import BadInputError, OutOfMemoryError, OutputError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
# Detached-header formats (.nhdr/.mhd) are two files and cannot be replaced atomically: read-only.
OUTPUT_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha")
_WRITE_HINT = "write .nii.gz, .nrrd or .mha"
_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_SUPPORTED = "a .nii, .nii.gz, .nrrd, .nhdr, .mha or .mhd file, or a DICOM series folder"

MIN_SPACING_MM = 0.01
MAX_SPACING_MM = 50.0

# RAS <-> LPS: negate x and y. Its own inverse.
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Volume:
    """A 3D image: `array[i, j, k]` (float32 for images) and the voxel -> world RAS mm `affine`.

    Arrays read from files are usually Fortran-ordered (nibabel's layout, and a free transpose of
    SimpleITK's); use np.ascontiguousarray where a C layout matters.
    """

    array: np.ndarray
    affine: np.ndarray
    path: str
    header: object | None = None  # nibabel header when read from NIfTI (for a faithful round trip)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return _spacing(self.affine)

    @property
    def voxel_ml(self) -> float:
        """One voxel's volume in mL (an oblique or sheared affine included)."""
        return abs(float(np.linalg.det(np.asarray(self.affine, dtype=np.float64)[:3, :3]))) / 1000.0

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------- paths


def _suffix(path: str | os.PathLike) -> str:
    """The (compound) image suffix of a path, lower case, or '' when it has none we know."""
    name = os.path.basename(os.fspath(path)).lower()
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):  # ".nii.gz" before ".nii"
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    return ""


def is_image_path(path: str | os.PathLike) -> bool:
    """True for a file name with an image suffix (any case) or an existing folder (a DICOM series)."""
    return bool(_suffix(path)) or os.path.isdir(path)


# ------------------------------------------------------------------------------------------- checks


def _spacing(affine: np.ndarray) -> tuple[float, float, float]:
    norms = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return tuple(float(n) for n in norms)  # type: ignore[return-value]


def _fmt_shape(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


def _fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size or unit == "KiB":
            return f"{n / size:.3g} {unit}"
    raise AssertionError  # unreachable


def _check_shape(raw_shape, path: str) -> tuple[int, int, int]:
    """Squeeze trailing singleton axes beyond the third; refuse anything that is not a real 3D volume."""
    shape = [int(s) for s in raw_shape]
    if any(s == 0 for s in shape) or not shape:
        raise BadInputError(f"is empty (shape {_fmt_shape(shape) or '()'})", path)
    while len(shape) > 3 and shape[-1] == 1:
        shape.pop()
    if len(shape) < 3:
        raise BadInputError(f"is {len(shape)}D (shape {_fmt_shape(shape)}); a 3D volume is needed", path)
    if len(shape) == 3 and 1 in shape:
        # A single slice stored with a third axis of length 1 is still a 2D image.
        raise BadInputError(f"is 2D (shape {_fmt_shape(shape)}); a 3D volume is needed", path)
    if len(shape) == 4:
        raise BadInputError(f"is 4D with {shape[3]} volumes; give one 3D volume per file", path)
    if len(shape) > 4:
        raise BadInputError(f"is {len(shape)}D (shape {_fmt_shape(shape)}); a 3D volume is needed", path)
    return shape[0], shape[1], shape[2]


def _check_dtype(dtype: np.dtype, path: str) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype.kind not in "biuf":
        raise BadInputError(f"has voxel type {dtype}; a scalar (grey-value) image is needed", path)
    return dtype


def _check_affine(affine: np.ndarray, path: str) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise BadInputError("has a voxel-to-world matrix with NaN/Inf entries", path)
    spacing = _spacing(affine)
    if not all(MIN_SPACING_MM <= s <= MAX_SPACING_MM for s in spacing):
        shown = " x ".join(f"{s:.4g}" for s in spacing)
        raise BadInputError(
            f"has voxel spacing {shown} mm; each spacing must be between {MIN_SPACING_MM:g} and {MAX_SPACING_MM:g} mm",
            path,
        )
    # |det| relative to the product of the column norms is 1 for orthogonal axes, 0 for dependent ones.
    if abs(np.linalg.det(affine[:3, :3])) / float(np.prod(spacing)) < 1e-6:
        raise BadInputError("has a singular voxel-to-world matrix (its axes are not independent)", path)
    return affine


def _check_values(array: np.ndarray, path: str) -> None:
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise BadInputError(f"contains {bad} NaN/Inf voxels", path)
    lo, hi = float(array.min()), float(array.max())
    if lo == hi:
        raise BadInputError(f"is constant (every voxel is {lo:g})", path)


def _check_file(path: str) -> str:
    """Refuse what is not an existing, readable input; return its kind: 'nifti', 'itk' or 'dicom'."""
    if not os.path.lexists(path):
        raise BadInputError("does not exist", path)
    if not os.path.exists(path):
        raise BadInputError("is a broken link", path)
    if os.path.isdir(path):
        if not os.access(path, os.R_OK | os.X_OK):
            raise BadInputError("cannot be read (permission denied)", path)
        return "dicom"
    suffix = _suffix(path)
    if not suffix:
        raise BadInputError(f"is not a supported image; give {_SUPPORTED}", path)
    if not os.access(path, os.R_OK):
        raise BadInputError("cannot be read (permission denied)", path)
    if os.path.getsize(path) == 0:
        raise BadInputError("is an empty file (0 bytes)", path)
    return "nifti" if suffix in _NIFTI_SUFFIXES else "itk"


def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split("\n")[0].split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------------- SimpleITK glue


def _sitk():
    import SimpleITK  # imported lazily: NIfTI-only runs do not pay for it

    return SimpleITK


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """Capture C-level stderr while ITK/GDCM/MetaIO run.

    They print multi-line diagnostics straight to fd 2, which would break the one-line error contract;
    the text is handed back (it often names the real cause, e.g. MetaIO's byte counts). Process-wide
    while it lasts, so keep the wrapped call short.
    """
    captured: list[str] = []
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable fd 2 (e.g. a windowed process)
        yield captured
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode("utf-8", "replace"))


def _itk_reason(exc: BaseException, stderr_text: str, *, header: bool = False) -> str:
    """A one-line problem statement from a SimpleITK exception and what ITK printed on stderr."""
    m = re.search(r"ideal\s*=\s*(\d+)\s*:\s*actual\s*=\s*(\d+)", stderr_text)
    if m:  # MetaIO's own count; its exception text then blames errno, which is misleading
        return f"is truncated: expected {m.group(1)} bytes of image data, found {m.group(2)}"
    text = str(exc)
    nrrd = [ln for ln in text.splitlines() if ln.startswith("[nrrd]")]
    if nrrd:  # teem's innermost message is the cause ("fread got only ... (50% of expected)")
        cause = re.sub(r"^\[nrrd\]\s*\w+:\s*", "", nrrd[-1]).strip()
        if not header and re.search(r"expected \d+ bytes but received|got only|premature|EOF", cause):
            return f"is truncated ({' '.join(cause.split())[:200]})"
    else:
        m = re.search(r"ITK ERROR: [^:]*\):\s*(.*)", text)
        cause = m.group(1).strip() if m else _first_line(exc)
    cause = " ".join(cause.split())[:200]
    if header:
        return f"is not a readable image ({cause})"
    return f"cannot be read (truncated or corrupt: {cause})"


def _itk_affine(size_dim: int, spacing, direction, origin) -> np.ndarray:
    """RAS affine from ITK's LPS geometry (first three axes)."""
    d = np.asarray(direction, dtype=np.float64).reshape(size_dim, size_dim)[:3, :3]
    lps = np.eye(4)
    lps[:3, :3] = d * np.asarray(spacing, dtype=np.float64)[:3]
    lps[:3, 3] = np.asarray(origin, dtype=np.float64)[:3]
    return _LPS @ lps


def _sitk_dtype(pixel_id: int) -> np.dtype:
    """numpy dtype of a SimpleITK pixel type (via a 1-pixel image: no table to keep in sync)."""
    sitk = _sitk()
    try:
        return sitk.GetArrayFromImage(sitk.Image([1, 1], pixel_id)).dtype
    except RuntimeError:  # exotic types: only used for reporting, the voxels are read as float32
        return np.dtype(np.float64)


def _to_sitk(array: np.ndarray, affine: np.ndarray):
    """A SimpleITK image (LPS) from an (i, j, k) array and its RAS affine."""
    sitk = _sitk()
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array).T))  # (k, j, i) for SimpleITK
    lps = _LPS @ np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in (lps[:3, :3] / spacing).ravel()])
    image.SetOrigin([float(v) for v in lps[:3, 3]])
    return image


# ------------------------------------------------------------------------------------------ headers


@dataclass
class _Header:
    shape: tuple[int, int, int]
    affine: np.ndarray
    dtype: np.dtype
    kind: str  # "nifti" | "itk" | "dicom"
    source: Any  # nibabel image, primed sitk.ImageFileReader, or DICOM file list
    raw_size: int  # voxels promised by the header, before squeezing


_NIFTI_UNIT_MM = {"meter": 1000.0, "mm": 1.0, "micron": 0.001, "unknown": 1.0}


def _nifti_header(path: str) -> _Header:
    try:
        img = nib.load(path)
    except MemoryError:
        raise
    except Exception as exc:  # nibabel raises many types for a bad header
        raise BadInputError(f"is not a readable NIfTI image ({_first_line(exc)})", path) from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise BadInputError(f"is not a NIfTI image (nibabel reads it as {type(img).__name__})", path)
    shape = _check_shape(img.shape, path)
    dtype = _check_dtype(img.get_data_dtype(), path)
    _check_raw_pixdim(img, path)
    affine = np.array(img.affine, dtype=np.float64)
    # nibabel ignores xyzt_units; ITK (and so Slicer) honours them. Follow ITK so outputs align there.
    unit = img.header.get_xyzt_units()[0]
    affine[:3, :] *= _NIFTI_UNIT_MM.get(unit, 1.0)
    affine = _check_affine(affine, path)
    raw_size = int(np.prod(img.shape))
    if path.lower().endswith(".nii"):  # uncompressed: truncation is visible from the file size
        _check_nifti_bytes(img, os.path.getsize(path), path)
    return _Header(shape, affine, dtype, "nifti", img, raw_size)


def _check_raw_pixdim(img, path: str) -> None:
    """nibabel silently replaces a zero voxel size by 1 mm when loading; refuse it instead.

    Only matters when the affine comes from pixdim (no sform): with an sform, pixdim is unused.
    """
    with nib.openers.ImageOpener(path) as f:
        raw = type(img.header).from_fileobj(f, check=False)
    if int(raw["sform_code"]) == 0:
        pixdim = np.asarray(raw["pixdim"][1:4], dtype=np.float64)
        if not np.all(np.isfinite(pixdim)) or np.any(pixdim == 0):
            raise BadInputError(f"has an invalid voxel spacing in its header (pixdim {pixdim.tolist()})", path)


def _check_nifti_bytes(img, available: int, path: str) -> None:
    # The file's offset and scaling live on the array proxy; nibabel resets them in img.header.
    offset = int(img.dataobj.offset)
    needed = int(np.prod(img.shape)) * img.dataobj.dtype.itemsize
    if available < offset + needed:
        raise BadInputError(
            f"is truncated: the header promises {needed} bytes of voxel data, the file holds {max(available - offset, 0)}",
            path,
        )


def _itk_header(path: str) -> _Header:
    sitk = _sitk()
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    with _captured_stderr() as err:
        try:
            reader.ReadImageInformation()
            failure = None
        except RuntimeError as exc:
            failure = exc
    if failure is not None:
        raise BadInputError(_itk_reason(failure, "".join(err), header=True), path)
    size = reader.GetSize()
    shape = _check_shape(size, path)
    components = reader.GetNumberOfComponents()
    if components != 1:
        raise BadInputError(
            f"has {components} values per voxel (a vector or colour image); a scalar 3D volume is needed", path
        )
    dtype = _check_dtype(_sitk_dtype(reader.GetPixelID()), path)
    dim = reader.GetDimension()
    affine = _itk_affine(dim, reader.GetSpacing(), reader.GetDirection(), reader.GetOrigin())
    return _Header(shape, _check_affine(affine, path), dtype, "itk", reader, int(np.prod(size)))


def _dicom_header(path: str) -> _Header:
    """Geometry of the DICOM series in a folder, from each slice's header (no pixel data read).

    The slice axis comes from the actual slice positions, not from the slice normal: that is what the
    voxels are, also for a gantry-tilted series (a sheared affine). Uneven steps mean missing slices.
    """
    sitk = _sitk()
    try:
        entries = os.listdir(path)
    except OSError as exc:
        raise BadInputError(f"cannot be read ({exc.strerror})", path) from None
    if not entries:
        raise BadInputError("is an empty folder; a DICOM series folder is needed", path)
    with _captured_stderr():
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(path)
    if not series:
        raise BadInputError("contains no DICOM series (subfolders are not searched)", path)
    with _captured_stderr():
        by_series = {uid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(path, uid) for uid in series}
    uid = sorted(by_series, key=lambda u: (-len(by_series[u]), u))[0]
    files = list(by_series[uid])
    if len(by_series) > 1:
        log.warning(
            "%s: holds %d DICOM series; using series %s (%d files, the largest)", path, len(by_series), uid, len(files)
        )

    infos, failure = [], None
    with _captured_stderr() as err:
        for f in files:
            reader = sitk.ImageFileReader()
            reader.SetFileName(f)
            try:
                reader.ReadImageInformation()
            except RuntimeError as exc:
                failure = (f, exc)
                break
            infos.append(reader)
    if failure is not None:
        reason = _itk_reason(failure[1], "".join(err), header=True)
        raise BadInputError(f"DICOM file {os.path.basename(failure[0])} {reason}", path)

    if len(files) == 1:  # a single (possibly multi-frame) file: ITK gives its full geometry
        return _itk_header(files[0])
    first = infos[0]
    if any(r.GetSize()[:2] != first.GetSize()[:2] for r in infos):
        raise BadInputError("mixes slices of different sizes in one DICOM series", path)
    if any(not np.allclose(r.GetDirection(), first.GetDirection(), atol=1e-4) for r in infos):
        raise BadInputError("mixes slices of different orientations in one DICOM series", path)
    if first.GetNumberOfComponents() != 1:
        raise BadInputError("is a colour DICOM series; a scalar 3D volume is needed", path)
    positions = np.array([r.GetOrigin()[:3] for r in infos], dtype=np.float64)
    steps = np.diff(positions, axis=0)
    step = (positions[-1] - positions[0]) / (len(files) - 1)
    gap = float(np.linalg.norm(step))
    distinct = len({tuple(np.round(p, 3)) for p in positions})
    if distinct < len(files):
        raise BadInputError(
            f"has {len(files)} images at {distinct} slice positions (several echoes or time points?); "
            "export one 3D volume",
            path,
        )
    lengths = np.linalg.norm(steps, axis=1)
    if np.max(np.linalg.norm(steps - step, axis=1)) > 0.02 * gap + 1e-3:
        raise BadInputError(
            f"has unevenly spaced slices ({lengths.min():.3g} to {lengths.max():.3g} mm apart); a slice may be missing",
            path,
        )
    direction = np.asarray(first.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, 0] = direction[:, 0] * first.GetSpacing()[0]
    lps[:3, 1] = direction[:, 1] * first.GetSpacing()[1]
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    shape = _check_shape((first.GetSize()[0], first.GetSize()[1], len(files)), path)
    dtype = _check_dtype(_sitk_dtype(first.GetPixelID()), path)
    return _Header(shape, _check_affine(_LPS @ lps, path), dtype, "dicom", files, int(np.prod(shape)))


def _header(path: str | os.PathLike) -> _Header:
    p = os.fspath(path)
    kind = _check_file(p)
    if kind == "nifti":
        return _nifti_header(p)
    if kind == "itk":
        return _itk_header(p)
    return _dicom_header(p)


def read_header(path: str | os.PathLike) -> tuple[tuple[int, int, int], np.ndarray, np.dtype]:
    """Shape, RAS affine and on-disk voxel dtype, validated, without reading voxel data.

    Use it to estimate memory and to fail early: it raises the same header-level BadInputErrors as
    read_volume (not 3D, empty, spacing, singular affine, truncated uncompressed NIfTI, ...).
    """
    h = _header(path)
    return h.shape, h.affine.copy(), h.dtype


# -------------------------------------------------------------------------------------------- reads


def _read_nifti(h: _Header, path: str) -> np.ndarray:
    img = h.source
    if path.lower().endswith(".gz"):
        # Decompress the whole stream ourselves: gzip then checks the CRC and length at the end, so a
        # truncated or damaged file is refused instead of handing back whatever decoded before the cut
        # (nibabel stops reading once it has the voxels it wants and never sees the trailer).
        try:
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise BadInputError(f"is truncated or corrupt ({_first_line(exc)})", path) from None
        _check_nifti_bytes(img, len(raw), path)
        # View the voxels in place (no second raw copy) and scale as nibabel's get_fdata would.
        proxy = img.dataobj
        data = np.frombuffer(raw, dtype=proxy.dtype, count=h.raw_size, offset=int(proxy.offset))
        out = data.reshape(img.shape, order=proxy.order).astype(np.float32)
        slope, inter = float(proxy.slope), float(proxy.inter)  # 1 and 0 when the file has no scaling
        if slope != 1.0:
            out *= np.float32(slope)
        if inter != 0.0:
            out += np.float32(inter)
        return out
    try:
        return img.get_fdata(dtype=np.float32)
    except MemoryError:
        raise
    except OSError as exc:  # nibabel: "Expected N bytes, got M bytes from ..."
        m = re.search(r"Expected (\d+) bytes, got (\d+)", str(exc))
        if m:
            raise BadInputError(f"is truncated: expected {m.group(1)} bytes of voxel data, found {m.group(2)}", path) from None
        raise BadInputError(f"cannot be read ({_first_line(exc)})", path) from None
    except Exception as exc:
        raise BadInputError(f"cannot be read ({_first_line(exc)})", path) from None


def _read_itk(h: _Header, path: str) -> np.ndarray:
    sitk = _sitk()
    if h.kind == "dicom":
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(h.source)  # our order: slice k is file k, as the affine assumes
    else:
        reader = h.source
    with _captured_stderr() as err:
        try:
            image = reader.Execute()
            failure = None
        except RuntimeError as exc:
            failure = exc
    if failure is not None:
        if "allocate" in str(failure).lower():
            raise MemoryError
        raise BadInputError(_itk_reason(failure, "".join(err)), path)
    if "".join(err).strip():
        log.debug("%s: ITK said: %s", path, " ".join("".join(err).split()))
    data = sitk.GetArrayFromImage(image)  # (k, j, i) or (t, k, j, i)
    del image
    return data.T.astype(np.float32, copy=False)  # (i, j, k), Fortran-ordered without a copy


def read_volume(path: str | os.PathLike, *, max_bytes: int | None = None) -> Volume:
    """Read and validate a 3D image (file or DICOM folder) as float32 (i, j, k) + RAS affine.

    `max_bytes`: refuse with OutOfMemoryError, before reading any voxel, when the float32 array would
    be larger. Every problem with the input is a one-line BadInputError naming it.
    """
    p = os.fspath(path)
    h = _header(p)
    if max_bytes is not None:
        needed = int(np.prod(h.shape)) * 4
        if needed > max_bytes:
            raise OutOfMemoryError(
                f"needs about {_fmt_bytes(needed)} of memory, {_fmt_bytes(max(max_bytes, 0))} available", p
            )
    try:
        array = _read_nifti(h, p) if h.kind == "nifti" else _read_itk(h, p)
    except MemoryError:
        raise OutOfMemoryError(f"needs about {_fmt_bytes(int(np.prod(h.shape)) * 4)} of memory; not available", p) from None
    if array.size != h.raw_size:  # belt and braces: never accept a short read
        raise BadInputError(f"is truncated: {array.size} of {h.raw_size} voxels could be read", p)
    array = array.reshape(h.shape, order="A")
    _check_values(array, p)
    header = h.source.header if h.kind == "nifti" else None
    return Volume(array=array, affine=h.affine.copy(), path=p, header=header)


# ------------------------------------------------------------------------------------------- writes


def _check_output_kind(p: str, *, image: bool) -> None:
    if os.path.isdir(p):
        raise OutputError(f"is a folder; a DICOM series cannot be written, {_WRITE_HINT}", p)
    suffix = _suffix(p)
    ext = os.path.splitext(p)[1].lower()
    # Non-image outputs (a .json report, a .png preview) are fine; a label map needs one of ours.
    if (image and suffix not in OUTPUT_SUFFIXES) or (suffix and suffix not in OUTPUT_SUFFIXES) or ext in ("", ".dcm"):
        raise OutputError(f"is not a supported output file name; {_WRITE_HINT}", p)


def check_output_path(path: str | os.PathLike, *, overwrite: bool) -> None:
    """Refuse an output path now, before long work: a folder or an image kind we cannot write
    (DICOM, detached headers, no suffix), a missing or unwritable folder, or an existing file.

    Other file kinds (.json, .png) pass, so one call checks every output of a run.
    """
    p = os.fspath(path)
    _check_output_kind(p, image=False)
    folder = os.path.dirname(os.path.abspath(p))
    if not os.path.isdir(folder):
        raise OutputError(f"cannot be written: folder {folder} does not exist", p)
    if os.path.lexists(p) and not overwrite:
        raise OutputError("already exists; use --overwrite to replace it", p)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"cannot be written: folder {folder} is not writable", p)


def _compound_suffix(name: str) -> str:
    return _suffix(name) or os.path.splitext(name)[1]


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to `path` (same folder, same compound suffix); move it onto `path`
    only when the body succeeds. On any exception, KeyboardInterrupt included, the temporary file is
    deleted and the exception re-raised, so no partial output is ever left behind. Single-file outputs only.
    """
    p = os.fspath(path)
    folder, name = os.path.split(p)
    suffix = _compound_suffix(name)
    stem = name[: len(name) - len(suffix)] if suffix else name
    tmp = os.path.join(folder, f".{stem}.tmp-{secrets.token_hex(4)}{suffix}")
    try:
        yield tmp
        if not os.path.exists(tmp):
            raise RuntimeError(f"atomic_output: nothing was written to {tmp}")
        os.replace(tmp, p)  # atomic on one file system; tmp is in the same folder
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_json(path: str | os.PathLike, data: Any, *, indent: int | None = 1, default=None) -> None:
    """Write `data` as JSON to `path` through `atomic_output`, flushed to disk before the move: a reader
    (another process, or the next run after a crash) sees the old file or the new one, never half of one."""
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=indent, default=default)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _storage_array(array: np.ndarray) -> np.ndarray:
    """Smallest faithful on-disk type: labels as uint8 (or int16/uint16/int32), images as float32."""
    a = np.asarray(array)
    if a.dtype.kind == "b":
        return a.astype(np.uint8)
    if a.dtype.kind in "iu":
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        for dtype in (np.uint8, np.int16, np.uint16, np.int32):
            info = np.iinfo(dtype)
            if info.min <= lo and hi <= info.max:
                return a.astype(dtype, copy=False)
        raise ValueError(f"label values {lo}..{hi} do not fit in int32")
    if a.dtype.kind == "f":
        return a.astype(np.float32, copy=False)
    raise ValueError(f"cannot write voxel type {a.dtype}")


def _write_nifti(tmp: str, array: np.ndarray, affine: np.ndarray, like: Volume | None) -> None:
    like_header = getattr(like, "header", None)
    if isinstance(like_header, (nib.Nifti1Header, nib.Nifti2Header)):
        # Keep the input's header (units, intent, description, xform codes) so the output reads back
        # like the input did; only what describes these voxels changes.
        header = like_header.copy()
        klass = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
        sform_code, qform_code = int(header["sform_code"]), int(header["qform_code"])
        if sform_code == 0 and qform_code == 0:
            sform_code = qform_code = 1  # otherwise the affine would be lost
        header.set_data_dtype(array.dtype)
        header.set_slope_inter(None, None)  # no scaling: the voxels are the values
        header["cal_min"] = header["cal_max"] = 0
        header.set_xyzt_units(xyz="mm", t=header.get_xyzt_units()[1])  # read_volume converted to mm
    else:
        header, klass = None, nib.Nifti1Image
        sform_code = qform_code = 1  # scanner
    img = klass(array, affine, header=header)
    img.set_sform(affine, code=sform_code)
    img.set_qform(affine, code=qform_code)
    if header is None:
        img.header.set_xyzt_units(xyz="mm", t="sec")
    nib.save(img, tmp)


def write_volume(
    path: str | os.PathLike,
    array: np.ndarray,
    affine: np.ndarray,
    *,
    like: Volume | None = None,
    overwrite: bool = False,
) -> None:
    """Write a 3D (i, j, k) array with its RAS affine; the format follows the suffix.

    Integer/bool arrays are labels (uint8 when they fit); float arrays are written as float32. `like`
    (a Volume read from NIfTI) lends its header. The file appears complete or not at all.
    """
    p = os.fspath(path)
    _check_output_kind(p, image=True)
    check_output_path(p, overwrite=overwrite)
    a = np.asarray(array)
    if a.ndim != 3:
        raise ValueError(f"write_volume needs a 3D array, got shape {a.shape}")
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4) or not np.all(np.isfinite(aff)):
        raise ValueError("write_volume needs a finite 4x4 affine")
    a = _storage_array(a)
    try:
        with atomic_output(p) as tmp:
            if _suffix(p) in _NIFTI_SUFFIXES:
                _write_nifti(tmp, a, aff, like)
            else:
                sitk = _sitk()
                with _captured_stderr() as err:
                    try:
                        sitk.WriteImage(_to_sitk(a, aff), tmp, useCompression=True)
                        failure = None
                    except RuntimeError as exc:
                        failure = exc
                if failure is not None:
                    raise OutputError(f"cannot be written ({_itk_reason(failure, ''.join(err))})", p)
    except OSError as exc:
        raise OutputError(f"cannot be written ({exc.strerror or _first_line(exc)})", p) from None


# --------------------------------------------------------------------------------------- resampling


def _world_box(vol: Volume) -> tuple[np.ndarray, np.ndarray]:
    """World (RAS) bounding box of the voxel grid, voxel edges included."""
    corners = np.array(np.meshgrid(*[[-0.5, s - 0.5] for s in vol.shape], indexing="ij")).reshape(3, -1)
    world = vol.affine[:3, :3] @ corners + vol.affine[:3, 3:4]
    return world.min(axis=1), world.max(axis=1)


def resample_onto(moving: Volume, reference: Volume, *, order: int = 1) -> Volume:
    """Resample `moving` onto `reference`'s grid through world space (order 1: linear, 0: nearest).

    Voxels outside `moving`'s field of view get its minimum (its background). Refuses volumes that do
    not overlap in world space, naming `moving.path`.
    """
    if order not in (0, 1):
        raise ValueError("order must be 0 (nearest) or 1 (linear)")
    lo_m, hi_m = _world_box(moving)
    lo_r, hi_r = _world_box(reference)
    if np.any(hi_m <= lo_r) or np.any(hi_r <= lo_m):
        raise BadInputError(f"does not overlap {os.path.basename(reference.path) or 'the reference'} in world space", moving.path)
    sitk = _sitk()
    fill = float(np.min(moving.array))
    interp = sitk.sitkNearestNeighbor if order == 0 else sitk.sitkLinear
    source = moving.array if order == 0 else moving.array.astype(np.float32, copy=False)
    ref_grid = sitk.Image([int(n) for n in reference.shape], sitk.sitkUInt8)  # geometry only
    ref_geom = _to_sitk(np.zeros((1, 1, 1), np.uint8), reference.affine)
    ref_grid.SetSpacing(ref_geom.GetSpacing())
    ref_grid.SetDirection(ref_geom.GetDirection())
    ref_grid.SetOrigin(ref_geom.GetOrigin())
    out = sitk.Resample(_to_sitk(source, moving.affine), ref_grid, sitk.Transform(), interp, fill)
    # The boxes of oblique grids can overlap while no reference voxel centre falls inside moving.
    inside = sitk.Resample(
        _to_sitk(np.ones(moving.shape, np.uint8), moving.affine), ref_grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0
    )
    if not sitk.GetArrayViewFromImage(inside).any():
        raise BadInputError(f"does not overlap {os.path.basename(reference.path) or 'the reference'} in world space", moving.path)
    array = sitk.GetArrayFromImage(out).T
    return Volume(array=array, affine=np.array(reference.affine, dtype=np.float64), path=moving.path, header=None)
