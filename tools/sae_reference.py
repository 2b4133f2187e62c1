#!/usr/bin/env python3
"""Build small SAE checkpoints in SAELens and EleutherAI-sparsify layout, plus numpy references.

For darkwatch issue 7 (SAE loaders / forward). Every case is a folder under tests/data/sae/:

    <case>/checkpoint/...           the checkpoint exactly as the library writes it
                                    SAELens : cfg.json + sae_weights.safetensors
                                    sparsify: layers.3/cfg.json + layers.3/sae.safetensors
    <case>/x.npy         [8, d_in]  input activations, float32
    <case>/pre_acts.npy  [8, d_sae] encoder pre-activation (before ReLU/TopK/JumpReLU), float32
    <case>/latents.npy   [8, d_sae] dense latent activations, float32
    <case>/recon.npy     [8, d_in]  reconstruction x_hat, float32
    <case>/error.npy     [8, d_in]  e = x - x_hat, float32
    <case>/expected.json            what a loader must infer (architecture, k, dtype, flags ...)

References are computed in float64 from the formulas (after rounding the weights to their stored
dtype) and stored as float32; inputs are chosen so that no value sits within 1e-3 of a decision
boundary (ReLU at 0, the k-th/(k+1)-th TopK gap, the JumpReLU threshold). See
tests/data/sae/README.md for the formulas and the exact per-case semantics.

How to run (needs only numpy and safetensors; no torch):

    python3 -m venv .venv-act
    .venv-act/bin/pip install numpy==2.4.6 safetensors==0.8.0
    .venv-act/bin/python tools/sae_reference.py --out tests/data/sae

float32/float16 checkpoints are written with safetensors.numpy.save_file (the same Rust
serializer that safetensors.torch.save_file uses); bfloat16 ones (numpy has no bf16) are written
by write_bf16_safetensors below, which mirrors that serializer (tensors sorted by name, compact
JSON header padded with spaces to a multiple of 8, no __metadata__) and is checked by parsing the
file back with safetensors.deserialize.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
from pathlib import Path

import numpy as np
from safetensors import deserialize
from safetensors.numpy import save_file

D_IN, D_SAE, N = 16, 64, 8
MARGIN = 1e-3
SAELENS_VERSION = "6.5.1"  # version string written into v6 metadata (any >= 6.0.0 means "v6")

# ----------------------------------------------------------------------------- dtype helpers


def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit pattern (uint16), round to nearest even (as torch .to(bfloat16))."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def bf16_bits_to_f32(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


def quantize(a: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Returns (array to store, exact float64 value of the stored array)."""
    a = a.astype(np.float32)
    if dtype == "float32":
        return a, a.astype(np.float64)
    if dtype == "float16":
        h = a.astype(np.float16)
        return h, h.astype(np.float64)
    if dtype == "bfloat16":
        b = to_bf16_bits(a)
        return b, bf16_bits_to_f32(b).astype(np.float64)
    raise ValueError(dtype)


def write_bf16_safetensors(tensors: dict[str, np.ndarray], path: Path) -> None:
    """tensors: name -> uint16 bf16 bit patterns. Mirrors safetensors' serializer layout."""
    header, blobs, off = {}, [], 0
    for name in sorted(tensors):
        raw = np.ascontiguousarray(tensors[name]).astype("<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(tensors[name].shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))
    # validate with the official parser
    parsed = dict(deserialize(path.read_bytes()))
    for name, arr in tensors.items():
        t = parsed[name]
        assert str(t["dtype"]).upper() in ("BF16", "BFLOAT16"), (name, t["dtype"])
        assert list(t["shape"]) == list(arr.shape), (name, t["shape"])
        assert np.array_equal(np.frombuffer(bytes(t["data"]), "<u2").reshape(arr.shape), arr)


def write_safetensors(tensors: dict[str, np.ndarray], dtype: str, path: Path) -> None:
    if dtype == "bfloat16":
        write_bf16_safetensors(tensors, path)
    else:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))
        want = {"float32": ("F32", "FLOAT32"), "float16": ("F16", "FLOAT16")}[dtype]
        for name, t in deserialize(path.read_bytes()):
            assert str(t["dtype"]).upper() in want, (name, t["dtype"])


