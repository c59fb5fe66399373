"""`uharmony bench generalize --single-source`: does GIN carry a model trained on ONE style to the others?

This is the setting GIN was made for (single-source domain generalisation; in FedGIN, a site that holds
one modality). Each training style of the generalize benchmark (mri-t1, mri-t2, ct) trains one plain
network alone, with and without GIN, at the generalize budget (the full step count, not a third);
every model is then scored on all four styles (the held-back mri-flair included). The figure that
matters is a model's mean Dice on the styles it never saw, and whether GIN raises it.

Same data, budget, scoring and seeds as `uharmony bench generalize` (`uharmony.bench.generalize`).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from uharmony.bench import generalize as G
from uharmony.data import heads
from uharmony.data.io import write_json

STYLES = (*heads.BENCH_TRAIN_DOMAINS, heads.BENCH_UNSEEN_DOMAIN)
ARMS = {"": False, "+GIN": True}  # label suffix -> GIN on


def run_single_source(*, work: str | None = None, seeds=(0, 1, 2), steps: int = 500, train_cases: int = 12,
                      val_cases: int = 3, quick: bool = False, json_path: str | None = None,
                      gin_options: dict | None = None, sources=heads.BENCH_TRAIN_DOMAINS, gin=(False, True),
                      device: str = "cpu") -> int:
    """``gin_options``: as `run_bench_generalize`'s, for the +GIN networks. ``sources``: which training styles
    get a network; ``gin``: which arms (False: without GIN, True: with it). A long run can be split over
    processes by source or arm and printed as one table with `print_from_json`. ``device``: as
    `run_bench_generalize`'s."""
    from uharmony.data.sources import cache_root
    from uharmony.model.package import load_model
    from uharmony.progress import Reporter
    from uharmony.train.trainer import run_train

    t0 = time.time()
    root = Path(work) if work else cache_root().parent / "bench-generalize"
    base = G.budget(steps, quick, device=device)
    data = G.make_data(root, train=train_cases, val=val_cases, spacing=base["spacing_mm"][0])
    rep = Reporter("none")
    runs: dict[str, dict[str, dict[int, dict]]] = {}  # source -> arm -> seed -> {style: score}
    evaluate_with = None
    for seed in seeds:
        for source in sources:
            for tag, with_gin in ARMS.items():
                if with_gin not in gin:
                    continue
                augment = G.augment_section(with_gin, gin_options)
                out = root / "runs" / f"seed{seed}" / f"single-{source}{tag}"
                cfg_path = out.with_name(out.name + ".json")
                cfg_path.parent.mkdir(parents=True, exist_ok=True)
                cfg_path.write_text(json.dumps({**base, "method": "joint", "augment": augment, "seed": seed}))
                run_train([str(data[source])], str(out), str(cfg_path), overwrite=True, reporter=rep, argv=["bench"])
                model, _ = load_model(out)
                if evaluate_with is None:
                    evaluate_with = G._evaluator(data, base["spacing_mm"], model.gate.downsample, device)
                s = evaluate_with(model, "joint", tuple(base["patch_size"]))
                scores = {d: s[d]["score"] for d in (*STYLES, *heads.BENCH_NOVEL_STYLES) if d in s}
                runs.setdefault(source, {}).setdefault(tag, {})[seed] = scores
                print(f"[{time.time() - t0:6.0f} s] seed {seed} {source}{tag:<5} "
                      + " ".join(f"{d}={v:.3f}" for d, v in scores.items() if v is not None),
                      file=sys.stderr, flush=True)
    minutes = (time.time() - t0) / 60
    result = {"kind": "single-source", "runs": runs, "config": base, "seeds": list(seeds),
              "minutes": round(minutes, 1), "gin_options": dict(gin_options or {})}
    print(format_report(result, quick=quick))
    if json_path:
        write_json(json_path, result)
    return 0


