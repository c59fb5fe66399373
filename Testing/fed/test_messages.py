"""What leaves a site: the real ClientApp's replies, inspected against the whitelist.

The ClientApp's train and evaluate handlers are called with real Flower Messages carrying a real
global model; every record, key, name, shape, dtype and value type of the reply is checked, and
anything outside the whitelist fails the test (and is refused by the coordinator's check).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("fed_data")


@pytest.fixture(scope="module")
def round_messages(fed_data, tmp_path_factory):
    from fed_helpers import write_config
    from flwr.app import Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from uharmony.fed import messages as M
    from uharmony.fed.config import load_fed_config
    from uharmony.fed.server_app import UHarmonyStrategy, initial_model

    folder = tmp_path_factory.mktemp("msg")
    path, _ = write_config(folder, fed_data)
    cfg = load_fed_config(path)
    s = {**cfg.to_dict(), "out": str(folder / "federation")}
    (folder / "federation").mkdir()
    strategy = UHarmonyStrategy(s, initial_model(s))
    config = strategy.round_config(1, 2)
    arrays = M.to_arrays(strategy.global_np)
    settings = folder / "site.json"
    settings.write_text(json.dumps({"data": str(fed_data["data"]["site-a"]), "device": "cpu"}), encoding="utf-8")

    def message(kind):
        return Message(RecordDict({M.ARRAYS: arrays, M.CONFIG: config}), dst_node_id=7, message_type=kind)

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 7  # as Flower's task runner sets
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    return strategy, message, context, settings


def _reply(round_messages, kind, monkeypatch):
    from uharmony.fed import client_app

    strategy, message, context, settings = round_messages
    monkeypatch.setenv("UHARMONY_FED_SITE_SETTINGS", str(settings))
    handler = client_app.train if kind == "train" else client_app.evaluate
    return strategy, handler(message(kind), context)


def test_train_reply_holds_only_whitelisted_content(round_messages, monkeypatch):
    from uharmony.fed import messages as M

    strategy, reply = _reply(round_messages, "train", monkeypatch)
    content = reply.content
    assert set(content.keys()) == {"arrays", "metrics", "site", "gate-stats"}
    assert dict(content["site"]) == {"domain": "synth-t1"}
    assert set(content["metrics"].keys()) <= M.metric_keys(strategy.classes[1:])
    assert content["metrics"]["num-examples"] == 2 and "loss" in content["metrics"]
    want = M.site_keys(list(strategy.expected), strategy.domains, "synth-t1", fixed_gate=True)
    assert list(content["arrays"].keys()) == want
    assert not any(".harmony.synth-t2." in k or k.startswith("heads.synth-t2.") for k in want)
    assert any(".harmony.synth-t1." in k for k in want) and any(k.startswith("heads.synth-t1.") for k in want)
    assert not any(k.startswith("gate.") for k in want)  # the negative-free gate is fixed: nothing of it is sent
    # ... but the statistics of its pooled features over the site's 2 training cases, and of its style features
    # the mean and the scatter's diagonal (for the unfamiliar-input score)
    dim, style = strategy.model.gate.pooled_dim, strategy.style_dim
    stats = {k: v.numpy() for k, v in content["gate-stats"].items()}
    assert {k: (v.shape, str(v.dtype)) for k, v in stats.items()} == {
        "count": ((1,), "float64"), "mean": ((dim,), "float64"), "scatter": ((dim, dim), "float64"),
        "style-mean": ((style,), "float64"), "style-scatter": ((style,), "float64")}
    assert (stats["style-scatter"] >= 0).all()
    assert stats["count"][0] == 2
    np.testing.assert_allclose(stats["scatter"], stats["scatter"].T)
    assert np.linalg.matrix_rank(stats["scatter"], tol=1e-9) <= 1  # two cases: one direction about their mean
    for k, a in content["arrays"].items():
        assert (tuple(a.shape), a.dtype) == (tuple(strategy.expected[k][0]), strategy.expected[k][1]), k
    # no strings, file names or paths anywhere but the domain name
    for name, record in content.items():
        for k, v in record.items():
            if name == "site":
                continue
            assert not isinstance(v, (str, bytes)), (name, k)
    assert M.check_reply(content, kind="train", expected=strategy.expected, domains=strategy.domains,
                         classes=strategy.classes[1:], gate_stats_dim=dim, style_dim=style) == "synth-t1"
    with pytest.raises(ValueError, match="ArrayRecord of count, mean, scatter$"):  # expecting no style arrays
        M.check_reply(content, kind="train", expected=strategy.expected, domains=strategy.domains,
                      classes=strategy.classes[1:], gate_stats_dim=dim)
    with pytest.raises(ValueError, match="records"):  # a coordinator with the averaged gate refuses it
        M.check_reply(content, kind="train", expected=strategy.expected, domains=strategy.domains,
                      classes=strategy.classes[1:])


def test_a_site_trains_its_own_parameters_at_the_coordinators_factor(round_messages):
    from uharmony.fed import client_app
    from uharmony.fed import messages as M
    from uharmony.train.trainer import make_optimizer

    strategy, message, _, _ = round_messages
    msg = message("train")
    rs = client_app.round_settings(msg.content[M.CONFIG])
    assert len(strategy.domains) == 2 and rs["train"]["domain_lr_scale"] == 2.0  # 0 resolved by the coordinator
    model = client_app.build_model(rs, msg.content[M.ARRAYS])
    optimizer = make_optimizer(model, client_app.train_config(rs, "synth-t1"))
    scale = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        own = ".harmony." in name or name.startswith("heads.")
        assert scale[id(p)] == (2.0 if own else 1.0), name
    old = {k: v for k, v in rs["train"].items() if k != "domain_lr_scale"}
    assert client_app.site_lr_scale(old) == 1.0  # a coordinator that predates the key
    for bad in (0.0, -1.0, 1000.0, float("nan")):  # a received value is bounded, as the config loader bounds it
        with pytest.raises(ValueError, match="domain_lr_scale"):
            client_app.site_lr_scale({**rs["train"], "domain_lr_scale": bad})


def test_a_site_takes_the_coordinators_gin_settings_checked_as_a_config_files(round_messages):
    from uharmony.fed import client_app
    from uharmony.fed import messages as M

    _, message, _, _ = round_messages
    rs = client_app.round_settings(message("train").content[M.CONFIG])
    t = rs["train"]  # what the coordinator sends: fed.toml's train section, GIN keys included
    assert (t["gin_kernel_sizes"], t["ipa"], t["ipa_weight"]) == ([1, 3], False, 0.3)
    a = client_app.train_config({**rs, "train": {**t, "gin_kernel_sizes": [1], "ipa": True}}, "synth-t1").augment
    assert (a.gin, a.gin_p, a.gin_kernel_sizes, a.ipa, a.ipa_weight) == (t["gin"], t["gin_p"], [1], True, 0.3)
    old = {k: v for k, v in t.items() if k not in ("gin_kernel_sizes", "ipa", "ipa_weight")}
    a = client_app.site_augment(old)  # a coordinator that predates the keys: the defaults
    assert (a.gin_kernel_sizes, a.ipa, a.ipa_weight) == ([1, 3], False, 0.3)
    for key, bad in (("gin_kernel_sizes", [2]), ("gin_kernel_sizes", "1"), ("gin_kernel_sizes", [True]),
                     ("gin_p", 1.5), ("gin_p", "0.5"), ("ipa", "yes"), ("gin", 1), ("ipa_weight", -1.0)):
        with pytest.raises(ValueError, match=f"the coordinator sent train.{key} = "):
            client_app.site_augment({**t, key: bad})


def test_averaged_gate_sends_the_whole_gate_and_no_statistics(round_messages, monkeypatch):
    from flwr.app import ConfigRecord

    from uharmony.fed import messages as M

    strategy, message, context, settings = round_messages
    msg = message("train")
    cfg = dict(msg.content["config"])
    cfg["train"] = M.encode_json({**json.loads(cfg["train"]), "gate_method": "averaged"})
    msg.content["config"] = ConfigRecord(cfg)
    monkeypatch.setenv("UHARMONY_FED_SITE_SETTINGS", str(settings))
    from uharmony.fed import client_app

    content = client_app.train(msg, context).content
    assert set(content.keys()) == {"arrays", "metrics", "site"}
    want = M.site_keys(list(strategy.expected), strategy.domains, "synth-t1")
    assert list(content["arrays"].keys()) == want
    assert not any(k.startswith("gate.calibration") for k in want)
    assert any(k.startswith("gate.classifier.synth-t2.") for k in want)  # averaged over all sites
    assert M.check_reply(content, kind="train", expected=strategy.expected, domains=strategy.domains,
                         classes=strategy.classes[1:]) == "synth-t1"


def test_evaluate_reply_holds_only_whitelisted_content(round_messages, monkeypatch):
    from uharmony.fed import messages as M

    strategy, reply = _reply(round_messages, "evaluate", monkeypatch)
    content = reply.content
    assert set(content.keys()) == {"metrics", "site"}
    keys = set(content["metrics"].keys())
    assert keys <= M.metric_keys(strategy.classes[1:])
    assert {"num-examples", "gate-accuracy", "dice/grey matter"} <= keys
    assert M.check_reply(content, kind="evaluate", expected=strategy.expected, domains=strategy.domains,
                         classes=strategy.classes[1:]) == "synth-t1"


@pytest.mark.parametrize("tamper", ["extra record", "extra metric", "file name", "extra array", "wrong shape",
                                    "other domain's head", "unknown domain", "nan metric", "negative unfamiliar score", "gate array",
                                    "stats extra key", "stats nan", "stats shape", "stats one case", "no stats",
                                    "style negative", "style shape", "style missing"])
def test_anything_outside_the_whitelist_is_refused(round_messages, monkeypatch, tamper):
    from flwr.app import Array, ConfigRecord, MetricRecord, RecordDict

    from uharmony.fed import messages as M

    strategy, reply = _reply(round_messages, "train", monkeypatch)
    c = reply.content
    M.check_reply(c, kind="train", expected=strategy.expected, domains=strategy.domains, classes=strategy.classes[1:],
                  gate_stats_dim=strategy.stats_dim, style_dim=strategy.style_dim)  # untouched, it passes
    records = dict(c.items())
    metrics = dict(c["metrics"])
    arrays = c["arrays"]
    if tamper == "extra record":
        records["debug"] = ConfigRecord({"note": "hello"})
    elif tamper == "extra metric":
        metrics["voxels"] = 123
    elif tamper == "file name":
        records["site"] = ConfigRecord({"domain": "synth-t1", "file": "/data/patient_007.nii.gz"})
    elif tamper == "extra array":
        arrays["images"] = Array(np.zeros((4, 4), np.float32))
    elif tamper == "wrong shape":
        k = next(iter(arrays.keys()))
        arrays[k] = Array(np.zeros((3,), np.float32))
    elif tamper == "other domain's head":
        arrays["heads.synth-t2.bias"] = Array(np.zeros(strategy.expected["heads.synth-t2.bias"][0], np.float32))
    elif tamper == "unknown domain":
        records["site"] = ConfigRecord({"domain": "patient-42"})
    elif tamper == "nan metric":
        metrics["loss"] = float("nan")
    elif tamper == "negative unfamiliar score":  # would set a negative threshold: every scan flagged
        metrics["unfamiliar-max"] = -1.0
    elif tamper == "gate array":  # the fixed gate's weights must not travel (nor change)
        arrays["gate.convs.0.bias"] = Array(strategy.global_np["gate.convs.0.bias"])
    elif tamper.startswith(("stats", "style")):
        stats = {k: v.numpy().copy() for k, v in c["gate-stats"].items()}
        if tamper == "stats extra key":
            stats["features"] = np.zeros((2, len(stats["mean"])))
        elif tamper == "stats nan":
            stats["mean"][0] = np.nan
        elif tamper == "stats shape":
            stats["scatter"] = stats["scatter"][:-1]
        elif tamper == "style negative":  # a sum of squares below zero
            stats["style-scatter"][0] = -1.0
        elif tamper == "style shape":
            stats["style-mean"] = stats["style-mean"][:-1]
        elif tamper == "style missing":
            stats.pop("style-scatter")
        else:
            stats["count"] = np.ones(1)
        records["gate-stats"] = M.to_arrays(stats)
    elif tamper == "no stats":
        records.pop("gate-stats")
    records["metrics"] = MetricRecord(metrics)
    with pytest.raises(ValueError):
        M.check_reply(RecordDict(records), kind="train", expected=strategy.expected, domains=strategy.domains,
                      classes=strategy.classes[1:], gate_stats_dim=strategy.stats_dim, style_dim=strategy.style_dim)


def test_the_coordinator_uses_plausible_gate_statistics_and_ignores_implausible_ones(round_messages, monkeypatch):
    """A real site's statistics lie within the synthetic heads' spread; scaled-up or shifted ones are
    logged and not used, and the site's earlier statistics stay."""
    from uharmony.fed import aggregate as A
    from uharmony.fed import messages as M

    strategy, reply = _reply(round_messages, "train", monkeypatch)
    stats = M.read_gate_stats(reply.content["gate-stats"], strategy.stats_dim, strategy.style_dim)
    ref = strategy.stats_reference
    assert ref.count == 96 and ref.mean.shape == (strategy.stats_dim,)
    monkeypatch.setattr(strategy, "site_stats", {})
    monkeypatch.setattr(strategy, "global_np", dict(strategy.global_np))
    monkeypatch.setattr(strategy, "entry", {})

    def fit(site_stats):
        strategy.fit_gate([A.Update(site="7", domain="synth-t1", samples=2, arrays={}, extra={"gate_stats": site_stats})])
        return strategy.entry["gate"]

    gate = fit(stats)
    assert gate["stats_rejected"] == [] and strategy.site_stats["7"][1] is stats
    measured = gate["stats_plausibility"]["7"]
    assert 0 <= measured["spread"] < 10 and 0 < measured["offset"] < 10
    rows = {k: strategy.global_np[k].copy() for k in strategy.global_np if k.startswith("gate.classifier.")}
    for bad, what in ((A.FeatureStats(2, stats.mean, stats.scatter * 1e6), "spread"),
                      (A.FeatureStats(2, ref.mean + 100 * (stats.mean - ref.mean), stats.scatter), "offset")):
        gate = fit(bad)
        assert [r["site"] for r in gate["stats_rejected"]] == ["7"] and what in gate["stats_rejected"][0]["reason"]
        assert gate["stats_plausibility"]["7"][what] > 10
        assert strategy.site_stats["7"][1] is stats and gate["from_earlier_rounds"] == ["7"]
        for k, v in rows.items():  # the gate is fitted as before
            np.testing.assert_array_equal(strategy.global_np[k], v)


