#!/usr/bin/env python3
"""Development suite for the table defaults (README, "Detection": "Table defaults on
other data"): tables that are not the benchmark's, with real outliers.

It builds 14 tables from scikit-learn's bundled data sets (nothing is downloaded), each
with a down-sampled class as its outliers, the usual ADBench construction:

- digits0 … digits9 (1,797 8×8 images, 64 pixel features, many nearly always 0): the
  other nine digits are normal, 3 % outliers drawn from digit c;
- breast (30 dense features): benign normal, 5 % malignant;
- wine0 … wine2 (13 dense features): the other two cultivars normal, 5 % of cultivar c.

It then runs `darkwatch harness` (fit on all) on them with each configuration and seed and
prints the mean AUROC, beside scikit-learn's IsolationForest (mean of 3 seeds) on the same
rows. The benchmark's own tables (ODDS) and SMD are not read, so a default chosen here is
not chosen with their test labels. About 12 minutes for the four configurations × two
seeds on 2 cores.

Usage: tools/table_dev_check.py DARKWATCH_BINARY [--quick]
  --quick: the shipped configuration at seed 0 only (about 90 s).
Needs numpy and scikit-learn (pip), and a release build of darkwatch.
"""

import csv
import os
import subprocess
import sys
import tempfile

import numpy as np

USAGE = __doc__.split("Usage: ")[1]

# name -> environment that selects it (read by darkwatch's config layer).
CONFIGS = {
    "shipped (bounded, z-score)": {},
    "excess, z-score": {"DARKWATCH__SCORE__WNLL_LOG_VARIANCE": "excess"},
    "bounded, min_max": {"DARKWATCH__MODEL__SCALER": "min_max"},
    # Each column mapped through its own quantiles onto a normal distribution before
    # darkwatch sees it (scikit-learn's QuantileTransformer, fitted on all rows): what a
    # rank-based scaler inside darkwatch would do.
    "quantile-normal inputs": {"QUANTILE": "1"},
}
SEEDS = [0, 1]


def build_suite(out):
    from sklearn import datasets

    rng = np.random.default_rng(0)

    def one_class_out(x, t, cls, share):
        normal, rare = x[t != cls], x[t == cls]
        k = max(3, int(round(share * len(normal) / (1 - share))))
        rare = rare[rng.choice(len(rare), size=min(k, len(rare)), replace=False)]
        xa = np.vstack([normal, rare])
        ya = np.r_[np.zeros(len(normal)), np.ones(len(rare))]
        p = rng.permutation(len(xa))
        return xa[p], ya[p]

    def save(name, x, y):
        np.savez(os.path.join(out, name + ".npz"), X=x.astype(np.float64), y=y.astype(np.int64))

    d = datasets.load_digits()
    for c in range(10):
        save(f"digits{c}", *one_class_out(d.data, d.target, c, 0.03))
    b = datasets.load_breast_cancer()
    save("breast", *one_class_out(b.data, b.target, 0, 0.05))
    w = datasets.load_wine()
    for c in range(3):
        save(f"wine{c}", *one_class_out(w.data, w.target, c, 0.05))


def iforest(folder):
    from sklearn.ensemble import IsolationForest
    from sklearn.metrics import roc_auc_score

    out = {}
    for f in sorted(os.listdir(folder)):
        z = np.load(os.path.join(folder, f))
        x, y = z["X"], z["y"]
        out[f[:-4]] = np.mean(
            [roc_auc_score(y, -IsolationForest(random_state=s).fit(x).score_samples(x)) for s in range(3)]
        )
    return out


def quantile_normal(folder, work):
    from sklearn.preprocessing import QuantileTransformer

    out = os.path.join(work, "suite-quantile")
    os.makedirs(out, exist_ok=True)
    for f in os.listdir(folder):
        z = np.load(os.path.join(folder, f))
        qt = QuantileTransformer(output_distribution="normal", n_quantiles=min(1000, len(z["X"])))
        np.savez(os.path.join(out, f), X=qt.fit_transform(z["X"]), y=z["y"])
    return out


def harness(binary, folder, env, seed, work):
    out = os.path.join(work, "results.csv")
    if env.pop("QUANTILE", None):
        folder = quantile_normal(folder, work)
    e = dict(os.environ, DARKWATCH__TRAIN__SEED=str(seed), **env)
    subprocess.run([binary, "harness", "--out", out, folder], env=e, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(out) as f:
        return {r["entity"]: float(r["auroc"]) for r in csv.DictReader(f)}


def main():
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help"):
        print("Usage: " + USAGE)
        sys.exit(0 if args else 2)
    binary, quick = args[0], "--quick" in args[1:]
    work = tempfile.mkdtemp(prefix="table-dev-")
    folder = os.path.join(work, "suite")
    os.makedirs(folder)
    build_suite(folder)
    base = iforest(folder)
    names = sorted(base)
    dense = [n for n in names if not n.startswith("digits")]
    digits = [n for n in names if n.startswith("digits")]

    def means(r):
        return (f"mean AUROC {np.mean([r[n] for n in names]):.3f} "
                f"(dense tables {np.mean([r[n] for n in dense]):.3f}, "
                f"digits tables {np.mean([r[n] for n in digits]):.3f})")

    print(f"IsolationForest: {means(base)}")
    configs = {k: v for k, v in CONFIGS.items() if not quick or not v}
    for name, env in configs.items():
        for seed in SEEDS[:1] if quick else SEEDS:
            r = harness(binary, folder, dict(env), seed, work)
            per = " ".join(f"{n} {r[n]:.3f}" for n in names)
            print(f"{name:28s} seed {seed}: {means(r)}  {per}", flush=True)


if __name__ == "__main__":
    main()
