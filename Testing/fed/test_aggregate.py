"""Aggregation rules with exact numbers (uharmony.fed.aggregate): per-domain stage 2 and heads, equal
domain weight, the gate over all sites, and the screening of NaN/Inf and far-out updates."""

from __future__ import annotations

import numpy as np
import pytest

from uharmony.fed.aggregate import FeatureStats, Update, aggregate, balanced_weights, screen

DOMAINS = ["ct", "mri"]
KEYS = ["backbone.conv.weight", "backbone.norm.harmony.ct.beta", "backbone.norm.harmony.mri.beta",
        "heads.ct.weight", "heads.mri.weight", "gate.classifier.ct.weight", "gate.classifier.mri.weight"]


def arrays(value: float, domain: str | None = None) -> dict[str, np.ndarray]:
    out = {}
    for k in KEYS:
        other = [d for d in DOMAINS if d != domain]
        if domain and any(f".harmony.{o}." in k or k.startswith(f"heads.{o}.") for o in other):
            continue  # a site sends only its own domain's stage-2 parameters and head
        out[k] = np.full((2,), value, np.float32)
    return out


def glob(value: float = 0.0) -> dict[str, np.ndarray]:
    return {k: np.full((2,), value, np.float32) for k in KEYS}


def test_equal_domain_weight_by_samples_within_domain():
    ups = [Update("1", "ct", 10, {}), Update("2", "ct", 30, {}), Update("3", "mri", 5, {})]
    assert balanced_weights(ups) == pytest.approx([0.125, 0.375, 0.5])


def test_per_domain_stage2_and_heads_gate_and_shared_over_all():
    ups = [Update("1", "ct", 10, arrays(1.0, "ct")), Update("2", "ct", 30, arrays(3.0, "ct")),
           Update("3", "mri", 5, arrays(8.0, "mri"))]
    new = aggregate(glob(), ups, DOMAINS)
    # shared and gate: domains weigh 1/2 each; within ct 10:30 -> 0.125*1 + 0.375*3 + 0.5*8 = 5.25
    for k in ("backbone.conv.weight", "gate.classifier.ct.weight", "gate.classifier.mri.weight"):
        assert new[k].tolist() == [5.25, 5.25], k
    # ct's stage 2 and head: the ct sites only, by samples: (10*1 + 30*3) / 40 = 2.5
    assert new["backbone.norm.harmony.ct.beta"].tolist() == [2.5, 2.5]
    assert new["heads.ct.weight"].tolist() == [2.5, 2.5]
    # mri's: the one mri site
    assert new["backbone.norm.harmony.mri.beta"].tolist() == [8.0, 8.0]
    assert new["heads.mri.weight"].tolist() == [8.0, 8.0]


def test_a_domain_without_sites_keeps_its_parameters():
    g = glob()
    g["heads.mri.weight"][:] = 7.0
    new = aggregate(g, [Update("1", "ct", 4, arrays(2.0, "ct"))], DOMAINS)
    assert new["heads.mri.weight"].tolist() == [7.0, 7.0]
    assert new["heads.ct.weight"].tolist() == [2.0, 2.0]
    assert new["gate.classifier.mri.weight"].tolist() == [2.0, 2.0]  # the gate learns from every site


def test_server_learning_rate_scales_the_step_from_the_global_model():
    g = glob(1.0)
    g["heads.mri.weight"][:] = 7.0
    g["step"] = np.array([3], np.int64)  # not a float array: never extrapolated
    ups = [Update("1", "ct", 10, arrays(2.0, "ct")), Update("2", "mri", 10, arrays(4.0, "mri"))]
    plain, fast = aggregate(g, ups, DOMAINS), aggregate(g, ups, DOMAINS, server_lr=2.0)
    assert plain["backbone.conv.weight"].tolist() == [3.0, 3.0]  # the mean of 2 and 4
    assert fast["backbone.conv.weight"].tolist() == [5.0, 5.0]  # 1 + 2 x (3 - 1)
    assert fast["heads.ct.weight"].tolist() == [3.0, 3.0]  # 1 + 2 x (2 - 1): a domain's own too
    assert fast["heads.mri.weight"].tolist() == [1.0, 1.0]  # 7 + 2 x (4 - 7)
    assert fast["backbone.conv.weight"].dtype == np.float32 and fast["step"] is g["step"]
    assert aggregate(g, [], DOMAINS, server_lr=2.0)["heads.mri.weight"].tolist() == [7.0, 7.0]


