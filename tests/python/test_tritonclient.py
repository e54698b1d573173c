"""End-to-end tests of the Aviary gateway with the stock Triton/KServe v2 gRPC client.

The test starts the real gateway binary (env AVIARY_BIN, else target/debug/aviary)
with tests/python/aviary-test.toml on an ephemeral port, waits for the line
`aviary: listening on 127.0.0.1:PORT` on its stdout, and talks to it with
`tritonclient.grpc` (test_tritonclient_http.py: the same server's HTTP/REST endpoint). Expected outputs are computed independently with the Python
onnxruntime package from the model files in tests/models.

    pip install -r tests/python/requirements.txt
    cargo build
    pytest tests/python
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import json
import shutil

import grpc
import ml_dtypes
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

REPO = Path(__file__).resolve().parents[2]
CONFIG = Path("tests") / "python" / "aviary-test.toml"
MODELS = REPO / "tests" / "models"
READY_RE = re.compile(r"^aviary: listening on (127\.0\.0\.1:\d+)$")
HTTP_RE = re.compile(r"^aviary: http listening on (127\.0\.0\.1:\d+)$")
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0

BATCH = np.array(
    [
        [5.1, 3.5, 1.4, 0.2],
        [6.2, 2.9, 4.3, 1.3],
        [7.7, 3.0, 6.1, 2.3],
    ],
    dtype=np.float32,
)


# --------------------------------------------------------------------------- server


def aviary_bin() -> Path:
    env = os.environ.get("AVIARY_BIN")
    return Path(env) if env else REPO / "target" / "debug" / "aviary"


class Server:
    def __init__(self, proc: subprocess.Popen, address: str, http_address: str, stderr_lines: list[str]):
        self.proc = proc
        self.address = address
        self.http_address = http_address
        self.stderr_lines = stderr_lines

    def stderr(self) -> str:
        return "".join(self.stderr_lines)


def _pump(stream, sink):
    for line in iter(stream.readline, ""):
        sink(line)
    stream.close()


def launch(config: Path) -> Server:
    """Starts `aviary serve --config config` on ephemeral ports; fails the test if it does not listen."""
    binary = aviary_bin()
    if not binary.is_file():
        pytest.fail(f"aviary binary not found at {binary} (build it with `cargo build` or set AVIARY_BIN)")

    proc = subprocess.Popen(
        [
            str(binary),
            "serve",
            "--config",
            str(config),
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        errors="replace",
    )
    stdout_q: queue.Queue = queue.Queue()
    stderr_lines: list[str] = []
    # Drain both pipes for the whole life of the process so it never blocks on a full pipe.
    threading.Thread(target=_pump, args=(proc.stdout, stdout_q.put), daemon=True).start()
    threading.Thread(target=_pump, args=(proc.stderr, stderr_lines.append), daemon=True).start()

    address = None
    http_address = None
    stdout_seen: list[str] = []
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        # The gRPC listener is bound first and the HTTP one last; both lines are awaited.
        while address is None or http_address is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"timed out after {START_TIMEOUT_S:.0f}s waiting for the listening line")
            try:
                line = stdout_q.get(timeout=min(remaining, 0.2))
            except queue.Empty:
                if proc.poll() is not None and stdout_q.empty():
                    raise RuntimeError(f"aviary exited with code {proc.returncode} before it was ready")
                continue
            stdout_seen.append(line)
            m = READY_RE.match(line.rstrip("\r\n"))
            if m:
                address = m.group(1)
            m = HTTP_RE.match(line.rstrip("\r\n"))
            if m:
                http_address = m.group(1)
    except RuntimeError as e:
        _stop(proc)
        time.sleep(0.2)  # let the pump threads collect the last stderr lines
        pytest.fail(
            f"{e}\n--- aviary stdout ---\n{''.join(stdout_seen)}\n--- aviary stderr ---\n{''.join(stderr_lines)}"
        )
    return Server(proc, address, http_address, stderr_lines)


@pytest.fixture(scope="session")
def server():
    srv = launch(CONFIG)
    yield srv
    _stop(srv.proc)


def _stop(proc: subprocess.Popen):
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT_S)


@pytest.fixture(scope="session")
def client(server):
    c = grpcclient.InferenceServerClient(url=server.address)
    yield c
    c.close()


@pytest.fixture(scope="session")
def stub(server):
    """Raw gRPC stub, for requests the tritonclient API cannot express (typed contents)."""
    channel = grpc.insecure_channel(server.address)
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


# --------------------------------------------------------------------------- oracle


_SESSIONS: dict[str, ort.InferenceSession] = {}


def oracle(model: str, version: str, feeds: dict) -> dict:
    """Run tests/models/<model>/<version>/model.onnx with Python onnxruntime."""
    key = f"{model}/{version}"
    if key not in _SESSIONS:
        _SESSIONS[key] = ort.InferenceSession(
            str(MODELS / model / version / "model.onnx"), providers=["CPUExecutionProvider"]
        )
    sess = _SESSIONS[key]
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def assert_demo_outputs(version: str, probabilities, label, batch=BATCH):
    want = oracle("demo", version, {"input": batch})
    assert probabilities is not None, "probabilities output missing"
    assert label is not None, "label output missing"
    assert probabilities.dtype == np.float32, probabilities.dtype
    assert label.dtype == np.int64, label.dtype
    assert probabilities.shape == (len(batch), 3), probabilities.shape
    assert label.shape == (len(batch),), label.shape
    assert np.allclose(probabilities, want["probabilities"], rtol=0, atol=1e-5), (
        f"version {version}: got {probabilities.tolist()}, onnxruntime says {want['probabilities'].tolist()}"
    )
    assert np.array_equal(label, want["label"]), (label.tolist(), want["label"].tolist())


def status_of(exc: InferenceServerException) -> str:
    return str(exc.status())


# --------------------------------------------------------------------------- infer helpers


def infer_with_client(client, model="demo", version="", batch=BATCH, outputs=None):
    """binary_data=True: tritonclient's gRPC InferInput always sends raw_input_contents."""
    inp = grpcclient.InferInput("input", list(batch.shape), "FP32")
    inp.set_data_from_numpy(batch)
    requested = [grpcclient.InferRequestedOutput(n) for n in outputs] if outputs else None
    result = client.infer(model, [inp], model_version=version, outputs=requested)
    return result, result.get_response().model_version


