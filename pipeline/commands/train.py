"""`mixer train` and `mixer eval`."""

from __future__ import annotations

import argparse
import json

TRAIN_EPILOG = """\
examples:
  mixer train jobs/quickstart.yaml                           # Ray in-process, workers from the spec
  mixer train jobs/mixer_b16_i21k.yaml --ray-address auto    # join the Ray cluster this machine belongs to
  mixer train SPEC --set optim.lr=3e-3 --set batch.micro=32  # override any key
  mixer train SPEC --workers 4                               # resume a 2-worker run on 4 workers

Resume is automatic: when run.url already holds committed checkpoints the run continues from the newest one.
Under torchrun or the deepspeed launcher, run the same trainer with `python -m pipeline.train SPEC`.
"""

EVAL_EPILOG = """\
examples:
  mixer eval SPEC --checkpoint s3://bucket/runs/b16                       # newest checkpoint, data.eval_split
  mixer eval SPEC --checkpoint RUN/exports/step-000100000.safetensors --split test
  mixer eval SPEC --checkpoint RUN --fewshot --set 'eval.fewshot.datasets=[s3://bucket/datasets/pets]'

Few-shot gives the numbers a run logs as fewshot/<dataset>/<n>shot for the same weights, on any number of workers.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a Mixer on Ray Train workers (DeepSpeed ZeRO)",
                       description="Train a Mixer from a job spec on N Ray Train workers, each a DeepSpeed rank.",
                       epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", help="job spec YAML (see jobs/)")
    p.add_argument("--workers", type=int, default=None, help="number of workers (default: cluster.workers)")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to join (default: RAY_ADDRESS if set, else Ray started in-process)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec key, e.g. --set optim.lr=3e-3 (repeatable)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume-from", default=None, metavar="URL",
                       help="start from this checkpoint (a step folder, of this run or another)")
    group.add_argument("--no-resume", action="store_true", help="refuse to touch a run that already has checkpoints")
    p.set_defaults(func=run_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint or export on the spec's eval split, or few-shot",
                       description="Evaluate a checkpoint (run URL, step folder or .safetensors export) on the "
                                   "spec's eval split: top-1, top-5 (precision@1 for multi-label data) and loss. "
                                   "With --fewshot: the spec's few-shot linear evaluation (eval.fewshot) instead.",
                       epilog=EVAL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("spec")
    e.add_argument("--checkpoint", required=True, metavar="URL",
                   help="run URL (newest checkpoint), step folder URL, or exported weights")
    e.add_argument("--split", default=None, help="split to evaluate (default: data.eval_split)")
    e.add_argument("--fewshot", action="store_true",
                   help="few-shot linear evaluation on eval.fewshot.datasets (shots, l2, draws from the spec)")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    e.set_defaults(func=run_eval)


def run_train(args: argparse.Namespace) -> int:
    from pipeline import launch, run

    spec = run.resolve(run.load_spec(args.spec, args.overrides, args.workers), resume=not args.no_resume,
                       resume_from=args.resume_from)
    launch.run(spec, ray_address=args.ray_address, resume_from=args.resume_from)
    print(f"run folder: {spec.run.url}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from pipeline.config import load
    from pipeline.evaluate import evaluate_weights, fewshot_weights

    spec = load(args.spec, args.overrides)
    if args.fewshot:
        result = fewshot_weights(spec, args.checkpoint)
    else:
        result = evaluate_weights(spec, args.checkpoint, split=args.split)
    print(json.dumps(result, indent=2))
    return 0
