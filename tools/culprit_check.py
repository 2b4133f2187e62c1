#!/usr/bin/env python3
"""Which part of the wnll term should name an alert's culprits? A label-free check (README,
"Detection").

The `bounded` head's term for feature j is alpha*e^2/v' + beta*(ln v' - lo_j), with e the
reconstruction error in z-space, v' the predicted variance clamped to [e^lo_j, e^hi_j]. The
second part gives a feature weight merely because the network predicts more uncertainty for
it (say because another feature is off and the network couples them), with no error on it.
The culprit rankings compared, each the mean of its stream's last 5 frames as darkwatch's:

  (a) full term        alpha*e^2/v' + beta*(ln v' - lo)   (shipped)
  (b) error part       alpha*e^2/v'                       (the same clamped v')
  (c) error vs floor   e^2 / e^lo                         (the feature's floor variance only)
  (d) excess NLL       the full term minus its median over 2,400 training rows
  (b') scaled error    (b) times the frame's score over the sum of its (b) parts, so a
                       frame's contributions still sum to its score: each frame ranks its
                       features as (b) does, but the 5-frame mean weighs frames as the
                       score does. Added after the labelled run, when (b) turned out to
                       break that sum (which the pipeline's tests and the alert text use);
                       it must meet the same rule against (a) without labels.

For each SMD machine and seeds 0 and 1 it trains a PAE with darkwatch (default config),
re-scores it with the numpy head of tools/smd_variants_check.py (the model's stored median
and ceiling, floor 0.1; close to the shipped head, not bit for bit), and injects into the
test half 40 segments whose culprits are known, one per fortieth of the half so that none
overlap:

- shift: a level shift of 2-6 standard deviations (of the training half) on 1-3 random
  metrics that move, 10-49 frames;
- spike: a spike of 4-10 standard deviations on one such metric, one frame.

HitRate@100 and @150 (OmniAnomaly's, rounding down as the harness does) are then measured
on the injected frames against the injected metrics. No test label is read: the test half's
own incidents stay in it, unlabelled, for every variant alike.

Decision rule, written down before the first run: a variant replaces (a) only if its
label-free HitRate@150, averaged over the three machines, both kinds and both seeds, beats
(a)'s by at least 0.02, and is higher than (a)'s at each seed on its own. Otherwise (a)
stays.

With --labels it prints instead HitRate@100 and @150 against the real interpretation labels
(every frame of every labelled segment, no injection): read once, after the label-free
numbers and the decision.

Usage: tools/culprit_check.py [SMD_DIR] [DARKWATCH_BINARY] [--labels]   (about 2 minutes)
Needs numpy and scikit-learn (pip), and a release build of darkwatch.
"""

import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from smd_variants_check import head_parts, hit_rates, segments, smooth_rows, train  # noqa: E402

MACHINES = ["machine-1-6", "machine-2-1", "machine-3-4"]
SEEDS = [0, 1]
ALPHA, BETA = 0.5, 2.0
SLOTS = 40


def variants(tensors, meta, x, ref_rows):
    """Per-frame culprit vectors (n x d) of every variant, before smoothing."""
    z, mu, ln_v, lo = head_parts(tensors, meta, x)
    e2 = (z - mu) ** 2
    err = ALPHA * e2 / np.exp(ln_v)
    full = err + BETA * (ln_v - lo)
    zr, mur, ln_vr, _ = head_parts(tensors, meta, ref_rows)
    ref = ALPHA * (zr - mur) ** 2 / np.exp(ln_vr) + BETA * (ln_vr - lo)
    return {
        "(a) full term (shipped)": full,
        "(b) error part a*e^2/v'": err,
        "(c) error vs floor e^2/e^lo": e2 / np.exp(lo),
        "(d) full term - training median": full - np.median(ref, 0),
        "(b') error part scaled to the score": err * (full.sum(1) / err.sum(1))[:, None],
    }


def inject(test, sd, rng, kind):
    """A copy of `test` with SLOTS segments of `kind` and their (first, last, culprits)."""
    x = test.copy()
    moving = np.where(sd > 1e-6)[0]
    slot = len(x) // SLOTS
    segs = []
    for i in range(SLOTS):
        if kind == "shift":
            length, k, (a, b) = int(rng.integers(10, 50)), int(rng.integers(1, 4)), (2, 6)
        else:
            length, k, (a, b) = 1, 1, (4, 10)
        start = i * slot + int(rng.integers(5, slot - length))
        f = rng.choice(moving, k, replace=False)
        x[start : start + length, f] += rng.uniform(a, b, k) * sd[f] * rng.choice([-1, 1], k)
        segs.append((start, start + length - 1, [int(j) for j in f]))
    return x, segs


def report(res):
    cells = {}
    for name, per in res.items():
        print(f"\n{name}")
        for key, hr in per.items():
            print(f"  {key:28s} HitRate@100 {hr[0]:.3f}  @150 {hr[1]:.3f}")
        mean = np.mean(list(per.values()), 0)
        by_seed = {
            s: np.mean([v for k, v in per.items() if k.endswith(f"seed {s}")], 0) for s in SEEDS
        }
        cells[name] = (mean, by_seed)
    print("\nmean over machines (and kinds): HitRate@100 @150, then by seed")
    for name, (mean, by_seed) in cells.items():
        seeds = "  ".join(f"seed {s} {v[0]:.3f}/{v[1]:.3f}" for s, v in by_seed.items())
        print(f"  {name:34s} {mean[0]:.3f} {mean[1]:.3f}   {seeds}")


def main():
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__)
        return
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    labels = "--labels" in sys.argv
    smd = args[0] if len(args) > 0 else "../shared/data/smd"
    binary = args[1] if len(args) > 1 else "target/release/darkwatch"
    work = tempfile.mkdtemp(prefix="culprit-check-")
    res = {}
    for machine in MACHINES:
        train_rows = np.load(os.path.join(smd, f"{machine}_train.npy")).astype(np.float64)
        test = np.load(os.path.join(smd, f"{machine}_test.npy")).astype(np.float64)
        sd = train_rows.std(0)
        for seed in SEEDS:
            tensors, meta, _ = train(binary, smd, machine, seed, work, {})
            rng = np.random.default_rng(7 + seed)
            ref_rows = train_rows[rng.permutation(len(train_rows))[:2400]]
            if labels:
                cases = [("labels", test, segments(smd, machine))]
            else:
                cases = [(kind, *inject(test, sd, rng, kind)) for kind in ["shift", "spike"]]
            for kind, x, segs in cases:
                for name, c in variants(tensors, meta, x, ref_rows).items():
                    key = f"{machine} {kind} seed {seed}"
                    res.setdefault(name, {})[key] = hit_rates(smooth_rows(c), segs)
    report(res)


if __name__ == "__main__":
    main()