_CONTENT_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_NP = {
    "BOOL": np.bool_,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "FP32": np.float32,
    "FP64": np.float64,
}


def decode_outputs(resp: service_pb2.ModelInferResponse) -> dict:
    """Decode a ModelInferResponse whether the server used raw_output_contents or typed contents."""
    out = {}
    use_raw = len(resp.raw_output_contents) > 0
    if use_raw:
        assert len(resp.raw_output_contents) == len(resp.outputs), "raw_output_contents / outputs mismatch"
    for i, o in enumerate(resp.outputs):
        shape = list(o.shape)
        if use_raw:
            arr = grpcclient.InferResult(resp).as_numpy(o.name)
        else:
            values = list(getattr(o.contents, _CONTENT_FIELD[o.datatype]))
            arr = np.array(values, dtype=_NP.get(o.datatype, object)).reshape(shape)
        out[o.name] = arr
    return out


def infer_with_contents(stub, model="demo", version="", batch=BATCH):
    """binary_data=False: the input goes in InferTensorContents.fp32_contents (no raw bytes)."""
    req = service_pb2.ModelInferRequest(model_name=model, model_version=version)
    tensor = req.inputs.add()
    tensor.name = "input"
    tensor.datatype = "FP32"
    tensor.shape.extend(batch.shape)
    tensor.contents.fp32_contents.extend(batch.reshape(-1).tolist())
    resp = stub.ModelInfer(req, timeout=30)
    return decode_outputs(resp), resp.model_version


# --------------------------------------------------------------------------- health


def test_server_live(client):
    assert client.is_server_live() is True


READY_TIMEOUT_S = 15.0


