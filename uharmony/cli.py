"""The `uharmony` command line: segment, info, models, devices, demo, bench, train, adapt, refit-gate.

Expected failures print one line ``uharmony: error: <file>: <problem>`` and exit with the code of
`uharmony.errors.ExitCode`; only bugs print a traceback (exit 1).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from pathlib import Path

from uharmony import __version__
from uharmony.device import DEVICE_CHOICES
from uharmony.errors import EXIT_CODE_HELP, BadInputError, ExitCode, UHarmonyError
from uharmony.progress import MODES, Reporter
from uharmony.train.config import GATE_METHODS, GateConfig, parse_gin_options

EPILOG = "exit codes: " + ", ".join(f"{int(c)} {h}" for c, h in EXIT_CODE_HELP.items())


def _add_training_run(p: argparse.ArgumentParser) -> None:
    """Options every training command shares: resume, overwrite, device, progress."""
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUT.checkpoint/")
    p.add_argument("--overwrite", action="store_true", help="replace OUT (and a stale checkpoint) if it exists")
    p.add_argument("--device", default=None, choices=DEVICE_CHOICES, help="overrides the config's device")
    _add_progress(p)


def _add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", choices=MODES, default="auto",
                   help="auto: a bar on a terminal, else log: a line per long stage every minute; "
                        "jsonl: JSON lines on stdout (protocol v1) for programs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uharmony", description=__doc__.splitlines()[0], epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"uharmony {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("segment", help="segment a scan (or a folder of scans with --batch)", epilog=EPILOG,
                       description="Segment one subject: one image file per input channel of the model (NIfTI, NRRD, "
                                   "MHA, or a DICOM series folder). The label map comes out on the first input's grid.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image file(s) or a DICOM folder; with --batch, one folder")
    p.add_argument("-o", "--output", required=True, help="label map file (.nii.gz, .nrrd, .mha); with --batch, a folder")
    p.add_argument("--batch", action="store_true", help="segment every scan in the INPUT folder; go on past bad files")
    p.add_argument("--model", default=None, help="model folder or name (default: the bundled model)")
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    p.add_argument("--domain", default="auto", help="'auto' lets the domain gate decide, or a domain name of the model")
    p.add_argument("--report", default=None, help="write the JSON report here (with --batch: one per scan, always)")
    p.add_argument("--preview", default=None, help="write a PNG with three slices and the overlay here")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--max-memory", type=float, default=None, metavar="GIB",
                   help="refuse inputs that would need more than this (default: the memory available)")
    p.add_argument("--min-component-ml", action="append", default=[], metavar="CLASS=ML",
                   help="relabel connected pieces of CLASS smaller than ML millilitres to the next likely class "
                        "(repeatable; overrides the card's postprocess, such as lesion=0.5 in the brain model; "
                        "CLASS=0 keeps every piece)")
    _add_progress(p)

    p = sub.add_parser("info", help="print a model's card", epilog=EPILOG)
    p.add_argument("--model", default=None, help="model folder or name (default: the bundled model)")
    p.add_argument("--json", action="store_true", help="print the card as JSON")

    p = sub.add_parser("models", help="manage the user's model folder and its trusted hashes", epilog=EPILOG)
    msub = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    q = msub.add_parser("list", help="list bundled and user models with their status")
    q.add_argument("--json", action="store_true")
    q = msub.add_parser("add", help="validate a model package, copy it into the model folder, record its hash")
    q.add_argument("folder")
    q.add_argument("--name", default=None, help="name in the model folder (default: the card's name)")
    q.add_argument("--overwrite", action="store_true")
    q.add_argument("--json", action="store_true")
    q = msub.add_parser("remove", help="remove a model from the model folder")
    q.add_argument("name")
    msub.add_parser("where", help="print the model folder")

    p = sub.add_parser("devices", help="what compute devices this machine offers")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("demo", help="segment a real scan (or a synthetic sample) with the bundled model", epilog=EPILOG)
    p.add_argument("--out", default="demo_out", help="folder for the sample, label map, report and picture")
    p.add_argument("--sample", default="real", choices=("real", "synthetic"),
                   help="real: the ITK example whole-head T1 (fetched once from Debian's package index); "
                        "synthetic: a phantom with true labels")
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    _add_progress(p)

    p = sub.add_parser("bench", help="benchmarks (results go into docs/benchmarks.md by hand)")
    bsub = p.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    q = bsub.add_parser("segment", help="time each stage against MONAI's reference pipeline on a ~200^3 volume")
    q.add_argument("--size", type=int, default=200, help="edge of the synthetic test volume in 1 mm voxels")
    q.add_argument("--repeats", type=int, default=3)
    q.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    q.add_argument("--model", default=None)
    q.add_argument("--json", default=None, help="also write the figures as JSON here")
    q = bsub.add_parser("gate", help="gate accuracy and unfamiliar-input flag on fresh synthetic samples")
    q.add_argument("--cases", type=int, default=20, help="fresh cases per style")
    q.add_argument("--model", default=None)
    q.add_argument("--json", default=None)

    q = bsub.add_parser("real", help="the model on real held-out images (MNI152 2009a, ITK KmeansTest): Dice, pictures")
    q.add_argument("--model", default=None)
    q.add_argument("--out", default="docs/images", help="folder for the pictures")
    q.add_argument("--device", default="cpu", choices=DEVICE_CHOICES)
    q.add_argument("--json", default=None)
    q = bsub.add_parser("generalize", help="U-Harmony vs joint/separate/oracle, with and without GIN, on atlas-based "
                                           "domains and an unseen style; adaptation with 4 cases (~36 min on 2 cores)")
    q.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    q.add_argument("--steps", type=int, default=None,
                   help="optimiser steps per model (default 1000; --single-source: 500)")
    q.add_argument("--cases", type=int, default=12, help="training cases per domain")
    q.add_argument("--work", default=None, help="folder for the generated data and the trained models")
    q.add_argument("--quick", action="store_true", help="tiny smoke run (seconds; the figures mean nothing)")
    q.add_argument("--json", default=None)
    q.add_argument("--from-json", nargs="+", default=None,
                   help="only re-print the table and targets of earlier --json results; several files of the same "
                        "budget (runs split over processes) print as one table")
    q.add_argument("--single-source", action="store_true",
                   help="instead: one network per training style, with and without GIN, scored on every style "
                        "(GIN's own setting; ~5 min per seed on 2 cores); --gin and --sources choose the networks")
    q.add_argument("--sources", nargs="+", default=None, metavar="STYLE",
                   help="--single-source: the training styles that get a network (default: all three: mri-t1 mri-t2 "
                        "ct)")
    q.add_argument("--gate", default=GateConfig().method, choices=GATE_METHODS,
                   help="the U-Harmony models' gate.method (default: training's, negative-free: contrast encoder + LDA, "
                        "no gate training)")
    q.add_argument("--methods", nargs="+", default=["uharmony", "joint", "separate"],
                   choices=("uharmony", "joint", "separate"),
                   help="which methods to train (uharmony brings its oracle and the adaptation rows)")
    q.add_argument("--gin", default="both", choices=("both", "off", "on"),
                   help="train each method without GIN, with it, or both (default)")
    q.add_argument("--no-adapt", action="store_true",
                   help="leave out the adaptation rows (they adapt uharmony+GIN, so --gin off leaves them out too)")
    q.add_argument("--gin-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an `augment` setting for every run with GIN on, adaptation included, the value in JSON "
                        "(repeatable): ipa=true, gin_p=0.25, gin_kernel_sizes=[1]; recorded in --json and the table")
    q.add_argument("--device", default="cpu", choices=DEVICE_CHOICES,
                   help="where every model trains and is scored (default cpu: figures that repeat to the digit; a "
                        "GPU fits budgets of 10000+ steps, where GIN starts to pay, into the hour); recorded in --json")
    q.add_argument("--workers", type=int, default=0,
                   help="train each (seed, GIN setting, method) in its own single-threaded process, this many at a "
                        "time, then print one table (default 0: one per CPU core; 1: everything in this process)")
    q = bsub.add_parser("fed", help="federated (one site per style, FedGIN) vs centralized U-Harmony on the generalize "
                                    "benchmark's data and budget; bytes and round overhead of a real Flower run (~15 min "
                                    "on 2 cores with --central-json)")
    q.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    q.add_argument("--rounds", type=int, default=None, help="federated rounds (default 24; quick 2); local steps "
                                                            "per round = steps x 2 / (3 sites x rounds x site batch): "
                                                            "each site trains its domain's centralized patches")
    q.add_argument("--site-batch", type=int, default=None,
                   help="patches per local step at a site (default 1; the centralized arm keeps the budget's 2)")
    q.add_argument("--central-batch", type=int, default=None,
                   help="patches per step of the centralized arm (default the budget's 2, generalize's); another "
                        "value scales its steps to train as many patches, and rules out --central-json")
    q.add_argument("--steps", type=int, default=None,
                   help="the centralized budget (default 1000, generalize's: --central-json then reuses a default "
                        "`bench generalize` run)")
    q.add_argument("--cases", type=int, default=None, help="training cases per domain (default 12)")
    q.add_argument("--work", default=None, help="folder for the data and the models (generalize's --work to reuse "
                                                "its data and centralized models)")
    q.add_argument("--central-json", default=None,
                   help="reuse the centralized uharmony(+GIN) results of `bench generalize --json` (checked: same "
                        "budget, seeds, and the cards in --work name the same datalists and config)")
    q.add_argument("--flower-rounds", type=int, default=None,
                   help="rounds of the real Flower run for bytes and overhead (default 2; quick 1; 0: none)")
    q.add_argument("--quick", action="store_true", help="tiny smoke run (about a minute; the figures mean nothing)")
    q.add_argument("--json", default=None)
    q.add_argument("--from-json", nargs="+", default=None,
                   help="only re-print the report of earlier --json results; several files of the same budget and "
                        "rounds (seeds, arms or GIN settings run as separate commands) print as one table")
    q.add_argument("--workers", type=int, default=0,
                   help="run each (arm, seed, GIN setting) in its own single-threaded process, this many at a time, "
                        "then the real Flower run alone (default 0: one per CPU core; 1: everything in this process)")
    q.add_argument("--arm", default="both", choices=("both", "central", "federated"),
                   help="train only one arm (what a worker runs; `both` is the benchmark)")
    q.add_argument("--gin", default="both", choices=("both", "off", "on"),
                   help="each arm without GIN, with it, or both (default)")
    q.add_argument("--gin-option", action="append", default=[], metavar="KEY=VALUE",
                   help="as for generalize: a GIN/IPA setting for every run with GIN on, both arms (fed.toml's train "
                        "section has the same keys), e.g. gin_kernel_sizes=[1]")
    q.add_argument("--device", default="cpu", choices=DEVICE_CHOICES,
                   help="as for generalize: where both arms (the sites too) train and every model is scored "
                        "(default cpu); recorded in --json")

    p = sub.add_parser("train", help="train a model jointly on several datalists (see docs/training.md)", epilog=EPILOG,
                       description="Train one U-Harmony model on one or more MSD-style datalists (dataset.json); "
                                   "writes a model package that `uharmony segment` uses.")
    p.add_argument("--data", nargs="+", required=True, metavar="DATASET_JSON", help="datalists, one per dataset")
    p.add_argument("--out", required=True, help="the model package folder to write")
    p.add_argument("--config", default=None, help="training config (.toml or .json); unknown keys are errors")
    _add_training_run(p)

    p = sub.add_parser("adapt", help="adapt a model to a new domain (modality) or new classes", epilog=EPILOG,
                       description="Adapt a model package to new data: a domain it lacks becomes a new domain, classes "
                                   "it lacks become new output channels; --keep datalists are replayed.")
    p.add_argument("--model", required=True, help="the base model (folder or name)")
    p.add_argument("--data", nargs="+", required=True, metavar="DATASET_JSON", help="datalists of the new data")
    p.add_argument("--keep", nargs="*", default=[], metavar="DATASET_JSON",
                   help="datalists of the old domains to replay and to evaluate with --domain auto")
    p.add_argument("--out", required=True, help="the adapted model package folder to write")
    p.add_argument("--config", default=None, help="adaptation config (.toml or .json); unknown keys are errors")
    _add_training_run(p)

    p = sub.add_parser("refit-gate", help="retrain only the domain gate of a model (images of known domain; no labels)",
                       epilog=EPILOG,
                       description="Retrain the domain gate of a model package on datalists of its domains (labels are "
                                   "not needed), recalibrate the unfamiliar-input score, and report gate accuracy per "
                                   "domain before and after. Every other weight stays byte-identical.")
    p.add_argument("--model", required=True, help="the model (folder or name)")
    p.add_argument("--data", nargs="+", required=True, metavar="DATASET_JSON",
                   help="datalists, each of one of the model's domains; their validation splits measure the gate")
    p.add_argument("--out", required=True, help="the model package folder to write")
    p.add_argument("--steps", type=int, default=1500, help="optimiser steps (default 1500)")
    p.add_argument("--batch-size", type=int, default=16, help="views per step, domains balanced (default 16)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate, cosine decay (default 1e-3)")
    p.add_argument("--no-augment", action="store_true", help="train on the fixed views (no flips, moves, jitter)")
    p.add_argument("--framing", type=float, default=0.0, metavar="FRACTION",
                   help="also reframe each full image before its view: every side cropped or padded by up to this "
                        "fraction (e.g. 0.15), so the gate copes with tight and loose fields of view (default 0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--device", default=None, choices=DEVICE_CHOICES)
    _add_progress(p)

    from uharmony.fed.cli import add_fed_parser

    add_fed_parser(sub, EPILOG)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # recorded in cards as the command that made them
    reporter = Reporter(getattr(args, "progress", "none"))
    reporter.claim_stdout()
    previous = signal.signal(signal.SIGTERM, _raise_cancelled)
    try:
        return int(_dispatch(args, reporter))
    except UHarmonyError as e:
        return _fail(reporter, e.code, str(e))
    except KeyboardInterrupt:
        return _fail(reporter, ExitCode.CANCELLED, "cancelled")
    except MemoryError:
        return _fail(reporter, ExitCode.OUT_OF_MEMORY, "ran out of memory")
    except BrokenPipeError:  # `uharmony info | head`: the reader left; not an error of ours
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # a bug: show everything
        import traceback

        traceback.print_exc()
        return _fail(reporter, ExitCode.INTERNAL, f"internal error: {type(e).__name__}: {e}")
    finally:
        reporter.close()
        signal.signal(signal.SIGTERM, previous)


def _raise_cancelled(signum, frame):
    # KeyboardInterrupt, not an Exception: no reader's broad `except Exception` may swallow a cancel.
    raise KeyboardInterrupt("SIGTERM")


def _fail(reporter: Reporter, code: int, message: str) -> int:
    reporter.error(int(code), message)
    print(f"uharmony: error: {message}", file=sys.stderr)
    return int(code)


def _results_json(path: str) -> dict:
    """A benchmark's --json results, or one clear error naming the file."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise BadInputError(f"{path}: cannot read benchmark results ({getattr(e, 'strerror', None) or e})") from None
    if not isinstance(data, dict) or "runs" not in data:
        raise BadInputError(f"{path}: not the --json results of a uharmony benchmark")
    return data


