"""Spread `cggr bench` jobs over the GPUs of one machine, one job per GPU at a time, then merge reports.

Each job is one line of the jobs file: a name, then `cggr bench` arguments (regime, configurations,
ratios, seeds, budget); the arguments after `--` on this command line are added to every job. A job
writes to ROOT/jobs/NAME (so a job that ran earlier, in a previous call on the same machine, is reused
by the bench itself), logs to ROOT/logs/NAME.log, and runs with CUDA_VISIBLE_DEVICES set to its GPU.
A job whose bench ended with every run done gets ROOT/jobs/NAME/DONE (its arguments); a later call with
the same arguments skips it without starting a process (each such start cost 5-7 s of a GPU's time).
Jobs sharing --cache-dir share the finetune stage-1 checkpoints and reference models: the bench locks
them, so the first job of a seed trains them and the others wait for it.

Every configuration keeps its own GPU for the whole run, so its clock is its own; the GPUs must be of
one model (the script records `nvidia-smi` names in ROOT/gpus.txt). With `--cpu-slices N` the CPUs this
process may use are cut into N equal slices and a job on GPU g runs on slice g mod N (through `taskset`),
so that one job's compile workers cannot slow another job's timed steps: unpinned jobs that started
together were 2-6 % slower per step than staggered ones (BENCHMARKS.md, regime 3, fifth session).

At the end, runs of one regime are merged into ROOT/merged/REGIME (`cggr bench --report-only`). Queues that
run side by side on one machine pass `--no-merge`, and one `--merge-only` call over all their jobs files
merges once after them (each merge replaces the folder).

    python scripts/bench_multi_gpu.py --gpus 0 1 2 3 --root /tmp/runs --jobs jobs.txt --wall 560 -- \
        --corpus TOK.npz --model-preset smollm-135m ...
"""
import argparse
import glob
import json
import os
import queue
import shlex
import shutil
import subprocess
import sys
import threading
import time


def parse_jobs(path):
    jobs = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            name, *args = shlex.split(line)
            if not name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"{path}:{number}: job name {name!r} must be letters, digits, '_' and '-'")
            jobs.append((name, args))
    names = [n for n, _ in jobs]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: job names must be unique")
    return jobs


def regime_of(args):
    return args[args.index("--regime") + 1] if "--regime" in args else "pretrain"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    common = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", nargs="+", help="GPU indices, one worker each")
    p.add_argument("--root", required=True)
    p.add_argument("--jobs", nargs="+", required=True, help="jobs files: NAME ARGS... per line, # comments")
    p.add_argument("--wall", type=float,
                   help="seconds from now: no job starts a run that would end later (the bench's --max-wall)")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--cpu-slices", type=int, default=0,
                   help="cut this process's CPUs into N equal slices; a job on GPU g runs on slice g mod N (0: no pinning)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--no-merge", action="store_true",
                      help="run the jobs only (another invocation with --merge-only merges several queues once)")
    mode.add_argument("--merge-only", action="store_true", help="merge the jobs' finished runs, run nothing")
    a = p.parse_args(own)
    jobs = [job for path in a.jobs for job in parse_jobs(path)]
    names = [n for n, _ in jobs]
    if len(set(names)) != len(names):
        p.error(f"job names must be unique across {a.jobs}")
    if a.merge_only:
        merge(a, jobs)
        return 0
    if not a.gpus or a.wall is None:
        p.error("--gpus and --wall are required unless --merge-only")
    slices = cpu_slices(a.cpu_slices) if a.cpu_slices else None
    deadline = time.monotonic() + a.wall
    os.makedirs(os.path.join(a.root, "logs"), exist_ok=True)
    if shutil.which("nvidia-smi"):
        with open(os.path.join(a.root, "gpus.txt"), "w") as f:
            subprocess.run(["nvidia-smi", "--query-gpu=index,name", "--format=csv,noheader"], stdout=f, check=True)

    work = queue.Queue()
    for job in jobs:
        work.put(job)
    results = {}
    lock = threading.Lock()

    def worker(gpu):
        while True:
            try:
                name, args = work.get_nowait()
            except queue.Empty:
                return
            out = os.path.join(a.root, "jobs", name)
            job_args = [*args, *common]
            if finished_earlier(out, job_args):
                with lock:
                    results[name] = "done earlier"
                continue
            left = deadline - time.monotonic()
            if left < 30:
                with lock:
                    results[name] = "not started (wall)"
                continue
            cmd = [a.python, "-m", "cggr", "bench", *job_args, "--out", out, "--max-wall", f"{left:.0f}"]
            if slices is not None:
                cmd = ["taskset", "-c", ",".join(map(str, slices[int(gpu) % len(slices)]))] + cmd
            env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(gpu), PYTHONUNBUFFERED="1")
            start = time.monotonic()
            log_path = os.path.join(a.root, "logs", name + ".log")
            with open(log_path, "a") as log:
                log.write(f"$ CUDA_VISIBLE_DEVICES={gpu} {shlex.join(cmd)}\n")
                log.flush()
                this_run_from = log.tell()
                rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
            if rc == 0 and last_line(log_path, this_run_from).startswith("done"):
                mark_finished(out, job_args)
            with lock:
                results[name] = f"gpu {gpu} exit {rc} in {time.monotonic() - start:.0f} s"
                print(f"{name}: {results[name]}", flush=True)

    threads = [threading.Thread(target=worker, args=(g,)) for g in a.gpus]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    if not a.no_merge:
        merge(a, jobs)
    for name, _ in jobs:
        print(f"{name}: {results.get(name, 'not started')}")
    return 0 if all(" exit 0 " in results.get(n, "") or results.get(n) == "done earlier" for n, _ in jobs) else 1


def last_line(path, start):
    """The last non-empty line written to ``path`` from byte ``start`` on ('' if none)."""
    with open(path, "rb") as f:
        f.seek(start)
        lines = [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def mark_finished(out, job_args):
    # `cggr bench` ends with "done in N s" when no run is left, "INCOMPLETE: ..." otherwise
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "DONE"), "w") as f:
        json.dump(job_args, f)


def finished_earlier(out, job_args):
    path = os.path.join(out, "DONE")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return json.load(f) == job_args


def cpu_slices(n):
    """This process's CPUs in ``n`` equal, disjoint, ascending slices (the remainder left out)."""
    cpus = sorted(os.sched_getaffinity(0))
    if n < 1 or len(cpus) < n:
        raise SystemExit(f"--cpu-slices must be between 1 and the {len(cpus)} CPUs this process may use, got {n}")
    if shutil.which("taskset") is None:
        raise SystemExit("--cpu-slices pins jobs with taskset (util-linux), which is not installed here")
    size = len(cpus) // n
    return [cpus[i * size:(i + 1) * size] for i in range(n)]


def merge(a, jobs):
    """ROOT/merged/REGIME: every finished run of these jobs, one report per regime (replaced each time)."""
    for regime in sorted({regime_of(args) for _, args in jobs}):
        merged = os.path.join(a.root, "merged", regime)
        shutil.rmtree(merged, ignore_errors=True)
        os.makedirs(os.path.join(merged, "runs"))
        files = [f for name, args in jobs if regime_of(args) == regime
                 for f in glob.glob(os.path.join(a.root, "jobs", name, "runs", f"{regime}__*.json"))]
        for f in files:
            shutil.copy(f, os.path.join(merged, "runs"))
        if files:
            rc = subprocess.run([a.python, "-m", "cggr", "bench", "--report-only", "--out", merged]).returncode
            print(f"merged {regime}: {len(files)} runs, report exit {rc}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
