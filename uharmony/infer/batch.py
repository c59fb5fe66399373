"""`uharmony segment --batch IN_FOLDER -o OUT_FOLDER`: every scan in a folder, past bad files."""

from __future__ import annotations

import json
from pathlib import Path

from uharmony.data.io import IMAGE_SUFFIXES, atomic_output, is_image_path
from uharmony.errors import ExitCode, OutputError, UHarmonyError
from uharmony.infer.segment import Segmenter
from uharmony.progress import Reporter


def _stem_and_suffix(path: Path) -> tuple[str, str]:
    name = path.name
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            stem = name[: -len(suffix)]
            # A header+data pair (.nhdr/.mhd) is written as a single-file format instead.
            out = {".nhdr": ".nrrd", ".mhd": ".mha"}.get(suffix, suffix)
            return stem, out
    return name, ".nii.gz"  # a DICOM series folder


def find_scans(folder: Path) -> list[Path]:
    """Image files of known formats directly in `folder`, and sub-folders (DICOM series)."""
    return [p for p in sorted(folder.iterdir()) if not p.name.startswith(".") and (p.is_dir() or is_image_path(p))]


def segment_batch(in_folder, out_folder, *, model=None, device="auto", domain="auto", overwrite=False,
                  reporter: Reporter | None = None, max_memory: int | None = None,
                  min_component_ml: dict[str, float] | None = None) -> int:
    reporter = reporter or Reporter("none")
    in_folder, out_folder = Path(in_folder), Path(out_folder)
    if not in_folder.is_dir():
        raise UHarmonyError("is not a folder (--batch takes a folder of scans)", in_folder, code=ExitCode.BAD_INPUT)
    scans = find_scans(in_folder)
    if not scans:
        raise UHarmonyError("holds no scans (.nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd or DICOM folders)", in_folder,
                            code=ExitCode.BAD_INPUT)
    try:
        out_folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot be created: {e.strerror}", out_folder) from None
    segmenter = Segmenter(model, device, reporter, max_memory=max_memory, min_component_ml=min_component_ml)
    results = []
    for n, scan in enumerate(scans, start=1):
        stem, suffix = _stem_and_suffix(scan)
        output = out_folder / f"{stem}_seg{suffix}"
        report_path = out_folder / f"{stem}_seg.json"
        reporter.progress("batch", n - 1, len(scans))
        try:
            report = segmenter.segment_files([scan], output, report_path=report_path, domain=domain,
                                             overwrite=overwrite)
            d = report["domain"]
            results.append({"input": str(scan), "ok": True, "output": str(output), "domain": d["chosen"],
                            "unfamiliar": d["unfamiliar"],
                            "unsure": d["unsure"], "seconds": report["timings_s"]["total"]})
        except UHarmonyError as e:
            results.append({"input": str(scan), "ok": False, "code": int(e.code), "error": str(e)})
            reporter.log(f"failed: {e}")
        reporter.progress("batch", n, len(scans))
    failed = [r for r in results if not r["ok"]]
    summary = {"inputs": len(results), "succeeded": len(results) - len(failed), "failed": len(failed), "items": results}
    with atomic_output(out_folder / "summary.json") as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    reporter.result([r["output"] for r in results if r["ok"]] + [str(out_folder / "summary.json")], summary)
    if reporter.mode != "jsonl":
        print(format_summary(summary))
    return int(ExitCode.PARTIAL) if failed else 0


def format_summary(summary: dict) -> str:
    lines = [f"{summary['succeeded']} of {summary['inputs']} scans segmented, {summary['failed']} failed"]
    for r in summary["items"]:
        if r["ok"]:
            flag = ("  (unfamiliar input)" if r["unfamiliar"] else "") + ("  (gate unsure)" if r.get("unsure") else "")
            lines.append(f"  ok      {Path(r['input']).name} -> {Path(r['output']).name} [{r['domain']}]{flag}")
        else:
            lines.append(f"  FAILED  {Path(r['input']).name}: {r['error']} (exit code {r['code']})")
    return "\n".join(lines)