def eventually(condition, timeout_s: float, interval_s: float = 0.05) -> bool:
    """Polls `condition` until it returns True or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)


def test_server_ready(client):
    # Readiness follows the versions' load state, which the gateway reports on its own
    # schedule: poll it, with a deadline, instead of asking once.
    assert eventually(lambda: client.is_server_ready() is True, READY_TIMEOUT_S), "ServerReady never turned true"


def test_model_ready(client):
    assert eventually(lambda: client.is_model_ready("demo") is True, READY_TIMEOUT_S), "demo never turned ready"


def test_unknown_model_not_ready(client):
    assert client.is_model_ready("nope") is False


# --------------------------------------------------------------------------- metadata / config


def test_model_metadata(client):
    md = client.get_model_metadata("demo")
    assert md.name == "demo"
    assert {"1", "2"} <= set(md.versions), list(md.versions)
    assert md.platform == "onnxruntime_onnx"

    inputs = {t.name: t for t in md.inputs}
    assert list(inputs) == ["input"], list(inputs)
    assert inputs["input"].datatype == "FP32"
    assert list(inputs["input"].shape) == [-1, 4]

    outputs = {t.name: t for t in md.outputs}
    assert set(outputs) == {"probabilities", "label"}, list(outputs)
    assert outputs["probabilities"].datatype == "FP32"
    assert list(outputs["probabilities"].shape) == [-1, 3]
    assert outputs["label"].datatype == "INT64"
    assert list(outputs["label"].shape) == [-1]


def test_model_config(client):
    cfg = client.get_model_config("demo").config
    assert cfg.name == "demo"
    assert cfg.platform == "onnxruntime_onnx"
    assert cfg.backend == "onnxruntime"
    assert cfg.max_batch_size == 0
    inputs = {t.name: t for t in cfg.input}
    assert list(inputs) == ["input"], list(inputs)
    assert inputs["input"].data_type == model_config_pb2.TYPE_FP32
    assert list(inputs["input"].dims) == [-1, 4]


def test_model_config_outputs(client):
    cfg = client.get_model_config("demo").config
    outputs = {t.name: t for t in cfg.output}
    assert set(outputs) == {"probabilities", "label"}, list(outputs)
    assert outputs["probabilities"].data_type == model_config_pb2.TYPE_FP32
    assert list(outputs["probabilities"].dims) == [-1, 3]
    assert outputs["label"].data_type == model_config_pb2.TYPE_INT64
    assert list(outputs["label"].dims) == [-1]


# --------------------------------------------------------------------------- inference


def test_oracle_versions_differ():
    """Guard: the two demo versions must be distinguishable, or the routing checks prove nothing."""
    p1 = oracle("demo", "1", {"input": BATCH})["probabilities"]
    p2 = oracle("demo", "2", {"input": BATCH})["probabilities"]
    assert np.max(np.abs(p1 - p2)) > 1e-3


@pytest.mark.parametrize("binary_data", [True, False], ids=["binary", "contents"])
@pytest.mark.parametrize("version", ["1", "2"])
def test_infer_pinned_version(client, stub, version, binary_data):
    if binary_data:
        result, got_version = infer_with_client(client, version=version)
        probabilities, label = result.as_numpy("probabilities"), result.as_numpy("label")
    else:
        outs, got_version = infer_with_contents(stub, version=version)
        probabilities, label = outs.get("probabilities"), outs.get("label")
    assert got_version == version
    assert_demo_outputs(version, probabilities, label)


@pytest.mark.parametrize("binary_data", [True, False], ids=["binary", "contents"])
def test_infer_unpinned(client, stub, binary_data):
    for _ in range(5):
        if binary_data:
            result, got_version = infer_with_client(client)
            probabilities, label = result.as_numpy("probabilities"), result.as_numpy("label")
        else:
            outs, got_version = infer_with_contents(stub)
            probabilities, label = outs.get("probabilities"), outs.get("label")
        assert got_version in {"1", "2"}, got_version
        assert_demo_outputs(got_version, probabilities, label)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_infer_with_request_compression(client, algorithm):
    """tritonclient's compression_algorithm: the request arrives compressed and is served."""
    inp = grpcclient.InferInput("input", list(BATCH.shape), "FP32")
    inp.set_data_from_numpy(BATCH)
    result = client.infer("demo", [inp], model_version="1", compression_algorithm=algorithm)
    assert result.get_response().model_version == "1"
    assert_demo_outputs("1", result.as_numpy("probabilities"), result.as_numpy("label"))


def test_unpinned_routing_reaches_both_versions(client):
    """routes.demo splits 50/50: 40 unpinned requests all landing on one version has odds ~2e-12."""
    seen = set()
    for _ in range(40):
        _, got_version = infer_with_client(client)
        seen.add(got_version)
        if seen == {"1", "2"}:
            break
    assert seen == {"1", "2"}, f"only saw versions {sorted(seen)}"


