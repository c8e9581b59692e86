"""Speed of the calibration methods (histogram -> amax) and of histogram collection.

Histograms come from real activations: EfficientNet-Lite0 (exported from its package weights) on
224x224 crops of scikit-image's sample photos, every float activation observed with
HistogramCollector (2048 bins). Each method then runs over all of them, several rounds; the
script prints ms per tensor (median round, and the slowest single tensor) as markdown lines for
bench/README.md, plus the collector's cost per observed value in both histogram modes.

    python bench/methods.py [--samples 16] [--rounds 5] [--json results.json]

The issue's budget for entropy is 20 ms per 2048-bin tensor.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calibrators.histogram import Histogram, HistogramCollector  # noqa: E402
from calibrators.methods import entropy_amax, minmax_amax, mse_amax, percentile_amax  # noqa: E402
from calibrators.spec import HistogramMode  # noqa: E402
from tests import zoo  # noqa: E402

METHODS: dict[str, Callable[[Histogram], float]] = {
    "entropy": entropy_amax,
    "minmax": minmax_amax,
    "percentile": percentile_amax,
    "mse": mse_amax,
}


def activations(samples: int, batch: int, threads: int) -> list[dict[str, np.ndarray]]:
    """Every float intermediate tensor of EfficientNet-Lite0, batch by batch."""
    model = onnx.load(zoo.efficientnet_lite0())
    known = {o.name for o in model.graph.output}
    for node in model.graph.node:
        model.graph.output.extend(
            onnx.ValueInfoProto(name=o) for o in node.output if o not in known
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    images = zoo.preprocess_imagenet(zoo.photo_crops(samples, seed=0))
    out = []
    for start in range(0, samples, batch):
        x = images[start : start + batch]
        values = session.run(None, {"input": x})
        batch_acts = {"input": x}
        batch_acts.update(
            {n: v for n, v in zip(names, values, strict=True) if v.dtype.kind == "f" and v.size}
        )
        out.append(batch_acts)
    return out


def time_collector(
    batches: list[dict[str, np.ndarray]], mode: HistogramMode
) -> tuple[dict[str, Histogram], float]:
    """Histograms and the collector's cost in ns per observed value."""
    collector = HistogramCollector(mode)
    values = sum(array.size for batch in batches for array in batch.values())
    start = time.perf_counter()
    for index in range(collector.passes(split_batches=False)):  # exact mode: max, then counts
        collector.begin_pass(index)
        for batch in batches:
            for name, array in batch.items():
                collector.observe(name, array)
            collector.end_batch()
    seconds = time.perf_counter() - start
    return collector.histograms(), seconds / values * 1e9


def time_method(
    fn: Callable[[Histogram], float], hists: list[Histogram], rounds: int
) -> dict[str, float]:
    fn(hists[0])  # warm caches (level tables, log tables)
    per_round = []
    slowest = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        for hist in hists:
            t0 = time.perf_counter()
            fn(hist)
            slowest = max(slowest, time.perf_counter() - t0)
        per_round.append((time.perf_counter() - start) / len(hists))
    return {"ms_per_tensor": float(np.median(per_round)) * 1e3, "max_ms": slowest * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    batches = activations(args.samples, args.batch, args.threads)
    exact, exact_ns = time_collector(batches, HistogramMode.EXACT)
    _, trt_ns = time_collector(batches, HistogramMode.TENSORRT)
    hists = list(exact.values())
    values = sum(a.size for b in batches for a in b.values())
    results = {name: time_method(fn, hists, args.rounds) for name, fn in METHODS.items()}

    date = datetime.now(UTC).strftime("%Y-%m-%d")
    machine = f"{platform.processor() or platform.machine()}, {platform.python_version()}, numpy {np.__version__}"
    print(
        f"EfficientNet-Lite0, {args.samples} photo crops: {len(hists)} tensors x 2048 bins, "
        f"{values / 1e6:.1f} M values observed ({date}; {machine})"
    )
    print()
    print("| method | ms per tensor (median of rounds) | slowest tensor ms |")
    print("|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['ms_per_tensor']:.2f} | {r['max_ms']:.2f} |")
    print()
    print(f"- histogram collection, exact mode: {exact_ns:.2f} ns per value")
    print(f"- histogram collection, tensorrt mode: {trt_ns:.2f} ns per value")
    entropy_ms = results["entropy"]["ms_per_tensor"]
    verdict = "within" if entropy_ms <= 20.0 else "OVER"
    print(f"- entropy: {entropy_ms:.2f} ms per 2048-bin tensor ({verdict} the 20 ms budget)")
    if args.json:
        payload = {
            "date": date,
            "machine": machine,
            "tensors": len(hists),
            "values": values,
            "methods": results,
            "collector_ns_per_value": {"exact": exact_ns, "tensorrt": trt_ns},
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
