#!/usr/bin/env python3
"""Generate the small, real ONNX models used by Aviary's demo and tests.

Run from anywhere (paths are resolved against the repository root):

    python scripts/make_models.py            # (re)write every model and card
    python scripts/make_models.py --verify   # also load and run them with onnxruntime

Only `onnx` and `numpy` are needed to generate (see scripts/requirements-models.txt);
`--verify` additionally needs `onnxruntime`.

Everything is deterministic: fixed seeds, float64 training whose final weights are
rounded to 6 decimals before being stored as float32, and fixed ONNX metadata, so a
re-run rewrites every file byte-for-byte the same.

Files written (layout `<repo>/<model>/<version>/model.onnx` + optional `model.toml`):

    deploy/local/models/demo/{1,2}/model.{onnx,toml}   3-class classifier, two versions
    deploy/local/models/mlp/1/model.{onnx,toml}        128 -> 512 -> 512 -> 256 -> 10 MLP
    tests/models/demo/{1,2}/model.{onnx,toml}          same bytes as the demo repository
    tests/models/types/1/model.onnx                    one Identity per KServe datatype
    tests/models/fixed/1/model.onnx                    fixed [2, 3] input, y = 2 * x
    tests/slow-models/slow/1/model.onnx                deliberately slow: 640 x (MatMul + Tanh)
    tests/bench-models/tabular/1/model.{onnx,toml}     16 features -> 32 ReLU -> 3 classes
    tests/warmup-models/reshape/1/model.onnx           Reshape(data, shape): fails on zeros

The slow model lives in its own repository because tests of `tests/models` expect that
folder's exact contents; it exists for drain and timeout tests that need requests to
stay in flight (batch 64 takes ~200 ms on one ONNX Runtime thread). The tabular model
likewise: it is the 16-feature classifier scripts/bench_data_quality.sh measures input
rules and drift tracking on.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
DEMO_REPO = REPO / "deploy" / "local" / "models"
TEST_REPO = REPO / "tests" / "models"
SLOW_REPO = REPO / "tests" / "slow-models"
BENCH_REPO = REPO / "tests" / "bench-models"
WARMUP_REPO = REPO / "tests" / "warmup-models"

# The slow model: SLOW_LAYERS x (MatMul with one shared WIDTH x WIDTH weight, Tanh).
SLOW_WIDTH = 512
SLOW_LAYERS = 640
SLOW_SEED = 512

OPSET = 17
IR_VERSION = 8
PRODUCER = "aviary-make-models"
PRODUCER_VERSION = "1"

FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
CLASSES = ["setosa", "versicolor", "virginica"]

# Per-class means and standard deviations of the synthetic, iris-like data set
# (loosely modelled on the summary statistics of Fisher's iris data; no real data used).
CLASS_MEANS = np.array(
    [
        [5.01, 3.42, 1.46, 0.24],
        [5.94, 2.77, 4.26, 1.33],
        [6.59, 2.97, 5.55, 2.03],
    ]
)
CLASS_STDS = np.array(
    [
        [0.35, 0.38, 0.17, 0.11],
        [0.52, 0.31, 0.47, 0.20],
        [0.64, 0.32, 0.55, 0.27],
    ]
)
TRAIN_PER_CLASS = 100
TEST_PER_CLASS = 50
DATA_SEED = 20240501

# KServe datatype (lowercase) -> ONNX element type, for tests/models/types.
TYPES = [
    ("bool", TensorProto.BOOL),
    ("int8", TensorProto.INT8),
    ("int16", TensorProto.INT16),
    ("int32", TensorProto.INT32),
    ("int64", TensorProto.INT64),
    ("uint8", TensorProto.UINT8),
    ("uint16", TensorProto.UINT16),
    ("uint32", TensorProto.UINT32),
    ("uint64", TensorProto.UINT64),
    ("fp16", TensorProto.FLOAT16),
    ("bf16", TensorProto.BFLOAT16),
    ("fp32", TensorProto.FLOAT),
    ("fp64", TensorProto.DOUBLE),
    ("bytes", TensorProto.STRING),
]


# --------------------------------------------------------------------------- data


def make_dataset():
    """Synthetic iris-like data: 4 Gaussian features per sample, 3 classes."""
    rng = np.random.default_rng(DATA_SEED)

    def draw(per_class):
        xs, ys = [], []
        for c in range(len(CLASSES)):
            xs.append(rng.normal(CLASS_MEANS[c], CLASS_STDS[c], size=(per_class, 4)))
            ys.append(np.full(per_class, c, dtype=np.int64))
        x = np.concatenate(xs)
        y = np.concatenate(ys)
        order = rng.permutation(len(y))
        return np.round(x[order], 1), y[order]

    x_train, y_train = draw(TRAIN_PER_CLASS)
    x_test, y_test = draw(TEST_PER_CLASS)
    return x_train, y_train, x_test, y_test


def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def rounded32(a):
    """Round to 6 decimals then store as float32 (stable across BLAS builds)."""
    return np.round(np.asarray(a, dtype=np.float64), 6).astype(np.float32)


def train_logreg(x, y, steps=300, lr=0.5):
    """Multinomial logistic regression, full-batch gradient descent on standardized x.

    The standardization is folded into the returned weights, so the model takes raw
    features: logits = x @ W + b.
    """
    mu, sd = x.mean(axis=0), x.std(axis=0)
    xs = (x - mu) / sd
    n, k = len(y), len(CLASSES)
    onehot = np.eye(k)[y]
    w = np.zeros((4, k))
    b = np.zeros(k)
    for _ in range(steps):
        p = softmax(xs @ w + b)
        g = (p - onehot) / n
        w -= lr * (xs.T @ g)
        b -= lr * g.sum(axis=0)
    w_raw = w / sd[:, None]
    b_raw = b - (mu / sd) @ w
    return {"W": rounded32(w_raw), "B": rounded32(b_raw)}


def train_mlp(x, y, hidden=16, steps=400, lr=0.3, seed=7):
    """One hidden ReLU layer of `hidden` units, full-batch gradient descent."""
    rng = np.random.default_rng(seed)
    mu, sd = x.mean(axis=0), x.std(axis=0)
    xs = (x - mu) / sd
    n, k = len(y), len(CLASSES)
    onehot = np.eye(k)[y]
    w1 = rng.normal(0.0, np.sqrt(2.0 / 4), size=(4, hidden))
    b1 = np.zeros(hidden)
    w2 = rng.normal(0.0, np.sqrt(1.0 / hidden), size=(hidden, k))
    b2 = np.zeros(k)
    for _ in range(steps):
        h_pre = xs @ w1 + b1
        h = np.maximum(h_pre, 0.0)
        p = softmax(h @ w2 + b2)
        g2 = (p - onehot) / n
        gw2 = h.T @ g2
        gb2 = g2.sum(axis=0)
        gh = (g2 @ w2.T) * (h_pre > 0)
        gw1 = xs.T @ gh
        gb1 = gh.sum(axis=0)
        w1 -= lr * gw1
        b1 -= lr * gb1
        w2 -= lr * gw2
        b2 -= lr * gb2
    w1_raw = w1 / sd[:, None]
    b1_raw = b1 - (mu / sd) @ w1
    return {
        "W1": rounded32(w1_raw),
        "B1": rounded32(b1_raw),
        "W2": rounded32(w2),
        "B2": rounded32(b2),
    }


def predict_np(params, x):
    """Float32 numpy forward pass of the exported graphs (for accuracy metrics)."""
    x = x.astype(np.float32)
    if "W" in params:
        z = x @ params["W"] + params["B"]
    else:
        h = np.maximum(x @ params["W1"] + params["B1"], 0.0)
        z = h @ params["W2"] + params["B2"]
    return softmax(z.astype(np.float64))


# --------------------------------------------------------------------------- graphs


def finish(graph, doc):
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name=PRODUCER,
        producer_version=PRODUCER_VERSION,
        doc_string=doc,
    )
    model.ir_version = IR_VERSION
    model.model_version = 1
    onnx.checker.check_model(model, full_check=True)
    return model


def demo_graph(params, name, doc):
    features = (params["W"] if "W" in params else params["W1"]).shape[0]
    nodes = []
    inits = []
    if "W" in params:
        inits += [numpy_helper.from_array(params["W"], "W"), numpy_helper.from_array(params["B"], "B")]
        nodes += [
            helper.make_node("MatMul", ["input", "W"], ["xw"], name="matmul"),
            helper.make_node("Add", ["xw", "B"], ["logits"], name="add"),
        ]
    else:
        for k in ("W1", "B1", "W2", "B2"):
            inits.append(numpy_helper.from_array(params[k], k))
        nodes += [
            helper.make_node("MatMul", ["input", "W1"], ["xw1"], name="matmul1"),
            helper.make_node("Add", ["xw1", "B1"], ["h_pre"], name="add1"),
            helper.make_node("Relu", ["h_pre"], ["h"], name="relu1"),
            helper.make_node("MatMul", ["h", "W2"], ["hw2"], name="matmul2"),
            helper.make_node("Add", ["hw2", "B2"], ["logits"], name="add2"),
        ]
    nodes += [
        helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1),
        helper.make_node("ArgMax", ["probabilities"], ["label"], name="argmax", axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        name,
        inputs=[helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", features])],
        outputs=[
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
        ],
        initializer=inits,
    )
    return finish(graph, doc)


def mlp_model(seed=1234):
    """128 -> 512 -> 512 -> 256 -> 10 MLP with seeded He-scaled random weights."""
    rng = np.random.default_rng(seed)
    sizes = [128, 512, 512, 256, 10]
    nodes, inits = [], []
    prev = "input"
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
        w = (rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        b = (rng.standard_normal(fan_out) * 0.01).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"fc{i}.weight"), numpy_helper.from_array(b, f"fc{i}.bias")]
        last = i == len(sizes) - 1
        out = "logits" if last else f"fc{i}"
        nodes.append(helper.make_node("Gemm", [prev, f"fc{i}.weight", f"fc{i}.bias"], [out], name=f"fc{i}"))
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"relu{i}"], name=f"relu{i}"))
            prev = f"relu{i}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        inputs=[helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 128])],
        outputs=[helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=inits,
    )
    return finish(graph, "Benchmark MLP 128-512-512-256-10 with seeded random weights (untrained).")


def tabular_params(seed=16, features=16, hidden=32):
    """A 16-feature tabular classifier's shape with seeded He-scaled random weights."""
    rng = np.random.default_rng(seed)
    return {
        "W1": (rng.standard_normal((features, hidden)) * np.sqrt(2.0 / features)).astype(np.float32),
        "B1": np.zeros(hidden, dtype=np.float32),
        "W2": (rng.standard_normal((hidden, 3)) * np.sqrt(2.0 / hidden)).astype(np.float32),
        "B2": np.zeros(3, dtype=np.float32),
    }


