"""Calibration memory within --memory-limit, and what the exact two-pass histograms cost (issue 9).

PP-OCRv4's text detector (from the rapidocr-onnxruntime 1.4.4 wheel, fetched with
``pip download --no-deps`` by bench/realmodels.py) on 640x640 inputs: crops of scikit-image's
photos, resized and normalized as PaddleOCR does. Its activations take ~660 MB per sample, so
``--batch-size 8`` used to hold 5.3 GB of them at once.

Each configuration is one ``trtforge calibrate --json`` child process, which reports its own peak
RSS (VmHWM: it restarts at exec, so nothing inherited from this parent counts); a watchdog kills a
child whose RSS passes --rss-limit-gb. Configurations, all at ``--batch-size 8``:

  default        entropy, exact histograms, the default 1 GiB limit
  unlimited      the same with --memory-limit 64GiB: ONNX Runtime runs the whole batch of 8 (the
                 in-run baseline of the memory limit)
  minmax         minmax at the default limit: one pass, max|x| only (the floor of a pass)
  groups         entropy, exact, --memory-limit 256MiB: below one sample, tensors in groups
  *-no-arena     the same with ONNX Runtime's CPU arena off (collect._ORT_CPU_ARENA = False)
  tensorrt       --histogram tensorrt at the default limit: batches cut into micro-batches, so
                 two passes (per-batch max, then counts) to keep whole-batch range decisions
  old-b8/old-b1  the single-pass collector before exact histograms and the memory limit (a
                 ``git archive`` of --old-commit): fine power-of-two histograms re-binned, one
                 ONNX Runtime run per batch of 8 (resp. 1)

    python bench/collect_memory.py [--samples 32 64] [--threads 2] [--repeat 2]

Writes bench/results/collect_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    RESULTS,
    WORK,
    crops_of,
    distinct_photos,
    environment,
    log,
    markdown_table,
    write_json,
    write_text,
)
from bench.realmodels import OCR_FILES, ocr_models_dir  # noqa: E402

OLD_COMMIT = "5030972"
"""The last commit with the single-pass collector (fine histograms re-binned, batch-sized runs)."""

CLI = "from service.cli.main import main; main()"
NO_ARENA = "import calibrators.collect as c; c._ORT_CPU_ARENA = False; " + CLI
PLAN_LINE = re.compile(r"activations take (.*) per sample: (\d+) sample\(s\) per run, (\d+) group")

# (name, method, histogram, memory limit or None for the default, python -c program, old code)
CONFIGS: list[tuple[str, str, str, str | None, str, bool]] = [
    ("default", "entropy", "exact", None, CLI, False),
    ("unlimited", "entropy", "exact", "64GiB", CLI, False),
    ("minmax", "minmax", "exact", None, CLI, False),
    ("groups", "entropy", "exact", "256MiB", CLI, False),
    ("default-no-arena", "entropy", "exact", None, NO_ARENA, False),
    ("groups-no-arena", "entropy", "exact", "256MiB", NO_ARENA, False),
    ("tensorrt", "entropy", "tensorrt", None, CLI, False),
    ("old-b8", "entropy", "exact", None, CLI, True),
    ("old-b1", "entropy", "exact", None, CLI, True),
]

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def make_dataset(n: int) -> Path:
    """``n`` 640x640 photo crops, normalized as PaddleOCR's detector expects, in an .npz."""
    path = WORK / f"det640_{n}.npz"
    if not path.exists():
        crops = crops_of(distinct_photos(), n, seed=0, size=640)
        x = (np.stack(crops).astype(np.float32) / 255.0 - MEAN) / STD
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, x=np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        tmp.replace(path)
    return path


def old_source(commit: str) -> Path:
    """The packages of ``commit``, unpacked once under bench/work (read from git, not checked out)."""
    folder = WORK / f"src_{commit}"
    if not (folder / "calibrators").exists():
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            archive = Path(tmp) / "src.tar"
            subprocess.run(
                ["git", "archive", "-o", str(archive), commit, "calibrators", "engines", "service"],
                cwd=ROOT,
                check=True,
            )
            with tarfile.open(archive) as tar:
                tar.extractall(folder, filter="data")
    return folder


def run_child(cmd: list[str], cwd: Path, env: dict[str, str], rss_limit: int) -> dict[str, Any]:
    """Run one calibration; its JSON summary plus the collection plan it logged."""
    started = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=cwd)
        ps = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                rss = ps.memory_info().rss
            except psutil.Error:
                rss = 0
            if rss > rss_limit:
                proc.kill()
                proc.wait()
                return {"out_of_memory": True, "rss_at_kill_mb": round(rss / 2**20)}
            time.sleep(0.1)
        out = proc.stdout.read() if proc.stdout else ""
        err.seek(0)
        stderr = err.read()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[3:6])} failed:\n{stderr[-3000:]}")
    summary = json.loads(out.strip().splitlines()[-1])
    result: dict[str, Any] = {
        "seconds": summary["seconds"],
        "wall_seconds": round(time.perf_counter() - started, 2),
        "cpu_seconds": round(cpu, 2),
        "peak_rss_mb": summary["peak_rss_mb"],
        "tensors": summary["tensors"],
        "table": summary["table"],
    }
    plan = PLAN_LINE.search(stderr)
    if plan:
        result.update(
            activations_per_sample=plan.group(1),
            samples_per_run=int(plan.group(2)),
            groups=int(plan.group(3)),
        )
    return result


