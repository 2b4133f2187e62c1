#!/usr/bin/env python3
"""Label-free check behind `[model] members` (README, "Detection"): one network or an
ensemble of five below 20 inputs.

For every data set given (ODDS-style `.npz` tables, whose `y` is never read, or `.npy`
matrices) it contaminates the rows with 6 % synthetic anomalies exactly as
tools/architecture_check.py does (global, local and dependency kinds), trains darkwatch on
them with seeds 0, 1 and 2 (fit on all: the model sees the anomalies), replays the same rows
and reports, per configuration:

- the AUPRC of the injected rows against the untouched ones (mean over kinds and seeds);
- the seeds' agreement: the mean Spearman correlation between the scores of every pair of
  seeds over all rows. A ranking that changes with the seed is one a user cannot trust.

No label of the data set is read. About a minute for the three small ODDS tables.

Usage: tools/ensemble_check.py DARKWATCH_BINARY FILE...
Needs numpy, scipy and scikit-learn (pip), and a release build of darkwatch.
"""

import itertools
import os
import sys
import tempfile

import numpy as np
from scipy.stats import spearmanr
from sklearn.metrics import average_precision_score

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from architecture_check import KINDS, contaminate, load, train_and_score  # noqa: E402

SEEDS = [0, 1, 2]
CONFIGS = {"one network": 1, "5 members": 5}


def scores(binary, x, members, seed, work):
    config = f"[model]\nmembers = {members}\n[train]\nseed = {seed}\n"
    return train_and_score(binary, x, config, work)


def main():
    binary, files = sys.argv[1], sys.argv[2:]
    work = tempfile.mkdtemp(prefix="ensemble-check-")
    print(f"{'data':16s} {'configuration':12s} {'AUPRC':>7s} {'agreement':>10s}")
    means = {c: ([], []) for c in CONFIGS}
    for path in files:
        name = os.path.basename(path).split(".")[0]
        # One contamination for every seed and configuration, so the seeds differ only in
        # the model.
        x, kind = contaminate(load(path), np.random.default_rng(1000))
        for cfg, members in CONFIGS.items():
            runs = [scores(binary, x, members, seed, work) for seed in SEEDS]
            aps = []
            for s in runs:
                for k in range(len(KINDS)):
                    keep = (kind == -1) | (kind == k)
                    aps.append(average_precision_score(kind[keep] == k, s[keep]))
            agree = np.mean([spearmanr(a, b)[0] for a, b in itertools.combinations(runs, 2)])
            means[cfg][0].append(np.mean(aps))
            means[cfg][1].append(agree)
            print(f"{name:16s} {cfg:12s} {np.mean(aps):7.3f} {agree:10.3f}", flush=True)
    for cfg, (ap, agree) in means.items():
        print(f"{'mean':16s} {cfg:12s} {np.mean(ap):7.3f} {np.mean(agree):10.3f}")


if __name__ == "__main__":
    main()
