"""The bundled default brain model matches the recipe in the repository (`make brain-model`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from uharmony.augment.views import FOV_VIEWS
from uharmony.model.card import load_card
from uharmony.model.registry import bundled_model_dir
from uharmony.train import brain
from uharmony.train.config import load_config

REPO = Path(__file__).resolve().parents[2]


def test_the_bundled_card_records_every_stage_of_the_repository_recipe():
    card = load_card(bundled_model_dir("brain"))  # schema-validated
    stages = card["training"]["stages"]
    assert [s["stage"] for s in stages] == list(range(1, brain.LAST_STAGE + 1)) == list(range(1, 11))
    adapts = stages[3:brain.LAST_ADAPT_STAGE]
    for stage in stages[:2] + adapts:
        assert (REPO / stage["config"]).is_file(), stage
    assert [REPO / s["config"] for s in adapts] == list(brain.LESION_CONFIGS)
    # the last network stage (9) was trained with what its config says today: GIN off, the gate frozen
    last, _ = load_config(REPO / adapts[-1]["config"], kind="adapt")
    used = card["training"]["config"]
    assert used["steps"] == last.steps and used["class_balance"] is last.class_balance is True
    assert used["lr"] == last.lr and used["fg_prob"] == last.fg_prob and used["seed"] == last.seed
    # trained before domain_lr_scale existed, i.e. with factor 1, which every brain config pins
    assert used.get("domain_lr_scale", 1.0) == last.domain_lr_scale == 1.0
    assert used["augment"]["gin"] is last.augment.gin is False and used["gate"]["weight"] == last.gate.weight == 0
    # stage 1's config still builds the shipped network (model.poly_scale: 1 pinned, the default is now 0.1)
    first, _ = load_config(REPO / stages[0]["config"])
    arch = card["architecture"]
    assert first.model.filters == arch["filters"] and first.model.harmony_levels == arch["harmony_levels"]
    assert first.model.poly_degree == arch["poly_degree"] and first.model.clamp == arch["clamp"]
    assert "poly_scale" not in arch and first.model.poly_scale == 1.0
    # stage 10: the gate refit, on the gate heads of `brain.py data` (gate2/ for T1)
    refit = card["gate"]["refit"]
    assert refit["steps"] == brain.GATE_STEPS and refit["batch_size"] == brain.GATE_BATCH
    assert stages[-1]["what"].startswith("uharmony refit-gate") and stages[-1]["gate_only_variants"] == ["mri-t1"]
    # ... on reframed scans, and segment asks the gate about several fields of view
    assert refit["framing"] == stages[-1]["framing"] == brain.GATE_FRAMING > 0
    assert f"--framing {brain.GATE_FRAMING}" in refit["command"]
    assert card["gate"]["fov_views"] == list(FOV_VIEWS) and "framing" in card["gate"]["calibration"]
    lists = refit["datalists"][len(brain.DOMAINS):]
    assert lists == [f"work/heads/{'gate2' if d == 'mri-t1' else 'gate'}/{d}/dataset.json" for d in brain.DOMAINS]
    per_domain = brain.GATE_VAL_CASES + brain.VAL_CASES
    for domain in brain.DOMAINS:
        assert sum(refit["confusion_after"][domain].values()) == per_domain
        right = refit["confusion_after"][domain][domain] / per_domain
        assert abs(right - refit["accuracy_after"][domain]) < 1e-3
    assert [d["name"] for d in card["domains"]] == list(brain.DOMAINS)


def test_finish_card_keeps_the_evaluation_honest():
    card = json.loads((bundled_model_dir("brain") / "card.json").read_text())
    real = {"images": {"x": {"dice": {"grey matter": 0.5}}}}
    synthetic = {"routing": "auto", "dice": {"ct": {"grey matter": 0.4}}, "gate_accuracy": {"ct": 1.0}}
    out = brain.finish_card(dict(card, evaluation={"before": {"a": 1}, "after": {"b": 2}}), real, synthetic)
    ev = out["evaluation"]
    last_stage = {"stage": brain.LAST_ADAPT_STAGE, "before": {"a": 1}, "after": {"b": 2}}
    assert ev["dice"] == synthetic["dice"] and ev["real_images"] == real["images"]
    assert ev["last_stage_adaptation"] == last_stage  # kept for the record, not presented as final
    assert "ct" in ev["not_evaluated_on_real_images"] and "lesion (every modality)" in ev["not_evaluated_on_real_images"]
    assert out["input"]["overlap"] == 0.25 and "not validated on patients" in out["intended_use"]
    # finish run again on a finished package keeps the last stage's record
    again = brain.finish_card(out, real, synthetic)
    assert again["evaluation"]["last_stage_adaptation"] == last_stage


def test_the_bundled_evaluation_used_the_overlap_that_ships(tmp_path):
    card = load_card(bundled_model_dir("brain"))
    assert card["input"]["overlap"] == brain.OVERLAP
    assert card["evaluation"]["overlap"] == brain.OVERLAP  # the figures in docs/model.md are what segment does
    assert card["postprocess"] == brain.POSTPROCESS
    # finish sets the overlap and the clean-up on the package before it evaluates anything
    path = tmp_path / "card.json"
    path.write_text(json.dumps(dict(card, input=dict(card["input"], overlap=0.5), postprocess={})))
    brain._set_inference(path)
    written = json.loads(path.read_text())
    assert written["input"]["overlap"] == brain.OVERLAP and written["postprocess"] == brain.POSTPROCESS
    assert not (tmp_path / "card.json.tmp").exists()


def test_brain_train_chains_the_ten_stages(monkeypatch, tmp_path):
    # the commands only (uharmony.cli.main is replaced: the stages themselves take hours)
    import uharmony.cli

    calls: list[list[str]] = []
    monkeypatch.setattr(uharmony.cli, "main", lambda argv: calls.append(argv) or 0)
    out = str(tmp_path / "brain")
    assert brain.cmd_train(str(tmp_path / "heads"), out, resume=False) == 0
    def arg(argv, flag):
        return argv[argv.index(flag) + 1]

    assert [c[0] for c in calls] == ["train", "adapt", "refit-gate", *["adapt"] * 6, "refit-gate"]
    outs = [arg(c, "--out") for c in calls]
    assert outs == [f"{out}.stage{n}" for n in range(1, 10)] + [out]
    assert [arg(c, "--model") for c in calls[1:]] == outs[:-1]  # each stage starts from the one before
    configs = [arg(c, "--config") for c in calls if "--config" in c]
    assert [Path(p).name for p in configs] == ["brain.toml", "brain-continue.toml",
                                               *(p.name for p in brain.LESION_CONFIGS)]
    (tmp_path / "brain.stage2").mkdir()
    (tmp_path / "brain.stage2" / "card.json").write_text("{}")
    calls.clear()
    assert brain.cmd_train(str(tmp_path / "heads"), out, resume=False) == 0
    assert len(calls) == 9  # a finished stage is kept, not redone
    # the two gate refits: the plain gate heads, then the gate-only variants for the MRI domains
    first, last = (c[c.index("--data") + 1:c.index("--steps")] for c in (calls[1], calls[-1]))
    heads = tmp_path / "heads"
    assert first[4:] == [str(heads / "gate" / d / "dataset.json") for d in brain.DOMAINS]
    assert last[4:] == [str(heads / ("gate2" if d == "mri-t1" else "gate") / d / "dataset.json") for d in brain.DOMAINS]
    assert "--framing" not in calls[1] and arg(calls[-1], "--framing") == str(brain.GATE_FRAMING)
    assert first[:4] == last[:4] == [str(heads / d / "dataset.json") for d in brain.DOMAINS]


def _strings(obj):
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return [obj] if isinstance(obj, str) else []


def test_the_bundled_card_names_no_machines_folders():
    card = json.loads((bundled_model_dir("brain") / "card.json").read_text())
    absolute = [s for s in _strings(card) if re.search(r"(^|\s)/\w", s)]
    assert absolute == []
    # the nested stage records still say what each stage trained on, in make brain-model's layout
    assert card["training"]["datalists"][0]["path"] == "work/heads/mri-t1/dataset.json"


def test_portable_paths_rewrites_only_the_given_roots(tmp_path):
    data, elsewhere = tmp_path / "data", "/opt/other/x.json"
    card = {"command": f"uharmony adapt --model {data}/brain6 --data {data}/heads/ct/dataset.json",
            "datalists": [{"path": f"{data}/heads/ct/dataset.json"}, {"path": elsewhere}],
            "url": "https://example.org/data/x", "n": 3}
    out = brain.portable_paths(card, [data, tmp_path / "data" / "heads" / ".."])  # the same root twice
    assert out["command"] == "uharmony adapt --model work/brain6 --data work/heads/ct/dataset.json"
    assert out["datalists"] == [{"path": "work/heads/ct/dataset.json"}, {"path": elsewhere}]
    assert out["url"] == card["url"] and out["n"] == 3
    assert card["datalists"][0]["path"].startswith(str(data))  # the input is not changed


def test_brain_data_renders_the_gate_only_variants_for_t1(monkeypatch, tmp_path):
    import uharmony.data.heads

    calls: list[list[str]] = []
    monkeypatch.setattr(uharmony.data.heads, "main", lambda argv: calls.append(argv) or 0)
    assert brain.cmd_data(str(tmp_path)) == 0
    outs = [c[c.index("--out") + 1] for c in calls]
    assert outs == [str(tmp_path), str(tmp_path / "gate"), str(tmp_path / "gate2")]
    assert ["--for-gate" in c for c in calls] == [False, False, True]
    last = calls[-1]
    assert last[last.index("--domains") + 1:last.index("--train")] == ["mri-t1"]
    assert last[last.index("--seed") + 1] == str(brain.GATE_SEED)  # the same heads as gate/, other contrasts
