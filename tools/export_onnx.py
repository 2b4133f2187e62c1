#!/usr/bin/env python3
"""Export a darkwatch model directory's autoencoder to ONNX.

    python3 -m venv .venv && .venv/bin/pip install onnx==1.23.2 numpy==2.4.6
    .venv/bin/python tools/export_onnx.py models/smd-machine-1-6            # writes model.onnx
    .venv/bin/python tools/export_onnx.py models/smd-machine-1-6 --layout stacked --out x.onnx

The bundled files (and the test fixtures under tests/data/onnx/) are made by
tools/export_bundled_onnx.sh.

Not needed to build or test darkwatch: the exported files are committed. The graph is
what PyTorch's exporter emits for the same network (Gemm + Relu, opset 17), so it stands
in for a model trained in PyTorch:

* input  `x`    float32 [batch, d], already scaled (darkwatch applies the model's scaler);
* plain model:  output `recon` [batch, d];
* probabilistic model, `--layout split` (default): outputs `mean` and `variance`, each
  [batch, d], the variance through Softplus (the native model's softplus(raw));
* probabilistic model, `--layout stacked`: one output `out` [batch, 2d], mean then variance;
* `--variance log_variance`: the variance output holds ln(variance) instead;
* `--batch N`: a fixed batch dimension instead of a dynamic one (darkwatch refuses it;
  the tests check that it says so).
* an ensemble (model.json `architecture.members` = K): the outputs are K·d wide, the
  members' reconstructions side by side, as the native network gives them.

The metadata_props `darkwatch.model_id`, `darkwatch.layout` and `darkwatch.variance`
("variance" or "log_variance") tell darkwatch how to read the outputs.

Deterministic: the same model directory gives the same bytes.
"""

import argparse
import json
import os
import struct
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def read_safetensors(path):
    """The F32 tensors of a safetensors file, without the safetensors package."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] != "F32":
            sys.exit(f"{path}: tensor {name} is {info['dtype']}, expected F32")
        lo, hi = info["data_offsets"]
        out[name] = np.frombuffer(data[lo:hi], dtype="<f4").reshape(info["shape"])
    return out


def export(model_dir, layout, out_path, variance="variance", batch="batch"):
    meta = json.load(open(os.path.join(model_dir, "model.json")))
    arch = meta["architecture"]
    if arch["kind"] != "dense_autoencoder":
        sys.exit(f"{model_dir}: architecture {arch['kind']!r} is not a dense autoencoder")
    tensors = read_safetensors(os.path.join(model_dir, meta["weights"]["file"]))
    widths = arch["layer_widths"]
    # An ensemble's outputs hold its members' reconstructions side by side: the mean and
    # variance outputs are members * d wide (darkwatch averages the members' terms).
    d_in = widths[0]
    d = d_in * arch.get("members", 1)
    n_layers = len(widths) - 1
    probabilistic = arch["output"] == "probabilistic"
    if not probabilistic:
        layout = "plain"

    nodes, inits = [], []
    prev = "x"
    for i in range(n_layers):
        w = tensors[f"layers.{i}.weight"]  # [out, in], like torch.nn.Linear
        b = tensors[f"layers.{i}.bias"]
        assert w.shape == (widths[i + 1], widths[i]), (i, w.shape)
        inits += [
            numpy_helper.from_array(np.ascontiguousarray(w), f"layers.{i}.weight"),
            numpy_helper.from_array(np.ascontiguousarray(b), f"layers.{i}.bias"),
        ]
        last = i == n_layers - 1
        y = f"gemm{i}" if (not last or probabilistic) else "recon"
        nodes.append(
            helper.make_node("Gemm", [prev, f"layers.{i}.weight", f"layers.{i}.bias"], [y], transB=1)
        )
        if not last:
            nodes.append(helper.make_node("Relu", [y], [f"relu{i}"]))
            prev = f"relu{i}"
        else:
            prev = y

    if layout == "plain":
        outputs = [helper.make_tensor_value_info("recon", TensorProto.FLOAT, [batch, d])]
    else:
        inits.append(numpy_helper.from_array(np.array([d, d], dtype=np.int64), "split_sizes"))
        nodes.append(helper.make_node("Split", [prev, "split_sizes"], ["mean", "raw_variance"], axis=1))
        if variance == "variance":
            nodes.append(helper.make_node("Softplus", ["raw_variance"], ["variance"]))
        else:
            nodes.append(helper.make_node("Softplus", ["raw_variance"], ["softplus_variance"]))
            nodes.append(helper.make_node("Log", ["softplus_variance"], ["variance"]))
        if layout == "split":
            outputs = [
                helper.make_tensor_value_info("mean", TensorProto.FLOAT, [batch, d]),
                helper.make_tensor_value_info("variance", TensorProto.FLOAT, [batch, d]),
            ]
        else:
            nodes.append(helper.make_node("Concat", ["mean", "variance"], ["out"], axis=1))
            outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, [batch, 2 * d])]

    graph = helper.make_graph(
        nodes,
        "darkwatch_autoencoder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, d_in])],
        outputs,
        inits,
    )
    model = helper.make_model(
        graph,
        producer_name="darkwatch tools/export_onnx.py",
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 8
    for k, v in {
        "darkwatch.model_id": meta["id"],
        "darkwatch.layout": layout,
        "darkwatch.variance": variance,
    }.items():
        p = model.metadata_props.add()
        p.key, p.value = k, v
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, out_path)
    print(f"{out_path}: {layout}, {variance}, d={d_in}, widths {widths}, model id {meta['id']}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--layout", choices=["split", "stacked"], default="split")
    ap.add_argument("--variance", choices=["variance", "log_variance"], default="variance")
    ap.add_argument("--batch", type=int, help="fixed batch size (default: dynamic)")
    ap.add_argument("--out", help="default: MODEL_DIR/model.onnx")
    a = ap.parse_args()
    out = a.out or os.path.join(a.model_dir, "model.onnx")
    export(a.model_dir, a.layout, out, a.variance, a.batch or "batch")


if __name__ == "__main__":
    main()