def test_infer_requested_output_subset(client):
    result, got_version = infer_with_client(client, version="1", outputs=["label"])
    assert result.as_numpy("probabilities") is None, "unrequested output was returned"
    label = result.as_numpy("label")
    want = oracle("demo", "1", {"input": BATCH})["label"]
    assert label is not None and np.array_equal(label, want)


def test_infer_unknown_model_not_found(client):
    with pytest.raises(InferenceServerException) as ei:
        infer_with_client(client, model="nope")
    assert status_of(ei.value) == str(grpc.StatusCode.NOT_FOUND), (status_of(ei.value), ei.value.message())
    # Triton's wording, which Triton's own examples and tests match on.
    assert ei.value.message().startswith("Request for unknown model: 'nope' is not found"), ei.value.message()


def test_infer_unknown_version_not_found(client):
    with pytest.raises(InferenceServerException) as ei:
        infer_with_client(client, version="9")
    assert status_of(ei.value) == str(grpc.StatusCode.NOT_FOUND), (status_of(ei.value), ei.value.message())
    assert ei.value.message().startswith("Request for unknown model: 'demo' version 9 is not found"), ei.value.message()


def test_missing_input_uses_tritons_wording(stub):
    request = service_pb2.ModelInferRequest(model_name="demo", model_version="1")
    with pytest.raises(grpc.RpcError) as ei:
        stub.ModelInfer(request)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, ei.value
    assert ei.value.details().startswith("expected 1 inputs but got 0 inputs for model 'demo'"), ei.value.details()


@pytest.mark.parametrize("binary_data", [True, False], ids=["binary", "contents"])
def test_infer_wrong_shape_invalid_argument(client, stub, binary_data):
    bad = np.zeros((3, 5), dtype=np.float32)
    if binary_data:
        with pytest.raises(InferenceServerException) as ei:
            infer_with_client(client, version="1", batch=bad)
        status, message = status_of(ei.value), ei.value.message()
    else:
        with pytest.raises(grpc.RpcError) as ei:
            infer_with_contents(stub, version="1", batch=bad)
        status, message = str(ei.value.code()), ei.value.details()
    assert status == str(grpc.StatusCode.INVALID_ARGUMENT), (status, message)
    assert "input" in message, message


# --------------------------------------------------------------------------- every datatype


TYPES = [
    ("bool", "BOOL", np.array([True, False, True])),
    ("int8", "INT8", np.array([-128, 0, 127], dtype=np.int8)),
    ("int16", "INT16", np.array([-32768, 1, 32767], dtype=np.int16)),
    ("int32", "INT32", np.array([-(2**31), 1, 2**31 - 1], dtype=np.int32)),
    ("int64", "INT64", np.array([-(2**63), 1, 2**63 - 1], dtype=np.int64)),
    ("uint8", "UINT8", np.array([0, 1, 255], dtype=np.uint8)),
    ("uint16", "UINT16", np.array([0, 1, 65535], dtype=np.uint16)),
    ("uint32", "UINT32", np.array([0, 1, 2**32 - 1], dtype=np.uint32)),
    ("uint64", "UINT64", np.array([0, 1, 2**64 - 1], dtype=np.uint64)),
    ("fp16", "FP16", np.array([1.5, -2.25, 65504.0], dtype=np.float16)),
    ("bf16", "BF16", np.array([1.5, -2.25, 3.0e38], dtype=ml_dtypes.bfloat16)),
    ("fp32", "FP32", np.array([1.5, -2.25, 1e30], dtype=np.float32)),
    ("fp64", "FP64", np.array([1.5, -2.25, 1e300], dtype=np.float64)),
    ("bytes", "BYTES", np.array([b"hello", b"", "w\u00f6rld".encode()], dtype=np.object_)),
]


def types_inputs():
    inputs = []
    for t, dt, arr in TYPES:
        inp = grpcclient.InferInput(f"in_{t}", list(arr.shape), dt)
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return inputs


