"""CLI: python -m fr_jax.view RUN_DIR [RUN_DIR ...] [--out DIR] [--serve [--port P] [--every S]]

Builds the run viewer's static report (docs/records.md: what the records hold) and prints its path: open
<out>/index.html from disk, no server and no network needed. Several runs are overlaid on the same curves.
With --serve it is served on 127.0.0.1 and rebuilt as a live run writes its records.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys
import time

from fr_jax import cli
from fr_jax.view.live import LiveReport
from fr_jax.view.report import ReportBuilder


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.parser("python -m fr_jax.view", __doc__)
    p.add_argument("runs", nargs="+", help="run directories (the run_dir of a fr_jax config)")
    p.add_argument("--out", default=None, help="report folder (default: <run_dir>/view for one run)")
    p.add_argument("--serve", action="store_true", help="serve on localhost and rebuild as records arrive")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default: loopback only)")
    p.add_argument("--port", type=int, default=8765, help="port to serve on (0: any free port)")
    p.add_argument("--every", type=float, default=5.0, help="seconds between rebuilds with --serve")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.out is None and len(args.runs) > 1:
        print("error: give --out DIR for the report of several runs", file=sys.stderr)
        return 2
    out = pathlib.Path(args.out) if args.out else pathlib.Path(args.runs[0]) / "view"
    try:
        builder = ReportBuilder(args.runs, out, live=args.serve)
        if not args.serve:
            done = builder.build()
            print(f"report: {done['index']} ({done['samples']} samples, built in {done['seconds']:.1f} s)")
            return 0
        with LiveReport(builder, host=args.host, port=args.port, every_s=args.every) as live:
            print(f"serving {live.url} (rebuilt every {args.every:g} s; Ctrl-C stops)", flush=True)
            while True:
                time.sleep(3600)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
