#!/usr/bin/env python3
"""Rebuild tests/data/smd/ from the SMD copy in the shared data folder (stdlib only).

Usage: python3 tests/data/smd/make_slices.py SOURCE_DIR
SOURCE_DIR is a copy of the SMD data (the project's shared data folder, smd/). The script:
  1. copies machine-1-6 train/test arrays, test labels, interpretation labels and both
     licence files unchanged (verifying the source SHA-256s below);
  2. writes small.csv / small_labels.txt: test rows WINDOW_START .. WINDOW_START+1999
     (0-based), a leading `timestamp` column (epoch seconds from 1_700_000_000, 60 s
     steps) and features m01..m38, each value the shortest decimal that parses back to
     the exact float32 in the .npy;
  3. rewrites README.md with the shapes and the SHA-256 of every file.
"""

import hashlib
import os
import shutil
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if len(sys.argv) != 2:
    sys.exit("usage: make_slices.py SOURCE_DIR  (a folder with the SMD machine-1-6 files)")
SOURCE = sys.argv[1]

# (source path relative to SOURCE, name here, sha256 from the shared MANIFEST.sha256)
COPIES = [
    ("machine-1-6_train.npy", "machine-1-6_train.npy",
     "56d079b77dd6155cc8bc18cfb3a23c1c3ae3cfbddc204978a2faa5b5402c8f34"),
    ("machine-1-6_test.npy", "machine-1-6_test.npy",
     "6c3c6cefb6d5c3985b48ddee542beb2d28947581555ef38c46464499570f2faa"),
    ("machine-1-6_test_label.txt", "machine-1-6_test_label.txt",
     "8359ffa67b5421b0b9967ccf396a58c7b3bf52fa24c3f95e6b9df6486f1d6365"),
    ("interpretation_label/machine-1-6.txt", "machine-1-6_interpretation_label.txt",
     "2cc68339b99fbf9ec0891c2a081c2d05ee04087a766d6200572fc74e99867f8f"),
    ("LICENSE_SMD.txt", "LICENSE_SMD.txt", None),
    ("LICENSE_InterFusion_repo.txt", "LICENSE_InterFusion_repo.txt", None),
]

WINDOW_START = 4000  # 0-based test row; the window holds four labelled segments
WINDOW_ROWS = 2000
T0 = 1_700_000_000
STEP = 60


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            h.update(chunk)
    return h.hexdigest()