def types_model():
    nodes, inputs, outputs = [], [], []
    for t, elem in TYPES:
        inputs.append(helper.make_tensor_value_info(f"in_{t}", elem, ["n"]))
        outputs.append(helper.make_tensor_value_info(f"out_{t}", elem, ["n"]))
        nodes.append(helper.make_node("Identity", [f"in_{t}"], [f"out_{t}"], name=f"identity_{t}"))
    graph = helper.make_graph(nodes, "types", inputs=inputs, outputs=outputs)
    return finish(graph, "out_<t> = Identity(in_<t>) for every KServe datatype <t>; 1-D dynamic shapes.")


def fixed_model():
    two = numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["y"], name="mul")],
        "fixed",
        inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        initializer=[two],
    )
    return finish(graph, "y = 2 * x with a fully fixed [2, 3] FP32 shape.")


def reshape_model():
    """out = Reshape(data, shape): valid, but not for an all-zero `shape` (ONNX reads 0 as
    "copy that dimension of data", which has only one): a zero-filled warm-up fails."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["data", "shape"], ["out"], name="reshape")],
        "reshape",
        inputs=[
            helper.make_tensor_value_info("data", TensorProto.FLOAT, [4]),
            helper.make_tensor_value_info("shape", TensorProto.INT64, [2]),
        ],
        outputs=[helper.make_tensor_value_info("out", TensorProto.FLOAT, ["rows", "columns"])],
    )
    return finish(graph, "out = Reshape(data, shape): fails on an all-zero shape, as a zero-filled warm-up sends.")


def slow_model():
    """y = tanh(...tanh(tanh(x @ W) @ W)... @ W), SLOW_LAYERS times, one shared W.

    One initializer keeps the file ~1 MB however many layers there are. W is random
    normal with gain 1.5 / sqrt(width): with Tanh between the MatMuls, activations stay
    within [-1, 1] and of order one instead of decaying towards 0 over 640 layers.
    """
    rng = np.random.default_rng(SLOW_SEED)
    w = (rng.standard_normal((SLOW_WIDTH, SLOW_WIDTH)) * (1.5 / np.sqrt(SLOW_WIDTH))).astype(np.float32)
    nodes, prev = [], "x"
    for i in range(SLOW_LAYERS):
        out = "y" if i == SLOW_LAYERS - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, "w"], [f"m{i}"], name=f"matmul{i}"))
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [out], name=f"tanh{i}"))
        prev = out
    graph = helper.make_graph(
        nodes,
        "slow",
        inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", SLOW_WIDTH])],
        outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", SLOW_WIDTH])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    return finish(
        graph,
        f"Deliberately slow model for drain tests: {SLOW_LAYERS} x (MatMul with one shared "
        f"{SLOW_WIDTH}x{SLOW_WIDTH} weight, then Tanh). Its outputs carry no meaning.",
    )


# --------------------------------------------------------------------------- cards


def toml_str(s):
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def model_card(
    description,
    owner,
    intended_use,
    limitations,
    training_data,
    metrics,
    default=None,
    labels=None,
    sequences=False,
    record=None,
):
    lines = [
        f"description = {toml_str(description)}",
        f"owner = {toml_str(owner)}",
        f"intended_use = {toml_str(intended_use)}",
        f"limitations = {toml_str(limitations)}",
        f"training_data = {toml_str(training_data)}",
    ]
    if sequences:
        # Stateless: every request of a sequence can be served alone.
        lines.append("sequences = true")
    if record:
        # The registry record's semantic version. No `sha256`: tests swap these model
        # files in place to exercise hot swap, which a stated SHA-256 would refuse.
        lines.append(f"semver = {toml_str(record['semver'])}")
    lines += ["", "[metrics]"]
    for k, v in metrics.items():
        lines.append(f"{k} = {float(v)!r}")
    if default:
        # What a gateway answers with when a call fails and the route opts in: one
        # example's outputs, repeated per row.
        lines += ["", "[default_prediction]"]
        for k, v in default.items():
            lines.append(f"{k} = [{', '.join(repr(x) for x in v)}]")
    if labels:
        # Class names of classification outputs (Triton's classification extension).
        lines += ["", "[labels]"]
        for k, v in labels.items():
            lines.append(f"{k} = [{', '.join(toml_str(x) for x in v)}]")
    if record:
        lineage = record["lineage"]
        lines += ["", "[lineage]"]
        for k in ("dataset", "dataset_sha256", "training_run"):
            lines.append(f"{k} = {toml_str(lineage[k])}")
        lines += ["", "[lineage.hyperparameters]"]
        for k, v in lineage["hyperparameters"].items():
            lines.append(f"{k} = {v!r}")
    return "\n".join(lines) + "\n"


def registry_record(semver, dataset_sha256, run, hyperparameters):
    """A card's registry record for a model generated here: no code revision (the
    script is the code), the data's hash over the training arrays' bytes."""
    return {
        "semver": semver,
        "lineage": {
            "dataset": f"generated by scripts/make_models.py (numpy seed {DATA_SEED})",
            "dataset_sha256": dataset_sha256,
            "training_run": run,
            "hyperparameters": hyperparameters,
        },
    }


# No class: equal probabilities and label -1.
DEMO_DEFAULT = {"probabilities": [0.3333, 0.3333, 0.3334], "label": [-1]}


DATA_DESC = (
    f"Synthetic iris-like data generated by scripts/make_models.py (numpy seed {DATA_SEED}): "
    f"4 features ({', '.join(FEATURES)}; cm, rounded to 0.1) drawn from per-class Gaussians "
    f"for 3 classes ({', '.join(CLASSES)}); {TRAIN_PER_CLASS * 3} training samples, "
    f"{TEST_PER_CLASS * 3} held-out samples. No real data."
)


# --------------------------------------------------------------------------- writing


def write_bytes(path: Path, data: bytes, written: list):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    written.append(path)


def build():
    x_train, y_train, x_test, y_test = make_dataset()

    p1 = train_logreg(x_train, y_train)
    p2 = train_mlp(x_train, y_train)

    def metrics(params):
        p_test = predict_np(params, x_test)
        p_train = predict_np(params, x_train)
        nll = -np.mean(np.log(np.clip(p_test[np.arange(len(y_test)), y_test], 1e-12, 1.0)))
        return {
            "heldout_accuracy": round(float(np.mean(p_test.argmax(1) == y_test)), 4),
            "train_accuracy": round(float(np.mean(p_train.argmax(1) == y_train)), 4),
            "heldout_log_loss": round(float(nll), 4),
        }

    m1, m2 = metrics(p1), metrics(p2)
    dataset_sha256 = hashlib.sha256(
        np.ascontiguousarray(x_train).tobytes() + np.ascontiguousarray(y_train).tobytes()
    ).hexdigest()

    owner = "Aviary maintainers"
    demo_use = "Demo and testing of the Aviary gateway (routing, versioning, metadata, inference). Not for real decisions."
    files = {}
    files["demo/1/model.onnx"] = demo_graph(
        p1, "demo_v1", "Demo v1: softmax regression (MatMul+Add+Softmax) on synthetic iris-like data."
    ).SerializeToString()
    files["demo/1/model.toml"] = model_card(
        "Demo classifier v1: multinomial logistic regression (4 features -> 3 classes), "
        "outputs class probabilities and the argmax label.",
        owner,
        demo_use,
        "Trained only on synthetic Gaussian data; says nothing about real flowers. "
        "Inputs far from the training range give overconfident probabilities.",
        DATA_DESC + " Trained with 300 steps of full-batch gradient descent (lr 0.5) on standardized features.",
        m1,
        DEMO_DEFAULT,
        labels={"probabilities": CLASSES},
        sequences=True,
        record=registry_record(
            "1.0.0", dataset_sha256, "make_models.py:demo_v1", {"steps": 300, "lr": 0.5}
        ),
    ).encode()
    files["demo/2/model.onnx"] = demo_graph(
        p2, "demo_v2", "Demo v2: MLP with one 16-unit ReLU hidden layer on synthetic iris-like data."
    ).SerializeToString()
    files["demo/2/model.toml"] = model_card(
        "Demo classifier v2: MLP with one hidden ReLU layer of 16 units (4 features -> 3 classes), "
        "outputs class probabilities and the argmax label.",
        owner,
        demo_use,
        "Trained only on synthetic Gaussian data; says nothing about real flowers. "
        "Inputs far from the training range give overconfident probabilities.",
        DATA_DESC + " Trained with 400 steps of full-batch gradient descent (lr 0.3, init seed 7) on standardized features.",
        m2,
        DEMO_DEFAULT,
        labels={"probabilities": CLASSES},
        sequences=True,
        record=registry_record(
            "2.0.0",
            dataset_sha256,
            "make_models.py:demo_v2",
            {"steps": 400, "lr": 0.3, "hidden_units": 16, "init_seed": 7},
        ),
    ).encode()

    mlp_bytes = mlp_model().SerializeToString()
    mlp_card = model_card(
        "Benchmark MLP: 128 -> 512 -> 512 -> 256 -> 10 (Gemm + ReLU), outputs 10 logits.",
        owner,
        "Load and latency benchmarks of the Aviary gateway. Its outputs carry no meaning.",
        "Untrained: weights are seeded random (He-scaled normal, seed 1234). Do not use for predictions.",
        "None (not trained).",
        {"parameters": 128 * 512 + 512 + 512 * 512 + 512 + 512 * 256 + 256 + 256 * 10 + 10},
    ).encode()

    written = []
    for rel, data in files.items():
        write_bytes(DEMO_REPO / rel, data, written)
        write_bytes(TEST_REPO / rel, data, written)
    write_bytes(DEMO_REPO / "mlp/1/model.onnx", mlp_bytes, written)
    write_bytes(DEMO_REPO / "mlp/1/model.toml", mlp_card, written)
    write_bytes(TEST_REPO / "types/1/model.onnx", types_model().SerializeToString(), written)
    write_bytes(TEST_REPO / "fixed/1/model.onnx", fixed_model().SerializeToString(), written)
    write_bytes(SLOW_REPO / "slow/1/model.onnx", slow_model().SerializeToString(), written)
    write_bytes(WARMUP_REPO / "reshape/1/model.onnx", reshape_model().SerializeToString(), written)
    tabular = demo_graph(
        tabular_params(),
        "tabular",
        "Benchmark tabular classifier: 16 features -> 32 ReLU -> 3 classes (probabilities and label), seeded random weights.",
    )
    write_bytes(BENCH_REPO / "tabular/1/model.onnx", tabular.SerializeToString(), written)
    write_bytes(
        BENCH_REPO / "tabular/1/model.toml",
        model_card(
            "Benchmark tabular classifier: 16 features -> 32 (ReLU) -> 3 classes, outputs class "
            "probabilities and the argmax label.",
            owner,
            "Benchmarks of input rules and drift tracking (scripts/bench_data_quality.sh). Its outputs carry no meaning.",
            "Untrained: weights are seeded random (He-scaled normal, seed 16). Do not use for predictions.",
            "None (not trained).",
            {"parameters": 16 * 32 + 32 + 32 * 3 + 3},
        ).encode(),
        written,
    )

    for p in written:
        print(f"wrote {p.relative_to(REPO)} ({p.stat().st_size} bytes)")
    print(f"demo v1 metrics: {m1}")
    print(f"demo v2 metrics: {m2}")
    return written


# --------------------------------------------------------------------------- verify


def verify():
    import onnxruntime as ort

    print(f"onnxruntime {ort.__version__}")

    def sess(path):
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    sample = np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)
    batch = np.array([[5.1, 3.5, 1.4, 0.2], [6.0, 2.8, 4.5, 1.4], [6.7, 3.0, 5.6, 2.2]], dtype=np.float32)
    probs = {}
    for repo in (DEMO_REPO, TEST_REPO):
        for v in ("1", "2"):
            s = sess(repo / "demo" / v / "model.onnx")
            p, label = s.run(None, {"input": sample})
            pb, lb = s.run(None, {"input": batch})
            assert p.dtype == np.float32 and p.shape == (1, 3), p
            assert label.dtype == np.int64 and label.shape == (1,), label
            assert np.allclose(p.sum(axis=1), 1.0, atol=1e-5)
            probs.setdefault(v, p)
            print(f"{repo.relative_to(REPO)}/demo/{v}: probabilities={p.tolist()} label={label.tolist()} "
                  f"batch labels={lb.tolist()}")
    diff = float(np.max(np.abs(probs["1"] - probs["2"])))
    print(f"max |v1 - v2| for [[5.1,3.5,1.4,0.2]] = {diff:.6f}")
    assert diff > 1e-3, "demo v1 and v2 must differ"

    s = sess(DEMO_REPO / "mlp/1/model.onnx")
    x = np.random.default_rng(0).standard_normal((4, 128)).astype(np.float32)
    (logits,) = s.run(None, {"input": x})
    assert logits.shape == (4, 10) and np.all(np.isfinite(logits)) and np.any(logits != 0)
    print(f"mlp/1: logits[0]={np.round(logits[0], 4).tolist()}")

    s = sess(TEST_REPO / "fixed/1/model.onnx")
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    (y,) = s.run(None, {"x": x})
    assert np.array_equal(y, x * 2)
    print(f"fixed/1: y={y.tolist()}")

    # slow/1 on one thread, as the tests run it (intra_op_threads = 1).
    import time

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    s = ort.InferenceSession(
        str(SLOW_REPO / "slow/1/model.onnx"), options, providers=["CPUExecutionProvider"]
    )
    x = np.random.default_rng(0).standard_normal((64, SLOW_WIDTH)).astype(np.float32)
    (y,) = s.run(None, {"x": x})
    assert y.shape == (64, SLOW_WIDTH) and y.dtype == np.float32, (y.shape, y.dtype)
    assert np.all(np.isfinite(y)) and np.mean(np.abs(y)) > 0.05, np.mean(np.abs(y))
    times = []
    for _ in range(5):
        started = time.perf_counter()
        s.run(None, {"x": x})
        times.append(time.perf_counter() - started)
    print(f"slow/1: batch 64 on one thread: median {sorted(times)[2] * 1e3:.0f} ms, mean |y| {np.mean(np.abs(y)):.3f}")

    # types/1. The Python binding cannot turn a bfloat16 tensor into numpy, and cannot
    # make an OrtValue from a string array, so the run is done in two steps:
    #   1. the real file, all 14 inputs fed, every output but out_bf16 fetched and checked;
    #   2. the same file with only its bf16 input/node/output kept, run with OrtValues,
    #      and the raw 16-bit patterns of out_bf16 read back through data_ptr().
    types_path = TEST_REPO / "types/1/model.onnx"
    s = sess(types_path)
    bf16_raw = np.array([0x3FC0, 0xC010, 0x7F7F, 0x0000], dtype=np.uint16)  # 1.5, -2.25, max, 0
    feeds, expect = {}, {}
    for t, elem in TYPES:
        if t == "bool":
            a = np.array([True, False, True, False])
        elif t == "bytes":
            a = np.array(["hello", "", "w\u00f6rld", "a\x00b"], dtype=object)
        elif t == "bf16":
            feeds["in_bf16"] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bf16_raw, elem)
            continue
        elif t in ("fp16", "fp32", "fp64"):
            big = 65504.0 if t == "fp16" else 1e30
            a = np.array([1.5, -2.25, big, np.inf], dtype=helper.tensor_dtype_to_np_dtype(elem))
        else:
            dt = helper.tensor_dtype_to_np_dtype(elem)
            info = np.iinfo(dt)
            a = np.array([info.min, 0, 1, info.max], dtype=dt)
        feeds[f"in_{t}"] = a
        expect[f"out_{t}"] = a
    names = [o.name for o in s.get_outputs() if o.name != "out_bf16"]
    for name, got in zip(names, s.run(names, feeds)):
        want = expect[name]
        assert got.dtype == want.dtype, (name, got.dtype, want.dtype)
        assert got.shape == want.shape and all(g == w for g, w in zip(got.tolist(), want.tolist())), (name, got, want)
        print(f"  {name}: {got.dtype} {got.tolist()}")

    m = onnx.load(str(types_path))
    keep = lambda vs: [v for v in vs if v.name.endswith("_bf16")]  # noqa: E731
    g = m.graph
    nodes, ins, outs = keep(g.node), keep(g.input), keep(g.output)
    del g.node[:], g.input[:], g.output[:]
    g.node.extend(nodes), g.input.extend(ins), g.output.extend(outs)
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    (ov,) = s.run_with_ort_values(
        ["out_bf16"], {"in_bf16": ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bf16_raw, TensorProto.BFLOAT16)}
    )
    import ctypes

    n = int(np.prod(ov.shape()))
    got = np.ctypeslib.as_array((ctypes.c_uint16 * n).from_address(ov.data_ptr())).copy()
    assert ov.data_type() == "tensor(bfloat16)" and np.array_equal(got, bf16_raw), (ov.data_type(), got)
    print(f"  out_bf16: {ov.data_type()} raw bits {[hex(v) for v in got.tolist()]}")
    print("types/1: every datatype round-trips")
    print("verify: OK")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--verify", action="store_true", help="load and run every model with onnxruntime")
    args = ap.parse_args()
    build()
    if args.verify:
        verify()
    return 0


if __name__ == "__main__":
    sys.exit(main())