@pytest.mark.parametrize("keys, want", [("", 2.0), ('aggregation = "fedavg"', 1.0),
                                        ('aggregation = "fedavg"\nserver_lr = 1.5', 1.5), ("server_lr = 1.0", 1.0)])
def test_plain_fedavg_mode_is_plain_fedavg_unless_a_server_lr_is_set(tmp_path, keys, want):
    from uharmony.fed.config import load_fed_config

    (tmp_path / "fed.toml").write_text(f'domains = ["a", "b"]\n{keys}\n')
    assert load_fed_config(tmp_path / "fed.toml").server_lr == want


@pytest.mark.parametrize("keys, want", [("", 3.0), ("[train]\ndomain_lr_scale = 1.5", 1.5),
                                        ('aggregation = "fedavg"', 1.0)])
def test_sites_own_parameters_learn_at_the_number_of_domains_by_default(tmp_path, keys, want):
    from uharmony.fed.config import load_fed_config, site_domain_lr_scale

    (tmp_path / "fed.toml").write_text(f'domains = ["a", "b", "c"]\n{keys}\n')
    assert site_domain_lr_scale(load_fed_config(tmp_path / "fed.toml").to_dict()) == want


def test_a_negative_domain_lr_scale_is_refused_with_its_key(tmp_path):
    from uharmony.errors import UHarmonyError
    from uharmony.fed.config import load_fed_config

    (tmp_path / "fed.toml").write_text('domains = ["a", "b"]\n[train]\ndomain_lr_scale = -1\n')
    with pytest.raises(UHarmonyError) as e:
        load_fed_config(tmp_path / "fed.toml")
    assert e.value.code == 2 and "train.domain_lr_scale" in e.value.message


@pytest.mark.parametrize("section, line, key", [
    ("gate", "filters = [4, 0]", "gate.filters"),  # was accepted by fed.toml, refused by the training config
    ("gate", "input_size = [8, 8]", "gate.input_size"),
    ("train", "patch_size = [16, 16, 18]", "train.patch_size"),
    ("model", "strides = [1, 2, 3, 2]", "model.strides"),
    ("train", "gin_kernel_sizes = [1, 2]", "train.gin_kernel_sizes"),  # GIN keys: the training config's rules
    ("train", "ipa_weight = -0.5", "train.ipa_weight"),
    ("train", "gin_p = 1.5", "train.gin_p"),
])
def test_network_shape_keys_are_checked_as_in_the_training_config(tmp_path, section, line, key):
    from uharmony.errors import UHarmonyError
    from uharmony.fed.config import load_fed_config

    (tmp_path / "fed.toml").write_text(f'domains = ["a", "b"]\n[{section}]\n{line}\n')
    with pytest.raises(UHarmonyError) as e:
        load_fed_config(tmp_path / "fed.toml")
    assert e.value.code == 2 and repr(key) in e.value.message, e.value.message


@pytest.mark.parametrize("key, fed_key", [("method", "gate_method"), ("pretrain_steps", "gate_pretrain_steps")])
def test_training_gate_keys_in_fed_toml_name_the_federation_key(tmp_path, key, fed_key):
    from uharmony.errors import UHarmonyError
    from uharmony.fed.config import config_table_markdown, load_fed_config

    (tmp_path / "fed.toml").write_text(f'domains = ["a", "b"]\n[gate]\n{key} = 1\n')
    with pytest.raises(UHarmonyError) as e:
        load_fed_config(tmp_path / "fed.toml")
    assert e.value.code == 2 and f"'gate.{key}'" in e.value.message and repr(fed_key) in e.value.message
    assert f"`gate.{key}`" not in config_table_markdown() and f"`{fed_key}`" in config_table_markdown()


