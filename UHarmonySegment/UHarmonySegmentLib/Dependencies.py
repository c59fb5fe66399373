"""Which Python packages the library still needs in Slicer, and how to install them safely.

Rules (DESIGN.md, issue 6):
- torch comes from the PyTorch extension's installer when it is present (it picks the CUDA build
  that matches the machine); never a plain ``pip install torch`` behind the user's back;
- Slicer's own numpy and SimpleITK are never replaced: every install runs with a constraints file
  pinning the versions Slicer has (pip then refuses, visibly, rather than swapping them);
- hospitals without internet install from a folder of wheels: ``--no-index --find-links DIR``.
Nothing here imports the packages it checks (importing torch into Slicer's process is avoided).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
from typing import Callable, Iterable

from .Library import MODULE_DIR

REQUIREMENTS_FILE = os.path.join(MODULE_DIR, "Resources", "requirements.txt")
PROTECTED_PACKAGES = ("numpy", "SimpleITK")
TORCH_REQUIREMENT = "torch>=2.3"

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def load_requirements(path: str = REQUIREMENTS_FILE) -> list[str]:
    """Requirement lines of a requirements file (comments, blanks and pip options dropped)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line and not line.startswith("-"):
                out.append(line)
    return out


def requirement_name(requirement: str) -> str:
    match = _NAME.match(requirement)
    if not match:
        raise ValueError(f"not a requirement: {requirement!r}")
    return match.group(1)


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _satisfies(version: str, requirement: str) -> bool:
    try:
        from packaging.requirements import Requirement
        from packaging.version import Version
    except ImportError:  # no packaging: presence is all we can check
        return True
    try:
        return Requirement(requirement).specifier.contains(Version(version), prereleases=True)
    except Exception:
        return True


def missing_requirements(requirements: Iterable[str],
                         version_of: Callable[[str], str | None] = installed_version) -> list[str]:
    """The requirements that are not installed, or installed in a version that does not satisfy them."""
    missing = []
    for requirement in requirements:
        version = version_of(requirement_name(requirement))
        if version is None or not _satisfies(version, requirement):
            missing.append(requirement)
    return missing


def torch_missing(version_of: Callable[[str], str | None] = installed_version) -> bool:
    return bool(missing_requirements([TORCH_REQUIREMENT], version_of))


def constraints_text(protected: Iterable[str] = PROTECTED_PACKAGES,
                     version_of: Callable[[str], str | None] = installed_version) -> str:
    """A pip constraints file pinning Slicer's own copies of `protected` to their installed versions."""
    lines = ["# written by UHarmony: keep Slicer's own packages as they are"]
    for name in protected:
        version = version_of(name)
        if version:
            lines.append(f"{name}=={version}")
    return "\n".join(lines) + "\n"


def pip_arguments(requirements: Iterable[str], constraints_path: str, wheel_dir: str | None = None) -> list[str]:
    """Arguments after ``pip install``: constrained, and offline from `wheel_dir` when given."""
    args = ["--constraint", constraints_path]
    if wheel_dir:
        args += ["--no-index", "--find-links", wheel_dir]
    return args + list(requirements)


def dependency_status(requirements: Iterable[str] | None = None,
                      version_of: Callable[[str], str | None] = installed_version) -> dict:
    """``{"torch": bool (installed), "missing": [...], "ok": bool}`` for the widget's banner."""
    reqs = load_requirements() if requirements is None else list(requirements)
    missing = missing_requirements(reqs, version_of)
    torch_ok = not torch_missing(version_of)
    return {"torch": torch_ok, "missing": missing, "ok": torch_ok and not missing}
