"""Aggregation rules (DESIGN.md, "Federated learning"): pure numpy, no Flower, unit-tested exactly.

Weights (the same in both modes, and the same as balanced sampling in centralised training): every
domain present among the accepted updates weighs the same; within a domain, sites weigh by their
sample count. Then, in mode ``uharmony``:

- shared weights (the backbone outside stage 2): averaged over all sites with those weights;
- a domain's stage-2 parameters (``...harmony.<domain>.*``) and head (``heads.<domain>.*``): averaged
  over the sites of that domain only, by sample count; kept as they are when no site of it took part;
- the gate (``gate.*``), with ``gate_method = "averaged"``: averaged over ALL sites (each site's update
  carries the negatives the other domains' rows need), with the domain-balanced weights. Measured, this
  collapses: with one domain per site every local update only says "answer my domain", and the
  averaged gate sent every benchmark case to one domain.
- the gate with ``gate_method = "negative-free"`` (the default; DESIGN.md's alternative): its
  convolutions stay the fixed, seeded initial ones and no site trains or sends them. Each site sends
  the count, mean and scatter matrix of the gate's pooled features over its training cases
  (`FeatureStats`); the coordinator pools them per domain (`pool`) and fits the classifier rows in
  closed form as linear discriminant analysis (`fit_gate_lda`): per-domain Gaussians with one shared
  covariance, shrunk by the OAS estimate (the federation has few cases per feature), equal priors. No
  site needs another domain's cases.

Mode ``fedavg`` (the FedGIN paper's setting, for comparison) averages every array over every site
that sent it, with the same weights.

Screening (`screen`): an update with NaN/Inf is rejected; so is one whose norm (of update = site
arrays - global arrays) exceeds ``factor`` x the median of accepted update norms so far, and, when
the round has 3+ finite updates, ``factor`` x the round's median. In the first round (no history)
the reference is the round's median with 3+ sites, else the norm of the global weights. A site's
gate statistics are screened on their own (`screen_stats`): implausible ones are not used (the
site's earlier statistics, if any, stay), whatever becomes of its weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

MODES = ("uharmony", "fedavg")
GATE_METHODS = ("negative-free", "averaged")
NEVER_CHOSEN_BIAS = -1.0e4  # the gate row of a domain no site has described yet


@dataclass
class Update:
    site: str  # an identifier for logs (Flower node id)
    domain: str
    samples: int
    arrays: dict[str, np.ndarray]
    norm: float = float("nan")
    extra: dict = field(default_factory=dict)


def domain_of_key(key: str, domains: list[str]) -> str | None:
    """The domain a key belongs to (stage-2 parameter or head), or None (shared or gate)."""
    for d in domains:
        if f".harmony.{d}." in key or key.startswith(f"heads.{d}."):
            return d
    return None


def balanced_weights(updates: list[Update]) -> list[float]:
    """Equal weight per domain, by sample count within a domain; sums to 1."""
    if not updates:
        return []
    per_domain: dict[str, int] = {}
    for u in updates:
        per_domain[u.domain] = per_domain.get(u.domain, 0) + u.samples
    n_domains = len(per_domain)
    return [u.samples / per_domain[u.domain] / n_domains for u in updates]


def _average(arrays: list[np.ndarray], weights: list[float]) -> np.ndarray:
    total = sum(weights)
    acc = np.zeros(arrays[0].shape, np.float64)
    for a, w in zip(arrays, weights):
        acc += a.astype(np.float64) * (w / total)
    return acc.astype(arrays[0].dtype)


def aggregate(global_arrays: dict[str, np.ndarray], updates: list[Update], domains: list[str],
              mode: str = "uharmony", server_lr: float = 1.0) -> dict[str, np.ndarray]:
    """The new global arrays from the accepted updates (arrays no update carries stay as they are).

    ``server_lr`` scales the step from the global arrays to the average (FedAvg with a server learning
    rate; 1.0 is plain averaging)."""
    if mode not in MODES:
        raise ValueError(f"aggregation mode must be one of {MODES}, not {mode!r}")
    out = dict(global_arrays)
    if not updates:
        return out
    weights = {id(u): w for u, w in zip(updates, balanced_weights(updates))}
    for key in global_arrays:
        holders = [u for u in updates if key in u.arrays]
        if mode == "uharmony":
            d = domain_of_key(key, domains)
            if d is not None:
                holders = [u for u in holders if u.domain == d]
                if holders:
                    out[key] = _average([u.arrays[key] for u in holders], [float(u.samples) for u in holders])
                continue
        if holders:
            out[key] = _average([u.arrays[key] for u in holders], [weights[id(u)] for u in holders])
    if server_lr != 1.0:
        for key, g in global_arrays.items():
            if out[key] is not g and np.issubdtype(g.dtype, np.floating):
                out[key] = (g + server_lr * (out[key].astype(np.float64) - g)).astype(g.dtype)
    return out


@dataclass
class FeatureStats:
    """What a site says about its domain's gate features: count, mean (F,) and scatter sum((f-m)(f-m)^T) (F, F)
    of the pooled features the gate's classifier reads; and of its style features (the early layers' channel
    means and log-stds, which only the unfamiliar-input score reads) the mean (S,) and the scatter's diagonal
    (S,) (None from a coordinator's file written before these were sent)."""

    count: int
    mean: np.ndarray
    scatter: np.ndarray
    style_mean: np.ndarray | None = None
    style_scatter: np.ndarray | None = None

    @classmethod
    def of(cls, features: np.ndarray, style: np.ndarray | None = None) -> "FeatureStats":
        f = np.asarray(features, np.float64)
        mean = f.mean(0)
        if style is None:
            return cls(len(f), mean, (f - mean).T @ (f - mean))
        g = np.asarray(style, np.float64)
        if len(g) != len(f):
            raise ValueError(f"{len(g)} style feature rows for {len(f)} cases")
        return cls(len(f), mean, (f - mean).T @ (f - mean), g.mean(0), ((g - g.mean(0)) ** 2).sum(0))

    @property
    def has_style(self) -> bool:
        return self.style_mean is not None and self.style_scatter is not None


def pool(parts: list[FeatureStats]) -> FeatureStats:
    """The statistics of the union of the parts' cases (exact); style statistics only when every part has them."""
    n = sum(p.count for p in parts)
    mean = sum(p.count * p.mean for p in parts) / n
    scatter = sum(p.scatter + p.count * np.outer(p.mean - mean, p.mean - mean) for p in parts)
    if not all(p.has_style for p in parts):
        return FeatureStats(n, mean, scatter)
    style_mean = sum(p.count * p.style_mean for p in parts) / n
    style_scatter = sum(p.style_scatter + p.count * (p.style_mean - style_mean) ** 2 for p in parts)
    return FeatureStats(n, mean, scatter, style_mean, style_scatter)


def familiarity_gaussian(stats: FeatureStats) -> tuple[np.ndarray, np.ndarray] | None:
    """A domain's unfamiliar-input Gaussian over the gate's whole feature vector (style, then pooled):
    (mean, variance), exactly what `DomainGate.fit_calibration` gives on the same cases, floor included.
    None without style statistics or with fewer than two cases."""
    if not stats.has_style or stats.count < 2:
        return None
    mean = np.concatenate([stats.style_mean, stats.mean])
    from uharmony.model.gate import variance_floor

    var = np.concatenate([stats.style_scatter, np.diag(stats.scatter)]) / (stats.count - 1)
    return mean, np.maximum(var, variance_floor(var.mean()))


def screen_stats(stats: FeatureStats, samples: int, reference: FeatureStats | None = None,
                 limit: float = math.inf) -> tuple[str | None, dict]:
    """Whether a site's gate statistics can describe real cases: (why not, or None; measures for the log).

    Structural, always: the count is the update's sample count (a site describes the cases it trained
    on); the scatter is symmetric, positive semi-definite and of rank < count, as a scatter of real
    cases is. Against ``reference`` (the gate's features on synthetic heads in random contrasts,
    `uharmony.train.contrast.reference_features`), in units of its standard deviation per case (the
    root of its mean variance): ``spread``, the site's standard deviation per case, and ``offset``, the
    distance of its mean from the reference mean; either above ``limit`` is implausible. With the
    shipped encoder, a reference view is at offset ~1, sites of the benchmark's styles at most 0.84 /
    1.29 and four unlike real scans 1.39 / at most 1.71 (docs/federation.md).
    """
    if stats.count != samples:
        return f"statistics over {stats.count} cases for an update of {samples} training cases", {}
    s = np.asarray(stats.scatter, np.float64)
    scale = max(abs(float(np.trace(s))), 1e-30)
    if float(np.abs(s - s.T).max()) > 1e-6 * scale:
        return "the scatter matrix is not symmetric", {}
    eig = np.linalg.eigvalsh((s + s.T) / 2)
    if float(eig.min()) < -1e-6 * scale:
        return f"the scatter matrix has a negative eigenvalue ({float(eig.min()):.3g})", {}
    rank = int((eig > 1e-8 * scale).sum())
    if rank > stats.count - 1:
        return f"the scatter matrix has rank {rank}, more than {stats.count} cases can give", {}
    if reference is None:
        return None, {}
    ref_var = max(float(np.trace(reference.scatter)) / max(reference.count - 1, 1), 1e-30)
    measures = {"spread": math.sqrt(max(float(np.trace(s)), 0.0) / max(stats.count - 1, 1) / ref_var),
                "offset": math.sqrt(float(np.sum((np.asarray(stats.mean, np.float64) - reference.mean) ** 2)) / ref_var)}
    measures = {k: round(v, 4) for k, v in measures.items()}
    why = next((f"gate feature {k} {v:.4g} > {limit:g} standard deviations of synthetic heads in every contrast"
                for k, v in measures.items() if v > limit), None)
    return why, measures


def oas_shrinkage(cov: np.ndarray, n: int) -> float:
    """The Oracle Approximating Shrinkage weight towards (trace / dim) I (Chen et al., IEEE TSP 2010).

    Needs only the covariance and its degrees of freedom, which is all the coordinator has: sites
    send scatter matrices, not cases (Ledoit-Wolf would need the cases themselves).
    """
    p = cov.shape[0]
    tr, tr2 = float(np.trace(cov)), float(np.trace(cov @ cov))
    den = (n + 1 - 2 / p) * (tr2 - tr * tr / p)
    return 1.0 if den <= 0 else float(min(1.0, ((1 - 2 / p) * tr2 + tr * tr) / den))


def fit_gate_lda(stats: dict[str, FeatureStats], domains: list[str], *,
                 shrinkage: float | None = None) -> tuple[dict[str, np.ndarray], float]:
    """The gate's classifier rows (``gate.classifier.<d>.weight`` (1, F), ``.bias`` (1,)) by LDA.

    logit_d = f . S^-1 m_d - m_d . S^-1 m_d / 2 with S the pooled within-domain covariance, shrunk
    towards its mean variance (by `shrinkage`, or by the OAS estimate when None); the softmax of the
    logits is then the posterior of Gaussians with that shared covariance and equal priors. Domains
    without statistics get a zero row and a bias that keeps them from ever being chosen. Returns
    (rows, the shrinkage used).
    """
    known = [d for d in domains if d in stats and stats[d].count >= 1]
    if not known:
        return {}, float("nan")
    dim = len(stats[known[0]].mean)
    n = sum(stats[d].count for d in known)
    within = sum(stats[d].scatter for d in known) / max(n - len(known), 1)
    if shrinkage is None:
        shrinkage = oas_shrinkage(within, max(n - len(known), 1))
    cov = (1 - shrinkage) * within + shrinkage * (np.trace(within) / dim + 1e-12) * np.eye(dim)
    out = {}
    for d in domains:
        if d in known:
            w = np.linalg.solve(cov, stats[d].mean)
            b = -0.5 * float(stats[d].mean @ w)
        else:
            w, b = np.zeros(dim), NEVER_CHOSEN_BIAS
        out[f"gate.classifier.{d}.weight"] = w[None].astype(np.float32)
        out[f"gate.classifier.{d}.bias"] = np.asarray([b], np.float32)
    return out, float(shrinkage)


def norm(arrays: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(np.square(a.astype(np.float64)))) for a in arrays.values()
                         if np.issubdtype(a.dtype, np.floating)))


