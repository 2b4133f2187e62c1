#!/usr/bin/env python3
"""Where the SMD AUPRC is lost: how many frames of each labelled segment stand out.

It READS THE TEST LABELS: an exploration record for the README ("Detection"), not a way
to choose a default.

For each SMD machine it trains a model with darkwatch's defaults (seed 0), replays the
test half with `--out`, and prints for every labelled anomaly segment its length, how many
of its frames score above the 99th percentile of the normal test frames (frames alone, and
the shipped 5-frame mean), and where the segment's median frame score falls among the
normal frames' scores. A segment whose frames mostly score like normal ones cannot be
ranked high frame by frame, whatever the detector: point-wise AUPRC then rewards only
scores that remember a fault for as long as its label lasts.

Usage: tools/smd_segments_check.py [SMD_DIR] [DARKWATCH_BINARY] [MACHINE...]   (about 30 s)
Needs numpy (pip) and a release build of darkwatch.
"""

import csv
import os
import subprocess
import sys
import tempfile

import numpy as np

MACHINES = ["machine-1-6", "machine-2-1", "machine-3-4"]


def replay_scores(binary, smd, machine, work):
    model = os.path.join(work, machine)
    subprocess.run(
        [binary, "train", "--input", os.path.join(smd, f"{machine}_train.npy"), "--out", model],
        check=True, capture_output=True,
        env=dict(os.environ, DARKWATCH__TRAIN__SEED="0"),
    )
    out = os.path.join(work, f"{machine}.csv")
    subprocess.run(
        [binary, "replay", "--model", model,
         "--input", os.path.join(smd, f"{machine}_test.npy"), "--out", out],
        check=True, capture_output=True,
    )
    rows = list(csv.DictReader(open(out)))
    return (np.array([float(r["frame_score"]) for r in rows]),
            np.array([float(r["score"]) for r in rows]))


def segments(y):
    d = np.diff(np.r_[0, y, 0])
    return list(zip(np.where(d == 1)[0], np.where(d == -1)[0]))


def main():
    args = sys.argv[1:]
    smd = args[0] if args else "../shared/data/smd"
    binary = args[1] if len(args) > 1 else "target/release/darkwatch"
    machines = args[2:] or MACHINES
    with tempfile.TemporaryDirectory() as work:
        for machine in machines:
            frame, mean5 = replay_scores(binary, smd, machine, work)
            y = np.loadtxt(os.path.join(smd, f"{machine}_test_label.txt")).astype(int)
            q_frame = np.quantile(frame[y == 0], 0.99)
            q_mean5 = np.quantile(mean5[y == 0], 0.99)
            normal = np.sort(frame[y == 0])
            print(f"{machine}: {y.sum()} anomalous frames of {len(y)}")
            print(f"  {'segment':>13} {'frames':>6} {'> q0.99 alone':>14} "
                  f"{'> q0.99 mean of 5':>18} {'median frame: percentile of normal':>35}")
            tot_frame = tot_mean5 = 0
            for a, b in segments(y):
                above_frame = int((frame[a:b] > q_frame).sum())
                above_mean5 = int((mean5[a:b] > q_mean5).sum())
                tot_frame += above_frame
                tot_mean5 += above_mean5
                pct = np.searchsorted(normal, np.median(frame[a:b])) / len(normal)
                print(f"  {a:>6}-{b - 1:<6} {b - a:>6} {above_frame:>14} {above_mean5:>18} "
                      f"{pct:>35.3f}")
            print(f"  all anomalous frames above the normal q0.99: {tot_frame} alone "
                  f"({tot_frame / y.sum():.0%}), {tot_mean5} as the mean of 5 "
                  f"({tot_mean5 / y.sum():.0%})")


if __name__ == "__main__":
    main()