def amax_agreement(a: Path, b: Path) -> dict[str, float]:
    """How far two tables' amax are apart (max relative difference, tensors differing)."""
    from calibrators.table import CalibrationTable

    ta, tb = CalibrationTable.load(a), CalibrationTable.load(b)
    rel = [abs(ta.amax[k] - tb.amax[k]) / max(abs(ta.amax[k]), 1e-30) for k in ta.amax]
    return {"max_rel_diff": max(rel), "tensors_differing": sum(r > 1e-6 for r in rel)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=1, help="runs per configuration (min time)")
    parser.add_argument("--rss-limit-gb", type=float, default=12.0)
    parser.add_argument("--old-commit", default=OLD_COMMIT)
    parser.add_argument("--only", nargs="*", default=None, help="configuration names to run")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    model = ocr_models_dir() / OCR_FILES["ocr_det"]
    old = old_source(args.old_commit)
    rows: list[dict[str, Any]] = []
    for n in args.samples:
        data = make_dataset(n)
        for name, method, histogram, limit, program, is_old in CONFIGS:
            if args.only is not None and name not in args.only:
                continue
            if n != args.samples[0] and name not in ("default", "unlimited", "old-b8"):
                continue  # the larger sample counts only show that memory stays flat
            batch = 1 if name == "old-b1" else args.batch_size
            src = old if is_old else ROOT
            out = WORK / f"collect_memory_{name}_{n}.json"
            cmd = [sys.executable, "-c", program, "-v", "calibrate", str(model), "--data", str(data)]
            cmd += ["--method", method, "--histogram", histogram, "--batch-size", str(batch)]
            cmd += ["--threads", str(args.threads), "--out", str(out), "--json"]
            if limit is not None:
                cmd += ["--memory-limit", limit]
            env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(args.threads)}
            runs = []
            for _ in range(args.repeat):
                log(f"{name}: {n} samples, batch {batch}")
                runs.append(run_child(cmd, src, env, int(args.rss_limit_gb * 2**30)))
                log(f"  -> {runs[-1]}")
            best = min(runs, key=lambda r: r.get("seconds", float("inf")))
            best["peak_rss_mb"] = max(r.get("peak_rss_mb", 0) for r in runs)
            best["seconds_runs"] = [r.get("seconds") for r in runs]
            best["cpu_seconds"] = min(r.get("cpu_seconds", float("inf")) for r in runs)
            rows.append({"config": name, "samples": n, "batch_size": batch, **best})
    by = {(r["config"], r["samples"]): r for r in rows}
    n0 = args.samples[0]
    ratios: dict[str, Any] = {}
    base = by.get(("default", n0))
    if base:
        for other in ("unlimited", "minmax", "old-b8", "old-b1", "groups", "tensorrt"):
            if (other, n0) in by and "seconds" in by[(other, n0)]:
                ratios[f"default_vs_{other}_time"] = round(
                    base["seconds"] / by[(other, n0)]["seconds"], 2
                )
                ratios[f"default_vs_{other}_cpu"] = round(
                    base["cpu_seconds"] / by[(other, n0)]["cpu_seconds"], 2
                )
        for other in ("unlimited", "old-b8", "groups"):
            if (other, n0) in by and "table" in by[(other, n0)]:
                ratios[f"amax_default_vs_{other}"] = amax_agreement(
                    Path(base["table"]), Path(by[(other, n0)]["table"])
                )
    result = {
        "model": "PP-OCRv4 det (rapidocr-onnxruntime 1.4.4), 640x640 photo crops",
        "environment": environment(args.threads),
        "old_commit": args.old_commit,
        "rows": rows,
        "ratios": ratios,
    }
    write_json(RESULTS / "collect_memory.json", result)
    table = markdown_table(
        ["config", "samples", "batch", "samples/run", "groups", "seconds", "CPU s", "peak RSS MB"],
        [
            [
                r["config"],
                r["samples"],
                r["batch_size"],
                r.get("samples_per_run", "-"),
                r.get("groups", "-"),
                r.get("seconds", "OOM"),
                r.get("cpu_seconds", "-"),
                r.get("peak_rss_mb", r.get("rss_at_kill_mb")),
            ]
            for r in rows
        ],
    )
    write_text(
        RESULTS / "collect_memory.md",
        f"# Collection memory (PP-OCRv4 det, 640x640)\n\n{table}\n\n```\n"
        f"{json.dumps(ratios, indent=2)}\n```\n",
    )
    print(table)
    print(json.dumps(ratios, indent=2))


if __name__ == "__main__":
    main()
