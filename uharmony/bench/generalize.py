"""`uharmony bench generalize`: U-Harmony vs its baselines across modalities, and on a style never seen.

Data: atlas-based heads (`uharmony.data.heads`, seeds from 100000, distinct from the default model's)
rendered as three training domains (mri-t1, mri-t2, ct) and one held-back style (mri-flair). Every
method is trained with the same reduced budget (4 mm grid, 24^3 patches, a small 4-level DynUNet) and
evaluated on the same validation cases:

==============  ===========================================================================
uharmony        U-Harmony layers + per-domain heads + gate; evaluated routed by the gate
oracle          the same network, told the true domain at evaluation (as in the paper)
joint           one plain network (InstanceNorm, one head) on all domains
separate        one plain network per domain, each with a third of the steps (equal total
                compute); on the unseen style the three are averaged
==============  ===========================================================================

each with and without GIN (4 mm grid, 24^3 patches, 1000 steps: with two single-threaded workers the
whole benchmark fits the 2-core machine's hour). Then the adaptation target: the uharmony+GIN model
adapted with 4 labelled cases of the unseen style (replaying the old domains; as many steps as a model's
training) against a uharmony+GIN model trained with that style from the start (with 4/3 of the steps, so
every domain sees as many patches as before).

Scores: mean Dice of CSF, grey and white matter per case, averaged over cases; mean ± sd over seeds.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from uharmony.data import heads
from uharmony.data.io import write_json
from uharmony.train.config import GateConfig

DEFAULT_GATE = GateConfig().method  # the U-Harmony rows' gate.method: the training default

CLASSES = ("cerebrospinal fluid", "grey matter", "white matter")
BENCH_SEED = 100000
ADAPT_CASES = 4
DEFAULT_STEPS = 1000  # per model (500 until 2026-12-03: U-Harmony's CT parameters were still undertrained there)
UNSEEN_STYLES = (heads.BENCH_UNSEEN_DOMAIN, *heads.BENCH_NOVEL_STYLES)  # scored, never trained on
NEW_ORDERS = "new tissue orders"  # the table's column: the mean over heads.BENCH_NOVEL_STYLES, per seed
EVAL_OVERLAP = 0.25  # sliding-window overlap of the benchmark's evaluations (the models' own cards say 0.5)


def budget(steps: int, quick: bool, gate: str = DEFAULT_GATE, device: str = "cpu") -> dict:
    """The config shared by every run (`uharmony train --config` keys); ``gate``: the gate.method; ``device``:
    where every model trains and is scored (cpu, the default, for figures that repeat to the digit; a GPU
    makes budgets of 10000+ steps, where GIN starts to pay, fit the benchmark's hour)."""
    if quick:  # smoke test: seconds, not meaningful
        return {"steps": steps, "batch_size": 2, "patch_size": [16, 16, 16], "spacing_mm": [6.0] * 3,
                "val_every": 0, "val_cases": 1, "checkpoint_every": 0, "device": device, "lr": 3e-3,
                "model": {"filters": [4, 8, 8], "strides": [1, 2, 2]},
                "gate": {"input_size": [8, 8, 8], "filters": [4, 8], "method": gate, "pretrain_steps": 5,
                         "pretrain_views": 12}}
    return {"steps": steps, "batch_size": 2, "patch_size": [24, 24, 24], "spacing_mm": [4.0] * 3,
            "val_every": 0, "val_cases": 4, "checkpoint_every": 0, "device": device, "lr": 3e-3, "fg_prob": 0.8,
            "model": {"filters": [8, 16, 32, 64], "strides": [1, 2, 2, 2], "harmony_levels": 2},
            "gate": {"input_size": [24, 24, 24], "filters": [8, 16, 32], "method": gate}}


def make_data(work: Path, *, train: int, val: int, spacing: float) -> dict[str, Path]:
    """Datalists per domain (cached in `work/data-<spacing>mm`), plus `adapt`: the first ADAPT_CASES flair cases.

    Rendered directly on the model grid: loading then costs no resampling, which matters with ~40 runs.
    """
    from tqdm import tqdm

    atlas = heads.build_atlas()
    out: dict[str, Path] = {}
    doms = [*heads.BENCH_TRAIN_DOMAINS, heads.BENCH_UNSEEN_DOMAIN]
    novel = heads.BENCH_NOVEL_STYLES
    bar = tqdm(total=len(doms) * (train + val) + len(novel) * (1 + val), desc="data", file=sys.stderr)
    for d in doms:
        out[d] = heads.write_dataset(work / f"data-{spacing:g}mm", d, n_train=train, n_val=val,
                                     base_seed=BENCH_SEED, spacing=spacing, atlas=atlas, progress=lambda *_: bar.update(1))
    # the unseen domain's validation heads again in each never-seen tissue order, so that only contrast
    # differs; one training head too, never trained on (a datalist needs one)
    anatomy = [heads.case_seed(heads.BENCH_UNSEEN_DOMAIN, i, BENCH_SEED) for i in (0, *range(train, train + val))]
    for d in novel:
        out[d] = heads.write_dataset(work / f"data-{spacing:g}mm", d, n_train=1, n_val=val, spacing=spacing,
                                     atlas=atlas, progress=lambda *_: bar.update(1), seeds=anatomy)
    bar.close()
    full = json.loads(out[heads.BENCH_UNSEEN_DOMAIN].read_text())
    full["name"] += "-adapt"
    full["training"] = full["training"][:ADAPT_CASES]
    p = out[heads.BENCH_UNSEEN_DOMAIN].with_name("adapt.json")
    write_json(p, full)  # atomic: workers (`--workers`) read it while another process may rewrite it
    out["adapt"] = p
    return out


def _score(dice: dict) -> float | None:
    v = [dice.get(c) for c in CLASSES]
    v = [x for x in v if x is not None]
    return float(np.mean(v)) if v else None


def _evaluator(data: dict[str, Path], spacing, gate_view, device: str = "cpu"):
    """A function (model, mode) -> {domain: score}, with the validation cases prepared once; scored on ``device``."""
    from uharmony.data.datalist import union_label_space
    from uharmony.progress import Reporter
    from uharmony.train.data import load_datasets
    from uharmony.train.trainer import evaluate, prepare_items

    doms = [*heads.BENCH_TRAIN_DOMAINS, heads.BENCH_UNSEEN_DOMAIN, *heads.BENCH_NOVEL_STYLES]
    datasets = load_datasets([data[d] for d in doms])
    union, maps = union_label_space(datasets)
    items = prepare_items(datasets, maps, union, spacing, gate_view, Reporter("none"), split="validation")
    by_dom: dict[str, list] = {}
    for it in items:
        by_dom.setdefault(it.domain, []).append(it)

    def run(model, mode: str, patch, only=None) -> dict[str, dict]:
        sets = {d: v for d, v in by_dom.items() if only is None or d in only}
        model = model.to(torch.device(device))  # packages load on the CPU; `evaluate` runs where the model is
        res = evaluate(model, sets, union, mode=mode, patch=patch, device=torch.device(device), overlap=EVAL_OVERLAP)
        return {d: {"score": _score(res["dice"][d]), "dice": res["dice"][d], "gate": res["gate_accuracy"][d]}
                for d in res["dice"]}
    return run


def run_bench_generalize(*, work: str | None = None, seeds=(0, 1, 2), steps: int = DEFAULT_STEPS, train_cases: int = 12,
                         val_cases: int = 3, quick: bool = False, json_path: str | None = None,
                         methods=("uharmony", "joint", "separate"), adapt: bool = True, gate: str = DEFAULT_GATE,
                         gin=(False, True), workers: int = 1, gin_options: dict | None = None,
                         device: str = "cpu") -> int:
    """Train and score `methods` for every seed and GIN setting in `gin`; the adaptation rows (which adapt the
    uharmony+GIN model) only with `adapt`, uharmony among the methods and GIN on among the settings.
    ``gin_options``: `augment` keys (say ``{"ipa": True}``) for every run with GIN on, adaptation included.
    ``workers`` > 1: each (seed, GIN setting, method) in its own single-threaded process, that many at a time
    (`run_in_workers`). ``device``: a torch device type (cpu, cuda, mps), recorded in the results' config."""
    from uharmony.data.sources import cache_root
    from uharmony.model.package import load_model
    from uharmony.progress import Reporter
    from uharmony.train.adapt import run_adapt
    from uharmony.train.trainer import run_train

    t0 = time.time()
    root = Path(work) if work else cache_root().parent / "bench-generalize"
    root.mkdir(parents=True, exist_ok=True)
    base = budget(steps, quick, gate, device)
    data = make_data(root, train=train_cases, val=val_cases, spacing=base["spacing_mm"][0])
    if workers > 1:
        return run_in_workers(root, workers, seeds=seeds, steps=steps, train_cases=train_cases, val_cases=val_cases,
                              quick=quick, json_path=json_path, methods=methods, adapt=adapt, gate=gate, gin=gin,
                              gin_options=gin_options, device=device)
    train_doms = [str(data[d]) for d in heads.BENCH_TRAIN_DOMAINS]
    rep = Reporter("none")
    gin_options = dict(gin_options or {})
    results: dict[str, dict[int, dict]] = {}
    seconds: dict[str, float] = {}
    evaluate_with = None

    def train(name: str, seed: int, cfg: dict, datalists: list[str]) -> Path:
        out = root / "runs" / f"seed{seed}" / name
        cfg_path = out.with_name(name + ".json")
        cfg_path.parent.mkdir(parents=True, exist_ok=True)
        cfg_path.write_text(json.dumps({**cfg, "seed": seed}))
        t = time.time()
        run_train(datalists, str(out), str(cfg_path), overwrite=True, reporter=rep, argv=["bench"])
        seconds[name] = seconds.get(name, 0.0) + time.time() - t
        return out

    def record(label: str, seed: int, scores: dict) -> None:
        results.setdefault(label, {})[seed] = scores
        unseen = scores.get(heads.BENCH_UNSEEN_DOMAIN, {}).get("score")
        print(f"[{time.time() - t0:6.0f} s] seed {seed} {label:<14} "
              + " ".join(f"{d}={scores[d]['score']:.3f}" for d in heads.BENCH_TRAIN_DOMAINS if d in scores
                         and scores[d]["score"] is not None)
              + (f" unseen={unseen:.3f}" if unseen is not None else ""), file=sys.stderr, flush=True)

    adapt = adapt and "uharmony" in methods and True in gin
    for seed in seeds:
        for with_gin in gin:
            tag = "+GIN" if with_gin else ""
            cfg = {**base, "augment": augment_section(with_gin, gin_options)}
            for method in methods:
                if method == "separate":
                    per = max(1, steps // len(train_doms))
                    out = train("separate" + tag, seed, {**cfg, "method": "separate", "steps": per}, train_doms)
                    merged: dict[str, list] = {}
                    for sub in sorted(p for p in out.iterdir() if (p / "card.json").is_file()):
                        model, card = load_model(sub)
                        own = card["domains"][0]["name"]
                        if evaluate_with is None:
                            evaluate_with = _evaluator(data, base["spacing_mm"], model.gate.downsample, device)
                        s = evaluate_with(model, "joint", tuple(base["patch_size"]))
                        merged.setdefault(own, []).append(s[own])
                        for d in UNSEEN_STYLES:
                            merged.setdefault(d, []).append(s[d])
                    scores = {d: {"score": float(np.mean([x["score"] for x in v])), "per_model": v}
                              for d, v in merged.items()}
                    record("separate" + tag, seed, scores)
                    continue
                out = train(method + tag, seed, {**cfg, "method": method}, train_doms)
                model, _ = load_model(out)
                if evaluate_with is None:
                    evaluate_with = _evaluator(data, base["spacing_mm"], model.gate.downsample, device)
                mode = "joint" if method == "joint" else "auto"
                record(method + tag, seed, evaluate_with(model, mode, tuple(base["patch_size"])))
                if method == "uharmony":
                    # no true domain to tell on the unseen style
                    oracle = evaluate_with(model, "oracle", tuple(base["patch_size"]), only=heads.BENCH_TRAIN_DOMAINS)
                    record("oracle" + tag, seed, oracle)
        if adapt:
            scores = adapt_vs_joint(root, seed, base, data, train, run_adapt, load_model, evaluate_with, rep,
                                    seconds, gin_options)
            for label, s in scores.items():
                record(label, seed, s)

    summary = summarise(results)
    print(report(summary, seeds=seeds, steps=steps, quick=quick, minutes=(time.time() - t0) / 60,
                 gin_options=gin_options, device=device))
    if json_path:
        write_json(json_path, {"summary": summary, "runs": results, "seconds": seconds, "config": base,
                               "model": effective_model(base), "gin_options": gin_options, "seeds": list(seeds),
                               "minutes": round((time.time() - t0) / 60, 1)})
    return 0


def worker_jobs(root: Path, *, seeds, steps: int, train_cases: int, quick: bool, methods, adapt: bool, gate: str,
                gin, parts: Path, gin_options: dict | None = None, device: str = "cpu") -> list:
    """One `uharmony bench generalize` command per (seed, GIN setting, method), each writing parts/<name>.json;
    the adaptation rows go with the uharmony+GIN job of their seed (they adapt its model)."""
    from uharmony.bench.workers import Job

    jobs = []
    for seed in seeds:
        for with_gin in gin:
            for method in methods:
                adapts = adapt and with_gin and method == "uharmony"
                name = f"seed{seed}-{method}{'+GIN' if with_gin else ''}"
                args = ["bench", "generalize", "--work", str(root), "--seeds", str(seed), "--steps", str(steps),
                        "--cases", str(train_cases), "--methods", method, "--gin", "on" if with_gin else "off",
                        "--gate", gate, "--json", str(parts / f"{name}.json"), "--workers", "1",  # a job spawns none
                        "--device", device]
                args += ([] if adapts else ["--no-adapt"]) + (["--quick"] if quick else [])
                args += gin_option_args(gin_options)  # GIN off too (ignored there): the parts then merge
                # run time in models of `steps` steps: adaptation takes 1 more, the from-start model 4/3
                jobs.append(Job(name, args, cost=1.0 + (1.0 + 4 / 3 if adapts else 0.0)))
    return jobs


def run_in_workers(root: Path, workers: int, *, seeds, steps: int, train_cases: int, val_cases: int, quick: bool,
                   json_path: str | None, methods, adapt: bool, gate: str, gin, gin_options: dict | None = None,
                   device: str = "cpu") -> int:
    """The benchmark as `worker_jobs`, `workers` processes at a time (`uharmony.bench.workers`); their files
    merged into one table and, with `json_path`, one results file. The data exist already (made by the caller),
    so no two processes render the same case."""
    from tqdm import tqdm

    from uharmony.bench.workers import run_jobs

    if val_cases != (2 if quick else 3):
        raise ValueError("with workers, the validation cases are the command line's (3, or 2 with quick)")
    t0 = time.time()
    parts = root / "parts"
    jobs = worker_jobs(root, seeds=seeds, steps=steps, train_cases=train_cases, quick=quick, methods=methods,
                       adapt=adapt, gate=gate, gin=gin, parts=parts, gin_options=gin_options, device=device)
    for job in jobs:
        (parts / f"{job.name}.json").unlink(missing_ok=True)  # a file left by an earlier run is not this run's
    bar = tqdm(total=len(jobs), desc=f"jobs ({workers} at a time)", file=sys.stderr)

    def done(name: str, seconds: float) -> None:
        bar.update(1)
        bar.write(f"[{time.time() - t0:6.0f} s] {name} done in {seconds / 60:.1f} min", file=sys.stderr)

    try:
        seconds = run_jobs(jobs, workers, parts, on_done=done)
    finally:
        bar.close()
    docs = [(str(parts / f"{j.name}.json"), json.loads((parts / f"{j.name}.json").read_text())) for j in jobs]
    merged = merge_results(docs)
    merged["minutes"] = round((time.time() - t0) / 60, 1)  # wall time of the whole run, not of its longest job
    merged["workers"] = workers
    merged["job_minutes"] = {k: round(v / 60, 1) for k, v in seconds.items()}
    print(report(summarise(merged["runs"]), seeds=seeds, steps=steps, quick=quick, minutes=merged["minutes"],
                 note=f"({len(jobs)} single-threaded jobs, {workers} at a time)", gin_options=merged["gin_options"],
                 device=device))
    if json_path:
        write_json(json_path, merged)
    return 0


def adapt_vs_joint(root: Path, seed: int, base: dict, data: dict, train, run_adapt, load_model, evaluate_with,
                   rep, seconds, gin_options: dict | None = None) -> dict:
    """Adapt uharmony+GIN to the unseen style with ADAPT_CASES cases vs training with it from the start."""
    unseen = heads.BENCH_UNSEEN_DOMAIN
    src = root / "runs" / f"seed{seed}" / "uharmony+GIN"
    out = root / "runs" / f"seed{seed}" / "adapted"
    cfg_path = root / "runs" / f"seed{seed}" / "adapt.json"
    # as many steps as a model's training (half of them until 2026-12-03: at 1000 steps that reached only 84 %)
    cfg_path.write_text(json.dumps({"steps": base["steps"], "seed": seed, "device": base["device"],
                                    "checkpoint_every": 0, "augment": augment_section(True, gin_options)}))
    t = time.time()
    run_adapt(str(src), [str(data["adapt"])], [str(data[d]) for d in heads.BENCH_TRAIN_DOMAINS], str(out),
              str(cfg_path), overwrite=True, reporter=rep, argv=["bench"])
    seconds["adapted"] = seconds.get("adapted", 0.0) + time.time() - t
    model, _ = load_model(out)
    patch = tuple(base["patch_size"])
    adapted = evaluate_with(model, "auto", patch)
    ref_cfg = {**base, "method": "uharmony", "augment": augment_section(True, gin_options),
               "steps": round(base["steps"] * 4 / 3)}
    ref = train("from-start+GIN", seed, ref_cfg, [str(data[d]) for d in (*heads.BENCH_TRAIN_DOMAINS, unseen)])
    model, _ = load_model(ref)
    return {"adapted+GIN": adapted, "from-start+GIN": evaluate_with(model, "auto", patch)}


def _with_new_orders(scores: dict) -> dict:
    """One seed's scores plus NEW_ORDERS, the mean over the never-seen tissue orders (when all were scored)."""
    v = [scores.get(d, {}).get("score") for d in heads.BENCH_NOVEL_STYLES]
    if any(x is None for x in v):
        return scores
    return {**scores, NEW_ORDERS: {"score": float(np.mean(v))}}


def summarise(results: dict[str, dict]) -> dict:
    """label -> domain -> mean, sd and n over seeds (and the gate's mean accuracy); the seed keys may be
    ints, as recorded, or strings, as read back from a results file. The never-seen tissue orders count as
    domains, and NEW_ORDERS is their mean per seed (so its sd is over seeds)."""
    out = {}
    for label, per_seed in results.items():
        row = {}
        per_seed = {k: _with_new_orders(s) for k, s in per_seed.items()}
        for d in (*heads.BENCH_TRAIN_DOMAINS, *UNSEEN_STYLES, NEW_ORDERS):
            v = [s[d]["score"] for s in per_seed.values() if d in s and s[d]["score"] is not None]
            g = [s[d].get("gate") for s in per_seed.values() if d in s and s[d].get("gate") is not None]
            if v:
                row[d] = {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                          "n": len(v)}
                if g:
                    row[d]["gate"] = float(np.mean(g))
        out[label] = row
    return out


def augment_section(with_gin: bool, gin_options: dict | None) -> dict:
    """A run's `augment` config: GIN on or off, and the benchmark's `--gin-option`s when on."""
    return {"gin": True, **(gin_options or {})} if with_gin else {"gin": False}


def gin_option_args(gin_options: dict | None) -> list[str]:
    """The command-line form of `gin_options`, for a worker process."""
    return [a for k, v in (gin_options or {}).items() for a in ("--gin-option", f"{k}={json.dumps(v)}")]


def gin_options_line(gin_options: dict | None) -> list[str]:
    """The report's line naming the GIN options ([] without any)."""
    if not gin_options:
        return []
    return ["GIN runs with " + ", ".join(f"augment.{k} = {json.dumps(v)}" for k, v in gin_options.items())]


def report(summary: dict, *, seeds, steps: int, quick: bool, minutes: float, note: str = "",
           gin_options: dict | None = None, device: str = "cpu") -> str:
    """The printed result of a `summarise`d run: the table, `note` below it, the target checks."""
    table = format_table(summary, seeds=list(seeds), steps=steps, quick=quick, minutes=minutes, device=device)
    table = "\n".join([table, *gin_options_line(gin_options)])
    return table + (f"\n{note}" if note else "") + "\n\n" + "\n".join(check_targets(summary))


def cell(row: dict, d: str) -> str:
    """A table cell: mean ± sd over seeds x 100, with the seed count when fewer seeds than its row's most have it
    (files merged by --from-json may predate a column), n/a when none has."""
    c = row.get(d)
    if c is None:
        return "n/a"
    most = max(v.get("n", 0) for v in row.values())
    return f"{100 * c['mean']:.1f} ± {100 * c['sd']:.1f}" + (f" (n={c['n']})" if c.get("n", most) < most else "")


def format_table(summary: dict, *, seeds, steps: int, quick: bool, minutes: float, device: str = "cpu") -> str:
    doms = [*heads.BENCH_TRAIN_DOMAINS, heads.BENCH_UNSEEN_DOMAIN, NEW_ORDERS]
    unseen = {heads.BENCH_UNSEEN_DOMAIN: " (unseen)", NEW_ORDERS: f" (unseen, mean of {len(heads.BENCH_NOVEL_STYLES)})"}
    head = "| method | " + " | ".join(d + unseen.get(d, "") for d in doms) + " | mean of trained |"
    title = (f"Dice (mean of CSF, GM, WM; mean ± sd over seeds {', '.join(map(str, seeds))}); {steps} steps per "
             f"model{' (QUICK smoke run: not meaningful)' if quick else ''}"
             f"{'' if device == 'cpu' else f' on {device}'}; {minutes:.1f} min in all")
    lines = [title, "",
             head, "|" + "---|" * (len(doms) + 2)]
    for label, row in summary.items():
        cells = [cell(row, d) for d in doms]
        trained = [row[d]["mean"] for d in heads.BENCH_TRAIN_DOMAINS if d in row]
        cells.append(f"{100 * np.mean(trained):.1f}" if trained else "n/a")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    novel = {label: row for label, row in summary.items() if NEW_ORDERS in row}
    if novel:
        lines += ["", f"{NEW_ORDERS}: the {heads.BENCH_UNSEEN_DOMAIN} validation heads with their brain tissues "
                  "in an order no training domain has (darkest first; g grey matter, c CSF, w white matter):", "",
                  "| method | " + " | ".join(heads.BENCH_NOVEL_STYLES) + " |",
                  "|" + "---|" * (len(heads.BENCH_NOVEL_STYLES) + 1)]
        lines += [f"| {label} | " + " | ".join(cell(row, d) for d in heads.BENCH_NOVEL_STYLES) + " |"
                  for label, row in novel.items()]
    gates = {label: {d: row[d]["gate"] for d in heads.BENCH_TRAIN_DOMAINS if d in row and "gate" in row[d]}
             for label, row in summary.items()}
    gates = {k: v for k, v in gates.items() if v}
    if gates:
        lines.append("")
        lines.append("gate accuracy on the trained domains: " + "; ".join(
            f"{k}: " + ", ".join(f"{d} {100 * a:.0f}%" for d, a in v.items()) for k, v in gates.items()))
    return "\n".join(lines)


def check_targets(summary: dict) -> list[str]:
    """The issue's targets, each as one line: PASS/FAIL with the figures."""
    trained, unseen = heads.BENCH_TRAIN_DOMAINS, heads.BENCH_UNSEEN_DOMAIN
    lines = ["targets:"]

    def mean(label, d):
        return summary.get(label, {}).get(d, {}).get("mean")

    for tag in ("", "+GIN"):
        u, j, o = "uharmony" + tag, "joint" + tag, "oracle" + tag
        if u in summary and j in summary:
            diffs = {d: mean(u, d) - mean(j, d) for d in trained if mean(u, d) is not None and mean(j, d) is not None}
            ok = all(v >= 0 for v in diffs.values())
            lines.append(f"- {'PASS' if ok else 'FAIL'} {u} >= {j} on every domain: "
                         + ", ".join(f"{d} {100 * v:+.1f}" for d, v in diffs.items()))
        if u in summary and o in summary:
            gap = float(np.mean([mean(o, d) - mean(u, d) for d in trained]))
            lines.append(f"- {'PASS' if gap <= 0.015 else 'FAIL'} {u} within 1.5 Dice points of {o} on average: "
                         f"gap {100 * gap:+.1f}")
    for base in ("uharmony", "joint", "separate"):
        a, b = mean(base, unseen), mean(base + "+GIN", unseen)
        if a is not None and b is not None:
            lines.append(f"- {'PASS' if b > a else 'FAIL'} GIN raises {base} on the unseen {unseen}: "
                         f"{100 * a:.1f} -> {100 * b:.1f} ({100 * (b - a):+.1f})")
    for base in ("uharmony", "joint", "separate"):
        a, b = mean(base, NEW_ORDERS), mean(base + "+GIN", NEW_ORDERS)
        if a is not None and b is not None:
            lines.append(f"- {'PASS' if b > a else 'FAIL'} GIN raises {base} on the never-seen tissue orders: "
                         f"{100 * a:.1f} -> {100 * b:.1f} ({100 * (b - a):+.1f})")
    a, f, base = summary.get("adapted+GIN"), summary.get("from-start+GIN"), summary.get("uharmony+GIN")
    if a and f and base and unseen in a and unseen in f:
        ratio = a[unseen]["mean"] / f[unseen]["mean"] if f[unseen]["mean"] else float("nan")
        lines.append(f"- {'PASS' if ratio >= 0.9 else 'FAIL'} adapted with {ADAPT_CASES} cases reaches >= 90 % of "
                     f"training with {unseen} from the start: {100 * ratio:.0f} %")
        drops = {d: base[d]["mean"] - a[d]["mean"] for d in trained if d in a and d in base}
        ok = all(v <= 0.01 for v in drops.values())
        lines.append(f"- {'PASS' if ok else 'FAIL'} old domains drop <= 1 Dice point after adaptation (gate routing): "
                     + ", ".join(f"{d} {100 * -v:+.1f}" for d, v in drops.items()))
        gates = {d: a[d].get("gate") for d in trained if d in a}
        ok = all(g is not None and g >= 0.95 for g in gates.values())
        lines.append(f"- {'PASS' if ok else 'FAIL'} gate >= 95 % right on the old domains after adaptation: "
                     + ", ".join(f"{d} {100 * g:.0f} %" if g is not None else f"{d} n/a" for d, g in gates.items()))
    return lines


def effective_model(base: dict) -> dict:
    """Every `model` key the runs were built with: the budget's, the rest the code's defaults (which change
    between versions, e.g. `poly_scale`), so results of other model settings are not merged."""
    import dataclasses

    from uharmony.train.config import ModelConfig

    return {**dataclasses.asdict(ModelConfig()), **base.get("model", {})}


def differing(a: dict, b: dict) -> str:
    return ", ".join(sorted(k for k in {*a, *b} if a.get(k) != b.get(k)))


def merge_results(docs: list[tuple[str, dict]]) -> dict:
    """One results document from several --json files of the same budget (runs split over processes by seed
    or method); ValueError naming the file whose budget differs or that repeats a run of another file."""
    merged: dict = {}
    for path, r in docs:
        if not merged:
            merged = {"config": r["config"], "model": r.get("model"), "gin_options": r.get("gin_options", {}),
                      "runs": {}, "seeds": [], "minutes": 0.0}
        elif r["config"] != merged["config"]:
            raise ValueError(f"{path}: another budget than the first file's (differs in "
                             f"{differing(r['config'], merged['config'])})")
        elif r.get("gin_options", {}) != merged["gin_options"]:
            raise ValueError(f"{path}: other GIN options than the first file's ({r.get('gin_options', {})} against "
                             f"{merged['gin_options']})")
        elif r.get("model") != merged["model"]:  # None: a file written before the key was recorded
            raise ValueError(f"{path}: models of another model config than the first file's (differs in "
                             f"{differing(r.get('model') or {}, merged['model'] or {})})")
        for label, per in r["runs"].items():
            for seed, scores in per.items():
                if str(seed) in merged["runs"].setdefault(label, {}):
                    raise ValueError(f"{path}: run {label} seed {seed} is in another of the files too")
                merged["runs"][label][str(seed)] = scores
        merged["seeds"] = sorted(set(merged["seeds"]) | set(r["seeds"]))
        merged["minutes"] = max(merged["minutes"], float(r["minutes"]))  # the files' runs ran side by side
    return merged


def print_from_json(docs: list[tuple[str, dict]]) -> int:
    """Re-print the table and the target checks from one or more (path, results) of --json, as the CLI has
    read them (merged: the same budget, each run in one file only)."""
    r = merge_results(docs) if len(docs) > 1 else docs[0][1]
    print(report(summarise(r["runs"]), seeds=r["seeds"], steps=r["config"]["steps"], quick=False, minutes=r["minutes"],
                 gin_options=r.get("gin_options"), device=r["config"].get("device", "cpu")))
    return 0
