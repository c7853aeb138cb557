"""`mixer plan`: what a spec needs on N GPUs, before running it."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="memory per GPU (ZeRO 1/2/3), steps, checkpoint size and time for a spec",
                       description="Estimate, before running, what a spec needs on N GPUs: model states and "
                                   "activations per GPU for ZeRO 1, 2 and 3 (with and without activation "
                                   "checkpointing), the number of steps, the checkpoint size and the wall time.")
    p.add_argument("spec")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs (one training worker each)")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GiB", help="flag what does not fit in this")
    speed = p.add_mutually_exclusive_group()
    speed.add_argument("--images-per-sec", type=float, default=None, metavar="X",
                       help="training throughput per GPU, for the wall time")
    speed.add_argument("--from-run", default=None, metavar="RUN",
                       help="take the throughput per GPU measured by a run (RUN/metrics.jsonl)")
    p.add_argument("--train-samples", type=int, default=None, metavar="N",
                   help="train split size, when the dataset is not reachable from here")
    p.add_argument("--num-classes", type=int, default=None, metavar="K",
                   help="classes, when neither model.num_classes nor the dataset gives them")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    from pipeline import config, plan

    spec = config.load(args.spec, args.overrides)
    speed = args.images_per_sec
    if args.from_run:
        speed = plan.measured_images_per_s_per_gpu(args.from_run)
    result = plan.plan_resources(spec, args.gpus, spec_path=args.spec, gpu_memory_gib=args.gpu_memory,
                                 images_per_s_per_gpu=speed, train_samples=args.train_samples,
                                 num_classes=args.num_classes)
    print(plan.to_json(result) if args.json else plan.render(result, spec))
    return 0