def write_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.lib.format.write_array(f, np.ascontiguousarray(arr, dtype="<f4"), version=(1, 0), allow_pickle=False)


# ----------------------------------------------------------------------------- reference maths


def norm_in(x: np.ndarray, mode: str, scale: float | None):
    """Returns (normalised x, function mapping the decoder output back)."""
    if mode == "none":
        return x, lambda y: y
    if mode == "constant_norm_rescale":
        c = np.sqrt(x.shape[1]) / np.linalg.norm(x, axis=1, keepdims=True)
        return x * c, lambda y: y / c
    if mode == "layer_norm":
        mu = x.mean(1, keepdims=True)
        xc = x - mu
        sd = xc.std(1, ddof=1, keepdims=True)  # torch.Tensor.std default: unbiased
        return xc / (sd + 1e-5), lambda y: y * sd + mu
    if mode == "expected_average_only_in_scaled":  # folded dataset-level scalar (see README)
        return x * scale, lambda y: y / scale
    raise ValueError(mode)


def topk_mask(pre: np.ndarray, k: int) -> np.ndarray:
    idx = np.argsort(-pre, axis=1, kind="stable")[:, :k]
    m = np.zeros_like(pre, dtype=bool)
    np.put_along_axis(m, idx, True, axis=1)
    return m


def reference(case: dict, W: dict[str, np.ndarray], x: np.ndarray, norm_mode: str | None = None):
    """float64 reference. W holds float64 weights in the library's own layout."""
    x = x.astype(np.float64)
    if case["format"] == "sparsify":
        # sparsify/sparse_coder.py encode + fused_encoder.py + decode
        pre = (x - W["b_dec"]) @ W["encoder.weight"].T + W["encoder.bias"]
        acts = np.maximum(pre, 0.0)  # ReLU first, then top-k of the ReLU'd values
        lat = np.where(topk_mask(acts, case["k"]), acts, 0.0)
        rec = lat @ W["W_dec"] + W["b_dec"]
        return pre, lat, rec
    mode = norm_mode or case["normalize_activations"]
    if mode == "expected_average_only_in":
        mode = "none"  # SAELens applies nothing at run time for this mode (see README)
    xin, out = norm_in(x, mode, case.get("norm_scaling_factor"))
    xin = xin - W["b_dec"] * float(case["apply_b_dec_to_input"])
    pre = xin @ W["W_enc"] + W["b_enc"]
    arch = case["architecture"]
    if arch == "standard":
        lat = np.maximum(pre, 0.0)
    elif arch == "topk":
        lat = np.where(topk_mask(pre, case["k"]), np.maximum(pre, 0.0), 0.0)  # topk, then ReLU
    elif arch == "jumprelu":
        lat = np.maximum(pre, 0.0) * (pre > W["threshold"])
    else:
        raise ValueError(arch)
    rec = out(lat @ W["W_dec"] + W["b_dec"])
    return pre, lat, rec


def margins_ok(case: dict, W: dict, pre: np.ndarray) -> bool:
    if np.abs(pre).min() < MARGIN:
        return False
    if case.get("architecture") == "jumprelu" and np.abs(pre - W["threshold"]).min() < MARGIN:
        return False
    if case.get("k"):
        vals = np.maximum(pre, 0.0) if case["format"] == "sparsify" else pre
        s = -np.sort(-vals, axis=1)
        k = case["k"]
        if (s[:, k - 1] - s[:, k]).min() < MARGIN or s[:, k - 1].min() < MARGIN:
            return False  # also require k strictly positive winners (no zero ties)
    return True


# ----------------------------------------------------------------------------- configs


