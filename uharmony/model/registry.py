"""Where models live and which ones the user trusts.

- The bundled model ships inside the package (`uharmony/models/<name>`).
- The user's model folder is ``$UHARMONY_MODELS`` or the platform's user data folder; it holds one
  sub-folder per model and ``trusted.json``, which records the sha256 of each model's weights and card
  when the user adds it. A model there whose files changed since is refused.
- The sha256 inside a card only detects corruption; trust comes from that record.

Torch-free: the Slicer module lists and adds models without loading a network.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from uharmony.errors import BadModelError, OutputError
from uharmony.model.card import CARD_FILE, WEIGHTS_FILE, load_card

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "models"
# The default: the brain model (issue 4) when it is bundled; the small starter model otherwise (it stays
# bundled as the tests' fast fixture).
DEFAULT_MODEL = "brain" if (BUNDLED_DIR / "brain" / "card.json").is_file() else "starter"
TRUST_FILE = "trusted.json"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def user_models_dir() -> Path:
    """The one place that decides where the user's models are."""
    env = os.environ.get("UHARMONY_MODELS")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("uharmony", appauthor=False)) / "models"


def bundled_model_dir(name: str = DEFAULT_MODEL) -> Path:
    return BUNDLED_DIR / name


@dataclass
class ModelEntry:
    name: str
    path: str
    sha256: str | None
    bundled: bool
    trusted: bool
    problem: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def verify_weights(model_dir: str | Path, card: dict | None = None) -> str:
    """Check the weights file against the card's sha256 (corruption, truncation); return the hash."""
    model_dir = Path(model_dir)
    card = card if card is not None else load_card(model_dir)
    weights = model_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise BadModelError(f"{WEIGHTS_FILE} is missing", model_dir)
    actual = sha256_file(weights)
    if actual != card["weights"]["sha256"]:
        raise BadModelError(
            f"weights do not match the card's sha256 (file {actual[:12]}..., card {card['weights']['sha256'][:12]}...): "
            "the file is corrupt, truncated or was replaced", weights)
    return actual


def publish_permissions(folder: Path) -> None:
    """mkdtemp makes a private folder; a published model is readable like any file (umask applies)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


@contextlib.contextmanager
def staged_folder(dest: Path, *, public: bool = True) -> Iterator[Path]:
    """Yield an empty staging folder beside `dest`; on success it replaces `dest` by a rename.

    On any exception (Ctrl-C included) the staging folder is removed and `dest` is left as it was,
    so a reader never sees a half-written model or checkpoint.
    """
    dest = Path(dest)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    try:
        yield staging
        if public:
            publish_permissions(staging)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _read_trust(root: Path) -> dict:
    path = root / TRUST_FILE
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise BadModelError(f"cannot be read: {e}", path) from None
    if not isinstance(data, dict):
        raise BadModelError("is not a JSON object", path)
    return data


def _write_trust(root: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".trusted-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
    os.replace(tmp, root / TRUST_FILE)


def _check_trusted(model_dir: Path, record: dict | None) -> str:
    """Refuse a model of the user's folder that is not recorded or that changed since it was added."""
    if record is None:
        raise BadModelError("is in the model folder but was never added with `uharmony models add`", model_dir)
    card = load_card(model_dir)
    weights = verify_weights(model_dir, card)
    for key, actual in (("weights_sha256", weights), ("card_sha256", sha256_file(model_dir / CARD_FILE))):
        if record.get(key) != actual:
            raise BadModelError(
                f"changed since it was added ({key.split('_')[0]} sha256 now {actual[:12]}..., recorded "
                f"{str(record.get(key))[:12]}...); if you trust the new version, remove it and add it again",
                model_dir)
    return weights