GIN_SETTINGS = {"both": (False, True), "off": (False,), "on": (True,)}  # a benchmark's --gin


def _workers(n: int) -> int:
    """A benchmark's --workers: 0 is one per CPU core."""
    if n < 0:
        raise UHarmonyError("--workers must be >= 0", code=ExitCode.USAGE)
    return n or (os.cpu_count() or 1)


def _at_least_one(value, flag: str) -> int | None:
    """An optional count argument (None: the default) that must be >= 1."""
    if value is not None and value < 1:
        raise UHarmonyError(f"{flag} must be >= 1", code=ExitCode.USAGE)
    return value


def _dispatch(args, reporter: Reporter) -> int:
    if args.command == "segment":
        return _segment(args, reporter)
    if args.command == "info":
        return _info(args)
    if args.command == "models":
        return _models(args)
    if args.command == "devices":
        from uharmony.device import detect

        found = detect()
        if args.json:
            print(json.dumps(found))
        else:
            print(f"auto -> {found['auto']}; CUDA: {found['cuda_name'] or 'no'}; MPS: {'yes' if found['mps'] else 'no'};"
                  f" torch {found['torch']}")
        return 0
    if args.command == "demo":
        from uharmony.demo import run_demo

        return run_demo(Path(args.out), device=args.device, reporter=reporter, sample=args.sample)
    if args.command in ("train", "adapt", "refit-gate"):
        return _train(args, reporter)
    if args.command == "fed":
        from uharmony.fed.cli import run_fed

        return run_fed(args, reporter)
    if args.command == "bench":
        if args.bench_command == "segment":
            from uharmony.bench.segment import run_bench_segment

            return run_bench_segment(size=args.size, repeats=args.repeats, device=args.device, model=args.model,
                                     json_path=args.json)
        if args.bench_command == "real":
            from uharmony.bench.real import run_bench_real

            return run_bench_real(args.model, out=args.out, json_path=args.json, device=args.device)
        if args.bench_command == "generalize":
            from uharmony.bench import single_source
            from uharmony.bench.generalize import print_from_json, run_bench_generalize

            if args.from_json:
                docs = [(p, _results_json(p)) for p in args.from_json]
                kinds = [r.get("kind") == "single-source" for _, r in docs]
                if any(kinds) and not all(kinds):
                    path = docs[kinds.index(not kinds[0])][0]
                    raise BadInputError(f"{path}: --from-json merges --single-source results only with other "
                                        "--single-source results")
                try:
                    return (single_source.print_from_json if kinds[0] else print_from_json)(docs)
                except ValueError as e:
                    raise BadInputError(str(e)) from None
            if args.workers < 0 or (args.workers > 1 and args.single_source):
                raise UHarmonyError("--workers must be >= 0, and is not for --single-source", code=ExitCode.USAGE)
            from uharmony.data.heads import BENCH_TRAIN_DOMAINS

            if args.sources and not args.single_source:
                raise UHarmonyError("--sources is for --single-source (the main benchmark trains on every style)",
                                    code=ExitCode.USAGE)
            if set(args.sources or ()) - set(BENCH_TRAIN_DOMAINS):
                raise UHarmonyError(f"--sources: {' '.join(sorted(set(args.sources) - set(BENCH_TRAIN_DOMAINS)))} is "
                                    f"not a training style of the benchmark ({' '.join(BENCH_TRAIN_DOMAINS)})",
                                    code=ExitCode.USAGE)
            gin_options = parse_gin_options(args.gin_option)
            from uharmony.device import choose_device

            device = choose_device(args.device).type  # auto resolved here, so the results name the device used
            if args.single_source:
                return single_source.run_single_source(work=args.work, seeds=tuple(args.seeds), steps=args.steps or 500,
                                                       train_cases=args.cases, val_cases=2 if args.quick else 3,
                                                       quick=args.quick, json_path=args.json, gin_options=gin_options,
                                                       sources=tuple(args.sources or BENCH_TRAIN_DOMAINS),
                                                       gin=GIN_SETTINGS[args.gin], device=device)
            from uharmony.bench.generalize import DEFAULT_STEPS

            return run_bench_generalize(work=args.work, seeds=tuple(args.seeds), steps=args.steps or DEFAULT_STEPS,
                                        train_cases=args.cases, val_cases=2 if args.quick else 3, quick=args.quick,
                                        json_path=args.json, methods=tuple(args.methods), gate=args.gate,
                                        adapt=not args.no_adapt, workers=_workers(args.workers),
                                        gin=GIN_SETTINGS[args.gin], gin_options=gin_options, device=device)
        if args.bench_command == "fed":
            from uharmony.bench.fed import print_from_json as fed_from_json
            from uharmony.bench.fed import ROUNDS, SITE_BATCH, run_bench_fed
            from uharmony.bench.generalize import DEFAULT_STEPS

            if args.from_json:
                try:
                    return fed_from_json([(p, _results_json(p)) for p in args.from_json])
                except ValueError as e:
                    raise BadInputError(str(e)) from None
            q = args.quick
            gin_options = parse_gin_options(args.gin_option)
            from uharmony.device import choose_device

            device = choose_device(args.device).type
            return run_bench_fed(work=args.work, seeds=tuple(args.seeds), quick=q, json_path=args.json,
                                 rounds=_at_least_one(args.rounds, "--rounds") or (2 if q else ROUNDS),
                                 site_batch=_at_least_one(args.site_batch, "--site-batch") or SITE_BATCH,
                                 central_batch=_at_least_one(args.central_batch, "--central-batch"),
                                 steps=args.steps or (6 if q else DEFAULT_STEPS),
                                 train_cases=args.cases or (2 if q else 12), val_cases=1 if q else 3,
                                 central_json=args.central_json, workers=_workers(args.workers),
                                 arms=("central", "federated") if args.arm == "both" else (args.arm,),
                                 gin=GIN_SETTINGS[args.gin], gin_options=gin_options, device=device,
                                 flower_rounds=(1 if q else 2) if args.flower_rounds is None else args.flower_rounds)
        if args.bench_command == "gate":
            from uharmony.bench.gate import run_bench_gate

            return run_bench_gate(cases=args.cases, model=args.model, json_path=args.json)
    raise AssertionError(args)


