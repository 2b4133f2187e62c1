#!/usr/bin/env python3
"""Label-free check behind the `bounded` wnll head's default floor (README, "Detection").

For each SMD machine's training half and seeds 0, 1, 2, it trains a PAE with darkwatch
(`darkwatch train`, default config), re-implements the forward pass and the wnll head in
numpy, and scores every candidate floor (a share of each feature's spread) two ways,
neither of which reads a test label:

- synthetic anomalies injected into rows of the training half: a level shift of 2-6
  standard deviations on 3 random metrics, or a spike of 4-10 on one (AUPRC, 10 % injected);
- seed agreement: the mean Spearman correlation between the three seeds' scores of the
  unlabelled test half (a head whose ranking depends on the seed will not generalise).

The head's median and ceiling come from 2,000 rows of the training half, in-sample for the
network (darkwatch takes them from its held-out validation rows), and the spread is 1 (as
under z-scoring): close to the shipped head, not bit for bit.

Usage: tools/variance_floor_check.py [SMD_DIR] [DARKWATCH_BINARY]
Needs numpy, scipy and scikit-learn (pip), and a release build of darkwatch.
"""

import json
import os
import struct
import subprocess
import sys
import tempfile

import numpy as np
from scipy.stats import spearmanr
from sklearn.metrics import average_precision_score

EPS = 1e-5
FLOORS = [0.01, 0.03, 0.1, 0.3, 1.0]
MACHINES = ["machine-1-6", "machine-2-1", "machine-3-4"]
SEEDS = [0, 1, 2]


def load(model_dir):
    raw = open(os.path.join(model_dir, "model.safetensors"), "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    tensors = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        start, end = spec["data_offsets"]
        tensors[name] = np.frombuffer(
            raw[8 + n + start : 8 + n + end], dtype=np.float32
        ).reshape(spec["shape"])
    meta = json.load(open(os.path.join(model_dir, "model.json")))
    return tensors, meta


def train(binary, smd, machine, seed, work):
    """Trains a PAE on `machine`'s training half with darkwatch (default config, `seed`)
    into `work` and loads it."""
    out = os.path.join(work, f"{machine}-{seed}")
    env = dict(os.environ, DARKWATCH__TRAIN__SEED=str(seed))
    subprocess.run(
        [binary, "train", "--input", os.path.join(smd, f"{machine}_train.npy"), "--out", out],
        env=env, check=True, capture_output=True,
    )
    return load(out)


def forward(tensors, meta, x):
    scaler = meta["scaler"]
    z = (x - np.array(scaler["offset"])) / np.array(scaler["scale"])
    h = z
    layers = len(meta["architecture"]["layer_widths"]) - 1
    for i in range(layers):
        h = h @ tensors[f"layers.{i}.weight"].T.astype(np.float64) + tensors[f"layers.{i}.bias"]
        if i < layers - 1:
            h = np.maximum(h, 0)
    d = z.shape[1]
    return z, h[:, :d], np.logaddexp(0, h[:, d:]) + EPS


def scores(z, mu, v, lo, hi, alpha=0.5, beta=2.0):
    """The wnll head with ln v clamped to [lo, hi] and the log term counted above lo."""
    ln_v = np.clip(np.log(v), lo, np.maximum(hi, lo))
    return (alpha * (z - mu) ** 2 / np.exp(ln_v) + beta * (ln_v - lo)).sum(1)


def heads(z, mu, v, median, ceiling, ln_spread):
    ln_v = np.minimum(np.log(v), ceiling)
    out = {}
    out["excess"] = (0.5 * (z - mu) ** 2 / np.exp(ln_v) + 2 * np.maximum(ln_v - median, 0)).sum(1)
    for f in FLOORS:
        out[f"bounded {f}"] = scores(z, mu, v, np.maximum(median, ln_spread + np.log(f)), ceiling)
    return out


def main():
    smd = sys.argv[1] if len(sys.argv) > 1 else "../shared/data/smd"
    binary = sys.argv[2] if len(sys.argv) > 2 else "target/release/darkwatch"
    work = tempfile.mkdtemp(prefix="floor-check-")
    synthetic, agreement = {}, {}
    for machine in MACHINES:
        rows = np.load(os.path.join(smd, f"{machine}_train.npy")).astype(np.float64)
        test = np.load(os.path.join(smd, f"{machine}_test.npy")).astype(np.float64)
        per_seed = {}
        for seed in SEEDS:
            tensors, meta = train(binary, smd, machine, seed, work)
            rng = np.random.default_rng(100 + seed)
            order = rng.permutation(len(rows))
            _, _, v_cal = forward(tensors, meta, rows[order[:2000]])
            median, ceiling = np.median(np.log(v_cal), 0), np.log(v_cal).max(0)
            ln_spread = np.zeros(rows.shape[1])  # z-scoring: every spread is 1
            sd = rows.std(0)
            moving = np.where(sd > 1e-6)[0]
            for kind in ["shift 3 metrics", "spike 1 metric"]:
                x = rows[order[2000:6000]].copy()
                y = np.zeros(len(x))
                hit = rng.choice(len(x), len(x) // 10, replace=False)
                y[hit] = 1
                for i in hit:
                    k = 3 if kind.startswith("shift") else 1
                    lo, hi = (2, 6) if k == 3 else (4, 10)
                    f = rng.choice(moving, k, replace=False)
                    x[i, f] += rng.uniform(lo, hi) * sd[f] * rng.choice([-1, 1], k)
                for name, s in heads(*forward(tensors, meta, x), median, ceiling, ln_spread).items():
                    synthetic.setdefault(name, {}).setdefault(kind, []).append(
                        average_precision_score(y, s)
                    )
            for name, s in heads(*forward(tensors, meta, test), median, ceiling, ln_spread).items():
                per_seed.setdefault(name, []).append(s)
        for name, runs in per_seed.items():
            rho = np.mean([spearmanr(runs[a], runs[b])[0] for a, b in [(0, 1), (0, 2), (1, 2)]])
            agreement.setdefault(name, []).append(rho)
    print(f"{'head':14s} {'shift AUPRC':>12s} {'spike AUPRC':>12s}   seed agreement (1-6, 2-1, 3-4)")
    for name in synthetic:
        shift = np.mean(synthetic[name]["shift 3 metrics"])
        spike = np.mean(synthetic[name]["spike 1 metric"])
        rho = " ".join(f"{r:.3f}" for r in agreement[name])
        print(f"{name:14s} {shift:12.3f} {spike:12.3f}   {rho}")


if __name__ == "__main__":
    main()