def test_sites_calibrate_the_unfamiliar_flag_without_sending_a_case(round_messages, monkeypatch, tmp_path):
    """The coordinator fits each domain's unfamiliar-input Gaussian from the style statistics its sites send:
    the Gaussian central training fits on the same cases. A site then reports the largest score of its
    validation cases; the card's threshold is 1.25 x the largest report. The package passes the site's own
    validation scan and flags noise."""
    import nibabel as nib
    import torch
    from flwr.app import Message, RecordDict

    from uharmony.fed import aggregate as A
    from uharmony.fed import client_app
    from uharmony.fed import messages as M
    from uharmony.fed.server_app import familiarity_threshold, make_card
    from uharmony.infer.segment import Segmenter
    from uharmony.model.package import load_portable_state_dict, save_package
    from uharmony.train.gate import gate_features

    strategy, message, context, settings = round_messages
    strategy, reply = _reply(round_messages, "train", monkeypatch)
    assert strategy.style_dim == strategy.model.gate.features - strategy.stats_dim == strategy.model.gate.style_dim > 0
    stats = M.read_gate_stats(reply.content["gate-stats"], strategy.stats_dim, strategy.style_dim)
    assert stats.style_mean.shape == stats.style_scatter.shape == (strategy.style_dim,)
    monkeypatch.setattr(strategy, "site_stats", {})
    monkeypatch.setattr(strategy, "global_np", dict(strategy.global_np))
    monkeypatch.setattr(strategy, "entry", {})
    strategy.fit_gate([A.Update(site="7", domain="synth-t1", samples=2, arrays={}, extra={"gate_stats": stats})])
    assert strategy.entry["gate"]["familiarity_fitted"] == ["synth-t1"]  # synth-t2: no site yet, count stays 0
    assert float(strategy.global_np["gate.calibration.synth-t2.count"]) == 0

    # the same Gaussian as DomainGate.fit_calibration on the site's two training cases
    config = strategy.round_config(1, 2)
    rs = client_app.round_settings(config)
    fresh = M.to_arrays(strategy.global_np)
    model = client_app.build_model(rs, fresh)
    site = client_app.load_site(json.loads(settings.read_text()), rs, model.gate.downsample)
    central = client_app.build_model(rs, fresh).gate
    central.fit_calibration(gate_features(model, site.train), torch.zeros(2, dtype=torch.long))
    fed = model.gate.calibration["synth-t1"]
    assert float(fed.count) == 2
    torch.testing.assert_close(fed.mean, central.calibration["synth-t1"].mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fed.var, central.calibration["synth-t1"].var, rtol=1e-5, atol=1e-6)

    # the site's evaluate reply carries its largest validation score, a whitelisted finite number
    monkeypatch.setenv("UHARMONY_FED_SITE_SETTINGS", str(settings))
    msg = Message(RecordDict({M.ARRAYS: fresh, M.CONFIG: config}), dst_node_id=7, message_type="evaluate")
    content = client_app.evaluate(msg, context).content
    M.check_reply(content, kind="evaluate", expected=strategy.expected, domains=strategy.domains,
                  classes=strategy.classes[1:])
    held = M.metrics_dict(content["metrics"])["unfamiliar_max"]
    expect = float(model.gate.unfamiliar_score(gate_features(model, site.evaluate)).max())
    assert held == pytest.approx(expect, rel=1e-5) and held >= 0

    fam = familiarity_threshold([{"site": "7", "evaluate": {"unfamiliar_max": held}}, {"site": "8", "evaluate": {}}])
    assert fam == {"threshold": round(1.25 * held, 6), "held_max": {"7": held}}
    entry = {"participants": [], "domains": {}, "gate": strategy.entry["gate"], "familiarity": fam}
    card = make_card(strategy.s, strategy.arch, 1, entry)
    assert card["gate"]["unfamiliar_threshold"] == fam["threshold"]
    assert card["gate"]["calibration"]["held_max_by_site"] == {"7": held}
    assert "fires on inputs unlike all of them" in card["limitations"][0]
    assert make_card(strategy.s, strategy.arch, 1, {**entry, "familiarity": None})["gate"]["unfamiliar_threshold"] == 1e6

    load_portable_state_dict(strategy.model, {k: torch.from_numpy(np.array(v)) for k, v in strategy.global_np.items()})
    save_package(strategy.model, card, tmp_path / "model")
    val = json.loads(open(json.loads(settings.read_text())["data"]).read())["validation"][0]["image"]
    val = (Path(json.loads(settings.read_text())["data"]).parent / val)
    img = nib.load(val)
    noise = np.random.default_rng(0).normal(size=img.shape).astype(np.float32)
    nib.save(nib.Nifti1Image(noise, img.affine), tmp_path / "noise.nii.gz")
    seg = Segmenter(tmp_path / "model", "cpu")
    own = seg.segment_files([val], tmp_path / "own.nii.gz")["domain"]
    assert own["unfamiliar_threshold"] == fam["threshold"]
    assert own["unfamiliar_score"] <= held * 1.01 and not own["unfamiliar"]
    odd = seg.segment_files([tmp_path / "noise.nii.gz"], tmp_path / "noise-seg.nii.gz")["domain"]
    assert odd["unfamiliar"] and odd["unfamiliar_score"] > fam["threshold"], odd