def _min_component_ml(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            ml = float(value)
        except ValueError:
            ml = -1.0
        if not sep or not name.strip() or not ml >= 0:
            raise UHarmonyError(f"--min-component-ml {item!r}: expected CLASS=ML with ML >= 0, such as lesion=0.5",
                                code=ExitCode.USAGE)
        out[name.strip()] = ml
    return out


def _segment(args, reporter: Reporter) -> int:
    from uharmony.infer.segment import Segmenter

    max_memory = None if args.max_memory is None else int(args.max_memory * 2**30)
    floors = _min_component_ml(args.min_component_ml)
    if args.batch:
        from uharmony.infer.batch import segment_batch

        if len(args.inputs) != 1:
            raise UHarmonyError("--batch takes exactly one input folder", code=ExitCode.USAGE)
        return segment_batch(args.inputs[0], args.output, model=args.model, device=args.device, domain=args.domain,
                             overwrite=args.overwrite, reporter=reporter, max_memory=max_memory,
                             min_component_ml=floors)
    segmenter = Segmenter(args.model, args.device, reporter, max_memory=max_memory, min_component_ml=floors)
    report = segmenter.segment_files(args.inputs, args.output, report_path=args.report, preview_path=args.preview,
                                     domain=args.domain, overwrite=args.overwrite)
    reporter.result(report["outputs"], report)
    if reporter.mode != "jsonl":
        print(human_summary(report))
    return 0


def _train(args, reporter: Reporter) -> int:
    argv = args.argv
    if args.command == "train":
        from uharmony.train.trainer import run_train

        written = run_train(args.data, args.out, args.config, resume=args.resume, overwrite=args.overwrite,
                            device=args.device, reporter=reporter, argv=argv)
    elif args.command == "refit-gate":
        from uharmony.train.gate import run_refit_gate

        written = [run_refit_gate(args.model, args.data, args.out, steps=args.steps, batch_size=args.batch_size,
                                  lr=args.lr, augment=not args.no_augment, framing=args.framing, seed=args.seed,
                                  overwrite=args.overwrite, device=args.device, reporter=reporter, argv=argv)]
    else:
        from uharmony.train.adapt import run_adapt

        written = [(args.out, run_adapt(args.model, args.data, args.keep, args.out, args.config, resume=args.resume,
                                        overwrite=args.overwrite, device=args.device, reporter=reporter, argv=argv))]
    if len(written) == 1:
        reporter.result([written[0][0]], {"card": written[0][1]})
    else:
        reporter.result([p for p, _ in written], {"cards": [c for _, c in written]})
    if reporter.mode != "jsonl":
        for path, card in written:
            print(f"wrote {path} ({', '.join(d['name'] for d in card['domains'])}; "
                  f"{', '.join(c['name'] for c in card['classes'][1:])})")
    return 0


def _top_two(domain: dict) -> str:
    ranked = sorted(domain["probabilities"].items(), key=lambda kv: -kv[1])
    return ", ".join(f"{name} p={p:.2f}" for name, p in ranked[:2])


def _cleaned(postprocess: dict) -> list[str]:
    floors, removed = postprocess.get("min_component_ml", {}), postprocess.get("removed_ml", {})
    parts = [f"{removed[n]:.1f} mL of {n} in pieces under {floors[n]:g} mL" for n in floors if removed.get(n)]
    return ["relabelled " + ", ".join(parts) + " (--min-component-ml)"] if parts else []


def human_summary(report: dict) -> str:
    d = report["domain"]
    p = d["probabilities"][d["chosen"]]
    lines = [f"wrote {', '.join(report['outputs'])}",
             f"domain: {d['chosen']} ({'gate' if d['mode'] == 'auto' else 'given'}, p={p:.3f})"
             + ("  WARNING: unfamiliar input (unlike every training domain): check the result"
                if d["unfamiliar"] else "")
             + ("  NOTE: the gate is unsure (" + _top_two(d) + "); pass --domain if you know the contrast"
                if d.get("unsure") else ""),
             "volumes: " + ", ".join(f"{c['name']} {c['volume_ml']:.1f} mL" for c in report["classes"]),
             *_cleaned(report.get("postprocess") or {}),
             f"device {report['device']}, {report['timings_s']['total']:.1f} s"]
    lines += [f"note: {n}" for n in report.get("notes", [])]
    return "\n".join(lines)


def _info(args) -> int:
    from uharmony.model.card import card_summary, load_card
    from uharmony.model.registry import resolve_model

    model_dir = resolve_model(args.model)
    card = load_card(model_dir)
    print(json.dumps(card, indent=2) if args.json else f"{model_dir}\n{card_summary(card)}")
    return 0


def _models(args) -> int:
    from uharmony.model import registry

    if args.models_command == "where":
        print(registry.user_models_dir())
    elif args.models_command == "list":
        entries = registry.list_models()
        if args.json:
            print(json.dumps([e.to_dict() for e in entries], indent=2))
        else:
            print(f"model folder: {registry.user_models_dir()}")
            for e in entries:
                status = "ok" if e.trusted else f"REFUSED: {e.problem}"
                kind = "bundled" if e.bundled else "user"
                print(f"  {e.name:<24} {kind:<8} {(e.sha256 or '-')[:12]:<12}  {status}")
    elif args.models_command == "add":
        entry = registry.add_model(args.folder, args.name, overwrite=args.overwrite)
        print(json.dumps(entry.to_dict()) if args.json else f"added {entry.name} ({entry.sha256[:12]}...) to {entry.path}")
    elif args.models_command == "remove":
        path = registry.remove_model(args.name)
        print(f"removed {args.name} ({path})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