def resolve_model(spec: str | os.PathLike | None) -> Path:
    """Find a model folder: None = the bundled default, a path to a folder, or a name.

    A name is looked up among the user's models (trust checked), then among the bundled ones.
    A folder inside the user's model folder given by path is trust-checked too.
    """
    if spec is None or str(spec) == "":
        return bundled_model_dir()
    root = user_models_dir()
    path = Path(spec).expanduser()
    if path.is_dir():
        try:
            inside = path.resolve().parent == root.resolve()
        except OSError:
            inside = False
        if inside:
            _check_trusted(path, _read_trust(root).get(path.name))
        return path
    name = str(spec)
    if os.sep not in name and "/" not in name:
        if (root / name).is_dir():
            _check_trusted(root / name, _read_trust(root).get(name))
            return root / name
        if bundled_model_dir(name).is_dir():
            return bundled_model_dir(name)
    raise BadModelError("no such model folder, and no model of that name in "
                        f"{root} or the bundled models (see `uharmony models list`)", spec)


def list_models() -> list[ModelEntry]:
    entries = []
    for d in sorted(p for p in BUNDLED_DIR.iterdir() if (p / CARD_FILE).exists()) if BUNDLED_DIR.is_dir() else []:
        entries.append(_entry(d, bundled=True, record=None))
    root = user_models_dir()
    if root.is_dir():
        trust = _read_trust(root)
        for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            entries.append(_entry(d, bundled=False, record=trust.get(d.name)))
    return entries


def _entry(d: Path, bundled: bool, record: dict | None) -> ModelEntry:
    try:
        sha = verify_weights(d) if bundled else _check_trusted(d, record)
        return ModelEntry(d.name, str(d), sha, bundled, True)
    except BadModelError as e:
        return ModelEntry(d.name, str(d), None, bundled, False, problem=e.message)


def add_model(src: str | os.PathLike, name: str | None = None, *, overwrite: bool = False) -> ModelEntry:
    """Validate a model package, copy it into the user's folder and record its hashes."""
    src = Path(src).expanduser()
    card = load_card(src)
    verify_weights(src, card)
    _check_loadable(src, card)
    name = name or card["name"]
    if not name or "/" in name or name.startswith(".") or os.sep in name:
        raise BadModelError(f"{name!r} is not a valid model name", src)
    root = user_models_dir()
    root.mkdir(parents=True, exist_ok=True)
    dest = root / name
    if dest.exists() and not overwrite:
        raise OutputError(f"a model named {name!r} exists already (remove it first, or use --overwrite)", dest)
    with staged_folder(dest) as staging:
        for f in (CARD_FILE, WEIGHTS_FILE):
            shutil.copy2(src / f, staging / f)
        record = {
            "weights_sha256": sha256_file(staging / WEIGHTS_FILE),
            "card_sha256": sha256_file(staging / CARD_FILE),
            "added": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "source": str(src.resolve()),
        }
        if record["weights_sha256"] != card["weights"]["sha256"]:
            raise BadModelError("changed while it was being copied", src)
    trust = _read_trust(root)
    trust[name] = record
    _write_trust(root, trust)
    return ModelEntry(name, str(dest), record["weights_sha256"], False, True)


def remove_model(name: str) -> Path:
    root = user_models_dir()
    dest = root / name
    trust = _read_trust(root) if root.is_dir() else {}
    if not dest.is_dir() and name not in trust:
        raise BadModelError("no model of that name in the user's model folder", name)
    if dest.is_dir():
        shutil.rmtree(dest)
    trust.pop(name, None)
    if root.is_dir():
        _write_trust(root, trust)
    return dest


def _check_loadable(model_dir: Path, card: dict) -> None:
    """Parse the safetensors header (no torch, no pickle) and check the tensors look like weights."""
    from safetensors import safe_open

    path = model_dir / WEIGHTS_FILE
    try:
        with safe_open(str(path), framework="numpy") as f:
            keys = list(f.keys())
    except Exception as e:  # safetensors raises its own error types for every malformed header
        raise BadModelError(f"is not a valid safetensors file: {e}", path) from None
    if not keys:
        raise BadModelError("holds no tensors", path)
    missing = [d["name"] for d in card["domains"] if f"heads.{d['name']}.weight" not in keys]
    if missing:
        raise BadModelError(f"has no output head for domain(s) {missing} listed in the card", path)
