"""Benchmark: the per-stroke latency ``sigec editor`` shows, for brush strokes of about 2%.

Runs the editor's HTTP API in-process (FastAPI TestClient, the same code path as the page) on a
256x512 canvas with the landscape generator at its default size (the shipped trained model when
``sigec.models.load("landscape")`` works, else seeded random weights: the timing is the same),
paints ``--strokes`` strokes of a radius-11, 100-pixel-long brush (about 2% of the canvas) at
different places, each of a class absent under it, and prints the engine time per stroke (the
figure the page shows as "incremental") against the session's dense latency, and the whole
request's server time.

    python benchmarks/editor_latency.py --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path


import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script or with -m

from fastapi.testclient import TestClient  # noqa: E402

from sigec.frontends.editor.server import RANDOM_MODEL, EditorError, create_app, resolve_model  # noqa: E402
from sigec.frontends.edits import brush_stroke_mask  # noqa: E402
from sigec.models.landscape import CLASSES  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--strokes", type=int, default=9)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--policy", default="exact")
    parser.add_argument("--model", default="landscape", help=f"a shipped model or {RANDOM_MODEL}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        model, name = resolve_model(args.model), args.model
    except EditorError:
        model, name = resolve_model(RANDOM_MODEL), RANDOM_MODEL
    start = time.perf_counter()
    # report_macs: each stroke's MACs are counted after its timed engine call (for the efficiency)
    app = create_app(model, height=args.height, width=args.width, policy=args.policy, report_macs=True)
    print(f"model {name}, {args.height}x{args.width}, policy {args.policy}, {torch.get_num_threads()} threads; "
          f"compiled in {time.perf_counter() - start:.1f} s")
    H, W = args.height, args.width
    with TestClient(app) as client:
        session = client.post("/api/sessions").json()
        sid = session["session"]
        print(f"dense latency (median of 3 runs of the plain model): {session['dense_ms']:.1f} ms")
        engine, server, edits, effs = [], [], [], []
        for i in range(args.strokes):
            y = H * (0.15 + 0.7 * ((i * 0.37) % 1.0))
            x0 = (W - 120) * ((i * 0.61) % 1.0) + 10
            points = [[x0 + t, y + 6 * ((t / 25) % 2 - 0.5)] for t in range(0, 101, 5)]
            mask = brush_stroke_mask(points, 11, H, W)
            current = app.state.sessions.get(sid).labels
            counts = torch.bincount(current[mask], minlength=len(CLASSES))
            cls = CLASSES[int(counts.argmin())]
            out = client.post(f"/api/sessions/{sid}/strokes", json={"points": points, "radius": 11, "class": cls})
            out.raise_for_status()
            st = out.json()["stats"]
            engine.append(st["engine_ms"])
            server.append(out.json()["server_ms"])
            edits.append(st["edit_fraction"])
            # efficiency: speed-up over MAC ratio (how much of the MAC cut the wall clock keeps)
            ratio = st["dense_macs"] / st["incremental_macs"] if st.get("incremental_macs") else None
            eff = st["speedup"] / ratio if ratio and st.get("speedup") else None
            if eff is not None:
                effs.append(eff)
            print(f"stroke {i + 1}: {cls:6s} edit {100 * st['edit_fraction']:.2f}%  recomputed "
                  f"{100 * st['recomputed_fraction']:.2f}%  engine {st['engine_ms']:.1f} ms  "
                  f"(server {out.json()['server_ms']:.1f} ms)  speed-up {st['speedup']:.1f}x"
                  + (f"  MAC ratio {ratio:.1f}x  efficiency {eff:.2f}" if eff is not None else ""))
    print(f"per-stroke engine latency: median {statistics.median(engine):.1f} ms, min {min(engine):.1f}, "
          f"max {max(engine):.1f} (dense {session['dense_ms']:.1f} ms; edits {100 * min(edits):.2f}-"
          f"{100 * max(edits):.2f}%); whole request on the server: median {statistics.median(server):.1f} ms"
          + (f"; efficiency (speed-up / MAC ratio) median {statistics.median(effs):.2f}" if effs else ""))


if __name__ == "__main__":
    main()
