"""Calibration speed and memory on EfficientNet-Lite0 (issue 2's performance targets).

One run measures, at 256 and at 2048 samples of 224x224 real-photo crops, with 2 CPU threads:
  floor    a plain FP32 ONNX Runtime forward pass over the same samples (same loader, same batches)
  ours     `trtforge calibrate --method entropy` (and minmax), end to end
  ort      onnxruntime.quantization.quantize_static with CalibrationMethod.Entropy and MinMax
Each configuration runs in its own process and reports its own peak RSS (VmHWM, which restarts at
exec, so memory inherited from this parent through fork does not count); a watchdog stops a process
whose RSS passes --rss-limit-gb and records that it ran out of memory. The floor and ONNX Runtime
run at --batch-size; trtforge uses its default batch size (as many samples as fit ~384 MB of
activations: 8 for EfficientNet-Lite0).

    python bench/calibration.py [--samples 256 2048] [--threads 2] [--skip-ort]

Prints ratios and writes bench/results/calibration.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import zoo  # noqa: E402

WORK = ROOT / "bench" / "work"
RESULTS = ROOT / "bench" / "results"

FLOOR = """
import sys, time, resource, numpy as np, onnxruntime as ort
from pathlib import Path
from calibrators.data import CalibrationDataset
model, data, n, threads, batch = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
so = ort.SessionOptions(); so.intra_op_num_threads = threads
s = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
t = time.perf_counter()
for feeds in CalibrationDataset.open(data).batches(batch, max_samples=n):
    s.run(None, feeds)
print(time.perf_counter() - t, [int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")][0])
"""

ORT = """
import sys, time, resource, numpy as np, onnxruntime as ort
from pathlib import Path
from onnxruntime.quantization import quantize_static, CalibrationMethod, CalibrationDataReader, QuantFormat, QuantType
from calibrators.data import CalibrationDataset
model, data, n, method, out, batch = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], int(sys.argv[6])
class Reader(CalibrationDataReader):
    def __init__(self):
        self.it = iter(CalibrationDataset.open(data).batches(batch, max_samples=n))
    def get_next(self):
        return next(self.it, None)
t = time.perf_counter()
quantize_static(model, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
    calibrate_method=getattr(CalibrationMethod, method), extra_options={"ActivationSymmetric": True})
print(time.perf_counter() - t, [int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")][0])
"""


def run_measured(cmd: list[str], rss_limit_bytes: int, env: dict[str, str]) -> dict[str, object]:
    """Run ``cmd``; its last stdout line is '<seconds> <peak_rss_mb>' or the CLI's JSON."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            rss = sum(p.memory_info().rss for p in [ps, *ps.children(recursive=True)])
        except psutil.Error:
            rss = 0
        peak = max(peak, rss)
        if rss > rss_limit_bytes:
            proc.kill()
            proc.wait()
            return {
                "out_of_memory": True,
                "rss_at_kill_mb": round(rss / 2**20),
                "seconds_until_kill": round(time.perf_counter() - started, 1),
            }
        time.sleep(0.2)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed:\n{err[-3000:]}")
    last = out.strip().splitlines()[-1]
    if last.startswith("{"):
        info = json.loads(last)
        return {
            "seconds": info["seconds"],
            "peak_rss_mb": info["peak_rss_mb"],
            "tensors": info["tensors"],
        }
    seconds, rss_mb = last.split()
    return {"seconds": round(float(seconds), 2), "peak_rss_mb": round(float(rss_mb), 1)}


def make_dataset(n: int) -> Path:
    path = WORK / f"photos_{n}.npz"
    if not path.exists():
        chunks = [
            zoo.preprocess_imagenet(zoo.photo_crops(min(256, n - i), seed=i))
            for i in range(0, n, 256)
        ]
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, input=np.concatenate(chunks))
        tmp.replace(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, nargs="+", default=[256, 2048])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rss-limit-gb", type=float, default=12.0)
    parser.add_argument("--skip-ort", action="store_true")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    model = zoo.efficientnet_lite0()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    limit = int(args.rss_limit_gb * 2**30)
    rows: list[dict[str, object]] = []
    for n in args.samples:
        data = make_dataset(n)
        row: dict[str, object] = {"samples": n}
        row["floor"] = run_measured(
            [
                sys.executable,
                "-c",
                FLOOR,
                str(model),
                str(data),
                str(n),
                str(args.threads),
                str(args.batch_size),
            ],
            limit,
            env,
        )
        for method in ("entropy", "minmax"):
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [
                    sys.executable,
                    "-c",
                    "from service.cli.main import main; main()",
                    "calibrate",
                    str(model),
                    "--data",
                    str(data),
                    "--method",
                    method,
                    "--max-samples",
                    str(n),
                    "--threads",
                    str(args.threads),
                    "--out",
                    f"{tmp}/t.cache",
                    "--json",
                ]
                row[f"ours_{method}"] = run_measured(cmd, limit, env)
        if not args.skip_ort:
            for method in ("Entropy", "MinMax"):
                with tempfile.TemporaryDirectory() as tmp:
                    row[f"ort_{method.lower()}"] = run_measured(
                        [
                            sys.executable,
                            "-c",
                            ORT,
                            str(model),
                            str(data),
                            str(n),
                            method,
                            f"{tmp}/q.onnx",
                            str(args.batch_size),
                        ],
                        limit,
                        env,
                    )
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} CPUs, {round(psutil.virtual_memory().total / 2**30)} GiB",
        "threads": args.threads,
        "batch_size": args.batch_size,
        "rows": rows,
    }
    (RESULTS / "calibration.json").write_text(json.dumps(report, indent=2))
    lines = [
        "| samples | floor s | ours entropy s | ratio to floor | ours RSS MB | ORT entropy s | speedup vs ORT | ORT entropy RSS MB | ours minmax s | ORT minmax s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f, e, m = r["floor"], r["ours_entropy"], r["ours_minmax"]
        oe, om = r.get("ort_entropy", {}), r.get("ort_minmax", {})

        def show(x: dict[str, object], key: str) -> str:
            if not x:
                return "-"
            return (
                f"OOM at {x['rss_at_kill_mb']} MB after {x['seconds_until_kill']} s"
                if x.get("out_of_memory")
                else str(x[key])
            )

        speed = (
            f"{oe['seconds'] / e['seconds']:.2f}x" if oe and not oe.get("out_of_memory") else "-"
        )
        lines.append(
            f"| {r['samples']} | {f['seconds']} | {e['seconds']} | {e['seconds'] / f['seconds']:.2f}x | {e['peak_rss_mb']} | {show(oe, 'seconds')} | {speed} | {show(oe, 'peak_rss_mb')} | {m['seconds']} | {show(om, 'seconds')} |"
        )
    if len(rows) >= 2:
        a, b = rows[0]["ours_entropy"]["peak_rss_mb"], rows[-1]["ours_entropy"]["peak_rss_mb"]
        lines.append(
            f"\nOur peak RSS from {rows[0]['samples']} to {rows[-1]['samples']} samples: {a} -> {b} MB ({(b - a) / a * 100:+.1f}%)."
        )
    md = "\n".join(lines)
    (RESULTS / "calibration.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
