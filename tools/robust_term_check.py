#!/usr/bin/env python3
"""Label-free checks of two robust variants of the wnll score (README, "Detection").

The wnll head sums per-feature Gaussian terms alpha*(z - mu)^2/v, so one feature far off
(a drifted metric) can outweigh the rest. A Student-t likelihood with nu degrees of
freedom replaces the term by alpha*(nu + 1)*ln(1 + (z - mu)^2/(nu*v)), which tends to the
Gaussian one as nu grows and grows only logarithmically in the residual. This script
scores each SMD machine's test half with both, on PAEs trained by darkwatch (default
config, seeds 0 and 1), after injecting synthetic anomaly segments into that test half
(40 segments of 10-49 frames: a level shift of 2-6 standard deviations on 3 random
metrics, or of 4-10 on one), and prints the AUPRC of the injected frames against all
others, each score the mean of 5 frames as darkwatch's default. No test label is read
(the test half's own anomalies count as negatives for every variant alike).

The second variant keeps the Gaussian terms but damps drift: each feature's term is
multiplied by m_j / max(r_j, m_j), where m_j is the feature's median term on training
rows and r_j its median term over the stream's last W frames (W = 500 or 2000), so a
feature whose typical term has grown counts that much less.

With --labels it prints instead the point-wise AUPRC of every variant against the real
test labels (no injection): the labels were read once, after the label-free numbers.

The head is the numpy re-implementation of tools/variance_floor_check.py (bounded, floor
0.1; median and ceiling from 2,000 training rows): close to the shipped head, not bit for
bit.

Usage: tools/robust_term_check.py [SMD_DIR] [DARKWATCH_BINARY] [--labels]   (about 40 s)
Needs numpy and scikit-learn (pip), and a release build of darkwatch.
"""

import os
import sys
import tempfile

import numpy as np
from sklearn.metrics import average_precision_score

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from variance_floor_check import forward  # noqa: E402
from variance_floor_check import train as train_model  # noqa: E402

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


def rolling_median(t, window, step=25):
    """Per feature, the median of the previous `window` rows (refreshed every `step` rows;
    NaN until 50 rows are in)."""
    out = np.full_like(t, np.nan)
    last = None
    for i in range(len(t)):
        if i % step == 0:
            lo = max(0, i - window)
            last = np.median(t[lo:i], 0) if i - lo >= 50 else None
        if last is not None:
            out[i] = last
    return out


def variants(z, mu, v, lo, hi, ref):
    """Frame scores of every variant: the Student-t terms, then the drift-damped ones."""
    out = {}
    for nu in NUS:
        out["Gaussian" if nu is None else f"Student-t nu={nu}"] = terms(z, mu, v, lo, hi, nu).sum(1)
    t = terms(z, mu, v, lo, hi, None)
    for window in [500, 2000]:
        recent = rolling_median(t, window)
        recent = np.where(np.isnan(recent), ref, recent)
        out[f"drift-damped W={window}"] = (t * ref / np.maximum(recent, ref)).sum(1)
    return out


def main():
    args = [a for a in sys.argv[1:] if a != "--labels"]
    labels = "--labels" in sys.argv
    smd = args[0] if len(args) > 0 else "../shared/data/smd"
    binary = args[1] if len(args) > 1 else "target/release/darkwatch"
    work = tempfile.mkdtemp(prefix="robust-term-check-")
    res = {}
    for machine in MACHINES:
        train = np.load(os.path.join(smd, f"{machine}_train.npy")).astype(np.float64)
        test = np.load(os.path.join(smd, f"{machine}_test.npy")).astype(np.float64)
        for seed in [0, 1]:
            tensors, meta = train_model(binary, smd, machine, seed, work)
            rng = np.random.default_rng(100 + seed)
            order = rng.permutation(len(train))
            _, _, v_cal = forward(tensors, meta, train[order[:2000]])
            lo = np.maximum(np.median(np.log(v_cal), 0), np.log(0.1))
            hi = np.log(v_cal).max(0)
            z_ref, mu_ref, v_ref = forward(tensors, meta, train[order[2000:6000]])
            ref = np.median(terms(z_ref, mu_ref, v_ref, lo, hi, None), 0) + 1e-6
            if labels:
                y = np.loadtxt(os.path.join(smd, f"{machine}_test_label.txt"))
                for name, s in variants(*forward(tensors, meta, test), lo, hi, ref).items():
                    res.setdefault(name, {}).setdefault(machine, []).append(
                        average_precision_score(y, trailing_mean(s))
                    )
                continue
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
                for name, s in variants(*forward(tensors, meta, x), lo, hi, ref).items():
                    res.setdefault(name, {}).setdefault(f"{machine} {kind}", []).append(
                        average_precision_score(y, trailing_mean(s))
                    )
    for name, cells in res.items():
        line = "  ".join(f"{k} {np.mean(v):.3f}" for k, v in cells.items())
        print(f"{name:20s} mean {np.mean([np.mean(v) for v in cells.values()]):.3f}   {line}")


if __name__ == "__main__":
    main()
