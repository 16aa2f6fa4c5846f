"""Submit pretraining or fine-tuning through submitit (its checkpoint-and-requeue mechanism):

    python slurm/submit.py --config configs/pretrain/cvt_w24_224_in22k.yaml --nodes 4 --gpus-per-node 8
    python slurm/submit.py --entry finetune --config configs/finetune/cvt_w24_384_ft1k.yaml \
        --nodes 2 --gpus-per-node 8 --partition gpu -- --pretrained runs/cvt_w24_224_in22k
    python slurm/submit.py --cluster local --config configs/pretrain/tiny_cpu.yaml --tasks-per-node 2 --wait

Arguments after `--` go to the entry point unchanged. Logs and submitit's files go to --folder.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cvtkit.train.submitit_job import ENTRIES, submit  # noqa: E402


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--entry", choices=sorted(ENTRIES), default="pretrain")
    p.add_argument("--config", required=True)
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--tasks-per-node", type=int, help="default: one per GPU")
    p.add_argument("--cpus-per-task", type=int, default=8)
    p.add_argument("--mem-gb", type=int)
    p.add_argument("--partition")
    p.add_argument("--timeout-min", type=int, default=24 * 60)
    p.add_argument("--cluster", choices=["slurm", "local", "debug"], help="default: slurm when available")
    p.add_argument("--folder", default="submitit_logs/%j")
    p.add_argument("--wait", action="store_true", help="wait for the job and return its exit code")
    args = p.parse_args(argv)
    if not Path(args.config).is_file():
        print(f"error: --config {args.config}: no such file", file=sys.stderr)
        return 2
    entry_argv = ["--config", args.config] + (["--set", *args.overrides] if args.overrides else []) + extra
    job = submit(args.entry, entry_argv, args.folder, args.nodes, args.gpus_per_node, args.tasks_per_node,
                 args.partition, args.timeout_min, args.cpus_per_task, args.cluster, mem_gb=args.mem_gb)
    print(f"submitted job {job.job_id}; logs in {Path(str(job.paths.folder))}", flush=True)
    if not args.wait:
        return 0
    codes = job.results()
    code = max(int(c or 0) for c in codes)
    print(f"job {job.job_id} finished with {codes}")
    return code


if __name__ == "__main__":
    sys.exit(main())
