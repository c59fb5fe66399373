"""What travels between the coordinator and a site, and the whitelist of what may leave a site.

A site's train reply is a RecordDict with exactly these records (the fourth only with the negative-free gate):

- ``arrays`` (ArrayRecord): the parameters the site trained, with the global model's names, shapes and
  dtype: everything except other domains' stage-2 parameters (``...harmony.<other>.*``) and heads
  (``heads.<other>.*``) and the gate's calibration statistics (with the negative-free gate: none of
  the gate) (`site_keys`);
- ``metrics`` (MetricRecord): ``num-examples`` (the site's training-case count) and the whitelisted
  scalars `METRIC_KEYS`: ``loss``, ``gate-accuracy``, ``dice/<class name>`` for the federation's classes;
- ``site`` (ConfigRecord): ``domain``, the site's domain name;
- ``gate-stats`` (ArrayRecord, only with ``gate_method = "negative-free"``, when the gate is fixed and
  its arrays are not sent): ``count`` (1,), ``mean`` (F,) and ``scatter`` (F, F) of the gate's pooled
  features over the site's training cases, and ``style-mean`` (S,) and ``style-scatter`` (S,), the mean
  and the scatter's diagonal of its style features, for the unfamiliar-input score; all float64
  (`uharmony.fed.aggregate.FeatureStats`).

An evaluate reply has ``metrics`` and ``site`` only; its metrics may add ``unfamiliar-max``, the largest
unfamiliar-input score of the site's validation cases (the coordinator's threshold comes from it).
`check_reply` refuses anything else: another record, key, name, shape, dtype, a non-finite number, a
string anywhere but the domain. The coordinator runs it on every reply before aggregation; a test runs it
on what a real ClientApp returns.
"""

from __future__ import annotations

import json
import math

import numpy as np

SITE_RECORD = "site"
ARRAYS, METRICS, CONFIG = "arrays", "metrics", "config"
SAMPLES = "num-examples"
SCALAR_METRICS = ("loss", "gate-accuracy", "unfamiliar-max")
DICE_PREFIX = "dice/"
GATE_STATS = "gate-stats"
MIN_STATS_CASES = 2


def site_keys(all_keys, domains: list[str], domain: str, fixed_gate: bool = False) -> list[str]:
    """The names a site of `domain` sends: all but other domains' stage-2/heads and gate calibration
    (and, when the gate is fixed (negative-free), none of the gate's arrays)."""
    others = [d for d in domains if d != domain]
    out = []
    for k in all_keys:
        if k.startswith("gate.calibration.") or (fixed_gate and k.startswith("gate.")):
            continue
        if any(f".harmony.{o}." in k or k.startswith(f"heads.{o}.") for o in others):
            continue
        out.append(k)
    return out


def metric_keys(classes: list[str]) -> set[str]:
    """Allowed MetricRecord keys: the sample count, loss, gate accuracy, the largest unfamiliar-input score of
    the validation cases, Dice per (foreground) class name."""
    return {SAMPLES, *SCALAR_METRICS, *(DICE_PREFIX + c for c in classes)}


def to_arrays(tensors: dict) -> ArrayRecord:  # noqa: F821
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({k: Array(np.ascontiguousarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v))
                        for k, v in tensors.items()})


def from_arrays(record) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def metrics_record(samples: int, metrics: dict, classes: list[str]):
    """A MetricRecord from {"loss": x, "gate_accuracy": y, "dice": {class: v}}; None values are left out."""
    from flwr.app import MetricRecord

    out: dict = {SAMPLES: int(samples)}
    if metrics.get("loss") is not None:
        out["loss"] = float(metrics["loss"])
    if metrics.get("gate_accuracy") is not None:
        out["gate-accuracy"] = float(metrics["gate_accuracy"])
    if metrics.get("unfamiliar_max") is not None:
        out["unfamiliar-max"] = float(metrics["unfamiliar_max"])
    for name, v in (metrics.get("dice") or {}).items():
        if v is not None and name in classes:
            out[DICE_PREFIX + name] = float(v)
    return MetricRecord(out)


def metrics_dict(record) -> dict:
    """MetricRecord -> {"samples", "loss", "gate_accuracy", "dice": {...}} (the protocol's shape)."""
    out: dict = {"dice": {}}
    for k, v in record.items():
        if k == SAMPLES:
            out["samples"] = int(v)
        elif k in ("gate-accuracy", "unfamiliar-max"):
            out[k.replace("-", "_")] = float(v)
        elif k.startswith(DICE_PREFIX):
            out["dice"][k[len(DICE_PREFIX):]] = float(v)
        else:
            out[k] = float(v)
    return out


def gate_stats_bytes(dim: int, style_dim: int = 0) -> int:
    """Bytes of a ``gate-stats`` record's arrays: float64 count, mean (dim), scatter (dim x dim) and the two
    style arrays (style_dim each)."""
    return 8 * (1 + dim + dim * dim + 2 * style_dim)


