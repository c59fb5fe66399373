"""Private temporary folders for patient data: made 0700, ALWAYS deleted after a run.

Both modules hand the library process a folder of exported volumes (patient data). The caller owns
that folder (DESIGN.md, "Progress protocol") and deletes it whatever happened; a folder of a run that
never finished (Slicer closed mid-run) is removed when the interpreter exits.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time

# folders of runs still going; removed at interpreter exit if a run was never finished
LIVE_TEMP_DIRS: set[str] = set()


def make_private_dir(root: str | None = None, prefix: str = "uharmony-") -> str:
    """A new folder only this user can read (mkdtemp: mode 0700), registered for clean-up at exit."""
    path = tempfile.mkdtemp(prefix=prefix, dir=root)
    LIVE_TEMP_DIRS.add(path)
    os.chmod(path, 0o700)
    return path


def remove_tree(path: str, attempts: int = 20) -> bool:
    """Delete a folder, retrying briefly (Windows keeps files of a just-ended process locked)."""
    for attempt in range(attempts):
        if not os.path.exists(path):
            LIVE_TEMP_DIRS.discard(path)
            return True
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.exists(path):
            LIVE_TEMP_DIRS.discard(path)
            return True
        time.sleep(0.05 * (attempt + 1))
    return not os.path.exists(path)


@atexit.register
def _remove_live_temp_dirs() -> None:
    for path in list(LIVE_TEMP_DIRS):
        remove_tree(path, attempts=3)
        LIVE_TEMP_DIRS.discard(path)