def update_norm(global_arrays: dict[str, np.ndarray], arrays: dict[str, np.ndarray]) -> float:
    return norm({k: arrays[k].astype(np.float64) - global_arrays[k].astype(np.float64) for k in arrays})


def screen(global_arrays: dict[str, np.ndarray], updates: list[Update], history: list[float], *,
           factor: float = 10.0) -> tuple[list[Update], list[tuple[Update, str]]]:
    """Split updates into (accepted, [(rejected, why)]); sets each update's ``norm``."""
    rejected: list[tuple[Update, str]] = []
    finite: list[Update] = []
    for u in updates:
        bad = next((k for k, a in u.arrays.items() if np.issubdtype(a.dtype, np.floating)
                    and not np.isfinite(a).all()), None)
        if bad is not None:
            rejected.append((u, f"non-finite values (NaN/Inf) in {bad}"))
            continue
        u.norm = update_norm(global_arrays, u.arrays)
        finite.append(u)
    round_median = float(np.median([u.norm for u in finite])) if finite else float("nan")
    refs: list[tuple[float, str]] = []
    if history:
        refs.append((float(np.median(history)), "the median of accepted update norms so far"))
        if len(finite) >= 3:
            refs.append((round_median, "this round's median update norm"))
    elif len(finite) >= 3:
        refs.append((round_median, "this round's median update norm (first round)"))
    else:
        refs.append((norm(global_arrays), "the global weights' norm (first round, fewer than 3 sites)"))
    accepted = []
    for u in finite:
        why = next((f"update norm {u.norm:.4g} > {factor:g} x {ref:.4g}, {what}" for ref, what in refs
                    if u.norm > factor * ref), None)
        if why:
            rejected.append((u, why))
        else:
            accepted.append(u)
    return accepted, rejected