def gate_stats_record(stats) -> "ArrayRecord":  # noqa: F821
    """The ``gate-stats`` record of a `FeatureStats`."""
    arrays = {"count": np.asarray([stats.count], np.float64), "mean": np.asarray(stats.mean, np.float64),
              "scatter": np.asarray(stats.scatter, np.float64)}
    if stats.has_style:
        arrays.update({"style-mean": np.asarray(stats.style_mean, np.float64),
                       "style-scatter": np.asarray(stats.style_scatter, np.float64)})
    return to_arrays(arrays)


def read_gate_stats(record, dim: int, style_dim: int = 0):
    """The `FeatureStats` of a ``gate-stats`` record, or ValueError when it is not exactly the whitelisted one
    (``style_dim`` > 0: with the style arrays)."""
    from uharmony.fed.aggregate import FeatureStats

    shapes = {"count": (1,), "mean": (dim,), "scatter": (dim, dim)}
    if style_dim:
        shapes.update({"style-mean": (style_dim,), "style-scatter": (style_dim,)})
    if type(record).__name__ != "ArrayRecord" or set(record.keys()) != set(shapes):
        raise ValueError(f"record '{GATE_STATS}' must be an ArrayRecord of {', '.join(shapes)}")
    got = {k: record[k].numpy() for k in shapes}
    for k, shape in shapes.items():
        a = got[k]
        if tuple(a.shape) != shape or a.dtype != np.float64 or not np.isfinite(a).all():
            raise ValueError(f"{GATE_STATS} {k} is {a.dtype}{tuple(a.shape)}, expected finite float64{shape}")
    count = float(got["count"][0])
    if count != int(count) or count < MIN_STATS_CASES:
        raise ValueError(f"{GATE_STATS} count must be an integer >= {MIN_STATS_CASES}")
    if style_dim and float(got["style-scatter"].min()) < 0:
        raise ValueError(f"{GATE_STATS} style-scatter holds sums of squares: it cannot be negative")
    return FeatureStats(int(count), got["mean"], got["scatter"], got.get("style-mean"), got.get("style-scatter"))


def check_reply(content, *, kind: str, expected: dict[str, tuple], domains: list[str], classes: list[str],
                gate_stats_dim: int | None = None, style_dim: int = 0) -> str:
    """Check a reply's RecordDict against the whitelist; returns the site's domain or raises ValueError.

    ``expected``: global name -> (shape, dtype str) of every array; a site must send exactly
    `site_keys` of its domain (for kind "train"); kind "evaluate" carries no arrays. ``gate_stats_dim``
    (negative-free gate): train replies carry no gate arrays but the ``gate-stats`` record (with ``style_dim``
    > 0, its style arrays too).
    """
    fixed_gate = gate_stats_dim is not None and kind == "train"
    names = set(content.keys())
    allowed = {METRICS, SITE_RECORD} | ({ARRAYS} if kind == "train" else set()) | ({GATE_STATS} if fixed_gate else set())
    if names != allowed:
        raise ValueError(f"records {sorted(names)} instead of {sorted(allowed)}")
    site = content[SITE_RECORD]
    if type(site).__name__ != "ConfigRecord" or set(site.keys()) != {"domain"}:
        raise ValueError(f"record 'site' must be a ConfigRecord with only 'domain', not {sorted(site.keys())}")
    domain = site["domain"]
    if not isinstance(domain, str) or domain not in domains:
        raise ValueError(f"domain {str(domain)[:40]!r} is not one of the federation's {domains}")
    metrics = content[METRICS]
    if type(metrics).__name__ != "MetricRecord":
        raise ValueError("record 'metrics' is not a MetricRecord")
    extra = set(metrics.keys()) - metric_keys(classes)
    if extra:
        raise ValueError(f"metric(s) outside the whitelist: {sorted(extra)[:3]}")
    if SAMPLES not in metrics or not isinstance(metrics[SAMPLES], int) or metrics[SAMPLES] < 1:
        raise ValueError(f"'{SAMPLES}' must be a positive integer")
    for k, v in metrics.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(float(v)):
            raise ValueError(f"metric {k!r} must be one finite number")
    if metrics.get("unfamiliar-max", 0.0) < 0:  # a mean squared distance; a negative one would flag everything
        raise ValueError("metric 'unfamiliar-max' cannot be negative")
    if kind == "train":
        arrays = content[ARRAYS]
        if type(arrays).__name__ != "ArrayRecord":
            raise ValueError("record 'arrays' is not an ArrayRecord")
        want = site_keys(list(expected), domains, domain, fixed_gate)
        got = list(arrays.keys())
        missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        if missing or unexpected:
            raise ValueError(f"array names differ from a {domain} site's: {len(missing)} missing "
                             f"({missing[:1]}), {len(unexpected)} unexpected ({unexpected[:1]})")
        for k in want:
            a = arrays[k]
            shape, dtype = expected[k]
            if tuple(a.shape) != tuple(shape) or str(a.dtype) != dtype:
                raise ValueError(f"array {k} is {a.dtype}{tuple(a.shape)}, expected {dtype}{tuple(shape)}")
    if fixed_gate:
        read_gate_stats(content[GATE_STATS], gate_stats_dim, style_dim)
    return domain


def encode_json(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True)
