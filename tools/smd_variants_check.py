#!/usr/bin/env python3
"""Three ideas for the SMD gaps, measured against the test labels (README, "Detection").

None of them was adopted; this script reproduces the numbers the README gives for them.
It READS THE TEST LABELS: it is an exploration record, not a way to choose a default.

For each SMD machine and seeds 0 and 1 it trains a PAE with darkwatch (default config),
scores the test half with the numpy re-implementation of the `bounded` wnll head (the
model's stored median and ceiling, floor 0.1; close to the shipped head, not bit for bit),
each score and each contribution vector the mean of its last 5 frames, and prints the mean
point-wise AUPRC, best-F1 and HitRate@150 over the three machines for:

1. the score: the sum of the per-feature terms (shipped) against sums of the terms
   calibrated per feature on 2,400 training rows (t / q99, t / mean, (t - median) /
   (q99 - median)), the sum of their square roots, and the largest calibrated term;
2. the culprit ranking (HitRate@100 and @150; the score unchanged): the terms (shipped)
   against the terms measured against a per-feature baseline of the stream, an
   exponentially weighted mean of the terms (half-life 100, 500 or 2,000 frames) that
   either follows every frame or is frozen while the score is above the training
   scores' 99th percentile; and the plain squared reconstruction error, in z-space and
   in the data's own units (the labellers looked at the metrics as plotted);
3. training longer (`--long`, about 4 minutes more): epochs_max 1000 and patience 40
   against the defaults (200 and 10), with the validation loss each reached.

Usage: tools/smd_variants_check.py [SMD_DIR] [DARKWATCH_BINARY] [--long]   (about 1 minute)
Needs numpy and scikit-learn (pip), and a release build of darkwatch.
"""

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from robust_term_check import trailing_mean  # noqa: E402
from variance_floor_check import forward, load  # noqa: E402

MACHINES = ["machine-1-6", "machine-2-1", "machine-3-4"]
SEEDS = [0, 1]


def train(binary, smd, machine, seed, work, extra):
    out = os.path.join(work, f"{machine}-{seed}")
    env = dict(os.environ, DARKWATCH__TRAIN__SEED=str(seed), **extra)
    subprocess.run(
        [binary, "train", "--input", os.path.join(smd, f"{machine}_train.npy"), "--out", out],
        env=env, check=True, capture_output=True,
    )
    tensors, meta = load(out)
    p = meta["provenance"]
    print(f"  {machine} seed {seed} {extra or 'defaults'}: {p['epochs_run']} epochs "
          f"(best {p['best_epoch']}), validation loss {min(p['validation_losses']):.1f}",
          flush=True)
    return tensors, meta, min(p["validation_losses"])


def head_parts(tensors, meta, x):
    """The bounded wnll head's pieces (floor 0.1, z-scored spread 1): the scaled input z, the
    reconstruction mu, ln v clamped to [lo, hi], and lo, from the model's stored median and
    ceiling."""
    z, mu, v = forward(tensors, meta, x)
    d = z.shape[1]
    base = np.array(meta["log_variance_baseline"])
    lo = np.maximum(base[:d], np.log(0.1))
    hi = np.maximum(base[d : 2 * d], lo)
    return z, mu, np.clip(np.log(v), lo, hi), lo


def terms(tensors, meta, x):
    """The bounded wnll head's per-feature terms (alpha 0.5, beta 2, floor 0.1)."""
    z, mu, ln_v, lo = head_parts(tensors, meta, x)
    return 0.5 * (z - mu) ** 2 / np.exp(ln_v) + 2.0 * (ln_v - lo)


def smooth_rows(a, w=5):
    """trailing_mean for each column of `a`."""
    return np.stack([trailing_mean(a[:, j], w) for j in range(a.shape[1])], 1)


def best_f1(y, s):
    p, r, _ = precision_recall_curve(y, s)
    return (2 * p * r / np.maximum(p + r, 1e-12)).max()


def segments(smd, machine):
    """Interpretation labels as (first, last, culprits), 0-based and inclusive."""
    out = []
    for line in open(os.path.join(smd, "interpretation_label", f"{machine}.txt")):
        if line.strip():
            rows, dims = line.strip().split(":")
            first, last = map(int, rows.split("-"))
            out.append((first - 1, last - 1, [int(j) - 1 for j in dims.split(",")]))
    return out