def saelens_v6_cfg(case: dict) -> dict:
    cfg = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": case["cfg_dtype"],
        "device": "cpu",
        "apply_b_dec_to_input": case["apply_b_dec_to_input"],
        "normalize_activations": case["normalize_activations"],
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_VERSION,
            "sae_lens_training_version": SAELENS_VERSION,
            "model_name": case.get("model_name", "all-MiniLM-L6-v2"),
            "hook_name": case.get("hook_name", "blocks.3.hook_resid_post"),
            "hook_head_index": None,
            "prepend_bos": True,
            "dataset_path": "synthetic",
            "context_size": 128,
            "model_from_pretrained_kwargs": {},
            "seqpos_slice": [None],
            "exclude_special_tokens": False,
            "neuronpedia_id": None,
        },
    }
    if case["architecture"] == "topk":
        cfg["k"] = case["k"]
        cfg["rescale_acts_by_decoder_norm"] = False
    cfg["architecture"] = case["architecture"]
    return cfg


def saelens_pre6_cfg(case: dict) -> dict:
    # Key set of SAELens 5.x SAEConfig.to_dict(); no sae_lens_version anywhere => pre-6.
    return {
        "architecture": case["cfg_architecture"],
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": case["cfg_dtype"],
        "device": "cpu",
        "model_name": "all-MiniLM-L6-v2",
        "hook_name": "blocks.3.hook_resid_post",
        "hook_layer": 3,
        "hook_head_index": None,
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": case["k"]},
        "apply_b_dec_to_input": case["apply_b_dec_to_input"],
        "finetuning_scaling_factor": False,
        "sae_lens_training_version": case["training_version"],
        "prepend_bos": True,
        "dataset_path": "synthetic",
        "dataset_trust_remote_code": True,
        "context_size": 128,
        "normalize_activations": case["normalize_activations"],
        "neuronpedia_id": None,
        "model_from_pretrained_kwargs": {},
        "seqpos_slice": [None],
    }


def sparsify_cfg(case: dict) -> dict:
    # SparseCoderConfig.to_dict() + d_in, as SparseCoder.save_to_disk writes it
    return {
        "activation": "topk",
        "expansion_factor": case["expansion_factor"],
        "normalize_decoder": True,
        "num_latents": case["num_latents"],
        "k": case["k"],
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": D_IN,
    }


CASES = [
    dict(name="saelens_relu_v6", format="saelens", cfg_style="v6", architecture="standard", dtype="float32",
         cfg_dtype="float32", apply_b_dec_to_input=True, normalize_activations="none"),
    dict(name="saelens_topk_v6", format="saelens", cfg_style="v6", architecture="topk", k=8, dtype="float32",
         cfg_dtype="float32", apply_b_dec_to_input=True, normalize_activations="none"),
    dict(name="saelens_topk_pre6_standard_arch", format="saelens", cfg_style="pre6", cfg_architecture="standard",
         architecture="topk", k=8, dtype="float32", cfg_dtype="float32", apply_b_dec_to_input=True,
         normalize_activations="none", training_version="4.4.1"),
    dict(name="saelens_topk_pre6_topk_arch", format="saelens", cfg_style="pre6", cfg_architecture="topk",
         architecture="topk", k=6, dtype="float32", cfg_dtype="float32", apply_b_dec_to_input=True,
         normalize_activations="none", training_version="5.9.1"),
    dict(name="saelens_jumprelu_gemmascope", format="saelens", cfg_style="v6", architecture="jumprelu",
         dtype="float32", cfg_dtype="float32", apply_b_dec_to_input=False, normalize_activations="none",
         model_name="gemma-2-2b", hook_name="blocks.12.hook_resid_post"),
    dict(name="saelens_jumprelu_bf16", format="saelens", cfg_style="v6", architecture="jumprelu",
         dtype="bfloat16", cfg_dtype="torch.bfloat16", apply_b_dec_to_input=True, normalize_activations="none"),
    dict(name="saelens_relu_constant_norm_rescale_f16", format="saelens", cfg_style="v6", architecture="standard",
         dtype="float16", cfg_dtype="float16", apply_b_dec_to_input=True, normalize_activations="constant_norm_rescale",
         x_scale=6.0),
    dict(name="saelens_relu_layer_norm", format="saelens", cfg_style="v6", architecture="standard",
         dtype="float32", cfg_dtype="float32", apply_b_dec_to_input=True, normalize_activations="layer_norm",
         x_scale=4.0, x_offset=1.5),
    dict(name="saelens_relu_expected_average_only_in", format="saelens", cfg_style="v6", architecture="standard",
         dtype="float32", cfg_dtype="float32", apply_b_dec_to_input=True,
         normalize_activations="expected_average_only_in", x_scale=5.0),
    dict(name="sparsify_topk_bf16", format="sparsify", hookpoint="layers.3", k=8, dtype="bfloat16",
         expansion_factor=4, num_latents=0),
    dict(name="sparsify_topk_f32", format="sparsify", hookpoint="layers.3", k=8, dtype="float32",
         expansion_factor=32, num_latents=64),
]


