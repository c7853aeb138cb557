"""Data commands: `mixer prepare`, `mixer verify`, `mixer make-sample-data`."""

from __future__ import annotations

import argparse
import json

PREPARE_EXAMPLES = """\
examples:
  mixer prepare raw/ out/ds --val-per-class 5                       ImageFolder raw/<class>/<image>, Ray in-process
  mixer prepare s3://bucket/i21k/ s3://bucket/i21k-256 --layout i21k-tars --shard-size 1000 --val-fraction 0.01
  mixer prepare s3://bucket/jft/manifest/ s3://bucket/jft-ds --ray-address auto --plan-only   check first
  mixer prepare s3://bucket/jft/manifest/ s3://bucket/jft-ds --ray-address auto --workers 256
  mixer prepare s3://bucket/in22k-wds/ s3://bucket/in22k-256 --layout wds   re-shard WebDataset tars (.cls labels)
  mixer prepare hf-parquet/ out/ds                                 Parquet parts with an image {bytes, path} column
  mixer prepare raw/ out/ds --classes-file head_classes.txt         fix class indices to an existing head
  mixer prepare s3://bucket/i21k/ s3://bucket/i21k-256 --dedup-against s3://bucket/imagenet-val s3://bucket/pets
                                                  leave out near-copies of downstream test images (rejected.jsonl)

Re-running the same command finishes an interrupted run: complete shards are kept (checked by their recorded size
and object version, without reading them), the rest redone. `mixer verify` re-hashes every shard.
A manifest is one .jsonl, .csv or .parquet file, or a folder or glob of such parts (each part, and each Parquet row
group, is listed by its own task). It has a path column (path|url|image|file|filename: relative to the part's folder
or a full URL; in Parquet, a struct of image bytes and path holds the image itself) and a label column
(labels|label|classes|class: a name, an index, or a list; in CSV separate several labels with '|'). Other columns
are kept in each sample's .json.
"""

