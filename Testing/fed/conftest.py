"""Federation fixtures: keys and tiny synthetic sites (helpers in fed_helpers.py)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def fed_data(tmp_path_factory) -> dict:
    """Keys (CA + server cert, three site keys) and three tiny datalists (6 mm phantoms)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from uharmony.fed.keys import make_ca, make_site_key
    from uharmony.train.data import write_synth_datalist

    root = tmp_path_factory.mktemp("fed-data")
    make_ca(root / "keys")
    keys = {n: make_site_key(n, root / "keys")[0] for n in ("site-a", "site-b", "site-c", "rogue")}
    data = {"site-a": write_synth_datalist(root / "t1a", "synth-t1", name="t1a", training_seeds=(0, 1),
                                           validation_seeds=(2,), spacing_mm=6.0),
            "site-b": write_synth_datalist(root / "t2", "synth-t2", name="t2", training_seeds=(3, 4),
                                           validation_seeds=(5,), spacing_mm=6.0),
            "site-c": write_synth_datalist(root / "t1c", "synth-t1", name="t1c", training_seeds=(6, 7, 8),
                                           validation_seeds=(9,), spacing_mm=6.0)}
    return {"root": root, "keys": keys, "data": data, "ca": root / "keys" / "ca.crt"}

