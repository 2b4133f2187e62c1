#!/usr/bin/env python3
"""Label-free check behind the default hidden layer widths (README, "Detection").

For every data set given (ODDS-style `.npz` tables, whose `y` is never read, and SMD
`<machine>_train.npy` training halves) and seeds 0 and 1, it replaces 6 % of the rows with
synthetic anomalies of three kinds (ADBench's taxonomy, Han et al. 2022, §4.3), a third of
them each:

- global: every feature drawn uniformly from its range widened by 10 % on both sides;
- local: 1-3 features of a real row moved by 3-6 standard deviations;
- dependency: every feature taken from a different random row, so the marginals are kept
  and the dependence between features is broken.

It then trains darkwatch on the contaminated rows (the fit-on-all protocol: the model sees
the anomalies, as it would in an unlabelled stream), replays the same rows and measures, per
kind, the AUPRC of the injected rows against the untouched ones. No label of the data set
is read. Each candidate width rule is written into a config file's `hidden_sizes`.

Usage: tools/architecture_check.py DARKWATCH_BINARY FILE...
Needs numpy and scikit-learn (pip), and a release build of darkwatch.
"""

import csv
import os
import subprocess
import sys
import tempfile

import numpy as np
from sklearn.metrics import average_precision_score

SEEDS = [0, 1]
SHARE = 0.06
KINDS = ["global", "local", "dependency"]


def rule(d):
    """The MSS-PAE widths (papers.md §1.1), as darkwatch had them."""
    h = lambda div: max(1, round(d / div))
    if d < 20:
        return [h(2)]
    if d < 100:
        return [h(2), h(4), h(2)]
    return [h(2), h(4), h(8), h(4), h(2)]


CANDIDATES = {
    "MSS-PAE rule": rule,
    "d<20: [16]": lambda d: [16] if d < 20 else rule(d),
    "rule, widths >= 16": lambda d: [max(w, 16) for w in rule(d)],
    "[64, 32, 64]": lambda d: [64, 32, 64],
}


def load(path):
    if path.endswith(".npz"):
        return np.load(path)["X"].astype(np.float64)
    return np.load(path).astype(np.float64)


def contaminate(x, rng):
    x = x.copy()
    n, d = x.shape
    lo, hi = x.min(0), x.max(0)
    span = hi - lo
    sd = x.std(0)
    moving = np.where(sd > 1e-9)[0]
    rows = rng.choice(n, int(n * SHARE), replace=False)
    kind = np.full(n, -1)
    for j, i in enumerate(rows):
        k = j % 3
        kind[i] = k
        if k == 0:
            x[i] = rng.uniform(lo - 0.1 * span, hi + 0.1 * span)
        elif k == 1:
            f = rng.choice(moving, min(len(moving), rng.integers(1, 4)), replace=False)
            x[i, f] += rng.uniform(3, 6, len(f)) * sd[f] * rng.choice([-1, 1], len(f))
        else:
            x[i] = x[rng.integers(0, n, d), np.arange(d)]
    return x, kind


def run(binary, x, widths, seed, work):
    return train_and_score(binary, x, f"[model]\nhidden_sizes = {widths}\n[train]\nseed = {seed}\n", work)


def train_and_score(binary, x, config, work):
    """Trains darkwatch on the rows of `x` with the TOML `config` (rows scored alone: a
    table's rows have no order) and returns its scores of the same rows."""
    data = os.path.join(work, "data.npy")
    np.save(data, x.astype(np.float32))
    cfg = os.path.join(work, "config.toml")
    with open(cfg, "w") as f:
        f.write(config + "[score]\nsmooth_frames = 1\n")
    model = os.path.join(work, "model")
    out = os.path.join(work, "scores.csv")
    for args in (
        ["train", "--force", "--config", cfg, "--input", data, "--out", model],
        ["replay", "--model", model, "--input", data, "--out", out],
    ):
        subprocess.run([binary, *args], check=True, capture_output=True)
    with open(out) as f:
        return np.array([float(r["score"]) for r in csv.DictReader(f)])


def main():
    binary, files = sys.argv[1], sys.argv[2:]
    work = tempfile.mkdtemp(prefix="architecture-check-")
    table = {}
    for path in files:
        name = os.path.basename(path).split(".")[0].replace("_train", "")
        clean = load(path)
        for seed in SEEDS:
            x, kind = contaminate(clean, np.random.default_rng(1000 + seed))
            for cand, widths in CANDIDATES.items():
                s = run(binary, x, widths(x.shape[1]), seed, work)
                for k, label in enumerate(KINDS):
                    keep = (kind == -1) | (kind == k)
                    ap = average_precision_score(kind[keep] == k, s[keep])
                    table.setdefault((cand, name), {}).setdefault(label, []).append(ap)
                print(f"{name} seed {seed} {cand}: done", file=sys.stderr)
    names = list(dict.fromkeys(n for _, n in table))
    print(f"{'candidate':20s} {'data':16s} " + " ".join(f"{k:>10s}" for k in KINDS) + "       mean")
    for cand in CANDIDATES:
        means = []
        for name in names:
            row = [np.mean(table[(cand, name)][k]) for k in KINDS]
            means.append(np.mean(row))
            print(f"{cand:20s} {name:16s} " + " ".join(f"{v:10.3f}" for v in row) + f" {means[-1]:10.3f}")
        print(f"{cand:20s} {'mean':16s} " + " " * 33 + f" {np.mean(means):10.3f}")


if __name__ == "__main__":
    main()