def test_a_restart_resumes_an_older_card_of_the_same_network_and_refuses_another(round_messages, tmp_path):
    """The coordinator's restart check: the last global model's architecture against fed.toml's, a key absent
    from an older card (`poly_scale`, added later) taken at its default (1: the network as it was trained)."""
    import copy

    from uharmony.errors import BadModelError
    from uharmony.fed.server_app import arch_of, initial_model, make_card
    from uharmony.model.package import save_package

    s = copy.deepcopy(round_messages[0].s)
    s["model"]["poly_scale"] = 1.0
    model = initial_model(s)
    folder = tmp_path / "global"
    save_package(model, make_card(s, arch_of(s), 1, {"participants": [], "domains": {}}), folder)
    card = json.loads((folder / "card.json").read_text())
    del card["architecture"]["poly_scale"]  # as written before the key existed
    (folder / "card.json").write_text(json.dumps(card))
    resumed = initial_model({**s, "resume_from": str(folder)})
    assert resumed.config.poly_scale == 1.0
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(resumed.state_dict().values(),
                                                                      model.state_dict().values()))
    s["model"]["poly_scale"] = 0.1  # fed.toml now builds another network: refused, naming the folder
    with pytest.raises(BadModelError, match="architecture differs") as e:
        initial_model({**s, "resume_from": str(folder)})
    assert str(folder) in str(e.value)
