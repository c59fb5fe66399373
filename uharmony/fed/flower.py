"""Plumbing around Flower's processes and CLI (flwr==1.41.0; see ../shared/FLOWER.md).

Every Flower process gets telemetry and the update check off and a private ``FLWR_HOME``. The
federated app (the FAB that ``flwr run`` ships) is generated here, byte for byte the same on every
machine with the same uharmony version: only a ``pyproject.toml`` naming our installed ServerApp and
ClientApp. Its sha256 is what a site approves by default (`app_fab_sha256`).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from uharmony import __version__
from uharmony.errors import ExitCode, FederationError, UHarmonyError

FLWR_VERSION = "1.41.0"
APP_NAME = "uharmony-fed"
PUBLISHER = "uharmony"


def require_flower() -> None:
    """Flower must be installed at the pinned version (the extra ``uharmony[fed]``)."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        found = version("flwr")
    except PackageNotFoundError:
        raise FederationError(f"Flower is not installed: pip install 'flwr=={FLWR_VERSION}' (or uharmony[fed])") \
            from None
    if found != FLWR_VERSION:
        raise FederationError(f"Flower {found} is installed but uharmony's federation is tested with "
                              f"{FLWR_VERSION} only (pip install 'flwr=={FLWR_VERSION}')")


def flower_env(home: str | os.PathLike, extra: dict | None = None) -> dict[str, str]:
    """The environment of every Flower process: no telemetry, no update check, a private FLWR_HOME."""
    env = dict(os.environ)
    env.update(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", FLWR_HOME=str(home),
               PYTHONUNBUFFERED="1")
    # Flower starts its helpers (flower-superexec, flwr-serverapp) by name: this environment's first.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(extra or {})
    return env


def tool(name: str) -> str:
    """A Flower executable of this Python environment (next to sys.executable), else from PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise FederationError(f"{name} not found (install flwr=={FLWR_VERSION} in this environment)")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(host, None))
        except OSError:
            return False


def split_address(address: str, what: str = "--server") -> tuple[str, int]:
    """'HOST:PORT' or '[v6]:PORT' -> (host, port); a one-line usage error otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UHarmonyError(f"{what} {address!r} must be HOST:PORT", code=ExitCode.USAGE)
    return host.strip("[]"), int(port)


# ------------------------------------------------------------------------------ the app (FAB)

def app_pyproject() -> str:
    """The federated app's pyproject.toml: it ships no code, only names our installed apps."""
    return f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{APP_NAME}"
version = "{__version__}"
description = "U-Harmony FedGIN: the ServerApp and ClientApp are the installed uharmony package's"
license = "Apache-2.0"
dependencies = ["uharmony=={__version__}", "flwr=={FLWR_VERSION}"]

[tool.flwr.app]
publisher = "{PUBLISHER}"

[tool.flwr.app.components]
serverapp = "uharmony.fed.server_app:app"
clientapp = "uharmony.fed.client_app:app"

[tool.flwr.app.config]
settings = "{{}}"
"""


def write_app_dir(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(app_pyproject(), encoding="utf-8")
    return folder


def fab_bytes_of(folder: str | os.PathLike) -> bytes:
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(Path(folder))


def app_fab_sha256() -> str:
    """The sha256 of the FAB `flwr run` builds from our app (deterministic: Flower fixes zip dates)."""
    with tempfile.TemporaryDirectory(prefix="uharmony-fab-") as tmp:
        return hashlib.sha256(fab_bytes_of(write_app_dir(tmp))).hexdigest()


# ------------------------------------------------------------------------------ the flwr CLI

def write_cli_config(home: str | os.PathLike, address: str, *, ca: str | None, insecure: bool) -> None:
    """$FLWR_HOME/config.toml naming one SuperLink connection, 'uharmony'."""
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", 'default = "uharmony"', "", "[superlink.uharmony]", f'address = "{address}"']
    if insecure:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {json.dumps(str(Path(ca).resolve()))}")
    (home / "config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")


def flwr_cli(args: list[str], home: str | os.PathLike, *, timeout: float = 60, check_json: bool = True) -> dict:
    """Run ``flwr ARGS --format json`` (connection 'uharmony'); returns its JSON (``success`` checked)."""
    cmd = [tool("flwr"), *args, "--format", "json"]
    try:
        done = subprocess.run(cmd, env=flower_env(home), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        raise FederationError(f"`flwr {' '.join(args[:2])}` did not answer within {timeout:.0f} s") from None
    text = done.stdout.strip()
    try:
        out = json.loads(text[text.index("{"):]) if "{" in text else {}
    except ValueError:
        out = {}
    if check_json and not out.get("success", False):
        reason = out.get("error-message") or out.get("error") or (done.stderr.strip().splitlines() or [text])[-1:]
        if isinstance(reason, list):
            reason = " ".join(reason)
        raise FederationError(f"`flwr {' '.join(args[:2])}` failed: {' '.join(str(reason).split())[:300]}")
    return out