# Binary BYTES elements: NUL bytes, invalid UTF-8, the start of a JPEG and a PNG file,
# 64 KiB of every byte value; ONNX Runtime's strings hold any bytes.
BINARY = np.array(
    [
        b"a\x00b",
        b"\xff\xfe\xfd",
        b"\xff\xd8\xff\xe0\x00\x10JFIF\x00",
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
        bytes(range(256)) * 256,
        b"",
    ],
    dtype=np.object_,
)


@pytest.mark.parametrize("binary_data", [True, False], ids=["binary", "contents"])
def test_binary_bytes_pass_through(client, stub, binary_data):
    """out_bytes = Identity(in_bytes): arbitrary binary elements come back byte for byte."""
    types = dict((t, arr) for t, _, arr in TYPES)
    types["bytes"] = BINARY
    if binary_data:
        inputs = []
        for t, dt, _ in TYPES:
            inp = grpcclient.InferInput(f"in_{t}", [len(types[t])], dt)
            inp.set_data_from_numpy(types[t])
            inputs.append(inp)
        got = client.infer("types", inputs).as_numpy("out_bytes")
        assert [bytes(v) for v in got.tolist()] == BINARY.tolist()
    else:
        request = service_pb2.ModelInferRequest(model_name="types")
        for t, dt, arr in TYPES:
            tensor = request.inputs.add(name=f"in_{t}", datatype=dt, shape=[len(types[t])])
            request.raw_input_contents.append(
                b"".join(len(e).to_bytes(4, "little") + e for e in types[t]) if dt == "BYTES" else arr.tobytes()
            )
        response = stub.ModelInfer(request)
        index = [o.name for o in response.outputs].index("out_bytes")
        raw = response.raw_output_contents[index]
        elements, at = [], 0
        while at < len(raw):
            size = int.from_bytes(raw[at : at + 4], "little")
            elements.append(raw[at + 4 : at + 4 + size])
            at += 4 + size
        assert elements == BINARY.tolist()


def test_types_round_trip(client):
    """tests/models/types: out_<t> = Identity(in_<t>) for every KServe datatype."""
    result = client.infer("types", types_inputs())
    for t, dt, arr in TYPES:
        got = result.as_numpy(f"out_{t}")
        assert got is not None, f"out_{t} missing"
        out = result.get_output(f"out_{t}")
        assert out.datatype == dt, (t, out.datatype)
        assert list(out.shape) == [len(arr)], (t, list(out.shape))
        if dt == "BYTES":
            assert [bytes(v) for v in got.tolist()] == arr.tolist(), (t, got)
        else:
            assert got.tobytes() == arr.tobytes(), (t, got, arr)


# --------------------------------------------------------------------------- parameters and extensions


def demo_input(batch=BATCH):
    inp = grpcclient.InferInput("input", list(batch.shape), "FP32")
    inp.set_data_from_numpy(batch)
    return inp


@pytest.mark.parametrize("class_count", [1, 2, 5])
def test_classification_extension(client, class_count):
    """InferRequestedOutput(class_count=k): the top k classes as "score:index:label" BYTES, row by row."""
    outputs = [grpcclient.InferRequestedOutput("probabilities", class_count=class_count)]
    result = client.infer("demo", [demo_input()], model_version="1", outputs=outputs)
    got = result.as_numpy("probabilities")
    k = min(class_count, 3)
    assert got.shape == (len(BATCH), k), got.shape
    want = oracle("demo", "1", {"input": BATCH})["probabilities"]
    labels = ["setosa", "versicolor", "virginica"]
    for row, classes in zip(want, got):
        top = np.argsort(-row, kind="stable")[:k]
        for index, element in zip(top, classes):
            score, got_index, label = element.decode().split(":")
            assert int(got_index) == index and label == labels[index], (element, row)
            assert abs(float(score) - row[index]) < 1e-6, (element, row)


def test_classification_of_integer_outputs_and_refused_for_strings(client):
    outputs = [grpcclient.InferRequestedOutput("out_int32", class_count=1)]
    result = client.infer("types", types_inputs(), outputs=outputs)
    # in_int32 = [-2**31, 1, 2**31 - 1]: the largest is index 2, an integer score.
    assert result.as_numpy("out_int32").tolist() == [b"2147483647:2"]
    outputs = [grpcclient.InferRequestedOutput("out_bytes", class_count=1)]
    with pytest.raises(InferenceServerException) as ei:
        client.infer("types", types_inputs(), outputs=outputs)
    assert status_of(ei.value) == str(grpc.StatusCode.INVALID_ARGUMENT), ei.value.message()
    assert ei.value.message().startswith('parameter "classification" of output "out_bytes"'), ei.value.message()


