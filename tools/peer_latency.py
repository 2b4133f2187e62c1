#!/usr/bin/env python3
"""Batch-1 scoring latency of darkwatch and of Python peers, in one session, interleaved
(README, "Latency and throughput").

Each round times every peer on the same real rows and then runs `darkwatch bench` once,
so that all of them see the same load; the 1-minute load average is recorded at the start
and the end of every round. Every peer is called one row at a time (batch 1), on one
thread (OMP_NUM_THREADS=1, torch.set_num_threads(1)), after --warmup calls, with
time.perf_counter_ns around each call. The peers see rows 0 .. warmup+frames-1 of --rows in
order (cycled if there are fewer), the same in every round. Rows per peer:

- pyod_ae decision_function: PyOD's AutoEncoder (its defaults: hidden [64, 32], batch
  norm, dropout, preprocessing on), fit for --pyod-epochs epochs on the training rows
  (timing only: its accuracy does not matter here), scoring one row through its whole
  public API, input validation and the scaler included;
- pyod_ae net only: the torch module inside that detector, called directly under
  torch.inference_mode() (squared error summed): what the API costs on top of its net;
- torch / numpy darkwatch PAE: darkwatch's own model read from the model directory
  (model.json: widths, scaler, head; model.safetensors: weights), doing the pipeline's
  per-frame work: scale, forward, the `bounded` wnll head's per-feature terms, their sum,
  the mean over the stream's last smooth_frames scores, and the top-3 features
  (torch under torch.inference_mode(); both in float32). The two are checked against
  each other on 256 rows before timing;
- river_hst: River's HalfSpaceTrees (defaults: 10 trees, height 8, window 250) after
  learning 2,000 training rows, on rows already converted to dicts: score_one alone,
  score_one + learn_one (River learns online, so a stream pays both), and the latter with
  the dict built from the numpy row inside the timed call. It is a different algorithm
  (random half-space trees, no reconstruction, no per-feature contributions).

darkwatch's rows come from `BIN bench --model DIR --frames N --json -` (its batch-1 rows:
copy the frame in, scale, forward, the head with its per-feature contributions, smoothing
over the stream's last frames, the top-3 contributions; std::time::Instant around each
frame). If `BIN bench --help` lists `--input`, the tool passes `--input ROWS` so that
darkwatch scores the same rows; otherwise bench scores its own 4,096 synthetic rows (the
report says which). The ratio column is a peer's p50 over darkwatch's wnll batch-1 p50 in
the same round. It is a ratio of wall times for different work (an interpreter, PyOD's
validation, another algorithm), not of the same computation: read each row for what it
times.

Usage: tools/peer_latency.py [--darkwatch BIN] [--model DIR] [--rows FILE.npy]
                             [--train FILE.npy] [--frames N] [--warmup N] [--rounds R]
                             [--json OUT]
Needs numpy (pip install numpy); each peer runs only if its package is there, else its row
says why it was skipped: pip install -r tools/requirements-peers.txt (torch, pyod, river,
scikit-learn). With the defaults on a 2-core machine at load average 9.6-10.8: 36 s to
fit PyOD (one epoch), 35-40 s a round (PyOD's 3,000 calls take half of it, `bench` about
5 s), 2.6 minutes in all.
"""

import argparse
import collections
import json
import os
import platform
import struct
import subprocess
import sys
import time

# One thread for every BLAS/OpenMP pool; must be set before numpy or torch are imported.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

try:
    import numpy as np
except ImportError:
    sys.exit("tools/peer_latency.py needs numpy: pip install numpy "
             "(or pip install -r tools/requirements-peers.txt for the peers too)")

PIP = "pip install -r tools/requirements-peers.txt"
VARIANCE_EPS = 1e-5  # src/model/nn.rs VARIANCE_EPS
DEFAULT_FLOOR = 0.1  # src/score.rs DEFAULT_VARIANCE_FLOOR
TOP = 3


def optional(name):
    """Imports a peer's package, or returns (None, reason)."""
    try:
        return __import__(name), None
    except ImportError as e:
        return None, f"{name} not importable ({e}): {PIP}"


# ---------------------------------------------------------------- darkwatch's model