def test_plain_fedavg_switch_averages_everything_with_the_same_weights():
    ups = [Update("1", "ct", 10, arrays(1.0)), Update("2", "mri", 30, arrays(3.0))]
    new = aggregate(glob(), ups, DOMAINS, mode="fedavg")
    for k in KEYS:  # equal domain weight: 0.5*1 + 0.5*3
        assert new[k].tolist() == [2.0, 2.0], k


def test_nan_and_inf_updates_are_rejected_and_not_averaged():
    bad = arrays(1.0, "ct")
    bad["backbone.conv.weight"][0] = np.nan
    inf = arrays(1.0, "mri")
    inf["heads.mri.weight"][1] = np.inf
    ups = [Update("1", "ct", 10, bad), Update("2", "ct", 10, arrays(2.0, "ct")), Update("3", "mri", 10, inf)]
    accepted, rejected = screen(glob(1.0), ups, history=[])  # first round, 1 finite: vs the global norm
    assert [u.site for u in accepted] == ["2"]
    assert {u.site: why for u, why in rejected} == {
        "1": "non-finite values (NaN/Inf) in backbone.conv.weight",
        "3": "non-finite values (NaN/Inf) in heads.mri.weight"}
    new = aggregate(glob(1.0), accepted, DOMAINS)
    assert np.isfinite(np.concatenate(list(new.values()))).all()
    assert new["backbone.conv.weight"].tolist() == [2.0, 2.0]


def test_far_out_norms_are_rejected_against_history_and_round_median():
    # history of accepted norms: median 2.0 -> limit 20
    ups = [Update("1", "ct", 1, {"backbone.conv.weight": np.array([3.0, 4.0], np.float32)}),  # norm 5
           Update("2", "mri", 1, {"backbone.conv.weight": np.array([12.0, 16.0], np.float32)})]  # norm 20
    g = {"backbone.conv.weight": np.zeros(2, np.float32)}
    accepted, rejected = screen(g, ups, history=[1.0, 2.0, 3.0])
    assert [u.site for u in accepted] == ["1", "2"]  # 20 is not > 10 x 2
    ups[1].arrays["backbone.conv.weight"] = np.array([12.0, 16.5], np.float32)  # norm > 20
    accepted, rejected = screen(g, ups, history=[1.0, 2.0, 3.0])
    assert [u.site for u in accepted] == ["1"]
    assert rejected[0][1].startswith("update norm 20.") and "median of accepted update norms so far" in rejected[0][1]


def test_first_round_references():
    g = {"w": np.array([1.0, 0.0], np.float32)}  # global norm 1
    two = [Update("1", "ct", 1, {"w": np.array([1.0, 5.0], np.float32)}),  # update norm 5
           Update("2", "mri", 1, {"w": np.array([1.0, 11.0], np.float32)})]  # update norm 11 > 10 x 1
    accepted, rejected = screen(g, two, history=[])
    assert [u.site for u in accepted] == ["1"] and "global weights' norm" in rejected[0][1]
    three = [Update(str(i), "ct", 1, {"w": np.array([1.0, v], np.float32)}) for i, v in enumerate([1.0, 2.0, 30.0])]
    accepted, rejected = screen(g, three, history=[])  # round median 2 -> limit 20
    assert [u.site for u in accepted] == ["0", "1"] and "this round's median" in rejected[0][1]


def test_readme_and_docs_document_every_fed_toml_key():
    from pathlib import Path

    from uharmony.fed.config import config_table_markdown

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    assert config_table_markdown() in readme


# -- the negative-free gate: feature statistics pooled per domain, classifier rows by LDA ----------------


