"""Kill -9 and resume, over and over: does an interrupted `stopsign train` always end as an uninterrupted one?

Trains the tests' tiny backbone (30 epochs over 40 generated images) in a subprocess, SIGKILLs it after a
seeded random point (in start-up, within any epoch and its writes, or while the report is written), resumes,
and repeats; then resumes once more to the end and compares with an uninterrupted run. Once the run has
finished (summary.json written before a kill landed), every further resume must be refused and leave each file
as it was. After every kill each file in the run folder must be whole (JSON parses, checkpoints load with
weights_only=True, metrics.csv lists each finished epoch once); at the end no temporary file may be left and
metrics.csv (but `seconds`) and best.pt must equal the uninterrupted run's. tests/test_faults.py runs the same
loop for 5 cycles.

    .venv/bin/python bench/kill_resume.py --cycles 20 --seed 0
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))

from conftest import TinyNet, write_images  # noqa: E402
from test_faults import assert_same_outcome, kill_and_resume, reference_run, write_launcher  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--epoch-delay", type=float, default=0.1, help="seconds added to each epoch")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        torch.manual_seed(0)
        weights = folder / "tiny.pt"
        torch.save(TinyNet().state_dict(), weights)
        data = write_images(folder / "data", {"stop": 20, "not_stop": 20}, layout="folders")
        launcher, out = write_launcher(folder), folder / "runs"
        began = time.monotonic()
        reference = reference_run(launcher, weights, data, out, args.epochs, args.epoch_delay)
        print(f"uninterrupted run: first epoch after {reference['first_epoch_s']:.1f} s, then "
              f"{reference['epoch_s']:.2f} s an epoch, report {reference['report_s']:.1f} s, "
              f"{reference['total_s']:.1f} s in all")
        log = kill_and_resume(launcher, weights, data, out, cycles=args.cycles, seed=args.seed, epochs=args.epochs,
                              timing=reference, epoch_delay=args.epoch_delay)
        print(f"{'cycle':>5}  {'action':<6}  {'kill at (phase, after epoch, + seconds)':<40}  {'ended':<7}  "
              "epochs before → after")
        for row in log:
            print(f"{row['cycle']:>5}  {row['action']:<6}  {row['kill']:<40}  {row['ended']:<7}  "
                  f"{row['epochs_before']:>6} → {row['epochs_after']}")
        try:
            assert_same_outcome(out / "loop", reference["run_dir"])
        except AssertionError:
            import shutil
            shutil.copytree(out, Path(tempfile.gettempdir()) / "kill_resume_failed", dirs_exist_ok=True)
            raise
        killed = sum(row["ended"] == "killed" for row in log)
        refused = sum(row["ended"] == "refused" for row in log)
        print(f"{killed} of {args.cycles} cycles killed, {refused} resumes of the finished run refused; every file "
              "whole after each; the final run folder holds no temporary file and equals the uninterrupted run "
              f"({time.monotonic() - began:.0f} s in all)")


if __name__ == "__main__":
    main()
