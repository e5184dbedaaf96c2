"""A slow subscriber of the derived documents no longer slows the analysis.

    python benchmarks/subscribers.py [--model FILE] [--side 8]

A real RunEngine runs a ``bp.grid_scan`` of ``side x side`` points with the classic-ophyd step
detector, twice, with the live NanobeamCallback: alone, and with bluesky's BestEffortCallback
subscribed to the derived run with its plots on (Agg backend; three LiveGrids redrawn per row).
For each it prints the seconds from the scan's start until every derived row was analysed and
emitted (the analysis), until the subscribers had them all (``flush()``), the time inside the
model and inside the subscribers, and whether the callback warned that the analysis was behind
the scan; then the ratio of the analysis times (goal: about 1, the subscribers on their own
thread; on 2 cores the plots still compete with the model for the CPU and the GIL).
"""

from __future__ import annotations

import argparse
import logging
import time

import matplotlib

matplotlib.use("Agg")


def run(predictor, side: int, with_bec: bool) -> dict[str, float]:
    import bluesky.plans as bp
    from bluesky import RunEngine
    from bluesky.callbacks.best_effort import BestEffortCallback

    from nanobeam_bluesky.callbacks import NanobeamCallback
    from nanobeam_bluesky.devices import FrameSimulator, NanoprobeStage, NanoprobeStepDetector
    from nanobeam_bluesky.phantoms import fig3_phantom

    sample = fig3_phantom(side, pixel_size_um=0.1)
    stage = NanoprobeStage(name="stage")
    detector = NanoprobeStepDetector(FrameSimulator(sample, seed=1), stage, name="det")
    RE = RunEngine({})
    callback = NanobeamCallback(predictor, lag_warning_s=5.0)
    if with_bec:
        bec = BestEffortCallback()
        bec.disable_table()
        callback.subscribe(bec)
    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("nanobeam_bluesky").addHandler(handler)
    RE.subscribe(callback)
    n = side * side
    last = (side - 1) * 0.1
    t0 = time.perf_counter()
    RE(bp.grid_scan([detector], stage.y, 0, last, side, stage.x, 0, last, side))
    while callback.stats.rows_emitted < n:
        time.sleep(0.005)
    analysed = time.perf_counter() - t0
    callback.flush()
    delivered = time.perf_counter() - t0
    callback.close()
    logging.getLogger("nanobeam_bluesky").removeHandler(handler)
    return {
        "analysed_s": analysed,
        "delivered_s": delivered,
        "model_s": callback.stats.predict_s,
        "subscribers_s": callback.stats.emit_s,
        "behind": float(any("behind the scan" in w for w in warnings)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model file (default: the shipped model)")
    parser.add_argument("--side", type=int, default=8, help="grid side (points per row)")
    args = parser.parse_args()
    from nanobeam_bluesky.inference import Predictor, load_pretrained

    predictor = Predictor.from_file(args.model) if args.model else load_pretrained()
    run(predictor, 4, False)  # warm-up (first model call), not reported
    results = {}
    for label, with_bec in (("callback alone", False), ("+ BestEffortCallback, plots on", True)):
        r = results[label] = run(predictor, args.side, with_bec)
        print(
            f"{label:32s} analysed {r['analysed_s']:6.1f} s  subscribers done {r['delivered_s']:6.1f} s  "
            f"model {r['model_s']:5.2f} s  in subscribers {r['subscribers_s']:6.1f} s  "
            f"warned 'analysis behind the scan': {'yes' if r['behind'] else 'no'}"
        )
    alone, bec = results.values()
    ratio = bec["analysed_s"] / alone["analysed_s"]
    print(f"analysis time with / without the plotting subscriber: {ratio:.2f}x")


if __name__ == "__main__":
    main()
