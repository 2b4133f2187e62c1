#!/usr/bin/env python3
"""Label-free check of a heavy-tailed (Student-t) wnll term (README, "Detection").

The wnll head sums per-feature Gaussian terms alpha*(z - mu)^2/v, so one feature far off
(a drifted metric) can outweigh the rest. A Student-t likelihood with nu degrees of
freedom replaces the term by alpha*(nu + 1)*ln(1 + (z - mu)^2/(nu*v)), which tends to the
Gaussian one as nu grows and grows only logarithmically in the residual. This script
scores each SMD machine's test half with both, on PAEs trained by darkwatch (default
config, seeds 0 and 1), after injecting synthetic anomaly segments into that test half
(40 segments of 10-50 frames: a level shift of 2-6 standard deviations on 3 random
metrics, or of 4-10 on one), and prints the AUPRC of the injected frames against all
others, each score the mean of 5 frames as darkwatch's default. No test label is read
(the test half's own anomalies count as negatives for every variant alike).

The head is the numpy re-implementation of tools/variance_floor_check.py (bounded, floor
0.1; median and ceiling from 2,000 training rows): close to the shipped head, not bit for
bit.

Usage: tools/robust_term_check.py [SMD_DIR] [DARKWATCH_BINARY]   (about 30 s)
Needs numpy and scikit-learn (pip), and a release build of darkwatch.
"""

import os
import subprocess
import sys
import tempfile

import numpy as np
from sklearn.metrics import average_precision_score

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from variance_floor_check import forward, load  # noqa: E402

MACHINES = ["machine-1-6", "machine-2-1", "machine-3-4"]
NUS = [None, 16, 4, 1]  # None: the Gaussian term darkwatch uses


def terms(z, mu, v, lo, hi, nu, alpha=0.5, beta=2.0):
    ln_v = np.clip(np.log(v), lo, np.maximum(hi, lo))
    r2 = (z - mu) ** 2 / np.exp(ln_v)
    q = r2 if nu is None else (nu + 1) * np.log1p(r2 / nu)
    return alpha * q + beta * (ln_v - lo)


def trailing_mean(s, w=5):
    c = np.concatenate([[0.0], np.cumsum(s)])
    i = np.arange(len(s))
    j = np.maximum(i - w + 1, 0)
    return (c[i + 1] - c[j]) / (i + 1 - j)


def main():
    smd = sys.argv[1] if len(sys.argv) > 1 else "../shared/data/smd"
    binary = sys.argv[2] if len(sys.argv) > 2 else "target/release/darkwatch"
    work = tempfile.mkdtemp(prefix="robust-term-check-")
    res = {}
    for machine in MACHINES:
        train = np.load(os.path.join(smd, f"{machine}_train.npy")).astype(np.float64)
        test = np.load(os.path.join(smd, f"{machine}_test.npy")).astype(np.float64)
        for seed in [0, 1]:
            out = os.path.join(work, f"{machine}-{seed}")
            env = dict(os.environ, DARKWATCH__TRAIN__SEED=str(seed))
            subprocess.run(
                [binary, "train", "--input", os.path.join(smd, f"{machine}_train.npy"), "--out", out],
                env=env, check=True, capture_output=True,
            )
            tensors, meta = load(out)
            rng = np.random.default_rng(100 + seed)
            order = rng.permutation(len(train))
            _, _, v_cal = forward(tensors, meta, train[order[:2000]])
            lo = np.maximum(np.median(np.log(v_cal), 0), np.log(0.1))
            hi = np.log(v_cal).max(0)
            sd = train.std(0)
            moving = np.where(sd > 1e-6)[0]
            for kind in ["shift 3 metrics", "shift 1 metric"]:
                x = test.copy()
                y = np.zeros(len(x))
                for start in rng.choice(len(x) - 60, 40, replace=False):
                    length = rng.integers(10, 50)
                    k = 3 if kind == "shift 3 metrics" else 1
                    f = rng.choice(moving, k, replace=False)
                    size = rng.uniform(2, 6) if k == 3 else rng.uniform(4, 10)
                    x[start : start + length, f] += size * sd[f] * rng.choice([-1, 1], k)
                    y[start : start + length] = 1
                z, mu, v = forward(tensors, meta, x)
                for nu in NUS:
                    s = trailing_mean(terms(z, mu, v, lo, hi, nu).sum(1))
                    key = f"{machine} {kind}"
                    res.setdefault(nu, {}).setdefault(key, []).append(average_precision_score(y, s))
    for nu, cells in res.items():
        name = "Gaussian" if nu is None else f"Student-t nu={nu}"
        line = "  ".join(f"{k} {np.mean(v):.3f}" for k, v in cells.items())
        print(f"{name:18s} mean {np.mean([np.mean(v) for v in cells.values()]):.3f}   {line}")


if __name__ == "__main__":
    main()