def test_triton_timeout_parameter_is_honoured(client):
    # Triton's `timeout` (microseconds): plenty here, so the request is served.
    result = client.infer("demo", [demo_input()], model_version="1", timeout=10_000_000)
    assert result.get_response().model_version == "1"


# Every request parameter Triton's client can send that Aviary does not implement, and
# custom parameters no route reads: refused with the code, naming the parameter.
REFUSED = [
    ("priority", {"priority": 5}, grpc.StatusCode.INVALID_ARGUMENT, 'parameter "priority"'),
    ("custom", {"parameters": {"my_knob": "x"}}, grpc.StatusCode.INVALID_ARGUMENT, 'parameter "my_knob"'),
]


@pytest.mark.parametrize("kwargs,code,named", [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_unimplemented_request_parameters_are_refused_by_name(client, kwargs, code, named):
    with pytest.raises(InferenceServerException) as ei:
        client.infer("demo", [demo_input()], model_version="1", **kwargs)
    assert status_of(ei.value) == str(code), (status_of(ei.value), ei.value.message())
    assert ei.value.message().startswith(named), ei.value.message()


# Parameters tritonclient itself will not let through (it reserves their names), sent
# with the raw stub: (where, name, value, code, message start).
RAW_REFUSED = [
    ("request", "binary_data_output", True, grpc.StatusCode.INVALID_ARGUMENT, 'parameter "binary_data_output"'),
    ("request", "sequence_end", True, grpc.StatusCode.INVALID_ARGUMENT, 'parameter "sequence_end"'),
    (
        "request",
        "triton_enable_empty_final_response",
        True,
        grpc.StatusCode.INVALID_ARGUMENT,
        'parameter "triton_enable_empty_final_response"',
    ),
    ("input", "binary_data_size", 48, grpc.StatusCode.INVALID_ARGUMENT, 'parameter "binary_data_size" of input'),
    ("input", "shared_memory_offset", 0, grpc.StatusCode.INVALID_ARGUMENT, 'input "input": shared_memory_offset'),
    ("output", "binary_data", True, grpc.StatusCode.INVALID_ARGUMENT, 'parameter "binary_data" of output'),
    ("output", "shared_memory_region", "r", grpc.StatusCode.INVALID_ARGUMENT, 'output "probabilities": shared_memory_region needs'),
    ("output", "classification", 0, grpc.StatusCode.INVALID_ARGUMENT, 'parameter "classification" of output'),
]


def set_parameter(parameters, value):
    if isinstance(value, bool):
        parameters.bool_param = value
    elif isinstance(value, int):
        parameters.int64_param = value
    else:
        parameters.string_param = value


@pytest.mark.parametrize(
    "where,name,value,code,named", RAW_REFUSED, ids=[f"{r[0]}-{r[1]}" for r in RAW_REFUSED]
)
def test_reserved_parameters_are_refused_by_name(stub, where, name, value, code, named):
    request = service_pb2.ModelInferRequest(model_name="demo", model_version="1")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(BATCH.shape))
    request.raw_input_contents.append(BATCH.tobytes())
    output = request.outputs.add(name="probabilities")
    target = {"request": request.parameters, "input": tensor.parameters, "output": output.parameters}[where]
    set_parameter(target[name], value)
    with pytest.raises(grpc.RpcError) as ei:
        stub.ModelInfer(request)
    assert ei.value.code() == code, (ei.value.code(), ei.value.details())
    assert ei.value.details().startswith(named), ei.value.details()


def test_system_shared_memory_inputs_and_outputs(client):
    """Triton's system shared memory: the input read from a region, the outputs written to one."""
    import tritonclient.utils.shared_memory as shm

    key = f"/aviary_test_{os.getpid()}"
    inputs_region = shm.create_shared_memory_region("inputs", key + "_in", BATCH.nbytes)
    outputs_region = shm.create_shared_memory_region("outputs", key + "_out", 1024)
    try:
        shm.set_shared_memory_region(inputs_region, [BATCH])
        client.register_system_shared_memory("inputs", key + "_in", BATCH.nbytes)
        client.register_system_shared_memory("outputs", key + "_out", 1024)
        status = client.get_system_shared_memory_status(as_json=True)
        assert set(status["regions"]) == {"inputs", "outputs"}, status

        inp = grpcclient.InferInput("input", list(BATCH.shape), "FP32")
        inp.set_shared_memory("inputs", BATCH.nbytes)
        probabilities = grpcclient.InferRequestedOutput("probabilities")
        probabilities.set_shared_memory("outputs", 3 * 3 * 4, offset=0)
        label = grpcclient.InferRequestedOutput("label")
        label.set_shared_memory("outputs", 3 * 8, offset=64)
        result = client.infer("demo", [inp], model_version="1", outputs=[probabilities, label])
        out = result.get_output("probabilities")
        assert out is not None and out.parameters["shared_memory_region"].string_param == "outputs"
        region = shm.get_contents_as_numpy(outputs_region, np.uint8, [1024]).tobytes()
        want = oracle("demo", "1", {"input": BATCH})
        got_probabilities = np.frombuffer(region[:36], np.float32).reshape(3, 3)
        assert np.allclose(got_probabilities, want["probabilities"], atol=1e-5), got_probabilities
        assert np.frombuffer(region[64:88], np.int64).tolist() == want["label"].tolist()

        # An output larger than its place is refused, saying how much it needs.
        small = grpcclient.InferRequestedOutput("probabilities")
        small.set_shared_memory("outputs", 8)
        with pytest.raises(InferenceServerException) as ei:
            client.infer("demo", [inp], model_version="1", outputs=[small])
        assert status_of(ei.value) == str(grpc.StatusCode.INVALID_ARGUMENT), ei.value.message()
        assert "should be at least 36 bytes" in ei.value.message(), ei.value.message()

        # A region registered twice, or never.
        with pytest.raises(InferenceServerException) as ei:
            client.register_system_shared_memory("inputs", key + "_in", 8)
        assert status_of(ei.value) == str(grpc.StatusCode.ALREADY_EXISTS), ei.value.message()
        with pytest.raises(InferenceServerException) as ei:
            client.get_system_shared_memory_status(region_name="nope")
        assert status_of(ei.value) == str(grpc.StatusCode.NOT_FOUND), ei.value.message()
    finally:
        client.unregister_system_shared_memory()
        shm.destroy_shared_memory_region(inputs_region)
        shm.destroy_shared_memory_region(outputs_region)
    assert client.get_system_shared_memory_status(as_json=True).get("regions", {}) == {}


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.get_cuda_shared_memory_status(),
        lambda c: c.unregister_cuda_shared_memory(),
        lambda c: c.get_trace_settings(),
        lambda c: c.update_log_settings({"log_verbose_level": 1}),
    ],
    ids=["cuda-status", "cuda-unregister", "trace", "log"],
)
def test_cuda_shared_memory_trace_and_log_settings_are_unimplemented_clearly(client, call):
    with pytest.raises(InferenceServerException) as ei:
        call(client)
    assert status_of(ei.value) == str(grpc.StatusCode.UNIMPLEMENTED), ei.value.message()
    assert "not supported" in ei.value.message(), ei.value.message()


