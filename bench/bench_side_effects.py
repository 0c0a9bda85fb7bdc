"""What stopsign's process-wide tricks save: gc.freeze around train (heap.settled_heap), the forked chart process
(reporting.report.ForkedCharts) and the frozen heap at exit (heap.freeze_at_exit).

    .venv/bin/python bench/bench_side_effects.py [--repeats 3]

Each is kept only if it saves at least 10% (STYLE.md habit 10). Cases, each repeat running each case in a fresh
subprocess on the default feature cache (warmed by one untimed run first):
  train      stopsign.train(DATA, backbone=efficientnet_lite0, progress=False) as it is, imports outside the clock
  noheap     the same, train's settled_heap skipped (train.__wrapped__)
  nofork     the same, every report chart drawn in this process (report.FORK = False)
  cli        `stopsign -q train DATA --backbone efficientnet_lite0 --out …`, wall seconds to process exit
  cliexit    the same without freeze_at_exit: the interpreter's last collections run
Prints the median wall seconds and each case's ratio to its reference (train, or cli), and the same for CPU
seconds (the process and its children), which other load on the machine moves less: a mechanism that only
saves work (the gc ones) shows there; the chart process saves wall time by running beside the parent, so only
the wall ratio speaks for it. A mechanism whose case runs less than 10% slower than its reference saves less
than 10%. Mechanisms already removed are reported so.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared/data/cvstudio-stop-signs"
BACKBONE = "efficientnet_lite0"
API_CASES = ("train", "noheap", "nofork")
CLI_CASES = ("cli", "cliexit")
REFERENCE = {"train": "train", "noheap": "train", "nofork": "train", "cli": "cli", "cliexit": "cli"}
NAMES = {"train": "stopsign.train, warm", "noheap": "  without settled_heap", "nofork": "  without ForkedCharts",
         "cli": "stopsign -q train, to exit", "cliexit": "  without freeze_at_exit"}

CLI_CODE = """
import sys, stopsign.cli as cli
if sys.argv[1] == "cliexit":
    if not hasattr(cli, "freeze_at_exit"):
        raise SystemExit(3)  # already removed: nothing to compare
    cli.freeze_at_exit = lambda: None
sys.argv[1:2] = []
cli.run()
"""


def child(case: str, out: Path) -> None:
    import stopsign.training.trainer as trainer  # imports (the same for every case) stay outside the clock
    from stopsign.reporting import report

    train = trainer.train
    if case == "noheap":
        if not hasattr(train, "__wrapped__"):
            raise SystemExit(3)
        train = train.__wrapped__  # contextmanager's decorator keeps the undecorated function here
    if case == "nofork":
        if not hasattr(report, "FORK"):
            raise SystemExit(3)
        report.FORK = False
    cpu, clock = cpu_seconds(resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN), time.perf_counter()
    result = train(DATA, backbone=BACKBONE, out=str(out), progress=False)
    print("RESULT " + json.dumps({"seconds": time.perf_counter() - clock, "val_acc": result.best_val_acc,
                                  "cpu": cpu_seconds(resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN) - cpu}))


def cpu_seconds(*who) -> float:
    """User and system seconds of these (this process, its reaped children): less moved by other load than wall."""
    return sum(usage.ru_utime + usage.ru_stime for usage in map(resource.getrusage, who))


def measure(case: str, out: Path) -> dict | None:
    if case in API_CASES:
        command = [sys.executable, __file__, "--child", case, "--out", str(out)]
    else:
        command = [sys.executable, "-c", CLI_CODE, case, "-q", "train", str(DATA), "--backbone", BACKBONE,
                   "--out", str(out)]
    cpu, clock = cpu_seconds(resource.RUSAGE_CHILDREN), time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds, cpu = time.perf_counter() - clock, cpu_seconds(resource.RUSAGE_CHILDREN) - cpu
    if done.returncode == 3:
        return None
    if done.returncode:
        raise SystemExit(f"case {case} failed:\n{done.stderr[-3000:]}")
    if case in API_CASES:
        return json.loads([line for line in done.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])
    return {"seconds": seconds, "cpu": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.out)
    cases = API_CASES + CLI_CASES
    results: dict[str, list] = {case: [] for case in cases}
    with tempfile.TemporaryDirectory(prefix="bench-side-effects-") as workdir:
        measure("train", Path(workdir) / "warmup")  # fills the default feature cache where it is not full yet
        for repeat in range(args.repeats):  # cases interleaved, so drift on the machine touches each alike
            for case in cases:
                results[case].append(measure(case, Path(workdir) / f"{case}-{repeat}"))
                shown = "removed" if results[case][-1] is None else f"{results[case][-1]['seconds']:.2f} s"
                print(f"repeat {repeat + 1}/{args.repeats} {case}: {shown}", file=sys.stderr, flush=True)
    def median(case, key):
        runs = results[case]
        return None if None in runs else statistics.median(run[key] for run in runs)

    print(f"{BACKBONE} on {DATA.name}, default settings, warm cache, median of {args.repeats}")
    print("| case | wall s | × reference | saved (× reference − 1) | CPU s | CPU × reference |\n" + "|---" * 6 + "|")
    for case in cases:
        seconds, reference = median(case, "seconds"), median(REFERENCE[case], "seconds")
        if seconds is None:
            print(f"| {NAMES[case]} | removed | – | – | – | – |")
            continue
        ratio = seconds / reference if reference else None
        cpu, cpu_reference = median(case, "cpu"), median(REFERENCE[case], "cpu")
        saved = "–" if case == REFERENCE[case] or ratio is None else f"{ratio - 1:.1%}"
        cpu_ratio = f"{cpu / cpu_reference:.3f}" if cpu_reference else "–"
        print(f"| {NAMES[case]} | {seconds:.2f} | {'–' if ratio is None else f'{ratio:.3f}'} | {saved} | {cpu:.2f} | "
              f"{cpu_ratio} |")
    print("\nwall seconds of each repeat: " + "; ".join(
        f"{case}: " + ", ".join("–" if r is None else f"{r['seconds']:.2f}" for r in runs)
        for case, runs in results.items()))


if __name__ == "__main__":
    main()
