"""`uharmony bench segment`: our pipeline against MONAI's reference pipeline, stage by stage.

Both run in their own fresh process (so each one's peak memory is its own), on the same file, with
the same weights, domain, ROI, overlap, window batch size and Gaussian blending; one warm-up run, then
the median of `repeats` timed runs. The reference is what a MONAI user would write:
LoadImaged -> EnsureChannelFirstd -> Orientationd(RAS) -> Spacingd -> our input normalisation ->
sliding_window_inference -> Invertd (logits back onto the input grid) -> argmax -> SaveImage.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from uharmony.data.io import write_json


def _ours(path: str, out_dir: str, model, device: str, repeats: int, conn) -> None:
    import torch

    from uharmony.infer.segment import Segmenter

    torch.set_num_threads(torch.get_num_threads())
    seg = Segmenter(model, device)
    runs = []
    for r in range(repeats + 1):
        report = seg.segment_files([path], Path(out_dir) / "ours.nii.gz", overwrite=True)
        if r:  # the first run is the warm-up
            runs.append(report["timings_s"])
    conn.send({"runs": runs, "domain": report["domain"]["chosen"], "device": report["device"],
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "output": str(Path(out_dir) / "ours.nii.gz")})


def _reference(path: str, out_dir: str, model, device: str, domain: str, repeats: int, conn) -> None:
    import torch
    from monai.data import MetaTensor
    from monai.inferers import sliding_window_inference
    from monai.transforms import (Compose, EnsureChannelFirstd, Invertd, LoadImaged, Orientationd, SaveImage,
                                  Spacingd)

    from uharmony.data.preprocess import normalize_intensity
    from uharmony.device import autocast, choose_device
    from uharmony.model.package import load_model
    from uharmony.model.registry import resolve_model

    dev = choose_device(device)
    net, card = load_model(resolve_model(model), dev)
    inp = card["input"]
    pre = Compose([LoadImaged("image", image_only=True), EnsureChannelFirstd("image"),
                   Orientationd("image", axcodes="RAS"),
                   Spacingd("image", pixdim=inp["spacing_mm"], mode="bilinear")])
    post = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False)
    saver = SaveImage(output_dir=out_dir, output_postfix="", separate_folder=False, output_ext=".nii.gz",
                      print_log=False, resample=False, output_dtype=np.uint8)
    runs = []
    for r in range(repeats + 1):
        t = {}
        t0 = time.perf_counter()
        data = pre({"image": path})
        t["read+preprocess"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with torch.inference_mode():
            x = normalize_intensity(data["image"].as_tensor().to(dev), inp["normalization"])
            routing = net.routing_from(domain, int(inp.get("sw_batch_size", 1)), dev)

            def predictor(p):
                with autocast(dev):
                    return net(p, routing[: p.shape[0]])

            logits = sliding_window_inference(x[None], inp["patch_size"], int(inp.get("sw_batch_size", 1)), predictor,
                                              overlap=float(inp.get("overlap", 0.5)), mode="gaussian",
                                              padding_mode="constant", cval=float(x.min()))  # as ours
        t["network"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        data["pred"] = MetaTensor(logits[0].float().cpu())  # as a MetaTensor input would have produced
        data["image"] = data["image"].cpu()
        inverted = post(data)
        labels = inverted["pred"].argmax(0, keepdim=True).to(torch.uint8)
        t["postprocess"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        saver(labels, meta_data=inverted["pred"].meta, filename=str(Path(out_dir) / "reference"))
        t["write"] = time.perf_counter() - t0
        t["total"] = sum(t.values())
        if r:
            runs.append(t)
    conn.send({"runs": runs, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "output": str(Path(out_dir) / "reference.nii.gz")})


def _in_process(target, *args) -> dict:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(*args, child))
    proc.start()
    child.close()
    try:
        result = parent.recv()  # EOFError when the child died before answering
    except EOFError:
        proc.join()
        raise RuntimeError(f"the benchmark process {target.__name__} failed (exit code {proc.exitcode}); "
                           "its traceback is above") from None
    proc.join()
    return result


def _median(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def run_bench_segment(size: int = 200, repeats: int = 3, device: str = "auto", model=None,
                      json_path: str | None = None) -> int:
    import nibabel as nib

    from uharmony.data import synth

    with tempfile.TemporaryDirectory(prefix="uharmony-bench-") as tmp:
        case = synth.make_case(80001, "synth-t1", spacing_mm=1.0, shape=(size, size, size))
        path = str(Path(tmp) / "bench.nii.gz")
        synth.write_case(case, path)
        print(f"volume {size}^3 at 1 mm (synthetic T1-like, seed 80001); {repeats} timed runs after a warm-up",
              file=sys.stderr)
        ours = _in_process(_ours, path, tmp, model, device, repeats)
        ref = _in_process(_reference, path, tmp, model, device, ours["domain"], repeats)
        a = np.asarray(nib.load(ours["output"]).dataobj)
        b = np.asarray(nib.load(ref["output"]).dataobj).reshape(a.shape)
        fg_a, fg_b = a > 0, b > 0
        dice_fg = 2 * (fg_a & fg_b).sum() / max(1, fg_a.sum() + fg_b.sum())
        per_class = {int(c): float(2 * ((a == c) & (b == c)).sum() / max(1, (a == c).sum() + (b == c).sum()))
                     for c in range(1, int(max(a.max(), b.max())) + 1)}
        agreement = float((a == b).mean())
    o, r = _median(ours["runs"]), _median(ref["runs"])
    ours_pre = o["read"] + o["preprocess"]
    rows = [("read + preprocess", ours_pre, r["read+preprocess"]), ("gate", o["gate"], None),
            ("network", o["network"], r["network"]), ("postprocess", o["postprocess"], r["postprocess"]),
            ("write", o["write"], r["write"]), ("total", o["total"], r["total"])]
    print(f"\n{'stage':<20}{'uharmony s':>12}{'MONAI ref s':>13}")
    for name, x, y in rows:
        print(f"{name:<20}{x:>12.3f}{('' if y is None else f'{y:.3f}'):>13}")
    print(f"\nspeed-up (reference total / ours total): {r['total'] / o['total']:.2f}x")
    print(f"peak memory: uharmony {ours['peak_rss_mib']:.0f} MiB, reference {ref['peak_rss_mib']:.0f} MiB")
    print(f"agreement: Dice(foreground) {dice_fg:.4f}, per class {json.dumps({k: round(v, 4) for k, v in per_class.items()})}, "
          f"voxel agreement {agreement:.4f}")
    print(f"device {ours['device']}, domain {ours['domain']}")
    if json_path:
        write_json(json_path, {"size": size, "repeats": repeats, "ours": o, "reference": r,
                               "speedup": r["total"] / o["total"], "dice_foreground": dice_fg,
                               "dice_per_class": per_class, "voxel_agreement": agreement,
                               "peak_rss_mib": {"ours": ours["peak_rss_mib"], "reference": ref["peak_rss_mib"]},
                               "device": ours["device"]}, indent=2)
    return 0