def test_pooled_statistics_equal_those_of_the_union_of_cases():
    from uharmony.fed.aggregate import FeatureStats, pool

    rng = np.random.default_rng(3)
    parts = [rng.normal(loc=i, size=(n, 5)) for i, n in enumerate((4, 7, 2))]
    pooled, union = pool([FeatureStats.of(p) for p in parts]), FeatureStats.of(np.concatenate(parts))
    assert pooled.count == union.count == 13
    np.testing.assert_allclose(pooled.mean, union.mean, rtol=1e-12)
    np.testing.assert_allclose(pooled.scatter, union.scatter, rtol=1e-10, atol=1e-10)
    assert pooled.style_mean is None  # no style statistics given: none pooled


def test_sites_style_statistics_give_the_unfamiliar_gaussian_of_central_training():
    """Pooled over three sites, the style and pooled statistics give exactly the Gaussian that
    `DomainGate.fit_calibration` fits on the union of the cases, variance floor included."""
    import torch

    from uharmony.fed.aggregate import FeatureStats, familiarity_gaussian, pool
    from uharmony.model.gate import DomainGate

    gate = DomainGate(1, ["ct"], input_size=(8, 8, 8), filters=(4, 8))
    dim, style = gate.pooled_dim, gate.style_dim
    rng = np.random.default_rng(5)
    parts = [rng.normal(loc=i, scale=1 + i, size=(n, gate.features)) for i, n in enumerate((4, 7, 2))]
    parts[1][:, 3] = 0.25  # a constant feature: the floor decides its variance
    sites = [FeatureStats.of(p[:, -dim:], style=p[:, :-dim]) for p in parts]
    pooled = pool(sites)
    assert pooled.count == 13 and pooled.style_mean.shape == pooled.style_scatter.shape == (style,)
    mean, var = familiarity_gaussian(pooled)
    union = torch.from_numpy(np.concatenate(parts)).float()
    gate.fit_calibration(union, torch.zeros(13, dtype=torch.long))
    np.testing.assert_allclose(mean, gate.calibration["ct"].mean.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(var, gate.calibration["ct"].var.numpy(), rtol=1e-5, atol=1e-6)
    assert familiarity_gaussian(FeatureStats(2, pooled.mean, pooled.scatter)) is None  # no style statistics
    assert pool([sites[0], FeatureStats(2, pooled.mean, pooled.scatter)]).style_mean is None  # not all parts have them
    with pytest.raises(ValueError, match="style feature rows"):
        FeatureStats.of(parts[0][:, -dim:], style=parts[0][:3, :-dim])


def _three_gaussians(rng, n):
    """Three domains with distinct means and one shared, strongly correlated covariance (8 features)."""
    a = np.random.default_rng(42).normal(size=(8, 8))  # the same covariance for every draw
    chol = np.linalg.cholesky(a @ a.T + 0.1 * np.eye(8))
    means = {"ct": np.zeros(8), "mri-t1": np.r_[4.0, np.zeros(7)], "mri-t2": np.r_[0, -4.0, np.zeros(6)]}
    return {d: m @ chol.T + rng.normal(size=(n, 8)) @ chol.T for d, m in means.items()}


def _choose(rows, feats, domains):
    logits = np.stack([feats @ rows[f"gate.classifier.{d}.weight"][0] + rows[f"gate.classifier.{d}.bias"][0]
                       for d in domains], 1)
    return logits.argmax(1)


def test_lda_rows_from_site_statistics_route_fresh_cases_of_every_domain():
    from uharmony.fed.aggregate import FeatureStats, fit_gate_lda, pool

    rng = np.random.default_rng(0)
    domains = ["ct", "mri-t1", "mri-t2"]
    train = _three_gaussians(rng, 40)
    # two sites per domain, each sending only its own statistics: no site sees another domain's cases
    stats = {d: pool([FeatureStats.of(x[:15]), FeatureStats.of(x[15:])]) for d, x in train.items()}
    rows, shrinkage = fit_gate_lda(stats, domains)
    assert 0 < shrinkage < 0.5  # OAS: 120 cases for 8 features need little
    assert set(rows) == {f"gate.classifier.{d}.{p}" for d in domains for p in ("weight", "bias")}
    assert rows["gate.classifier.ct.weight"].shape == (1, 8) and rows["gate.classifier.ct.bias"].shape == (1,)
    assert all(a.dtype == np.float32 for a in rows.values())
    fresh = _three_gaussians(np.random.default_rng(1), 200)
    for i, d in enumerate(domains):
        assert (_choose(rows, fresh[d], domains) == i).mean() > 0.9, d
    # the LDA posterior: a point halfway between two domain means (in the shared metric) is a tie
    mid = 0.5 * (stats["ct"].mean + stats["mri-t1"].mean)
    la = mid @ rows["gate.classifier.ct.weight"][0] + rows["gate.classifier.ct.bias"][0]
    lb = mid @ rows["gate.classifier.mri-t1.weight"][0] + rows["gate.classifier.mri-t1.bias"][0]
    assert la == pytest.approx(lb, rel=1e-4, abs=1e-3)


def test_a_domain_no_site_described_is_never_chosen():
    from uharmony.fed.aggregate import NEVER_CHOSEN_BIAS, FeatureStats, fit_gate_lda

    rng = np.random.default_rng(0)
    train = _three_gaussians(rng, 30)
    rows, _ = fit_gate_lda({d: FeatureStats.of(train[d]) for d in ("ct", "mri-t1")}, ["ct", "mri-t1", "mri-t2"])
    assert not rows["gate.classifier.mri-t2.weight"].any()
    assert rows["gate.classifier.mri-t2.bias"][0] == NEVER_CHOSEN_BIAS
    fresh = _three_gaussians(np.random.default_rng(1), 100)
    assert set(_choose(rows, np.concatenate(list(fresh.values())), ["ct", "mri-t1", "mri-t2"])) <= {0, 1}
    assert fit_gate_lda({}, ["ct"])[0] == {}


def test_oas_shrinkage_grows_as_cases_per_feature_shrink():
    from uharmony.fed.aggregate import oas_shrinkage

    rng = np.random.default_rng(0)
    cov = lambda n: np.cov(rng.normal(size=(n, 20)), rowvar=False)  # noqa: E731  (true covariance: I)
    few, many = oas_shrinkage(cov(12), 11), oas_shrinkage(cov(2000), 1999)
    assert 0.5 < few <= 1.0 and 0.0 <= many < few
    assert oas_shrinkage(np.eye(20), 5) == 1.0  # already spherical: all the way


# -- screening a site's gate statistics ---------------------------------------------------------------


def test_statistics_of_real_cases_pass_with_spread_and_offset_in_reference_units():
    from uharmony.fed.aggregate import FeatureStats, screen_stats

    rng = np.random.default_rng(5)
    reference = FeatureStats.of(rng.normal(size=(400, 6)) * 2.0)  # variance per case ~ 6 x 4
    ref_var = np.trace(reference.scatter) / 399
    site = rng.normal(size=(9, 6)) * 0.5 + np.r_[3.0, np.zeros(5)]
    why, measures = screen_stats(FeatureStats.of(site), 9, reference, limit=10.0)
    assert why is None
    stats = FeatureStats.of(site)
    assert measures["spread"] == pytest.approx(np.sqrt(np.trace(stats.scatter) / 8 / ref_var), abs=1e-4)
    assert measures["offset"] == pytest.approx(np.linalg.norm(stats.mean - reference.mean) / np.sqrt(ref_var), abs=1e-4)
    assert 0.1 < measures["spread"] < 0.5 and 0.4 < measures["offset"] < 1.0
    assert screen_stats(FeatureStats.of(site), 9) == (None, {})  # structure only, without a reference


@pytest.mark.parametrize("tamper, reason", [
    (lambda s: FeatureStats(s.count + 1, s.mean, s.scatter), "statistics over 10 cases for an update of 9"),
    (lambda s: FeatureStats(s.count, s.mean, s.scatter + np.triu(np.ones_like(s.scatter), 1)), "not symmetric"),
    (lambda s: FeatureStats(s.count, s.mean, s.scatter - 2 * np.trace(s.scatter) * np.eye(6)), "negative eigenvalue"),
    (lambda s: FeatureStats(3, s.mean, s.scatter), "rank"),  # 6 independent directions from 3 cases
    (lambda s: FeatureStats(s.count, s.mean, s.scatter * 1e4), "gate feature spread"),
    (lambda s: FeatureStats(s.count, s.mean + 50.0, s.scatter), "gate feature offset"),
])
def test_implausible_statistics_are_refused_with_the_reason(tamper, reason):
    from uharmony.fed.aggregate import FeatureStats, screen_stats

    rng = np.random.default_rng(6)
    reference = FeatureStats.of(rng.normal(size=(400, 6)))
    genuine = FeatureStats.of(rng.normal(size=(9, 6)))
    bad = tamper(genuine)
    why, _ = screen_stats(bad, 3 if bad.count == 3 else 9, reference, limit=10.0)
    assert why is not None and reason in why


def test_gate_statistics_file_round_trips_for_a_restarted_coordinator(tmp_path):
    from safetensors.numpy import load_file

    from uharmony.fed.aggregate import FeatureStats
    from uharmony.fed.server_app import GATE_STATS_FILE, load_gate_stats, save_gate_stats

    rng = np.random.default_rng(0)
    stats = {"17": ("ct", FeatureStats.of(rng.normal(size=(5, 4)))),
             "42": ("mri-t1", FeatureStats.of(rng.normal(size=(3, 4)))),
             "99": ("mri-t1", FeatureStats.of(rng.normal(size=(2, 4)))),
             "7": ("gone", FeatureStats.of(rng.normal(size=(2, 4)))),
             "5": ("ct", FeatureStats.of(rng.normal(size=(4, 4)), style=rng.normal(size=(4, 6))))}
    path = tmp_path / GATE_STATS_FILE
    save_gate_stats(path, stats)
    assert sorted(load_file(str(path))) == sorted(
        [f"{s}.{k}" for s in stats for k in ("count", "mean", "scatter")] + ["5.style-mean", "5.style-scatter"])
    assert [p.name for p in tmp_path.iterdir()] == [GATE_STATS_FILE]  # written via a temporary name, renamed
    back = load_gate_stats(path, ["ct", "mri-t1", "mri-t2"])
    assert set(back) == {"17", "42", "99", "5"}  # one entry per site; a domain no longer federated is dropped
    for site, (domain, st) in back.items():
        assert domain == stats[site][0] and st.count == stats[site][1].count
        np.testing.assert_array_equal(st.mean, stats[site][1].mean)
        np.testing.assert_array_equal(st.scatter, stats[site][1].scatter)
        assert st.has_style == (site == "5")
    np.testing.assert_array_equal(back["5"][1].style_mean, stats["5"][1].style_mean)
    np.testing.assert_array_equal(back["5"][1].style_scatter, stats["5"][1].style_scatter)


def test_gate_statistics_file_of_the_per_domain_format_loads_as_one_pseudo_site_per_domain(tmp_path):
    from safetensors.numpy import save_file

    from uharmony.fed.aggregate import FeatureStats
    from uharmony.fed.server_app import load_gate_stats

    st = FeatureStats.of(np.random.default_rng(1).normal(size=(4, 3)))
    save_file({"ct.count": np.array([4.0]), "ct.mean": st.mean, "ct.scatter": st.scatter}, str(tmp_path / "g"))
    [(site, (domain, back))] = load_gate_stats(tmp_path / "g", ["ct", "mri-t1"]).items()
    assert site == "domain:ct" and domain == "ct" and back.count == 4
    np.testing.assert_array_equal(back.scatter, st.scatter)
