"""`mixer submit` and `mixer jobs`: running on a Ray cluster through the Ray Jobs API."""

from __future__ import annotations

import argparse
import datetime
import json
import sys

SUBMIT_EPILOG = """\
examples:
  mixer submit jobs/mixer_b16_i21k.yaml --address https://HEAD:8265 --follow    # a dashboard behind TLS
  mixer submit jobs/quickstart.yaml --set run.url=s3://bucket/runs/q1 --workers 4
  ray dashboard infra/aws/cluster.yaml &    # an SSH tunnel from 127.0.0.1:8265 to the head's dashboard
  RAY_AUTH_TOKEN=$(ssh HEAD ray get-auth-token) mixer submit jobs/quickstart.yaml --address http://127.0.0.1:8265

The address is the head's dashboard (default: RAY_API_SERVER_ADDRESS, or RAY_ADDRESS when it is an http URL).
The token comes from RAY_AUTH_TOKEN or ~/.ray/auth_token and is sent as a bearer header, so plain http:// is
refused except to this machine (127.0.0.1, ::1, localhost: the end of an SSH tunnel or `kubectl port-forward`);
use https://, a tunnel, or --insecure on a network you trust. Credentials for object storage are never sent: the
cluster's environment or instance role provides them.
"""


def _address_option(p: argparse.ArgumentParser) -> None:
    from pipeline.jobs import default_address

    p.add_argument("--address", default=default_address(),
                   help="Ray dashboard URL, e.g. http://127.0.0.1:8265 through a tunnel, or https://HEAD:8265 "
                        "(default: RAY_API_SERVER_ADDRESS)")
    p.add_argument("--insecure", action="store_true",
                   help="allow plain http:// to another machine, which sends the cluster token unencrypted; only on "
                        "a network you trust end to end")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("submit", help="submit a training job to a Ray cluster (Ray Jobs API)",
                       description="Validate a job spec, then submit `mixer train` with it to a Ray cluster, carrying "
                                   "this package's source and the resolved spec.",
                       epilog=SUBMIT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", help="job spec YAML (see jobs/)")
    _address_option(p)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec key (repeatable)")
    p.add_argument("--workers", type=int, default=None, help="number of training workers (cluster.workers)")
    p.add_argument("--follow", action="store_true", help="stream the job's logs until it ends; exit 0 on success")
    p.set_defaults(func=run_submit)

    j = sub.add_parser("jobs", help="list, inspect, follow and stop jobs on a Ray cluster",
                       description="Jobs on a Ray cluster: list, status ID, logs ID [--follow], stop ID.")
    actions = j.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = actions.add_parser("list", help="every job: id, status, start time, spec, run")
    _address_option(a)
    a.set_defaults(func=run_jobs_list)
    a = actions.add_parser("status", help="one job's status and metadata")
    a.add_argument("job_id")
    _address_option(a)
    a.set_defaults(func=run_jobs_status)
    a = actions.add_parser("logs", help="one job's logs")
    a.add_argument("job_id")
    a.add_argument("--follow", action="store_true", help="keep streaming until the job ends")
    _address_option(a)
    a.set_defaults(func=run_jobs_logs)
    a = actions.add_parser("stop", help="stop a job and wait until it has stopped")
    a.add_argument("job_id")
    _address_option(a)
    a.set_defaults(func=run_jobs_stop)


def run_submit(args: argparse.Namespace) -> int:
    from pipeline import jobs

    job_id = jobs.submit(args.spec, args.address, args.overrides, args.workers, insecure=args.insecure)
    target = f"--address {args.address}" + (" --insecure" if args.insecure else "")
    if not args.follow:
        print(f"follow it with: mixer jobs logs {job_id} --follow {target}")
        return 0
    try:
        status = jobs.follow(args.address, job_id, insecure=args.insecure)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job runs on. Stop it with: mixer jobs stop {job_id} {target}",
              file=sys.stderr)
        return 130
    print(f"job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def _time(ms: int | None) -> str:
    if not ms:
        return "-"
    return datetime.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def run_jobs_list(args: argparse.Namespace) -> int:
    from pipeline import jobs

    found = jobs.list_jobs(args.address, insecure=args.insecure)
    print(f"{'job':<44}  {'status':<10}  {'started':<19}  {'spec':<32}  run")
    for job in found:
        meta = job.metadata or {}
        job_id = job.submission_id or job.job_id
        print(f"{job_id:<44}  {job.status.value:<10}  {_time(job.start_time):<19}  {meta.get('spec', '-'):<32}  "
              f"{meta.get('run_url', '-')}")
    return 0


def run_jobs_status(args: argparse.Namespace) -> int:
    from pipeline import jobs

    info = jobs.job_info(args.address, args.job_id, insecure=args.insecure)
    print(f"job {args.job_id}: {info.status.value}")
    print(f"  started   {_time(info.start_time)}")
    print(f"  ended     {_time(info.end_time)}")
    if info.message:
        print(f"  message   {info.message}")
    print(f"  metadata  {json.dumps(info.metadata or {})}")
    run_url = (info.metadata or {}).get("run_url")
    if run_url:
        print(f"  workers   {_workers(run_url)}")
    return 0


def _workers(run_url: str) -> str:
    """The run's world size over its starts and restarts, from RUN/metrics.jsonl: where each began, on how many
    workers and which hosts."""
    from pipeline.metrics import MetricsError, read_records

    try:
        starts = [r for r in read_records(run_url) if r.get("kind") == "start"]
    except (MetricsError, OSError) as e:
        return f"unknown ({type(e).__name__}: {e})"
    if not starts:
        return "no start on record yet (metrics are published at each checkpoint and every 30 s)"
    return "; ".join(f"{r['workers']} from step {r['step']} on {', '.join(r['hosts'])}"
                     for r in starts)


def run_jobs_logs(args: argparse.Namespace) -> int:
    from pipeline import jobs

    if args.follow:
        status = jobs.follow(args.address, args.job_id, insecure=args.insecure)
        print(f"job {args.job_id}: {status}")
        return 0 if status == "SUCCEEDED" else 1
    print(jobs.job_logs(args.address, args.job_id, insecure=args.insecure), end="")
    return 0


def run_jobs_stop(args: argparse.Namespace) -> int:
    from pipeline import jobs

    status = jobs.stop(args.address, args.job_id, insecure=args.insecure)
    print(f"job {args.job_id}: {status}")
    return 0 if status == "STOPPED" else 1