def load_model(model_dir):
    """model.json and the layer weights from model.safetensors (float32)."""
    meta_path = os.path.join(model_dir, "model.json")
    try:
        meta = json.load(open(meta_path))
    except OSError as e:
        sys.exit(f"cannot read {meta_path}: {e}")
    raw = open(os.path.join(model_dir, meta["weights"]["file"]), "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    tensors = {}
    for name, spec in header.items():
        if name == "__metadata__" or not name.startswith("layers."):
            continue
        if spec["dtype"] != "F32":
            sys.exit(f"{name}: dtype {spec['dtype']}, expected F32")
        a, b = spec["data_offsets"]
        tensors[name] = np.frombuffer(raw[8 + n + a : 8 + n + b], np.float32).reshape(spec["shape"])
    arch, head = meta["architecture"], meta["head"]
    if arch.get("output") != "probabilistic" or head.get("kind") != "wnll" \
            or head.get("log_variance", "excess") != "bounded":
        sys.exit(f"{model_dir}: the numpy/torch peers re-implement a probabilistic model with the "
                 f"bounded wnll head; this one has output {arch.get('output')}, head {head}")
    members = int(arch.get("members", 1) or 1)
    window = int(meta.get("window_frames", 1) or 1)
    if members != 1 or window != 1:
        sys.exit(f"{model_dir}: the numpy/torch peers re-implement one network on one frame; "
                 f"this model has {members} ensemble members and a window of {window} frames "
                 f"(darkwatch trains 5 members below 20 inputs, and windows one-feature series): "
                 f"time a model of 20 or more metrics, such as models/smd-machine-1-6")
    return meta, tensors


def bounded_consts(meta):
    """lo, hi per feature as src/score.rs prepare_baseline (bounded)."""
    d = len(meta["features"])
    base = np.array(meta.get("log_variance_baseline", []), np.float32)
    floor = meta["head"].get("variance_floor", DEFAULT_FLOOR)
    median = base[:d] if len(base) >= 2 * d else np.full(d, -np.inf, np.float32)
    spread = base[2 * d : 3 * d] if len(base) >= 3 * d else np.zeros(d, np.float32)
    lo = np.maximum(median, spread + np.float32(np.log(floor))).astype(np.float32)
    hi = np.maximum(base[d : 2 * d], lo) if len(base) >= 2 * d else np.full(d, np.inf, np.float32)
    return lo, hi.astype(np.float32)


class NumpyPae:
    """darkwatch's per-frame work in numpy, float32: scale, forward, bounded wnll terms,
    score, mean of the last smooth_frames scores, top-3 features."""

    def __init__(self, meta, tensors):
        sc = meta["scaler"]
        self.offset = np.array(sc["offset"], np.float32)
        self.inv_scale = (1.0 / np.array(sc["scale"], np.float32)).astype(np.float32)
        layers = len(meta["architecture"]["layer_widths"]) - 1
        self.w = [np.ascontiguousarray(tensors[f"layers.{i}.weight"].T) for i in range(layers)]
        self.b = [tensors[f"layers.{i}.bias"] for i in range(layers)]
        self.d = len(meta["features"])
        self.lo, self.hi = bounded_consts(meta)
        self.alpha = np.float32(meta["head"]["alpha"])
        self.beta = np.float32(meta["head"]["beta"])
        self.recent = collections.deque(maxlen=int(meta.get("smooth_frames", 1)))

    def terms(self, x):
        z = (x - self.offset) * self.inv_scale
        h = z
        last = len(self.w) - 1
        for i, (w, b) in enumerate(zip(self.w, self.b)):
            h = h @ w + b
            if i < last:
                h = np.maximum(h, 0)
        mu, raw = h[..., : self.d], h[..., self.d :]
        v = np.logaddexp(np.float32(0), raw) + np.float32(VARIANCE_EPS)
        ln_v = np.clip(np.log(v), self.lo, self.hi)
        return self.alpha * (z - mu) ** 2 * np.exp(-ln_v) + self.beta * (ln_v - self.lo)

    def __call__(self, x):
        c = self.terms(x)
        self.recent.append(float(c.sum()))
        smoothed = sum(self.recent) / len(self.recent)
        top = np.argpartition(-c, TOP)[:TOP]
        return smoothed, top[np.argsort(-c[top])]


def torch_pae(torch, meta, tensors):
    """The same work as NumpyPae with torch modules, called under inference_mode."""
    widths = meta["architecture"]["layer_widths"]
    mods = []
    for i in range(len(widths) - 1):
        lin = torch.nn.Linear(widths[i], widths[i + 1])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(tensors[f"layers.{i}.weight"].copy()))
            lin.bias.copy_(torch.from_numpy(tensors[f"layers.{i}.bias"].copy()))
        mods.append(lin)
        if i < len(widths) - 2:
            mods.append(torch.nn.ReLU())
    net = torch.nn.Sequential(*mods).eval()
    sc = meta["scaler"]
    offset = torch.tensor(sc["offset"], dtype=torch.float32)
    inv_scale = 1.0 / torch.tensor(sc["scale"], dtype=torch.float32)
    lo_np, hi_np = bounded_consts(meta)
    lo, hi = torch.from_numpy(lo_np), torch.from_numpy(hi_np)
    alpha, beta, d = meta["head"]["alpha"], meta["head"]["beta"], len(meta["features"])
    softplus = torch.nn.functional.softplus
    recent = collections.deque(maxlen=int(meta.get("smooth_frames", 1)))

    def terms(x):
        z = (x - offset) * inv_scale
        h = net(z)
        mu, v = h[..., :d], softplus(h[..., d:]) + VARIANCE_EPS
        ln_v = torch.clamp(torch.log(v), lo, hi)
        return alpha * (z - mu) ** 2 * torch.exp(-ln_v) + beta * (ln_v - lo)

    def one(row):
        with torch.inference_mode():
            c = terms(torch.from_numpy(row))
            recent.append(c.sum().item())
            top = torch.topk(c, TOP).indices.tolist()
        return sum(recent) / len(recent), top

    return one, terms