SAMPLE_EXAMPLES = """\
examples:
  mixer make-sample-data raw/ --layout imagefolder --classes 10 --per-class 50
  mixer make-sample-data s3://bucket/raw --layout i21k-tars --classes 8 --per-class 40 --bad 6
  mixer make-sample-data raw-jft/ --layout manifest --classes 8 --per-class 30 --manifest-format parquet
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        help="turn raw images into a sharded WebDataset with dataset.json",
        description="Turn raw images (ImageFolder, ImageNet-21k per-synset tars, WebDataset tars, or JSONL/CSV/Parquet "
        "manifest parts; local or any fsspec URL) into WebDataset shards with dataset.json. Listing and planning "
        "(keys, the stratified val split, the global shuffle) run as Ray tasks, so the driver's memory does not grow "
        "with the number of inputs; then one Ray task per shard.",
        epilog=PREPARE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", metavar="SOURCE", help="folder, prefix or manifest file of the raw images")
    p.add_argument("dest", metavar="DEST", help="where the shards and dataset.json go")
    p.add_argument("--layout", default="auto", choices=["auto", "imagefolder", "i21k-tars", "wds", "manifest"],
                   help="source layout (default: detected; wds must be named)")
    p.add_argument("--max-size", type=int, default=256,
                   help="largest short side in pixels, never upscaled (default 256)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images (default 95)")
    p.add_argument("--shard-size", type=int, default=1000,
                   help="samples per shard; shards are balanced (default 1000)")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val-per-class", type=int, metavar="N", help="hold out N images per class as 'val'")
    val.add_argument("--val-fraction", type=float, metavar="F", help="hold out this fraction of each class")
    p.add_argument("--workers", type=int, help="shard tasks in flight (default: the cluster's CPUs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and the shuffle (default 0)")
    p.add_argument("--ray-address", help="join this Ray cluster (default: start Ray in-process)")
    p.add_argument("--classes-file", help="class names, one per line, in head order (default: sorted names)")
    p.add_argument("--retries", type=int, default=4, help="retries per shard, with exponential backoff (default 4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--dedup-against", nargs="+", default=[], metavar="URL",
                   help="leave out inputs that are near-duplicates of any image of these reference sets (prepared "
                   "datasets or folders of images, e.g. the downstream test sets); listed in rejected.jsonl as "
                   "near-duplicate, with the image matched")
    p.add_argument("--plan-only", action="store_true",
                   help="list and plan, print the summary (inputs, classes, splits, shards, refusals, plan digest), "
                   "write nothing but DEST/_progress/plan.json")
    p.set_defaults(func=run_prepare)

    v = sub.add_parser(
        "verify",
        help="check a prepared dataset against its dataset.json",
        description="Read every shard with webdataset; recompute sizes, sha256 and counts; check keys and labels. "
        "Exits 1 and names the shard when anything differs from dataset.json; 2 when DS holds no readable dataset.json "
        "to check against.",
    )
    v.add_argument("dataset", metavar="DS", help="dataset URL (the folder holding dataset.json)")
    v.add_argument("--json", action="store_true", help="print the summary as JSON")
    v.set_defaults(func=run_verify)

    s = sub.add_parser(
        "make-sample-data",
        help="write a small synthetic, learnable image collection",
        description="Write a synthetic collection: per-class colour and stripe patterns a tiny Mixer learns at "
        "32x32, varied sizes and formats, optional bad files. Deterministic for a seed.",
        epilog=SAMPLE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("dest", metavar="DEST")
    s.add_argument("--layout", required=True, choices=["imagefolder", "i21k-tars", "manifest"])
    s.add_argument("--classes", type=int, required=True)
    s.add_argument("--per-class", type=int, required=True)
    s.add_argument("--bad", type=int, default=0, help="bad files to add (truncated, random bytes, empty, text...)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--manifest-format", default="jsonl", choices=["jsonl", "csv", "parquet"])
    s.set_defaults(func=run_make_sample_data)


def run_prepare(args: argparse.Namespace) -> int:
    from data_prep.prepare import PrepareOptions, prepare

    options = PrepareOptions(
        layout=args.layout, classes_file=args.classes_file, max_size=args.max_size, quality=args.quality,
        shard_size=args.shard_size, val_per_class=args.val_per_class, val_fraction=args.val_fraction, seed=args.seed,
        dedup_against=tuple(args.dedup_against),
    )
    prepare(args.source, args.dest, options, workers=args.workers, ray_address=args.ray_address,
            retries=args.retries, progress=not args.no_progress, plan_only=args.plan_only)
    return 0


def run_verify(args: argparse.Namespace) -> int:
    """Exit status 1 when the dataset has problems: a finding about the data, not an error of the command."""
    from data_prep.verify import verify

    problems, summary = verify(args.dataset)
    if args.json:
        print(json.dumps({**summary, "problems": problems}, indent=2))
    else:
        print(f"{summary['url']}: {summary['shards']} shards, {summary['samples']:,} samples, "
              f"{summary['bytes'] / 1e6:,.1f} MB, {summary['classes']} classes"
              f"{' (multi-label)' if summary['multi_label'] else ''}")
        for problem in problems:
            print(f"  FAIL {problem}")
        print("ok" if not problems else f"{len(problems)} problems")
    return 1 if problems else 0


def run_make_sample_data(args: argparse.Namespace) -> int:
    from data_prep.sample_data import make_sample_data

    made = make_sample_data(args.dest, args.layout, args.classes, args.per_class, args.bad, args.seed,
                            args.manifest_format)
    print(f"wrote {made['images']} images in {made['classes']} classes and {made['bad']} bad files to "
          f"{made['dest']} ({made['layout']})")
    source = f"{made['dest']}/manifest.{args.manifest_format}" if args.layout == "manifest" else made["dest"]
    print(f"next: mixer prepare {source} DEST")
    return 0