def hit_rates(contrib, segs):
    """HitRate@100 and @150 over every frame of every labelled segment, as the harness: the
    top floor(P/100 * |culprits|) features (OmniAnomaly's / InterFusion's rounding; numbers
    in the README before it were computed with ceil)."""
    h100 = h150 = frames = 0
    for first, last, dims in segs:
        g = len(dims)
        for t in range(first, min(last + 1, len(contrib))):
            order = np.argsort(-contrib[t])
            h100 += len(set(order[:g]) & set(dims)) / g
            h150 += len(set(order[: (3 * g) // 2]) & set(dims)) / g
            frames += 1
    return h100 / frames, h150 / frames


def score_variants(t, ref):
    med, q99, mean = np.median(ref, 0), np.quantile(ref, 0.99, 0), ref.mean(0)
    return {
        "sum of terms (shipped)": t.sum(1),
        "sum of t / q99": (t / (q99 + 1e-6)).sum(1),
        "sum of t / mean": (t / (mean + 1e-6)).sum(1),
        "sum of (t - median) / (q99 - median)": ((t - med) / (q99 - med + 1e-6)).sum(1),
        "sum of sqrt(t)": np.sqrt(np.maximum(t, 0)).sum(1),
        "largest t / q99": (t / (q99 + 1e-6)).max(1),
    }


def stream_baseline(t, follow, half_life, start):
    """Per feature, an exponentially weighted mean of the terms before each frame, updated
    only on frames where `follow` is true."""
    a = 1 - 0.5 ** (1 / half_life)
    b, out = start.copy(), np.empty_like(t)
    for i in range(len(t)):
        out[i] = b
        if follow[i]:
            b = b + a * (t[i] - b)
    return out


def ranking_variants(t, ref, score):
    out = {"terms (shipped)": t}
    mean = ref.mean(0)
    # Follows only while the (5-frame) score is below the training rows' per-frame q0.99.
    below = score < np.quantile(ref.sum(1), 0.99)
    for hl in [100, 500, 2000]:
        for name, follow in [("follows every frame", np.ones(len(t), bool)), ("frozen", below)]:
            b = stream_baseline(t, follow, hl, mean)
            out[f"t / baseline, half-life {hl}, {name}"] = t / np.maximum(b, mean)
            out[f"t - baseline, half-life {hl}, {name}"] = t - b
    return out


def report(title, cells):
    print(f"\n{title}")
    for name, per in cells.items():
        m = {k: np.mean(v, 0) for k, v in per.items()}
        mean = np.mean(list(m.values()), 0)
        each = "  ".join(f"{k[-3:]} " + "/".join(f"{x:.3f}" for x in v) for k, v in m.items())
        print(f"  {name:44s} " + " ".join(f"{x:.3f}" for x in mean) + f"   {each}")


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    smd = args[0] if len(args) > 0 else "../shared/data/smd"
    binary = args[1] if len(args) > 1 else "target/release/darkwatch"
    configs = {"default (200 epochs, patience 10)": {}}
    if "--long" in sys.argv:
        configs["epochs_max 1000, patience 40"] = {
            "DARKWATCH__TRAIN__EPOCHS_MAX": "1000",
            "DARKWATCH__TRAIN__PATIENCE_EPOCHS": "40",
        }
    scores, rankings, training = {}, {}, {}
    for machine in MACHINES:
        train_rows = np.load(os.path.join(smd, f"{machine}_train.npy")).astype(np.float64)
        test = np.load(os.path.join(smd, f"{machine}_test.npy")).astype(np.float64)
        y = np.loadtxt(os.path.join(smd, f"{machine}_test_label.txt"))
        segs = segments(smd, machine)
        for seed in SEEDS:
            ref_rows = train_rows[np.random.default_rng(7 + seed).permutation(len(train_rows))[:2400]]
            for config, extra in configs.items():
                work = tempfile.mkdtemp(prefix="smd-variants-")
                tensors, meta, val = train(binary, smd, machine, seed, work, extra)
                t, ref = terms(tensors, meta, test), terms(tensors, meta, ref_rows)
                s = trailing_mean(t.sum(1))
                hr = hit_rates(smooth_rows(t), segs)
                cell = (average_precision_score(y, s), best_f1(y, s), hr[1], val)
                training.setdefault(config, {}).setdefault(machine, []).append(cell)
                if extra:
                    continue
                for name, v in score_variants(t, ref).items():
                    sv = trailing_mean(v)
                    scores.setdefault(name, {}).setdefault(machine, []).append(
                        (average_precision_score(y, sv), best_f1(y, sv))
                    )
                z, mu, _ = forward(tensors, meta, test)
                errors = {
                    "squared error in z-space (no variance)": (z - mu) ** 2,
                    "squared error in the data's units": ((z - mu) * np.array(meta["scaler"]["scale"])) ** 2,
                }
                for name, c in {**ranking_variants(t, ref, s), **errors}.items():
                    rankings.setdefault(name, {}).setdefault(machine, []).append(
                        hit_rates(smooth_rows(c), segs)
                    )
    print("mean over machines of the mean over seeds 0 and 1, then each machine")
    report("1. score: AUPRC best-F1", scores)
    report("2. culprit ranking: HitRate@100 @150", rankings)
    report("3. training: AUPRC best-F1 HitRate@150 validation-loss", training)


if __name__ == "__main__":
    main()
