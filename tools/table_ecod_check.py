#!/usr/bin/env python3
"""Would tables score better as darkwatch's PAE score combined with ECOD's? (README,
"Detection": "The tabular sets".) Checked on the 14 development tables of
`tools/table_dev_check.py` (scikit-learn's bundled data, a down-sampled class as the
outliers), never on the benchmark's ODDS tables or SMD.

ECOD (Li et al., TKDE 2022) scores a row by how far out in its columns' empirical tails it
lies: per column the left- and right-tail ECDFs, summed as −log over columns, three ways
(left, right, each column's tail on the side of its skew), the score the largest. It has
no parameter, it is what the benchmark's peers found strongest on two of the five tables,
and it sees what a fit-on-all autoencoder can learn to reconstruct: a row that is rare in
its columns. The combination is the mean of the two scores' ranks (each rank divided by
the row count), the simplest fusion with no scale to choose; a product would map each
score through its empirical distribution on training rows instead, which for fit-on-all
is the same thing.

The rule, written here before the first run: the combination replaces the shipped table
score if its mean AUROC over the 14 tables is at least 0.02 above the shipped score's at
both seeds (0 and 1). ECOD alone is printed beside them for reference, not as a
candidate (it has no streaming story for time series).

Usage: tools/table_ecod_check.py DARKWATCH_BINARY
Needs numpy and scikit-learn (pip), and a release build of darkwatch. About a minute.
"""

import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from table_dev_check import build_suite  # noqa: E402

USAGE = __doc__.split("Usage: ")[1]
SEEDS = [0, 1]


def ecod(x):
    """ECOD's outlier score of every row of x, fitted on x (fit on all)."""
    n = len(x)
    s = np.sort(x, axis=0)
    # ECDFs: share of rows <= v (left) and >= v (right), column by column.
    left = np.stack([np.searchsorted(s[:, j], x[:, j], side="right") for j in range(x.shape[1])], 1) / n
    right = np.stack([n - np.searchsorted(s[:, j], x[:, j], side="left") for j in range(x.shape[1])], 1) / n
    ul, ur = -np.log(left), -np.log(right)
    mu, sd = x.mean(0), x.std(0)
    skew = np.where(sd > 0, ((x - mu) ** 3).mean(0) / np.where(sd > 0, sd, 1) ** 3, 0.0)
    auto = np.where(skew < 0, ul, ur)
    return np.maximum.reduce([ul.sum(1), ur.sum(1), auto.sum(1)])


def ranks(v):
    """Ranks in (0, 1], ties sharing their mean rank."""
    from scipy.stats import rankdata

    return rankdata(v) / len(v)


def darkwatch_scores(binary, x, seed, work):
    """darkwatch's score of every row (train --table on all rows, replay --table)."""
    inp, model, out = (os.path.join(work, n) for n in ("x.npy", "model", "scores.csv"))
    np.save(inp, x.astype(np.float64))
    env = dict(os.environ, DARKWATCH__TRAIN__SEED=str(seed))
    run = dict(env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run([binary, "train", "--table", "--force", "--input", inp, "--out", model], **run)
    subprocess.run([binary, "replay", "--table", "--model", model, "--input", inp, "--out", out], **run)
    with open(out) as f:
        header = f.readline().strip().split(",")
        col = header.index("score")
        return np.array([float(line.split(",")[col]) for line in f])


def main():
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help"):
        print("Usage: " + USAGE)
        sys.exit(0 if args else 2)
    from sklearn.metrics import roc_auc_score

    binary = args[0]
    work = tempfile.mkdtemp(prefix="table-ecod-")
    folder = os.path.join(work, "suite")
    os.makedirs(folder)
    build_suite(folder)
    names = sorted(f[:-4] for f in os.listdir(folder))
    for seed in SEEDS:
        rows = {"shipped": [], "shipped + ECOD ranks": [], "ECOD alone": []}
        for name in names:
            z = np.load(os.path.join(folder, name + ".npz"))
            x, y = z["X"], z["y"]
            pae, e = darkwatch_scores(binary, x, seed, work), ecod(x)
            rows["shipped"].append(roc_auc_score(y, pae))
            rows["shipped + ECOD ranks"].append(roc_auc_score(y, ranks(pae) + ranks(e)))
            rows["ECOD alone"].append(roc_auc_score(y, e))
        for k, v in rows.items():
            per = " ".join(f"{n} {a:.3f}" for n, a in zip(names, v))
            print(f"seed {seed} {k:22s} mean AUROC {np.mean(v):.3f}  {per}", flush=True)


if __name__ == "__main__":
    main()