def read_npy_f4(path):
    """Return (rows, cols, flat list of floats) for a C-order '<f4' 2-D .npy."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:6] == b"\x93NUMPY", "not an npy file"
    major = data[6]
    if major == 1:
        (hlen,) = struct.unpack_from("<H", data, 8)
        start = 10
    else:
        (hlen,) = struct.unpack_from("<I", data, 8)
        start = 12
    header = data[start:start + hlen].decode("latin1")
    assert "'descr': '<f4'" in header and "'fortran_order': False" in header, header
    shape = header.split("'shape': (")[1].split(")")[0]
    rows, cols = (int(x) for x in shape.split(",") if x.strip())
    body = data[start + hlen:]
    assert len(body) == rows * cols * 4, "size mismatch"
    return rows, cols, struct.unpack("<%df" % (rows * cols), body)


def shortest_f32(x):
    """Shortest %g string that parses back to the same float32."""
    want = struct.pack("<f", x)
    for p in range(1, 10):
        s = "%.*g" % (p, x)
        if struct.pack("<f", float(s)) == want:
            return s
    return repr(x)


def main():
    for src, dst, digest in COPIES:
        src_path = os.path.join(SOURCE, src)
        if digest is not None and sha256(src_path) != digest:
            sys.exit("%s: sha256 differs from the shared MANIFEST" % src_path)
        shutil.copyfile(src_path, os.path.join(HERE, dst))

    rows, cols, flat = read_npy_f4(os.path.join(HERE, "machine-1-6_test.npy"))
    train_rows, train_cols, _ = read_npy_f4(os.path.join(HERE, "machine-1-6_train.npy"))
    with open(os.path.join(HERE, "machine-1-6_test_label.txt")) as f:
        labels = [line.strip() for line in f if line.strip()]
    assert len(labels) == rows

    lo, hi = WINDOW_START, WINDOW_START + WINDOW_ROWS
    with open(os.path.join(HERE, "small.csv"), "w", newline="\n") as f:
        f.write(",".join(["timestamp"] + ["m%02d" % (j + 1) for j in range(cols)]) + "\n")
        for i in range(lo, hi):
            vals = (shortest_f32(v) for v in flat[i * cols:(i + 1) * cols])
            f.write(",".join([str(T0 + STEP * (i - lo))] + list(vals)) + "\n")
    with open(os.path.join(HERE, "small_labels.txt"), "w", newline="\n") as f:
        f.write("".join(l + "\n" for l in labels[lo:hi]))

    window = labels[lo:hi]
    runs, i = [], 0
    while i < len(window):
        if window[i] == "1":
            j = i
            while j < len(window) and window[j] == "1":
                j += 1
            runs.append((i, j - 1))
            i = j
        else:
            i += 1
    n_anom = sum(1 for l in window if l == "1")

    names = [dst for _, dst, _ in COPIES[:4]] + ["small.csv", "small_labels.txt"]
    names += [dst for _, dst, _ in COPIES[4:]] + ["make_slices.py"]
    sums = "\n".join("| `%s` | %d | `%s` |" % (n, os.path.getsize(os.path.join(HERE, n)),
                                                sha256(os.path.join(HERE, n))) for n in names)
    run_txt = ", ".join("%d-%d" % r for r in runs)
    readme = f"""# SMD machine-1-6: a bundled slice for tests

Server Machine Dataset (Su et al., KDD 2019, "Robust Anomaly Detection for Multivariate
Time Series through Stochastic Recurrent Neural Network"), machine-1-6. Values were
min-max scaled to [0, 1] by the authors; one row per minute; 38 metrics.

Source (copied unchanged in content from the project's shared data folder):
- arrays: `zhhlee/InterFusion` @ `8c85d51`, `data/processed/machine-1-6_{{train,test}}.pkl`,
  converted to `.npy` (float32, C order);
- labels: `NetManAIOps/OmniAnomaly` @ `7fb0e0a`, `ServerMachineDataset/test_label/machine-1-6.txt`
  and `ServerMachineDataset/interpretation_label/machine-1-6.txt` (renamed here to
  `machine-1-6_interpretation_label.txt`).

Licence: MIT, see `LICENSE_SMD.txt` (dataset) and `LICENSE_InterFusion_repo.txt` (arrays).

## Files

- `machine-1-6_train.npy`: `<f4`, shape ({train_rows}, {train_cols}), unlabelled.
- `machine-1-6_test.npy`: `<f4`, shape ({rows}, {cols}).
- `machine-1-6_test_label.txt`: {rows} lines of `0`/`1`, {sum(1 for l in labels if l == "1")} anomalous.
- `machine-1-6_interpretation_label.txt`: `a-b:d,d,...` per segment. The row range matches
  `test_label` as the 0-based half-open range `[a, b)` (equivalently 1-based inclusive
  `a+1..=b`), checked on every segment of all three SMD machines; dims are 1-based.
- `small.csv`: test rows {lo}..={hi - 1} (0-based; 1-based {lo + 1}..={hi}), header
  `timestamp,m01,...,m38`; `timestamp` is epoch seconds {T0} + 60·i. Each value is the
  shortest decimal that parses back to the exact float32 of `machine-1-6_test.npy`.
- `small_labels.txt`: the matching {WINDOW_ROWS} labels, {n_anom} anomalous, in segments at
  rows {run_txt} (0-based inclusive, relative to the slice).
- `make_slices.py`: rebuilds all of the above (stdlib Python only).

| file | bytes | sha256 |
|---|---:|---|
{sums}
"""
    with open(os.path.join(HERE, "README.md"), "w", newline="\n") as f:
        f.write(readme)
    print(readme)


if __name__ == "__main__":
    main()