# ---------------------------------------------------------------- timing


def time_calls(fn, inputs, frames, warmup):
    """perf_counter_ns around each of `frames` calls after `warmup`, inputs cycled."""
    n = len(inputs)
    for i in range(warmup):
        fn(inputs[i % n])
    t = np.empty(frames, np.int64)
    pc = time.perf_counter_ns
    for i in range(frames):
        x = inputs[(warmup + i) % n]
        t0 = pc()
        fn(x)
        t[i] = pc() - t0
    return {"p50_us": float(np.percentile(t, 50)) / 1e3,
            "p99_us": float(np.percentile(t, 99)) / 1e3,
            "mean_us": float(t.mean()) / 1e3,
            "samples": frames}


def load1():
    return os.getloadavg()[0]


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions():
    from importlib import metadata
    out = {"python": platform.python_version()}
    for pkg in ("numpy", "torch", "pyod", "river", "scikit-learn"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def bench_has_input(binary):
    try:
        help_text = subprocess.run([binary, "bench", "--help"], capture_output=True,
                                   text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        sys.exit(f"cannot run `{binary} bench --help` ({e}); build it with "
                 "`cargo build --release` or pass --darkwatch BIN")
    return "--input" in help_text


def run_bench(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"`{' '.join(cmd)}` failed ({out.returncode}):\n{out.stderr[-2000:]}")
    report = json.loads(out.stdout)
    rows = {}
    for r in report["rows"]:
        if r.get("batch") == 1 and r.get("p50_ns") is not None:
            name = "darkwatch " + r["name"] + ("" if r.get("backend", "native") == "native"
                                               else f" ({r['backend']})")
            rows[name] = {"p50_us": r["p50_ns"] / 1e3, "p99_us": r["p99_ns"] / 1e3,
                          "mean_us": r["mean_ns"] / 1e3, "samples": r.get("samples")}
    return report, rows


# ---------------------------------------------------------------- output

DW_REF = "darkwatch wnll"


def print_round(k, res, l0, l1):
    ref = res.get(DW_REF, {}).get("p50_us")
    print(f"\nround {k + 1}: load average (1 min) {l0:.2f} at start, {l1:.2f} at end")
    print(f"  {'row':40s} {'p50 µs':>10s} {'p99 µs':>10s} {'mean µs':>10s} {'p50/dw wnll':>12s}")
    for name, v in res.items():
        if "skipped" in v:
            print(f"  {name:40s} skipped: {v['skipped']}")
            continue
        ratio = f"{v['p50_us'] / ref:11.1f}x" if ref else "-"
        print(f"  {name:40s} {v['p50_us']:10.2f} {v['p99_us']:10.2f} {v['mean_us']:10.2f} {ratio:>12s}",
              flush=True)


def summarise(rounds):
    """Per row: the rounds' p50, p99, mean and ratio, as median [min-max]."""
    names = list(dict.fromkeys(n for r in rounds for n in r["rows"]))
    out = {}
    for name in names:
        got = [r["rows"][name] for r in rounds if name in r["rows"]]
        if any("skipped" in g for g in got):
            out[name] = {"skipped": got[0]["skipped"]}
            continue
        s = {}
        for key in ("p50_us", "p99_us", "mean_us"):
            vals = [g[key] for g in got]
            s[key] = {"median": float(np.median(vals)), "min": min(vals), "max": max(vals)}
        ratios = [r["rows"][name]["p50_us"] / r["rows"][DW_REF]["p50_us"]
                  for r in rounds if name in r["rows"] and DW_REF in r["rows"]]
        if ratios:
            s["ratio_p50"] = {"median": float(np.median(ratios)), "min": min(ratios),
                              "max": max(ratios)}
        out[name] = s
    return out


def print_summary(summary, rounds):
    loads = [x for r in rounds for x in (r["load1_start"], r["load1_end"])]
    print(f"\nall {len(rounds)} rounds: median over rounds [min-max]; ratio = the row's p50 over "
          f"darkwatch wnll's batch-1 p50 in the same round; load average (1 min) "
          f"{min(loads):.2f}-{max(loads):.2f}")
    print(f"  {'row':40s} {'p50 µs':>9s} {'[min-max]':>19s} {'p99 µs':>9s} {'mean µs':>9s} "
          f"{'p50/dw wnll':>11s} {'[min-max]':>15s}")
    for name, s in summary.items():
        if "skipped" in s:
            print(f"  {name:40s} skipped: {s['skipped']}")
            continue
        p50, r = s["p50_us"], s.get("ratio_p50")
        ratio = (f"{r['median']:10.1f}x {'[' + format(r['min'], '.1f') + '-' + format(r['max'], '.1f') + ']':>15s}"
                 if r else f"{'-':>11s} {'':15s}")
        rng = f"[{p50['min']:.2f}-{p50['max']:.2f}]"
        print(f"  {name:40s} {p50['median']:9.2f} {rng:>19s} {s['p99_us']['median']:9.2f} "
              f"{s['mean_us']['median']:9.2f} {ratio}")


# ---------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--darkwatch", default="target/release/darkwatch", metavar="BIN")
    ap.add_argument("--model", default="models/smd-machine-1-6", metavar="DIR")
    ap.add_argument("--rows", default="tests/data/smd/machine-1-6_test.npy", metavar="FILE.npy",
                    help="rows every side scores (cycled)")
    ap.add_argument("--train", default="tests/data/smd/machine-1-6_train.npy", metavar="FILE.npy",
                    help="rows PyOD and River are fitted on")
    ap.add_argument("--frames", type=int, default=2000, help="timed calls per peer per round")
    ap.add_argument("--warmup", type=int, default=1000, help="untimed calls before them")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pyod-epochs", type=int, default=1,
                    help="PyOD AutoEncoder training epochs (timing only)")
    ap.add_argument("--json", metavar="OUT", help="write everything as JSON to OUT")
    args = ap.parse_args()
    if args.frames < 100 or args.warmup < 0 or args.rounds < 1:
        sys.exit("--frames must be at least 100, --warmup at least 0, --rounds at least 1")

    for path in (args.rows, args.train):
        if not os.path.exists(path):
            sys.exit(f"{path}: no such file (run from the repository root, or pass --rows/--train)")
    rows = np.ascontiguousarray(np.load(args.rows), dtype=np.float32)
    train = np.ascontiguousarray(np.load(args.train), dtype=np.float32)
    meta, tensors = load_model(args.model)
    d = len(meta["features"])
    if rows.ndim != 2 or rows.shape[1] != d or train.ndim != 2 or train.shape[1] != d:
        sys.exit(f"the model has {d} features; --rows is {rows.shape}, --train {train.shape}")
    used = rows[: args.warmup + args.frames]  # the rows each peer sees, cycled if fewer
    one_rows = [used[i : i + 1] for i in range(len(used))]  # (1, d) as a batch-1 caller has
    flat_rows = [used[i] for i in range(len(used))]

    has_input = bench_has_input(args.darkwatch)
    bench_cmd = [args.darkwatch, "bench", "--model", args.model, "--frames", str(args.frames),
                 "--json", "-"] + (["--input", args.rows] if has_input else [])

    info = {
        "cpu": cpu_model(), "cpus": os.cpu_count(), "platform": platform.platform(),
        "versions": versions(), "omp_num_threads": os.environ["OMP_NUM_THREADS"],
        "rows_file": args.rows, "rows": int(len(rows)), "rows_used": int(len(used)),
        "train_file": args.train, "model": args.model, "model_id": meta.get("id"),
        "widths": meta["architecture"]["layer_widths"], "frames": args.frames,
        "warmup": args.warmup, "bench_command": bench_cmd,
        "darkwatch_rows": "same rows (--input)" if has_input
        else "bench's own synthetic rows (this bench has no --input)",
    }
    try:
        info["darkwatch_version"] = subprocess.run([args.darkwatch, "--version"], capture_output=True,
                                                   text=True).stdout.strip()
    except OSError:
        pass

    peers = collections.OrderedDict()  # name -> (callable, inputs) or reason for skipping
    npae = NumpyPae(meta, tensors)

    torch, why_torch = optional("torch")
    if torch is not None:
        torch.set_num_threads(1)
        info["torch_threads"] = torch.get_num_threads()

    # PyOD AutoEncoder, fit on the training rows.
    pyod_why = why_torch
    if torch is not None:
        try:
            from pyod.models.auto_encoder import AutoEncoder
        except ImportError as e:
            pyod_why = f"pyod not importable ({e}): {PIP}"
    if pyod_why is None:
        t0 = time.time()
        ae = AutoEncoder(epoch_num=args.pyod_epochs, verbose=0, random_state=0, device="cpu")
        ae.fit(train)
        torch.set_num_threads(1)  # in case fitting changed it
        info["pyod_fit_s"] = round(time.time() - t0, 1)
        info["pyod_params"] = {k: str(v) for k, v in ae.get_params().items()}
        net = ae.model.eval()

        def pyod_net(row):
            with torch.inference_mode():
                x = torch.from_numpy(row)
                return ((net(x) - x) ** 2).sum().item()

        peers["pyod_ae decision_function"] = (ae.decision_function, one_rows)
        peers["pyod_ae net only (inference_mode)"] = (pyod_net, one_rows)
    else:
        peers["pyod_ae decision_function"] = pyod_why

    # darkwatch's PAE in torch, checked against the numpy one.
    if torch is not None:
        tone, tterms = torch_pae(torch, meta, tensors)
        with torch.inference_mode():
            ct = tterms(torch.from_numpy(used[:256])).numpy()
        cn = npae.terms(used[:256])
        info["torch_vs_numpy_max_rel_score_diff"] = float(
            np.max(np.abs(ct.sum(1) - cn.sum(1)) / np.maximum(np.abs(cn.sum(1)), 1e-6)))
        peers["torch darkwatch PAE (inference_mode)"] = (tone, flat_rows)
    else:
        peers["torch darkwatch PAE (inference_mode)"] = why_torch
    peers["numpy darkwatch PAE"] = (npae, flat_rows)

    river, why_river = optional("river")
    if river is not None:
        from river import anomaly
        hst = anomaly.HalfSpaceTrees(seed=0)
        for x in train[:2000]:
            hst.learn_one({i: float(v) for i, v in enumerate(x)})
        dicts = [{i: float(v) for i, v in enumerate(x)} for x in used]

        def score_learn(dct):
            s = hst.score_one(dct)
            hst.learn_one(dct)
            return s

        def dict_score_learn(row):
            dct = {i: float(v) for i, v in enumerate(row)}
            s = hst.score_one(dct)
            hst.learn_one(dct)
            return s

        peers["river_hst score_one"] = (hst.score_one, dicts)
        peers["river_hst score_one+learn_one"] = (score_learn, dicts)
        peers["river_hst dict+score_one+learn_one"] = (dict_score_learn, flat_rows)
    else:
        peers["river_hst score_one"] = why_river

    print(f"cpu: {info['cpu']} ({info['cpus']} CPUs); {info['platform']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    print(f"{info.get('darkwatch_version', args.darkwatch)}: model {meta.get('id')} widths "
          f"{info['widths']}; darkwatch scores {info['darkwatch_rows']}")
    print(f"peers: {len(used)} rows of {args.rows} ({args.warmup} warm-up + {args.frames} timed "
          f"calls each per round), one thread; torch threads {info.get('torch_threads', '-')}"
          + (f"; PyOD fit {info['pyod_fit_s']} s ({args.pyod_epochs} epochs)"
             if "pyod_fit_s" in info else "")
          + (f"; torch vs numpy PAE score, max relative difference "
             f"{info['torch_vs_numpy_max_rel_score_diff']:.1e}"
             if "torch_vs_numpy_max_rel_score_diff" in info else ""), flush=True)

    rounds = []
    for k in range(args.rounds):
        l0 = load1()
        res = collections.OrderedDict()
        for name, peer in peers.items():
            if isinstance(peer, str):
                res[name] = {"skipped": peer}
            else:
                res[name] = time_calls(peer[0], peer[1], args.frames, args.warmup)
        report, dw = run_bench(bench_cmd)
        res.update(dw)
        l1 = load1()
        rounds.append({"load1_start": l0, "load1_end": l1, "rows": res,
                       "bench_machine": report.get("machine"), "bench_data_rows": report.get("data_rows")})
        print_round(k, res, l0, l1)

    summary = summarise(rounds)
    print_summary(summary, rounds)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "rounds": rounds, "summary": summary}, f, indent=1)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
