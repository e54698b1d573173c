"""End-to-end tests of the gateway's KServe v2 HTTP/REST endpoint with the stock
`tritonclient.http` client and plain `curl`.

The server is the one test_tritonclient.py starts (`aviary serve` on ephemeral ports,
its HTTP listener with `--http-listen 127.0.0.1:0`); expected outputs come from the
Python onnxruntime package, as there.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import shutil
import socket
import subprocess
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from test_tritonclient import (
    BATCH,
    BINARY,
    MODELS,
    TYPES,
    _stop,
    server,
    assert_demo_outputs,
    launch,
    oracle,
)


@pytest.fixture(scope="module")
def web(server):
    c = httpclient.InferenceServerClient(url=server.http_address)
    yield c
    c.close()


def status_of(exc: InferenceServerException) -> str:
    return str(exc.status())


def request(server_address, method, path, body=None, headers=None):
    """A raw HTTP request: (status, headers (case-insensitive), body bytes)."""
    req = urllib.request.Request(f"http://{server_address}{path}", data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def demo_input(binary_data=True, batch=BATCH):
    inp = httpclient.InferInput("input", list(batch.shape), "FP32")
    inp.set_data_from_numpy(batch, binary_data=binary_data)
    return inp


# --------------------------------------------------------------------------- health and metadata


def test_health_and_readiness(web):
    assert web.is_server_live()
    assert web.is_server_ready()
    assert web.is_model_ready("demo")
    assert web.is_model_ready("demo", model_version="1")
    assert not web.is_model_ready("nope")


def test_health_answers_have_empty_bodies_as_kserve_says(server):
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/demo/ready"):
        status, _, body = request(server.http_address, "GET", path)
        assert (status, body) == (200, b""), (path, status, body)
    status, _, body = request(server.http_address, "GET", "/v2/models/nope/ready")
    assert status == 400 and body == b"", (status, body)


def test_server_and_model_metadata(web):
    meta = web.get_server_metadata()
    assert meta["name"] == "aviary"
    assert {"classification", "sequence", "system_shared_memory"} <= set(meta["extensions"])
    model = web.get_model_metadata("demo")
    assert model["name"] == "demo" and model["platform"] == "onnxruntime_onnx"
    assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    assert {o["name"] for o in model["outputs"]} == {"probabilities", "label"}
    assert web.get_model_metadata("demo", model_version="2")["versions"] == ["1", "2"]


def test_model_config_is_tritons_json(web):
    config = web.get_model_config("demo")
    assert config["name"] == "demo" and config["platform"] == "onnxruntime_onnx"
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    # 64-bit integers are JSON numbers, as Triton writes them.
    assert config["input"][0]["dims"] == [-1, 4]
    assert isinstance(config["max_batch_size"], int)


def test_statistics_count_http_inferences(web):
    before = web.get_inference_statistics("demo", model_version="1")["model_stats"][0]["inference_count"]
    web.infer("demo", [demo_input()], model_version="1")
    stats = web.get_inference_statistics("demo", model_version="1")["model_stats"][0]
    assert stats["inference_count"] == before + len(BATCH), stats
    assert {s["name"] for s in web.get_inference_statistics()["model_stats"]} >= {"demo", "types"}


# --------------------------------------------------------------------------- inference


@pytest.mark.parametrize("inputs_binary", [True, False], ids=["binary-in", "json-in"])
@pytest.mark.parametrize("outputs_binary", [True, False], ids=["binary-out", "json-out"])
@pytest.mark.parametrize("version", ["1", "2"])
def test_infer_pinned_version(web, version, inputs_binary, outputs_binary):
    outputs = [httpclient.InferRequestedOutput(n, binary_data=outputs_binary) for n in ("probabilities", "label")]
    result = web.infer("demo", [demo_input(inputs_binary)], model_version=version, outputs=outputs)
    assert result.get_response()["model_version"] == version
    assert_demo_outputs(version, result.as_numpy("probabilities"), result.as_numpy("label"))


def test_infer_unpinned_reaches_both_versions_and_says_which(server, web):
    seen = set()
    for _ in range(60):
        result = web.infer("demo", [demo_input()])
        version = result.get_response()["model_version"]
        assert_demo_outputs(version, result.as_numpy("probabilities"), result.as_numpy("label"))
        seen.add(version)
    assert seen == {"1", "2"}, seen
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": BATCH[0].tolist()}]})
    status, headers, answer = request(server.http_address, "POST", "/v2/models/demo/infer", body.encode())
    assert status == 200, answer
    assert headers["x-aviary-variant"] == json.loads(answer)["model_version"]


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_and_answers(web, algorithm):
    result = web.infer(
        "demo",
        [demo_input()],
        model_version="1",
        request_compression_algorithm=algorithm,
        response_compression_algorithm=algorithm,
    )
    assert_demo_outputs("1", result.as_numpy("probabilities"), result.as_numpy("label"))


@pytest.mark.parametrize("binary_data", [True, False], ids=["binary", "json"])
def test_every_datatype_round_trips(web, binary_data):
    """tests/models/types: out_<t> = Identity(in_<t>) for every KServe datatype."""
    # tritonclient sends and reads BF16 only as binary data (JSON numbers are FP32 or wider).
    inputs = []
    for t, dt, arr in TYPES:
        inp = httpclient.InferInput(f"in_{t}", list(arr.shape), dt)
        inp.set_data_from_numpy(arr, binary_data=binary_data or dt == "BF16")
        inputs.append(inp)
    outputs = [
        httpclient.InferRequestedOutput(f"out_{t}", binary_data=binary_data or dt == "BF16") for t, dt, _ in TYPES
    ]
    result = web.infer("types", inputs, outputs=outputs)
    for t, dt, arr in TYPES:
        got = result.as_numpy(f"out_{t}")
        assert got is not None, f"out_{t} missing"
        if dt == "BYTES":
            assert [bytes(v) if not isinstance(v, str) else v.encode() for v in got.tolist()] == arr.tolist()
        else:
            assert np.array_equal(got, arr), (t, got, arr)


def test_binary_bytes_pass_through_and_json_refuses_what_it_cannot_hold(web):
    inputs = []
    for t, dt, arr in TYPES:
        value = BINARY if t == "bytes" else arr
        inp = httpclient.InferInput(f"in_{t}", [len(value)], dt)
        inp.set_data_from_numpy(value)
        inputs.append(inp)
    got = web.infer("types", inputs, outputs=[httpclient.InferRequestedOutput("out_bytes")]).as_numpy("out_bytes")
    assert [bytes(v) for v in got.tolist()] == BINARY.tolist()
    with pytest.raises(InferenceServerException) as ei:
        web.infer("types", inputs, outputs=[httpclient.InferRequestedOutput("out_bytes", binary_data=False)])
    assert status_of(ei.value) == "400", ei.value.message()
    assert 'output "out_bytes"' in ei.value.message() and "binary_data" in ei.value.message(), ei.value.message()


def test_classification_over_http(web):
    outputs = [httpclient.InferRequestedOutput("probabilities", class_count=2)]
    got = web.infer("demo", [demo_input()], model_version="1", outputs=outputs).as_numpy("probabilities")
    want = oracle("demo", "1", {"input": BATCH})["probabilities"]
    assert got.shape == (len(BATCH), 2), got.shape
    for row, classes in zip(want, got):
        score, index, _label = classes[0].decode().split(":")
        assert int(index) == int(np.argmax(row)) and abs(float(score) - row.max()) < 1e-6


def test_sequence_stays_on_one_version_over_http(web):
    for sequence_id in range(100, 110):
        versions = {
            web.infer(
                "demo", [demo_input()], sequence_id=sequence_id, sequence_start=step == 0, sequence_end=step == 2
            ).get_response()["model_version"]
            for step in range(3)
        }
        assert len(versions) == 1, (sequence_id, versions)


# --------------------------------------------------------------------------- errors


def test_errors_have_the_grpc_wording_and_their_http_status(web):
    cases = [
        (lambda: web.infer("nope", [demo_input()]), "404", "Request for unknown model: 'nope' is not found"),
        (lambda: web.infer("demo", [demo_input()], model_version="9"), "404", "Request for unknown model: 'demo' version 9 is not found"),
        (lambda: web.infer("demo", [demo_input(batch=BATCH[:, :3])], model_version="1"), "400", "input \"input\""),
        (lambda: web.infer("demo", [demo_input()], priority=3), "400", 'parameter "priority"'),
        (lambda: web.infer("demo", [demo_input()], parameters={"nonsense": 1}), "400", 'parameter "nonsense"'),
    ]
    for call, status, says in cases:
        with pytest.raises(InferenceServerException) as ei:
            call()
        assert status_of(ei.value) == status, (says, status_of(ei.value), ei.value.message())
        assert says in ei.value.message(), (says, ei.value.message())


@pytest.mark.parametrize(
    "method,path,body,headers,status,says",
    [
        ("POST", "/v2/models/demo/infer", b"{not json", {}, 400, "not a KServe v2 inference request"),
        ("POST", "/v2/models/demo/infer", b'{"inputs": [], "extra": 1}', {}, 400, "unknown field `extra`"),
        (
            "POST",
            "/v2/models/demo/infer",
            b'{"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 16}}]}',
            {},
            400,
            "only 0 bytes of binary data are left",
        ),
        ("POST", "/v2/models/demo/infer", b"{}", {"Inference-Header-Content-Length": "99"}, 400, "the body has only 2 bytes"),
        ("POST", "/v2/models/demo/infer", b"x", {"Content-Encoding": "br"}, 415, "Content-Encoding"),
        (
            "POST",
            "/v2/models/demo/infer",
            b'{"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": null}]}',
            {},
            400,
            '"data" is null',
        ),
        (
            "POST",
            "/v2/models/demo/infer",
            b'{"parameters": {"timeout": 1, "timeout": 2}, "inputs": []}',
            {},
            400,
            'parameter "timeout" is given twice',
        ),
        (
            "POST",
            "/v2/models/demo/infer",
            b'{"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1e300, 0, 0, 0]}]}',
            {},
            400,
            "1e+300 is out of range for FP32",
        ),
        ("GET", "/v2/models/demo", None, {"grpc-timeout": "1S"}, 400, "header grpc-timeout"),
        ("GET", "/v2/models/%FF/ready", None, {}, 400, "UTF-8"),
        ("GET", "/v2/models/demo?verbose=1", None, {}, 400, "query parameters are not supported"),
        ("GET", "/v2/nothing", None, {}, 404, "no KServe v2 endpoint at GET /v2/nothing"),
        ("DELETE", "/v2/models/demo", None, {}, 405, "DELETE is not a method"),
        ("GET", "/v2/cudasharedmemory/status", None, {}, 501, "not supported"),
        ("GET", "/v2/trace/setting", None, {}, 501, "not supported"),
    ],
    ids=[
        "not-json",
        "unknown-field",
        "binary-missing",
        "header-length",
        "brotli",
        "data-null",
        "parameter-twice",
        "fp32-overflow",
        "grpc-timeout",
        "path-not-utf8",
        "query",
        "no-endpoint",
        "method",
        "cuda",
        "trace",
    ],
)
def test_bad_requests_are_refused_naming_the_reason(server, method, path, body, headers, status, says):
    got, answer_headers, answer = request(server.http_address, method, path, body, headers)
    assert got == status, (got, answer)
    assert answer_headers["Content-Type"] == "application/json", answer_headers
    assert says in json.loads(answer)["error"], answer


def test_gzip_bomb_is_held_to_the_message_limit(server):
    # 65 MiB of zeros, a few dozen KiB on the wire: over the 64 MiB limit once inflated.
    bomb = gzip.compress(b"\0" * (65 * 1024 * 1024), compresslevel=9)
    status, _, answer = request(
        server.http_address, "POST", "/v2/models/demo/infer", bomb, {"Content-Encoding": "gzip"}
    )
    assert status == 413, answer
    assert "message limit" in json.loads(answer)["error"]


# --------------------------------------------------------------------------- curl


def curl(*args):
    return subprocess.run(["curl", "--silent", "--show-error", *args], capture_output=True, text=True, timeout=60)


def test_plain_curl(server):
    base = f"http://{server.http_address}"
    ready = curl("--fail", "--output", "/dev/null", "--write-out", "%{http_code}", f"{base}/v2/health/ready")
    assert ready.returncode == 0 and ready.stdout == "200", (ready.stdout, ready.stderr)
    body = {"inputs": [{"name": "input", "shape": [3, 4], "datatype": "FP32", "data": BATCH.tolist()}]}
    infer = curl(
        "--fail-with-body", "-H", "Content-Type: application/json", "-d", json.dumps(body), f"{base}/v2/models/demo/versions/2/infer"
    )
    assert infer.returncode == 0, (infer.stdout, infer.stderr)
    answer = json.loads(infer.stdout)
    outputs = {o["name"]: o for o in answer["outputs"]}
    probabilities = np.array(outputs["probabilities"]["data"], dtype=np.float32).reshape(outputs["probabilities"]["shape"])
    label = np.array(outputs["label"]["data"], dtype=np.int64)
    assert_demo_outputs("2", probabilities, label)
    missing = curl("--write-out", "\n%{http_code}", f"{base}/v2/models/nope")
    text, code = missing.stdout.rsplit("\n", 1)
    assert code == "404" and "Request for unknown model: 'nope'" in json.loads(text)["error"], missing.stdout


# --------------------------------------------------------------------------- shared memory


def test_system_shared_memory_over_http(web):
    import tritonclient.utils.shared_memory as shm

    key = f"/aviary_http_{os.getpid()}"
    inputs_region = shm.create_shared_memory_region("h_in", key + "_in", BATCH.nbytes)
    outputs_region = shm.create_shared_memory_region("h_out", key + "_out", 256)
    try:
        shm.set_shared_memory_region(inputs_region, [BATCH])
        web.register_system_shared_memory("h_in", key + "_in", BATCH.nbytes)
        web.register_system_shared_memory("h_out", key + "_out", 256)
        status = web.get_system_shared_memory_status()
        assert {r["name"] for r in status} == {"h_in", "h_out"}, status
        assert web.get_system_shared_memory_status(region_name="h_in")[0]["byte_size"] == BATCH.nbytes
        inp = httpclient.InferInput("input", list(BATCH.shape), "FP32")
        inp.set_shared_memory("h_in", BATCH.nbytes)
        out = httpclient.InferRequestedOutput("probabilities", binary_data=False)
        out.set_shared_memory("h_out", 36)
        result = web.infer("demo", [inp], model_version="1", outputs=[out])
        assert result.get_output("probabilities")["parameters"]["shared_memory_region"] == "h_out"
        got = shm.get_contents_as_numpy(outputs_region, np.float32, [3, 3])
        assert np.allclose(got, oracle("demo", "1", {"input": BATCH})["probabilities"], atol=1e-5)
    finally:
        web.unregister_system_shared_memory()
        shm.destroy_shared_memory_region(inputs_region)
        shm.destroy_shared_memory_region(outputs_region)
    assert web.get_system_shared_memory_status() == []


# --------------------------------------------------------------------------- repository and auth


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """A gateway with model control "explicit" and API keys: one infer key, one admin key."""
    root = tmp_path_factory.mktemp("http-control")
    shutil.copytree(MODELS / "demo", root / "models" / "demo")
    keys = {"infer": "infer-key-0123456789", "admin": "admin-key-0123456789", "slow": "slow-key-0123456789"}
    (root / "keys.toml").write_text(
        "".join(
            f'[[keys]]\nname = "{name}"\nsha256 = "{hashlib.sha256(key.encode()).hexdigest()}"\n'
            f'roles = ["{"infer" if name == "slow" else name}"]\n'
            + ("rate_limit = { per_second = 0.2, burst = 1 }\n" if name == "slow" else "")
            + "\n"
            for name, key in keys.items()
        )
    )
    config = root / "aviary.toml"
    config.write_text(
        '[server]\nlisten = "127.0.0.1:0"\nmodel_control = "explicit"\n\n'
        '[admin]\nlisten = "127.0.0.1:0"\n\n'
        '[auth]\nkeys_file = "keys.toml"\n\n'
        f'[repository]\npath = "{root / "models"}"\n\n'
        '[routes.demo]\nversions = [ { version = "2", weight = 1 } ]\n'
    )
    srv = launch(config)
    yield srv, keys, root / "models"
    _stop(srv.proc)


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def test_http_calls_pass_the_same_keys_and_roles_as_grpc(guarded):
    srv, keys, _ = guarded
    c = httpclient.InferenceServerClient(url=srv.http_address)
    try:
        # Probes need no key.
        assert c.is_server_live() and c.is_server_ready()
        with pytest.raises(InferenceServerException) as ei:
            c.infer("demo", [demo_input()])
        assert status_of(ei.value) == "401", ei.value.message()
        result = c.infer("demo", [demo_input()], headers=bearer(keys["infer"]))
        assert_demo_outputs("2", result.as_numpy("probabilities"), result.as_numpy("label"))
        with pytest.raises(InferenceServerException) as ei:
            c.unload_model("demo", headers=bearer(keys["infer"]))
        assert status_of(ei.value) == "403", ei.value.message()
        assert "model-control" in ei.value.message(), ei.value.message()
        # A caller without a key is refused before its body is read: one that announces
        # a body over the message limit and sends the first MiB of it gets 401, not 413.
        host, port = srv.http_address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=30) as conn:
            conn.sendall(
                b"POST /v2/models/demo/infer HTTP/1.1\r\nHost: aviary\r\n"
                + f"Content-Length: {65 * 1024 * 1024}\r\n\r\n".encode()
                + b"0" * (1024 * 1024)
            )
            status_line = conn.recv(4096).split(b"\r\n", 1)[0]
        assert status_line.startswith(b"HTTP/1.1 401"), status_line
        # A key over its rate limit gets 429 with Retry-After.
        body = json.dumps(
            {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": BATCH[0].tolist()}]}
        ).encode()
        first, _, answer = request(srv.http_address, "POST", "/v2/models/demo/infer", body, bearer(keys["slow"]))
        assert first == 200, answer
        second, headers, answer = request(srv.http_address, "POST", "/v2/models/demo/infer", body, bearer(keys["slow"]))
        assert second == 429, answer
        assert int(headers["Retry-After"]) >= 1, dict(headers)
        assert "over its rate limit" in json.loads(answer)["error"], answer
    finally:
        c.close()


def test_repository_load_with_config_and_files_over_http(guarded):
    srv, keys, models = guarded
    admin = bearer(keys["admin"])
    c = httpclient.InferenceServerClient(url=srv.http_address)
    try:
        index = c.get_model_repository_index(headers=admin)
        assert {(m["name"], m["version"], m["state"]) for m in index} >= {("demo", "1", "READY"), ("demo", "2", "READY")}
        c.load_model("demo", headers=admin, config=json.dumps({"max_batch_size": 4, "dynamic_batching": {}}))
        assert c.get_model_config("demo", headers=admin)["max_batch_size"] == 4
        onnx = (MODELS / "demo" / "1" / "model.onnx").read_bytes()
        c.load_model("demo", headers=admin, config="{}", files={"file:3/model.onnx": onnx})
        assert (models / "demo" / "3" / "model.onnx").read_bytes() == onnx
        index = c.get_model_repository_index(headers=admin)
        assert ("demo", "3", "READY") in {(m["name"], m["version"], m["state"]) for m in index}, index
        with pytest.raises(InferenceServerException) as ei:
            c.load_model("demo", headers=admin, config="{not json")
        assert status_of(ei.value) == "400" and ei.value.message().startswith('parameter "config": not JSON')
        # Raw: file contents that are not base64 are refused naming the parameter.
        status, _, answer = request(
            srv.http_address,
            "POST",
            "/v2/repository/models/demo/load",
            json.dumps({"parameters": {"file:4/model.onnx": "%%%"}}).encode(),
            admin,
        )
        assert status == 400 and 'parameter "file:4/model.onnx"' in json.loads(answer)["error"], answer
        # A routed model is unloaded only when forced: the parameter passes through as a boolean.
        with pytest.raises(InferenceServerException) as ei:
            c.unload_model("demo", headers=admin)
        assert status_of(ei.value) == "400" and "serves traffic" in ei.value.message(), ei.value.message()
        status, _, answer = request(
            srv.http_address,
            "POST",
            "/v2/repository/models/demo/unload",
            json.dumps({"parameters": {"force": True}}).encode(),
            admin,
        )
        assert status == 200, answer
        assert not c.is_model_ready("demo", headers=admin)
        c.load_model("demo", headers=admin)
        assert c.is_model_ready("demo", headers=admin)
    finally:
        c.close()


def test_a_card_alone_for_a_version_without_a_model_is_refused(guarded):
    srv, keys, models = guarded
    body = json.dumps({"parameters": {"config": "{}", "file:5/model.toml": base64.b64encode(b"owner = 'x'\n").decode()}})
    status, _, answer = request(srv.http_address, "POST", "/v2/repository/models/demo/load", body.encode(), bearer(keys["admin"]))
    assert status == 400, answer
    assert 'parameter "file:5/model.toml"' in json.loads(answer)["error"] and "loads nothing" in json.loads(answer)["error"]
    assert not (models / "demo" / "5").exists(), "a refused load writes nothing"


def test_a_supplied_model_that_is_not_its_cards_is_refused_before_it_is_written(guarded):
    srv, keys, models = guarded
    v1 = (MODELS / "demo" / "1" / "model.onnx").read_bytes()
    v2 = (MODELS / "demo" / "2" / "model.onnx").read_bytes()
    card = f'sha256 = "{hashlib.sha256(v2).hexdigest()}"\n'.encode()
    body = json.dumps(
        {
            "parameters": {
                "config": "{}",
                "file:7/model.onnx": base64.b64encode(v1).decode(),
                "file:7/model.toml": base64.b64encode(card).decode(),
            }
        }
    )
    status, _, answer = request(srv.http_address, "POST", "/v2/repository/models/demo/load", body.encode(), bearer(keys["admin"]))
    assert status == 400, answer
    error = json.loads(answer)["error"]
    assert 'parameter "file:7/model.onnx"' in error and hashlib.sha256(v1).hexdigest() in error, error
    assert not (models / "demo" / "7").exists(), "a refused load writes nothing"