def make_weights(case: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """float32 master weights in the library's layout."""
    if case["format"] == "sparsify":
        enc = rng.normal(0, 1 / np.sqrt(D_IN), (D_SAE, D_IN))
        dec = rng.normal(0, 1, (D_SAE, D_IN))
        dec /= np.linalg.norm(dec, axis=1, keepdims=True)  # normalize_decoder = true
        return {"encoder.weight": enc, "encoder.bias": rng.normal(0.05, 0.1, D_SAE),
                "W_dec": dec, "b_dec": rng.normal(0, 0.5, D_IN)}
    W = {
        "W_enc": rng.normal(0, 1 / np.sqrt(D_IN), (D_IN, D_SAE)),
        "b_enc": rng.normal(-0.05, 0.1, D_SAE),
        "W_dec": rng.normal(0, 1 / np.sqrt(D_IN), (D_SAE, D_IN)),
        "b_dec": rng.normal(0, 0.5, D_IN),
    }
    if case["architecture"] == "jumprelu":
        W["threshold"] = rng.uniform(0.05, 0.5, D_SAE)
    return W


def build_case(case: dict, out: Path, seed: int) -> dict:
    cdir = out / case["name"]
    if cdir.exists():
        shutil.rmtree(cdir)
    ck = cdir / "checkpoint"
    if case["format"] == "sparsify":
        ck = ck / case["hookpoint"]
    ck.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    master = make_weights(case, rng)
    stored, W = {}, {}
    for name, a in master.items():
        stored[name], W[name] = quantize(a, case["dtype"])

    x_rng = np.random.default_rng(seed + 1000)
    for attempt in range(10000):
        x = (x_rng.normal(0, 1, (N, D_IN)) * case.get("x_scale", 1.0) + case.get("x_offset", 0.0)).astype(np.float32)
        if case.get("normalize_activations") == "expected_average_only_in":
            case["norm_scaling_factor"] = float(np.float32(np.sqrt(D_IN) / np.linalg.norm(x, axis=1).mean()))
        pre, lat, rec = reference(case, W, x)
        ok = margins_ok(case, W, pre)
        if ok and case.get("normalize_activations") == "expected_average_only_in":
            ok = margins_ok(case, W, reference(case, W, x, norm_mode="expected_average_only_in_scaled")[0])
        if ok:
            break
    else:
        raise SystemExit(f"{case['name']}: no input with clear margins")

    # checkpoint files
    if case["format"] == "sparsify":
        cfg = sparsify_cfg(case)
        write_safetensors(stored, case["dtype"], ck / "sae.safetensors")
    else:
        cfg = saelens_v6_cfg(case) if case["cfg_style"] == "v6" else saelens_pre6_cfg(case)
        write_safetensors(stored, case["dtype"], ck / "sae_weights.safetensors")
    (ck / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")

    x64 = x.astype(np.float64)
    write_npy(cdir / "x.npy", x)
    write_npy(cdir / "pre_acts.npy", pre)
    write_npy(cdir / "latents.npy", lat)
    write_npy(cdir / "recon.npy", rec)
    write_npy(cdir / "error.npy", x64 - rec)

    exp = {
        "format": case["format"],
        "checkpoint_dir": str(ck.relative_to(cdir)),
        "architecture": case.get("architecture", "topk"),
        "k": case.get("k"),
        "d_in": D_IN,
        "d_sae": D_SAE,
        "weights_dtype": case["dtype"],
        "apply_b_dec_to_input": case.get("apply_b_dec_to_input", True),
        "normalize_activations": case.get("normalize_activations", "none"),
        "seed": seed,
        "active_per_row": [int(v) for v in (lat > 0).sum(1)],
        "tolerance_abs": 1e-4,
    }
    if case["format"] == "saelens":
        exp["config_style"] = case["cfg_style"]
    if case["format"] == "sparsify":
        exp["hookpoint"] = case["hookpoint"]
    notes = []
    if case.get("normalize_activations") == "expected_average_only_in":
        s = case["norm_scaling_factor"]
        exp["norm_scaling_factor"] = s
        pre_s, lat_s, rec_s = reference(case, W, x, norm_mode="expected_average_only_in_scaled")
        write_npy(cdir / "pre_acts_scaled.npy", pre_s)
        write_npy(cdir / "latents_scaled.npy", lat_s)
        write_npy(cdir / "recon_scaled.npy", rec_s)
        write_npy(cdir / "error_scaled.npy", x64 - rec_s)
        notes.append("latents/recon/error: no run-time normalisation (SAELens SAE.load_from_disk); "
                     "*_scaled: with norm_scaling_factor s folded in, i.e. x*s in, x_hat/s out "
                     "(SAELens SAE.from_pretrained with a registry norm_scaling_factor). s is NOT stored "
                     "in the checkpoint; here s = sqrt(d_in)/mean_rows(||x||).")
    if case.get("architecture") == "jumprelu" and not case["apply_b_dec_to_input"]:
        wrong = dict(case, apply_b_dec_to_input=True)
        _, lat_w, rec_w = reference(wrong, W, x)
        exp["guard_max_abs_diff_if_b_dec_wrongly_subtracted"] = {
            "latents": round(float(np.abs(lat_w - lat).max()), 4),
            "recon": round(float(np.abs(rec_w - rec).max()), 4),
        }
        assert exp["guard_max_abs_diff_if_b_dec_wrongly_subtracted"]["latents"] > 0.05
    if case.get("cfg_style") == "pre6" and case["cfg_architecture"] == "standard":
        _, lat_relu, _ = reference(dict(case, architecture="standard"), W, x)
        exp["relu_instead_of_topk_active_per_row"] = [int(v) for v in (lat_relu > 0).sum(1)]
        notes.append("architecture 'standard' + activation_fn_str 'topk' (+ activation_fn_kwargs.k): "
                     "TopK semantics as SAELens <= 5 ran it. SAELens 6's handle_pre_6_0_config keeps "
                     "architecture 'standard' here (it only reads k when architecture == 'topk'), i.e. "
                     "it would silently run plain ReLU; darkwatch must infer TopK from activation_fn_str.")
    if notes:
        exp["notes"] = notes
    (cdir / "expected.json").write_text(json.dumps(exp, indent=2) + "\n")
    return exp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("tests/data/sae"))
    ap.add_argument("--seed", type=int, default=20241)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for i, case in enumerate(CASES):
        exp = build_case(dict(case), args.out, args.seed + 17 * i)
        summary[case["name"]] = exp["active_per_row"]
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(json.dumps(summary, indent=1))
    print(f"total bytes under {args.out}: {total}")


if __name__ == "__main__":
    main()