def summarise(runs: dict) -> dict:
    """source -> arm -> {style: mean over seeds, "unseen": mean over seeds of the other styles' mean}."""
    out: dict = {}
    for source, arms in runs.items():
        for tag, per_seed in arms.items():
            row = {}
            for d in STYLES:
                v = [s[d] for s in per_seed.values() if s.get(d) is not None]
                if v:
                    row[d] = float(np.mean(v))
            others = [float(np.mean([s[d] for d in STYLES if d != source and s.get(d) is not None]))
                      for s in per_seed.values()]
            row["unseen"] = float(np.mean(others))
            row["unseen_sd"] = float(np.std(others, ddof=1)) if len(others) > 1 else 0.0
            novel = [[s.get(d) for d in heads.BENCH_NOVEL_STYLES] for s in per_seed.values()]
            if all(v is not None for seed in novel for v in seed):  # files before 2026-12-05 have none
                row[G.NEW_ORDERS] = float(np.mean([np.mean(seed) for seed in novel]))
            out.setdefault(source, {})[tag] = row
    return out


def check_target(summary: dict) -> str:
    """PASS when GIN raises the mean Dice on never-seen styles, averaged over the source styles."""
    pairs = [(arms[""]["unseen"], arms["+GIN"]["unseen"]) for arms in summary.values() if "" in arms and "+GIN" in arms]
    if not pairs:
        return "- n/a GIN raises single-source models on the styles they never saw"
    a, b = float(np.mean([p[0] for p in pairs])), float(np.mean([p[1] for p in pairs]))
    per = ", ".join(f"{src} {100 * (arms['+GIN']['unseen'] - arms['']['unseen']):+.1f}" for src, arms in summary.items()
                    if "" in arms and "+GIN" in arms)
    return (f"- {'PASS' if b > a else 'FAIL'} GIN raises single-source models on the styles they never saw: "
            f"{100 * a:.1f} -> {100 * b:.1f} ({100 * (b - a):+.1f}; per source: {per})")


def format_report(result: dict, *, quick: bool = False) -> str:
    summary = summarise(result["runs"])
    steps, device = result["config"]["steps"], result["config"].get("device", "cpu")
    lines = [f"Single-source: one network per training style, Dice (mean of CSF, GM, WM) on every style, mean over "
             f"seeds {', '.join(map(str, result['seeds']))}; {steps} steps per model"
             f"{' (QUICK smoke run: not meaningful)' if quick else ''}{'' if device == 'cpu' else f' on {device}'}; "
             f"{result['minutes']:.1f} min in all",
             *G.gin_options_line(result.get("gin_options")), "",
             "| trained on | " + " | ".join(d + (" (held back)" if d == heads.BENCH_UNSEEN_DOMAIN else "")
                                         for d in STYLES) + f" | mean on never-seen styles | {G.NEW_ORDERS} |",
             "|" + "---|" * (len(STYLES) + 3)]
    for source, arms in summary.items():
        for tag, row in arms.items():
            cells = [("n/a" if d not in row else f"{100 * row[d]:.1f}") + (" (own)" if d == source else "")
                     for d in STYLES]
            cells.append(f"{100 * row['unseen']:.1f} ± {100 * row['unseen_sd']:.1f}")
            cells.append(f"{100 * row[G.NEW_ORDERS]:.1f}" if G.NEW_ORDERS in row else "n/a")
            lines.append(f"| {source}{tag} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\ntargets:\n" + check_target(summary)


def _flat(runs: dict) -> dict:
    return {source + tag: per for source, arms in runs.items() for tag, per in arms.items()}


def _nested(flat: dict) -> dict:
    out: dict = {}
    for label, per in flat.items():
        tag = next((t for t in ARMS if t and label.endswith(t)), "")
        out.setdefault(label[:len(label) - len(tag)], {})[tag] = per
    return out


def merge_results(docs: list[tuple[str, dict]]) -> dict:
    """One single-source results document from several (path, results) of the same budget and GIN options,
    each (source, arm, seed) in one file only; ValueError naming the file otherwise (`generalize.merge_results`'s
    rules)."""
    merged = G.merge_results([(path, {**r, "runs": _flat(r["runs"])}) for path, r in docs])
    return {**merged, "kind": "single-source", "runs": _nested(merged["runs"])}


def print_from_json(docs: list[tuple[str, dict]]) -> int:
    """Re-print the table and target of one or more (path, results) of --single-source --json."""
    print(format_report(merge_results(docs) if len(docs) > 1 else docs[0][1]))
    return 0
