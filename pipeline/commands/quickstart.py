"""`mixer quickstart`: the whole chain on one machine, on built-in defaults, in a few minutes on CPU."""

from __future__ import annotations

import argparse
import os
import time

from pipeline import storage
from pipeline.errors import MixerError

SPEC = os.path.join(os.path.dirname(__file__), "..", "..", "jobs", "quickstart.yaml")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quickstart", help="run the whole chain on generated data (CPU, a few minutes)",
        description="Generate a small image collection, prepare shards with Ray, train a tiny Mixer with two "
                    "DeepSpeed ZeRO workers through Ray Train, stop and resume from its checkpoint, evaluate, "
                    "export and plot. Everything lands under --out.")
    p.add_argument("--out", default="out/quickstart", help="folder (or any fsspec URL) for everything it writes")
    p.add_argument("--spec", default=os.path.normpath(SPEC), help="job spec to train (default: jobs/quickstart.yaml)")
    p.add_argument("--steps", type=int, default=None, help="override schedule.total_steps")
    p.set_defaults(func=run)


def _step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def _mixer(*argv: str) -> None:
    """Run one `mixer` command as a user would type it; a non-zero exit stops the quickstart."""
    from pipeline.commands import checkpoints, data, plot, train

    parser = argparse.ArgumentParser(prog="mixer")
    sub = parser.add_subparsers()
    for group in (data, train, checkpoints, plot):
        group.register(sub)
    args = parser.parse_args(argv)
    print(f"$ mixer {' '.join(argv)}", flush=True)
    status = args.func(args)
    if status:
        raise QuickstartError(f"`mixer {' '.join(argv)}` exited with status {status}; see its output above")


class QuickstartError(MixerError):
    """A step of the quickstart that did not succeed."""


def run(args: argparse.Namespace) -> int:
    from pipeline import config
    from pipeline.checkpoint import CheckpointStore

    out = args.out.rstrip("/")
    raw, dataset, run_url = f"{out}/raw", f"{out}/dataset", f"{out}/run"
    if storage.exists(run_url):
        storage.filesystem(run_url)[0].rm(storage.filesystem(run_url)[1], recursive=True)
    overrides = [f"data.dataset={dataset}", f"run.url={run_url}"]
    if args.steps:
        overrides.append(f"schedule.total_steps={args.steps}")
    sets = [arg for o in overrides for arg in ("--set", o)]
    spec = config.load(args.spec, overrides)
    half = spec.schedule.total_steps // 2
    t0 = time.perf_counter()

    _step("1/7 generate a small image collection (10 classes, a few bad files)")
    _mixer("make-sample-data", raw, "--layout", "imagefolder", "--classes", "10", "--per-class", "60", "--bad", "4",
           "--seed", "0")
    _step("2/7 prepare WebDataset shards with Ray, then verify them")
    _mixer("prepare", raw, dataset, "--max-size", "48", "--shard-size", "25", "--val-per-class", "8")
    _mixer("verify", dataset)
    _step(f"3/7 train {spec.model.variant} on {spec.cluster.workers} ZeRO-{spec.deepspeed.zero_stage} workers, "
          f"stopping after step {half} as a preemption would")
    _mixer("train", args.spec, *sets, "--set", f"run.stop_after={half}")
    _step("4/7 run the same command again: it resumes from the newest checkpoint and finishes")
    _mixer("train", args.spec, *sets)
    _step("5/7 checkpoints and evaluation")
    _mixer("checkpoints", "list", run_url)
    _mixer("eval", args.spec, "--checkpoint", run_url, *sets)
    _step("6/7 export the weights")
    export = f"{out}/mixer_quickstart.safetensors"
    _mixer("export", run_url, export, "--format", "safetensors")
    _step("7/7 plot the run")
    plot = f"{run_url}/plots/metrics.png"
    _mixer("plot", run_url, "--out", plot)

    latest = CheckpointStore(run_url).list()[-1]
    print(f"\nquickstart finished in {time.perf_counter() - t0:.0f} s")
    print(f"  dataset      {dataset}  (dataset.json, shards, rejected.jsonl)")
    print(f"  run folder   {run_url}  (config.yaml, metrics.jsonl, tensorboard/)")
    print(f"  checkpoint   {latest.url}")
    print(f"  export       {export}")
    print(f"  plot         {plot}")
    return 0
