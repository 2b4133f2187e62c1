#!/usr/bin/env python3
"""One-feature series cut from SMD, scored with and without a lag window (README, "Detection").

SMD has no univariate benchmark, so this builds twelve: for each machine, the four metrics
that the interpretation labels blame in the most segments (skipping metrics constant in
training). Each series is one metric's training half and test half; a test row is
anomalous when it lies in a segment that blames that metric. darkwatch trains on the
one-column training half with the default config (`[model] window_frames = 0`: the
series' autocorrelation period, 8 to 64 frames, each score averaged over 5 frames), with
`smooth_frames = 1` (each window scored alone) and with neither, replays the test half,
and the script prints point-wise AUROC and AUPRC for each, over the rows each scores (a
window of w frames leaves the first w - 1 test rows unscored). The window length comes
from the training series alone; the labels are only read to score.

Usage: tools/univariate_check.py [SMD_DIR] [DARKWATCH_BINARY]   (about a minute)
Needs numpy and scikit-learn (pip), and a release build of darkwatch.
"""

import csv
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

MACHINES = ["machine-1-6", "machine-2-1", "machine-3-4"]
CONFIGS = {
    "no window": "[model]\nwindow_frames = 1\n[score]\nsmooth_frames = 1\n",
    "window": "[score]\nsmooth_frames = 1\n",
    "window, smoothed (default)": "",
}


def series(smd):
    for m in MACHINES:
        train = np.load(os.path.join(smd, f"{m}_train.npy"))
        test = np.load(os.path.join(smd, f"{m}_test.npy"))
        blamed = {}
        with open(os.path.join(smd, "interpretation_label", f"{m}.txt")) as f:
            for line in f:
                seg, dims = line.strip().split(":")
                a, b = map(int, seg.split("-"))
                for d in dims.split(","):
                    blamed.setdefault(int(d) - 1, []).append((a - 1, b))
        for k in sorted(blamed, key=lambda k: -len(blamed[k]))[:4]:
            if train[:, k].std() < 1e-6:
                continue
            y = np.zeros(len(test))
            for a, b in blamed[k]:
                y[a:b] = 1
            yield f"{m} metric {k + 1}", train[:, k : k + 1], test[:, k : k + 1], y


def main():
    smd = sys.argv[1] if len(sys.argv) > 1 else "../shared/data/smd"
    binary = sys.argv[2] if len(sys.argv) > 2 else "target/release/darkwatch"
    work = tempfile.mkdtemp(prefix="univariate-check-")
    paths = {n: os.path.join(work, n) for n in ["train.npy", "test.npy", "c.toml", "m", "s.csv"]}
    results = {c: [] for c in CONFIGS}
    print(f"{'series':24s} {'rows':>6s} {'anomalous':>9s}   " + "   ".join(
        f"{c} (w): AUROC AUPRC" for c in CONFIGS))
    for name, train, test, y in series(smd):
        np.save(paths["train.npy"], train.astype(np.float32))
        np.save(paths["test.npy"], test.astype(np.float32))
        cells = []
        for c, text in CONFIGS.items():
            with open(paths["c.toml"], "w") as f:
                f.write(text)
            subprocess.run([binary, "train", "--force", "--config", paths["c.toml"], "--input",
                            paths["train.npy"], "--out", paths["m"]], check=True, capture_output=True)
            with open(os.path.join(paths["m"], "model.json")) as f:
                w = json.load(f).get("window_frames", 1)
            subprocess.run([binary, "replay", "--model", paths["m"], "--input", paths["test.npy"],
                            "--out", paths["s.csv"]], check=True, capture_output=True)
            # A windowed model scores the rows from its first full window on; `frame` is
            # the input row.
            with open(paths["s.csv"]) as f:
                rows = [(int(r["frame"]), float(r["score"])) for r in csv.DictReader(f)]
            frames = np.array([i for i, _ in rows])
            s = np.array([v for _, v in rows])
            results[c].append((roc_auc_score(y[frames], s), average_precision_score(y[frames], s)))
            cells.append(f"({w:2d}) {results[c][-1][0]:.3f} {results[c][-1][1]:.3f}")
        print(f"{name:24s} {len(y):6d} {y.mean():9.3f}   " + "   ".join(cells))
    for c in CONFIGS:
        auroc, auprc = np.mean(results[c], 0)
        print(f"mean, {c}: AUROC {auroc:.3f}, AUPRC {auprc:.3f}")


if __name__ == "__main__":
    main()