def test_sequence_stays_on_one_version(client):
    """tritonclient's sequence_id/sequence_start/sequence_end: one version from start to end."""
    for sequence_id in range(1, 21):
        versions = set()
        for step in range(4):
            result = client.infer(
                "demo",
                [demo_input()],
                sequence_id=sequence_id,
                sequence_start=step == 0,
                sequence_end=step == 3,
            )
            versions.add(result.get_response().model_version)
        assert len(versions) == 1, (sequence_id, versions)


def test_sequence_to_a_model_without_sequences_is_refused(client):
    with pytest.raises(InferenceServerException) as ei:
        client.infer("types", types_inputs(), sequence_id=3, sequence_start=True)
    assert status_of(ei.value) == str(grpc.StatusCode.INVALID_ARGUMENT), ei.value.message()
    assert "does not take sequences" in ei.value.message(), ei.value.message()


# --------------------------------------------------------------------------- RepositoryModelLoad


@pytest.fixture(scope="module")
def control(tmp_path_factory):
    """A gateway with model control "explicit" over a copy of the demo model, routing version 2."""
    root = tmp_path_factory.mktemp("control")
    shutil.copytree(MODELS / "demo", root / "models" / "demo")
    config = root / "aviary.toml"
    config.write_text(
        '[server]\nlisten = "127.0.0.1:0"\nmodel_control = "explicit"\n\n'
        '[admin]\nlisten = "127.0.0.1:0"\n\n'
        f'[repository]\npath = "{root / "models"}"\n\n'
        '[routes.demo]\nversions = [ { version = "2", weight = 1 } ]\n'
    )
    srv = launch(config)
    c = grpcclient.InferenceServerClient(url=srv.address)
    yield c, root / "models"
    c.close()
    _stop(srv.proc)


