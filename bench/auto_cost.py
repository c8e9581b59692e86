"""What ``--method auto`` costs against ``--method entropy`` on the same model, same run (issue 9).

For each model (EfficientNet-Lite0 from the test zoo, the PP-OCRv4 recognizer from the
rapidocr-onnxruntime wheel; see bench/realmodels.py), ``calibrators.calibrate.calibrate`` runs
with ``entropy()`` and ``auto()`` on the same calibration set, alternating which goes first,
``--repeats`` times; before that one untimed entropy run warms the compiled kernels and the file
cache. Reported per model: the median wall time of each method and their ratio, the same in
process CPU time (all threads; steadier than wall time on a shared machine), and where auto's
extra time goes (candidate ranges from the histograms, then the consumers' measuring pass), from
``calibrators.auto``'s log line. Target: auto <= 1.5x entropy.

    python bench/auto_cost.py [--models efficientnet_lite0 ocr_rec] [--calibration 64 256]
        [--repeats 3] [--threads 2] [--auto-samples N] [--output auto_cost]

Writes bench/results/<output>.json and .md.
"""

from __future__ import annotations

import argparse
import logging
import re
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, environment, log, markdown_table, write_json, write_text
from bench.realmodels import load
from calibrators.calibrate import calibrate
from calibrators.data import CalibrationDataset
from calibrators.spec import MethodSpec, auto, entropy
from calibrators.table import CalibrationTable

_AUTO_LINE = re.compile(
    r"candidates of (\d+) tensors in ([\d.]+) s; (\d+) consumers measured on (\d+) samples "
    r"in ([\d.]+) s"
)


class _Capture(logging.Handler):
    """Keeps the messages of ``calibrators.auto`` (its timing line)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def timed(
    path: Path, dataset: CalibrationDataset, spec: MethodSpec, batch: int | None, threads: int
) -> tuple[float, float, CalibrationTable]:
    """Wall and process CPU seconds of one calibration."""
    wall, cpu = time.perf_counter(), time.process_time()
    table = calibrate(path, dataset, spec, batch_size=batch, threads=threads)
    return time.perf_counter() - wall, time.process_time() - cpu, table


def measure(key: str, calibration: int, args: argparse.Namespace) -> dict[str, Any]:
    model = load(key, calibration=calibration, evaluation=1, seed=args.seed)
    dataset = CalibrationDataset.from_arrays(model.calibration)
    batch = model.calibration_batch_size
    spec_auto = auto(args.auto_samples) if args.auto_samples else auto()
    capture = _Capture()
    auto_log = logging.getLogger("calibrators.auto")
    auto_log.setLevel(logging.INFO)
    auto_log.addHandler(capture)
    log(f"{key} x{calibration}: warm-up")
    timed(model.path, dataset, entropy(), batch, args.threads)
    runs: dict[str, list[tuple[float, float]]] = {"entropy": [], "auto": []}
    table: CalibrationTable | None = None
    try:
        for repeat in range(args.repeats):
            order = ("entropy", "auto") if repeat % 2 == 0 else ("auto", "entropy")
            for name in order:
                spec = entropy() if name == "entropy" else spec_auto
                wall, cpu, result = timed(model.path, dataset, spec, batch, args.threads)
                runs[name].append((wall, cpu))
                log(f"{key} x{calibration}: {name} {wall:.2f} s wall, {cpu:.2f} s CPU")
                if name == "auto":
                    table = result
    finally:
        auto_log.removeHandler(capture)
    phases = [m.groups() for m in map(_AUTO_LINE.search, capture.messages) if m]
    choices = Counter(
        f"{c.criterion.value}: {c.method}" for c in (table.range_choices or {}).values()
    ) if table is not None else Counter()
    med = {
        name: (
            statistics.median(w for w, _ in values),
            statistics.median(c for _, c in values),
        )
        for name, values in runs.items()
    }
    return {
        "model": key,
        "title": model.title,
        "calibration_samples": calibration,
        "auto_samples": spec_auto.samples,
        "runs": runs,
        "entropy_wall_s": med["entropy"][0],
        "auto_wall_s": med["auto"][0],
        "wall_ratio": med["auto"][0] / med["entropy"][0],
        "entropy_cpu_s": med["entropy"][1],
        "auto_cpu_s": med["auto"][1],
        "cpu_ratio": med["auto"][1] / med["entropy"][1],
        "tensors": int(phases[0][0]) if phases else None,
        "candidates_s": statistics.median(float(p[1]) for p in phases) if phases else None,
        "consumers": int(phases[0][2]) if phases else None,
        "measured_samples": int(phases[0][3]) if phases else None,
        "measure_s": statistics.median(float(p[4]) for p in phases) if phases else None,
        "choices": dict(sorted(choices.items())),
    }


def render(rows: Sequence[dict[str, Any]]) -> str:
    table = markdown_table(
        [
            "model",
            "samples",
            "entropy s",
            "auto s",
            "**auto / entropy** (wall)",
            "CPU ratio",
            "auto: candidates s",
            "auto: measuring s (consumers, samples)",
        ],
        [
            [
                r["title"],
                r["calibration_samples"],
                f"{r['entropy_wall_s']:.2f}",
                f"{r['auto_wall_s']:.2f}",
                f"**{r['wall_ratio']:.2f}x**",
                f"{r['cpu_ratio']:.2f}x",
                f"{r['candidates_s']:.2f}" if r["candidates_s"] is not None else "-",
                (
                    f"{r['measure_s']:.2f} ({r['consumers']}, {r['measured_samples']})"
                    if r["measure_s"] is not None
                    else "-"
                ),
            ]
            for r in rows
        ],
    )
    choices = "\n".join(
        f"- {r['title']} x{r['calibration_samples']}: "
        + ", ".join(f"{k} {v}" for k, v in r["choices"].items())
        for r in rows
    )
    return f"{table}\n\nauto's choices (criterion: chosen candidate, tensors):\n\n{choices}\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["efficientnet_lite0", "ocr_rec"])
    parser.add_argument("--calibration", nargs="+", type=int, default=[64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--auto-samples", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="auto_cost")
    args = parser.parse_args(argv)
    rows = [measure(key, n, args) for key in args.models for n in args.calibration]
    text = render(rows)
    print(text)
    payload = {"environment": environment(args.threads), "rows": rows}
    write_json(RESULTS / f"{args.output}.json", payload)
    write_text(RESULTS / f"{args.output}.md", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
