"""`uharmony adapt`: a new domain copied from the closest one, new classes as new output channels that
leave the old outputs unchanged, replay, before/after evaluation, and refusals before training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from uharmony.errors import ExitCode
from uharmony.model.network import ArchConfig, UHarmonyNet
from uharmony.train.data import Prepared, write_synth_datalist

REPO = Path(__file__).resolve().parents[2]


def run(*args, timeout=180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "uharmony", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def tiny_net(domains=("dom-a", "dom-b"), classes=4) -> UHarmonyNet:
    torch.manual_seed(0)
    return UHarmonyNet(ArchConfig(num_classes=classes, domains=list(domains), filters=[4, 8, 16], strides=[1, 2, 2],
                                  gate_filters=[4, 8, 8], gate_input_size=[16, 16, 16]))


def test_add_classes_keeps_existing_outputs_and_starts_small():
    net = tiny_net().eval()
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        before = {d: net(x, d) for d in net.domains}
    old_heads = {d: (h.weight.clone(), h.bias.clone()) for d, h in net.heads.items()}
    net.add_classes(2, generator=torch.Generator().manual_seed(1))
    assert net.config.num_classes == 6
    with torch.no_grad():
        for d in net.domains:
            after = net(x, d)
            assert after.shape == (2, 6, 16, 16, 16)
            torch.testing.assert_close(after[:, :4], before[d], rtol=0, atol=1e-6)
            assert torch.equal(net.heads[d].weight[:4], old_heads[d][0])
            assert torch.equal(net.heads[d].bias[:4], old_heads[d][1])
            # new classes take little probability at first
            assert float(torch.softmax(after, 1)[:, 4:].max()) < 0.05
    # the state dict keeps the same keys (a package of the result loads with num_classes = 6)
    assert set(net.state_dict()) == set(tiny_net(classes=6).state_dict())


def _item(domain: str, seed: int) -> Prepared:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(1, 16, 16, 16, generator=g)
    return Prepared(image=image, labels=None, small=image.clone(), domain=domain, dataset="x", annotated=[1],
                    source="none")


def test_new_domain_starts_as_a_copy_of_the_closest_and_has_a_gate_output():
    from uharmony.model.harmony import HarmonyNorm
    from uharmony.train.adapt import expand_model

    net = tiny_net()
    with torch.no_grad():  # make the gate favour dom-b on anything, and make the domains differ
        net.gate.classifier["dom-b"].bias.fill_(5.0)
        for layer in net.harmony_layers():
            layer.harmony["dom-b"].gamma.add_(0.1 * torch.randn_like(layer.harmony["dom-b"].gamma))
            layer.harmony["dom-b"].beta.add_(0.3)
        net.heads["dom-b"].bias.add_(1.0)
    added = expand_model(net, {"new-mod": [_item("new-mod", s) for s in range(3)]}, 1, seed=0)
    assert added["new-mod"]["like"] == "dom-b"
    assert added["new-mod"]["gate_mean_probabilities"]["dom-b"] > 0.9
    assert net.domains == ["dom-a", "dom-b", "new-mod"]
    layers = [m for m in net.modules() if isinstance(m, HarmonyNorm)]
    assert layers
    for layer in layers:
        assert torch.equal(layer.harmony["new-mod"].gamma, layer.harmony["dom-b"].gamma)
        assert torch.equal(layer.harmony["new-mod"].beta, layer.harmony["dom-b"].beta)
        assert not torch.equal(layer.harmony["new-mod"].beta, layer.harmony["dom-a"].beta)
    assert torch.equal(net.heads["new-mod"].weight, net.heads["dom-b"].weight)  # copied, then one class added to both
    assert net.heads["new-mod"].weight.shape[0] == 5
    assert torch.equal(net.gate.classifier["new-mod"].weight, net.gate.classifier["dom-b"].weight)
    logits, _ = net.gate(torch.randn(2, 1, 16, 16, 16))
    assert logits.shape == (2, 3)
    # routing to the new domain gives the same output as routing to its source, until trained
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(net(x, "new-mod"), net(x, "dom-b"), rtol=0, atol=0)


@pytest.fixture(scope="module")
def adapt_data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("adapt-data")
    keep = write_synth_datalist(root / "keep", "synth-t1", domain="dom-a", name="old-a", training_seeds=(72001, 72002),
                                validation_seeds=(72003,),
                                classes=["cerebrospinal fluid", "grey matter", "white matter"])
    new = write_synth_datalist(root / "new", "synth-flair", domain="flair", name="new-flair",
                               training_seeds=(72011, 72012, 72013), classes=["grey matter", "white matter", "lesion"])
    doc = json.loads(new.read_text(encoding="utf-8"))
    doc["labels"]["4"] = "Oedema"  # a class the base lacks (the base has "lesion" too, as value 4)
    new.write_text(json.dumps(doc))
    config = root / "adapt.toml"
    config.write_text("steps = 12\nbatch_size = 2\nlr = 0.003\ncheckpoint_every = 5\n[augment]\ngin_p = 0.5\n")
    return {"keep": keep, "new": new, "config": config}


@pytest.fixture(scope="module")
def adapted(tiny_model, adapt_data, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("adapted") / "adapted"
    p = run("adapt", "--model", tiny_model, "--data", adapt_data["new"], "--keep", adapt_data["keep"], "--out", out,
            "--config", adapt_data["config"])
    assert p.returncode == 0, p.stderr
    return {"out": out, "proc": p}


def test_adapt_adds_a_domain_and_a_class_with_three_cases(tiny_model, adapted, tmp_path):
    out, p = adapted["out"], adapted["proc"]
    assert "adaptation: Dice per class and gate accuracy" in p.stderr and "flair (new) after" in p.stderr
    card = json.loads((out / "card.json").read_text(encoding="utf-8"))
    base = json.loads((tiny_model / "card.json").read_text(encoding="utf-8"))
    assert [d["name"] for d in card["domains"]] == ["dom-a", "dom-b", "flair"]
    assert card["architecture"]["domains"] == ["dom-a", "dom-b", "flair"]
    names = [c["name"] for c in sorted(card["classes"], key=lambda c: c["value"])]
    assert names == [c["name"] for c in base["classes"]] + ["Oedema"]
    assert card["architecture"]["num_classes"] == 6
    assert card["domains"][2]["annotated_classes"] == ["grey matter", "white matter", "Oedema"]
    t = card["training"]
    assert t["method"] == "adapt" and t["base_model"]["sha256"] == base["weights"]["sha256"]
    assert t["new_domains"]["flair"]["like"] in ("dom-a", "dom-b") and t["new_classes"] == ["Oedema"]
    assert t["domain_lr_scale"] == 2.0  # the config's 0: flair and the replayed dom-a are trained together
    ev = card["evaluation"]
    assert ev["split"] == {"dom-a": "validation", "flair": "training"}  # no validation split: training cases, said
    assert ev["before"]["gate_accuracy"]["flair"] is None  # the base has no such domain
    assert isinstance(ev["after"]["gate_accuracy"]["flair"], float)
    assert isinstance(ev["before"]["gate_accuracy"]["dom-a"], float)
    assert set(ev["after"]["dice"]["flair"]) == {"grey matter", "white matter", "Oedema"}
    assert ev["before"]["dice"]["flair"]["Oedema"] == 0.0  # the base cannot predict a class it lacks
    assert not Path(str(out) + ".checkpoint").exists()

    # the adapted package is used by `uharmony segment` as it is, routed to the new domain on request
    from uharmony.data import synth

    case = synth.make_case(79101, "synth-flair", spacing_mm=4.0)
    src = tmp_path / "flair.nii.gz"
    synth.write_case(case, src)
    report = tmp_path / "r.json"
    p = run("segment", src, "-o", tmp_path / "seg.nii.gz", "--model", out, "--domain", "flair", "--report", report)
    assert p.returncode == 0, p.stderr
    r = json.loads(report.read_text(encoding="utf-8"))
    assert r["domain"]["chosen"] == "flair" and set(r["domain"]["probabilities"]) == {"dom-a", "dom-b", "flair"}
    assert [c["name"] for c in r["classes"]][-1] == "Oedema"


def test_adapt_resume_after_sigkill_equals_uninterrupted(tiny_model, adapt_data, adapted, tmp_path):
    import signal

    from safetensors.torch import load_file

    out = tmp_path / "again"
    cmd = [sys.executable, "-m", "uharmony", "adapt", "--model", str(tiny_model), "--data", str(adapt_data["new"]),
           "--keep", str(adapt_data["keep"]), "--out", str(out), "--config", str(adapt_data["config"]),
           "--progress", "jsonl"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        for line in proc.stdout:
            e = json.loads(line)
            if e["event"] == "progress" and e["stage"] == "train" and e["done"] == 7:  # checkpoint 5 is written
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    step = json.loads((tmp_path / "again.checkpoint" / "latest.json").read_text(encoding="utf-8"))["step"]
    assert 5 <= step < 12
    p = run("adapt", "--model", tiny_model, "--data", adapt_data["new"], "--keep", adapt_data["keep"], "--out", out,
            "--config", adapt_data["config"], "--resume")
    assert p.returncode == 0, p.stderr
    assert json.loads((out / "card.json").read_text(encoding="utf-8"))["training"]["resumed_from_step"] == step
    a, b = load_file(str(out / "model.safetensors")), load_file(str(adapted["out"] / "model.safetensors"))
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])]


def test_adapt_refuses_a_channel_mismatch_before_training(tiny_model_2ch, adapt_data, tmp_path):
    out = tmp_path / "never"
    p = run("adapt", "--model", tiny_model_2ch, "--data", adapt_data["new"], "--out", out,
            "--config", adapt_data["config"], "--progress", "jsonl")
    assert p.returncode == ExitCode.BAD_DATALIST, p.stderr
    assert "Traceback" not in p.stderr
    events = [json.loads(line) for line in p.stdout.splitlines()]
    assert [e["event"] for e in events] == ["error"]
    assert events[0]["code"] == ExitCode.BAD_DATALIST
    assert str(adapt_data["new"]) in events[0]["message"] and "has 1 channel" in events[0]["message"]
    assert not out.exists() and not Path(str(out) + ".checkpoint").exists()


def test_adapt_refuses_a_missing_model_and_an_architecture_key(tiny_model, adapt_data, tmp_path, capsys):
    from uharmony.cli import main

    assert main(["adapt", "--model", str(tmp_path / "nope"), "--data", str(adapt_data["new"]),
                 "--out", str(tmp_path / "o")]) == ExitCode.BAD_MODEL
    assert "no such model folder" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nfilters = [8, 16, 32]\n")
    assert main(["adapt", "--model", str(tiny_model), "--data", str(adapt_data["new"]), "--out", str(tmp_path / "o"),
                 "--config", str(bad)]) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert "'model.filters' is fixed by the base model" in err and len(err.strip().splitlines()) == 1


def test_adapt_gate_batches_draw_every_domain_equally_often():
    """The gate's batches in `uharmony adapt` are balanced over domains, not over new vs replayed data.

    Through the new/replayed groups, 3 new cases would fill half of every gate batch and each of two old
    domains a quarter: a prior that drifted old cases onto the new domain after adaptation.
    """
    import numpy as np

    from uharmony.train.data import BalancedSampler, domain_sampler

    def item(domain):
        return Prepared(image=torch.zeros(1, 2, 2, 2), labels=None, small=torch.zeros(1, 2, 2, 2), domain=domain,
                        dataset=domain, annotated=[1], source=f"{domain}.nii.gz")

    items = [item("flair")] * 3 + [item("dom-a")] * 4 + [item("dom-b")] * 2
    groups = BalancedSampler([{"flair": [0, 1, 2]}, {"dom-a": [3, 4, 5, 6], "dom-b": [7, 8]}])
    rng = np.random.default_rng(0)
    seg_share = np.mean([items[groups.draw(rng)].domain == "flair" for _ in range(3000)])
    gate = domain_sampler(items)
    drawn = [items[gate.draw(rng)].domain for _ in range(3000)]
    shares = {d: drawn.count(d) / len(drawn) for d in ("flair", "dom-a", "dom-b")}
    assert abs(seg_share - 0.5) < 0.03  # the segmentation batches: half new data (replay as designed)
    assert all(abs(s - 1 / 3) < 0.03 for s in shares.values()), shares


def test_adapt_with_gate_weight_zero_leaves_the_gate_as_it_was(tiny_model, adapt_data, tmp_path):
    # the brain model's stages 4-6 continue the segmentation network after the gate refit (stage 3)
    from safetensors.torch import load_file

    config = tmp_path / "frozen-gate.toml"
    config.write_text("steps = 4\nbatch_size = 2\ncheckpoint_every = 0\n[augment]\ngin = false\n[gate]\nweight = 0.0\n")
    out = tmp_path / "continued"
    p = run("adapt", "--model", tiny_model, "--data", adapt_data["keep"], "--out", out, "--config", config)
    assert p.returncode == 0, p.stderr
    base, new = load_file(str(tiny_model / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(base) == set(new)
    learnt = [k for k in base if not k.startswith("gate.") and not torch.equal(base[k], new[k])]
    assert any(k.startswith("heads.dom-a") for k in learnt) and any(k.startswith("backbone.") for k in learnt)
    frozen = [k for k in base if k.startswith("gate.") and not k.startswith("gate.calibration.")]
    assert frozen and all(torch.equal(base[k], new[k]) for k in frozen)