def ready_versions(c):
    return sorted(m.version for m in c.get_model_repository_index().models if m.name == "demo" and m.state == "READY")


def test_load_time_config_override_changes_the_settings(control):
    c, _ = control
    override = {
        "max_batch_size": 8,
        "dynamic_batching": {"preferred_batch_size": [4], "max_queue_delay_microseconds": 200},
        "instance_group": [{"count": 2, "kind": "KIND_CPU"}],
        "version_policy": {"latest": {"num_versions": 1}},
    }
    c.load_model("demo", config=json.dumps(override))
    config = c.get_model_config("demo", as_json=True)["config"]
    assert config["max_batch_size"] == 8, config
    assert config["dynamic_batching"]["preferred_batch_size"] == [4], config
    assert config["instance_group"][0]["count"] == 2, config
    assert config["version_policy"] == {"latest": {"num_versions": 1}}, config
    assert ready_versions(c) == ["2"], "latest 1 keeps only version 2"
    result = c.infer("demo", [demo_input()])
    assert_demo_outputs("2", result.as_numpy("probabilities"), result.as_numpy("label"))
    # A load without an override goes back to the repository's settings.
    c.load_model("demo")
    config = c.get_model_config("demo", as_json=True)["config"]
    assert config.get("max_batch_size", 0) == 0 and "dynamic_batching" not in config, config
    assert ready_versions(c) == ["1", "2"]


@pytest.mark.parametrize(
    "override,code,says",
    [
        ("{not json", grpc.StatusCode.INVALID_ARGUMENT, 'parameter "config": not JSON'),
        ('{"input": []}', grpc.StatusCode.INVALID_ARGUMENT, "config.input: Aviary does not take this field"),
        ('{"max_batch_size": 4}', grpc.StatusCode.INVALID_ARGUMENT, "config.max_batch_size: above 0"),
        (
            '{"instance_group": [{"count": 1, "kind": "KIND_GPU"}]}',
            grpc.StatusCode.INVALID_ARGUMENT,
            "config.instance_group: kind KIND_GPU",
        ),
        (
            '{"model_warmup": [{"name": "w", "batch_size": 1, "inputs": {"input": {"random_data": true}}}]}',
            grpc.StatusCode.UNIMPLEMENTED,
            "config.model_warmup",
        ),
    ],
    ids=["malformed", "input", "batch-without-batching", "gpu", "random-warmup"],
)
def test_load_time_config_override_refusals(control, override, code, says):
    c, _ = control
    with pytest.raises(InferenceServerException) as ei:
        c.load_model("demo", config=override)
    assert status_of(ei.value) == str(code), (status_of(ei.value), ei.value.message())
    assert ei.value.message().startswith(says), ei.value.message()


def test_file_override_loads_supplied_model_bytes(control):
    c, models = control
    onnx = (MODELS / "demo" / "1" / "model.onnx").read_bytes()
    c.load_model("demo", config="{}", files={"file:3/model.onnx": onnx})
    assert (models / "demo" / "3" / "model.onnx").read_bytes() == onnx
    assert "3" in ready_versions(c)
    with pytest.raises(InferenceServerException) as ei:
        c.load_model("demo", config="{}", files={"file:../evil/model.onnx": onnx})
    assert status_of(ei.value) == str(grpc.StatusCode.INVALID_ARGUMENT), ei.value.message()
    assert ei.value.message().startswith('parameter "file:../evil/model.onnx"'), ei.value.message()
    assert not (models / "evil").exists()
