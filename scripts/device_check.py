"""The steps of scripts/device_check.sh (see there); one JSON of results, a PASS/FAIL line per check.

Every step is the `uharmony` command a user runs, in its own process, so a crash in one (a CUDA error, a
missing package) is reported and the others still run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

TINY_TRAIN = """
steps = 40
batch_size = 2
patch_size = [32, 32, 32]
spacing_mm = [4.0, 4.0, 4.0]
lr = 0.01
val_every = 20
val_cases = 1
checkpoint_every = 20
seed = 0
amp = true
[augment]
gin = true
[model]
filters = [8, 16, 32]
strides = [1, 2, 2]
[gate]
input_size = [16, 16, 16]
filters = [4, 8, 8]
method = "trained"
"""


def uharmony(*args: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess, float]:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "uharmony", *args], capture_output=True, text=True, timeout=timeout)
    return r, time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    import nibabel as nib
    import numpy as np

    from uharmony.data import synth
    from uharmony.device import choose_device, detect
    from uharmony.train.data import write_synth_datalist

    from uharmony.errors import UHarmonyError

    found = detect()
    try:
        dev = choose_device(args.device).type
    except UHarmonyError as e:
        print(f"FAIL device: {e.message} (torch {found['torch']})")
        return 1
    result: dict = {"detect": found, "device": dev, "python": sys.version.split()[0], "checks": {}}

    def check(name: str, ok: bool, **info) -> None:
        result["checks"][name] = {"ok": bool(ok), **info}
        print(f"{'PASS' if ok else 'FAIL'} {name}: " + ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)
        (out / "device_check.json").write_text(json.dumps(result, indent=1, default=str))

    check("device", dev != "cpu" or args.device == "cpu", device=dev, cuda=found["cuda_name"], torch=found["torch"])

    # 1. the bundled model: the same head on the CPU and on the device
    scan = out / "head_t1.nii.gz"
    case = synth.make_case(90001, "synth-t1", spacing_mm=1.0)
    synth.write_case(case, scan, out / "head_t1_truth.nii.gz")
    runs = {}
    for d in dict.fromkeys(("cpu", dev)):
        r, s = uharmony("segment", str(scan), "-o", str(out / f"seg_{d}.nii.gz"), "--report",
                        str(out / f"report_{d}.json"), "--device", d, "--overwrite")
        runs[d] = (r, s)
        check(f"segment on {d}", r.returncode == 0, seconds=round(s, 1),
              stderr=r.stderr.strip()[-300:] if r.returncode else "")
    if all(r.returncode == 0 for r, _ in runs.values()):
        a, b = (np.asarray(nib.load(str(out / f"seg_{d}.nii.gz")).dataobj) for d in ("cpu", dev))
        ra, rb = (json.loads((out / f"report_{d}.json").read_text()) for d in ("cpu", dev))
        dice = {int(c): round(2 * float(((a == c) & (b == c)).sum()) / max(1, int((a == c).sum() + (b == c).sum())), 4)
                for c in np.union1d(np.unique(a), np.unique(b)) if c}
        same_gate = ra["domain"]["chosen"] == rb["domain"]["chosen"]
        check(f"{dev} agrees with cpu", same_gate and min(dice.values(), default=0) >= 0.95,
              dice_per_class=dice, gate_cpu=ra["domain"]["chosen"], gate_dev=rb["domain"]["chosen"],
              p_cpu=ra["domain"]["probabilities"], p_dev=rb["domain"]["probabilities"],
              device_in_report=rb.get("device"))

    # 2. speed: bench segment on the device (200^3 at 1 mm, the README's figure is the CPU's)
    r, s = uharmony("bench", "segment", "--model", "brain", "--device", dev, "--repeats", "3", "--json",
                    str(out / "bench_segment.json"))
    check(f"bench segment on {dev}", r.returncode == 0, seconds=round(s, 1), tail=r.stdout.strip()[-600:],
          stderr=r.stderr.strip()[-300:] if r.returncode else "")

    # 3. training with AMP (GIN on, batched) on the device, then its package segments there
    data = [write_synth_datalist(out / "data" / s, s, name=s, training_seeds=(71001, 71002, 71003),
                                 validation_seeds=(71004,)) for s in ("synth-t1", "synth-t2")]
    cfg = out / "tiny.toml"
    cfg.write_text(TINY_TRAIN)
    r, s = uharmony("train", "--data", *map(str, data), "--out", str(out / "model"), "--config", str(cfg),
                    "--device", dev, "--overwrite")
    check(f"train on {dev} (AMP, GIN)", r.returncode == 0 and (out / "model" / "card.json").is_file(),
          seconds=round(s, 1), stderr=r.stderr.strip()[-400:] if r.returncode else "")
    if r.returncode == 0:
        val = json.loads((out / "model" / "card.json").read_text()).get("evaluation", {})
        r, s = uharmony("segment", str(out / "data" / "synth-t1" / "imagesTr" / "synth-t1_71004.nii.gz"), "-o",
                        str(out / "seg_trained.nii.gz"), "--model", str(out / "model"), "--device", dev, "--overwrite")
        check(f"the trained package segments on {dev}", r.returncode == 0, seconds=round(s, 1),
              validation=json.dumps(val.get("dice"))[:300], stderr=r.stderr.strip()[-300:] if r.returncode else "")
    failed = [k for k, v in result["checks"].items() if not v["ok"]]
    print(f"{len(result['checks']) - len(failed)} of {len(result['checks'])} checks passed"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
