"""`mixer plot`: a run's curves as a PNG."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="plot a run's loss, lr, throughput and eval curves to a PNG",
                       description="Plot RUN/metrics.jsonl (any URL) to a PNG.")
    p.add_argument("run", help="run folder URL")
    p.add_argument("--out", default=None, help="PNG path or URL (default: RUN/plots/metrics.png)")
    p.set_defaults(func=run_plot)


def run_plot(args: argparse.Namespace) -> int:
    from pipeline.plot import plot_run

    print(f"wrote {plot_run(args.run, args.out)}")
    return 0
