import argparse
import json
import os
import signal
import sys
import time

import numpy as np
import SimpleITK as sitk

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = os.path.join(os.path.dirname(HERE), "data", "fake_model")


def emit(**event):
    sys.stdout.write(json.dumps({"v": 1, **event}) + "\n")
    sys.stdout.flush()


def main():
    parser = argparse.ArgumentParser(prog="fake_uharmony")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("segment")
    p.add_argument("inputs", nargs="+")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--report")
    p.add_argument("--progress")
    p.add_argument("--device", default="auto")
    p.add_argument("--domain", default="auto")
    p.add_argument("--model")
    args = parser.parse_args()
    partial = []

    def on_term(signum, frame):
        for path in partial:
            if os.path.exists(path):
                os.remove(path)
        emit(event="error", code=8, message="cancelled")
        sys.exit(8)

    signal.signal(signal.SIGTERM, on_term)
    if os.environ.get("FAKE_UHARMONY_PIDFILE"):
        with open(os.environ["FAKE_UHARMONY_PIDFILE"], "w") as f:
            f.write(str(os.getpid()))
    if os.environ.get("FAKE_UHARMONY_STRAY"):
        print("a stray line that is not JSON", flush=True)
    print("fake_uharmony: starting", file=sys.stderr, flush=True)
    emit(event="progress", stage="read", done=0, total=1)
    fail = os.environ.get("FAKE_UHARMONY_FAIL")
    if fail:
        code, message = fail.split(":", 1)
        emit(event="error", code=int(code), message=message)
        print(f"uharmony: error: {message}", file=sys.stderr)
        sys.exit(int(code))
    image = sitk.ReadImage(args.inputs[0])
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    emit(event="progress", stage="read", done=1, total=1)
    delay = float(os.environ.get("FAKE_UHARMONY_DELAY", "0"))
    steps = 4
    for step in range(steps):
        emit(event="progress", stage="infer", done=step, total=steps)
        time.sleep(delay)
    labels = np.zeros(array.shape, np.uint8)
    foreground = array > 0
    if foreground.any():
        t1, t2 = np.quantile(array[foreground], [1 / 3, 2 / 3])
        labels[foreground & (array <= t1)] = 1
        labels[foreground & (array > t1) & (array <= t2)] = 2
        labels[foreground & (array > t2)] = 3
    out = sitk.GetImageFromArray(labels)
    out.CopyInformation(image)
    partial.append(args.output)
    sitk.WriteImage(out, args.output)
    emit(event="progress", stage="write", done=1, total=1)
    with open(os.path.join(MODEL, "card.json")) as f:
        card = json.load(f)
    spacing = np.prod(image.GetSpacing())
    classes = [{"value": c["value"], "name": c["name"], "voxels": int((labels == c["value"]).sum()),
                "volume_ml": float((labels == c["value"]).sum() * spacing / 1000.0), "color": c.get("color")}
               for c in card["classes"] if c["value"] != 0]
    report = {"inputs": args.inputs, "output": args.output,
              "model": {"name": "fake", "version": "0.0", "sha256": "0" * 64, "path": MODEL},
              "device": "cpu",
              "domain": {"mode": args.domain, "chosen": "synth-t1", "probabilities": {"synth-t1": 0.9, "synth-t2": 0.1},
                         "unfamiliar": False, "unfamiliar_score": 1.0, "unfamiliar_threshold": 6.0},
              "classes": classes, "timings_s": {"total": 0.1},
              "intended_use": card["intended_use"], "limitations": card["limitations"]}
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report, f)
    emit(event="result", outputs=[args.output] + ([args.report] if args.report else []), report=report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
