"""Bad input, limits and auth: every refusal is a 4xx with the JSON error shape, never a 500."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from service_helpers import running
from tiny import make_store


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    store = make_store(tmp_path_factory.mktemp("limits") / "store", arch="bert", n_adapters=1)
    with running(store.root, api_key="k3y", max_inputs=8, max_input_chars=200, max_body_bytes=20_000) as s:
        yield s


CLASSIFY = "/v1/classify"
V2 = "/v2/models/lora-0/infer"


def error_of(path: str, body: dict) -> tuple[str, str]:
    """(type, message) of an error body, checking its shape: the Hugging Face route (as the HF Inference API and
    TEI do) and KServe V2 (the Open Inference Protocol) {"error": message, "error_type": type}; every other route
    {"error": {"type", "message"}}."""
    if path.startswith(("/models/", "/v2/")) or path == "/v2":
        assert set(body) == {"error", "error_type"} and isinstance(body["error"], str), body
        return body["error_type"], body["error"]
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}, body
    return body["error"]["type"], body["error"]["message"]


def _v2(**tensor) -> dict:
    return {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hi"], **tensor}]}


# (method, path, body: json object | raw bytes | None, expected status, error type, words the message must contain)
BAD = [
    ("POST", CLASSIFY, b'{"model": "lora-0", "inputs": ', 422, "invalid_request", "not valid JSON"),
    ("POST", CLASSIFY, b"not json at all", 422, "invalid_request", "JSON"),
    ("POST", CLASSIFY, {"inputs": "x"}, 422, "invalid_request", "model"),
    ("POST", CLASSIFY, {"model": "lora-0"}, 422, "invalid_request", "inputs"),
    ("POST", CLASSIFY, {"model": "lora-0", "inputs": 5}, 422, "invalid_request", "inputs"),
    ("POST", CLASSIFY, {"model": "lora-0", "inputs": [1, 2]}, 422, "invalid_request", "inputs"),
    ("POST", CLASSIFY, {"model": "lora-0", "inputs": []}, 422, "invalid_request", "at least one"),
    ("POST", CLASSIFY, {"model": "lora-0", "inputs": "x", "top_k": 0}, 422, "invalid_request", "top_k"),
    ("POST", CLASSIFY, {"model": "lora-0", "inputs": "x", "topk": 1}, 422, "invalid_request", "topk"),
    ("POST", CLASSIFY, [1, 2], 422, "invalid_request", "body"),
    ("POST", CLASSIFY, {"model": "lora-0", "inputs": ["x"] * 9}, 413, "payload_too_large", "split"),
    ("POST", CLASSIFY, {"model": "lora-0", "inputs": ["y" * 201]}, 422, "invalid_request", "shorten"),
    ("POST", CLASSIFY, {"model": "lora-0", "inputs": ["z" * 199] * 120}, 413, "payload_too_large", "bytes"),
    (
        "POST",
        CLASSIFY,
        {"model": "nope", "inputs": "x"},
        404,
        "model_not_found",
        "loaded: full, lora-0; load it with PUT /v1/adapters/nope",
    ),
    ("POST", "/models/nope", {"inputs": "x"}, 404, "model_not_found", "PUT /v1/adapters/nope"),
    # a name no variant can have: the naming rule, not advice to PUT what PUT refuses with a 422
    ("POST", CLASSIFY, {"model": "bad name!", "inputs": "x"}, 404, "model_not_found", "invalid variant name"),
    ("POST", "/models/lora-0", {"parameters": {}}, 422, "invalid_request", "inputs"),
    ("POST", "/models/lora-0", {"inputs": "x", "parameters": {"top_k": -1}}, 422, "invalid_request", "top_k"),
    # JSON may escape a lone surrogate; UTF-8 (the tokenizer) cannot hold it (pydantic refuses it on CLASSIFY)
    ("POST", "/models/lora-0", b'{"inputs": "caf\\ud800e"}', 422, "invalid_request", "lone surrogate"),
    (
        "POST",
        V2,
        b'{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["\\udfff"]}]}',
        422,
        "invalid_request",
        "lone surrogate",
    ),
    ("POST", V2, b"{", 422, "invalid_request", "V2"),
    ("POST", V2, _v2(datatype="FP32"), 422, "invalid_request", "BYTES"),
    ("POST", V2, _v2(data=None), 422, "invalid_request", "data"),
    ("POST", V2, _v2(shape=[3]), 422, "invalid_request", "shape"),
    ("POST", V2, {**_v2(), "outputs": [{"name": "nope"}]}, 422, "invalid_request", "unknown outputs"),
    (
        "POST",
        V2,
        {**_v2(), "outputs": [{"name": "label", "parameters": {"binary_data": "yes"}}]},
        422,
        "invalid_request",
        "true or false",
    ),
    ("POST", V2, {**_v2(), "parameters": {"binary_data_output": 1}}, 422, "invalid_request", "true or false"),
    ("POST", V2, _v2(data=None, parameters={"binary_data_size": "ten"}), 422, "invalid_request", "binary_data_size"),
    ("POST", V2, _v2(data=None, parameters={"binary_data_size": -1}), 422, "invalid_request", "non-negative"),
    ("POST", V2, b'{"inputs": [{"data": ' + b"[" * 3000 + b"]" * 3000 + b"}]}", 422, "invalid_request", "V2"),
    ("POST", "/v2/models/nope/infer", _v2(), 404, "model_not_found", "loaded"),
    ("GET", "/v2/models/nope", None, 404, "model_not_found", "loaded"),
    ("GET", CLASSIFY, None, 405, "http_error", "not allowed"),
    ("GET", "/no/such/route", None, 404, "http_error", "/docs"),
    ("PUT", "/v1/adapters/missing", None, 404, "model_not_found", "no variant 'missing'"),
    ("PUT", "/v1/adapters/bad name!", None, 422, "invalid_request", "invalid variant name"),
    ("DELETE", "/v1/adapters/missing", None, 404, "model_not_found", "not loaded"),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "etype", "words"),
    BAD,
    ids=[f"{b[0]} {b[1]} {b[3]}-{i}" for i, b in enumerate(BAD)],
)
def test_bad_input_gets_its_4xx(srv, method, path, body, status, etype, words):
    kwargs = (
        {"content": body, "headers": {"content-type": "application/json"}}
        if isinstance(body, bytes)
        else {"json": body}
    )
    r = srv.admin.request(method, path, **({} if body is None else kwargs))
    assert r.status_code == status, r.text
    type_, message = error_of(path, r.json())
    assert type_ == etype and words in message, message
    # the server is still healthy after every refusal
    assert srv.classify("lora-0", "still fine").status_code == 200


V2_ERRORS = [
    ("POST", "/v2/models/nope/infer", _v2(), 404, "model_not_found", "loaded: full, lora-0"),
    ("GET", "/v2/models/nope", None, 404, "model_not_found", "loaded: full, lora-0"),
    ("GET", "/v2/models/nope/ready", None, 404, "model_not_found", "loaded: full, lora-0"),
    ("POST", V2, b"{", 422, "invalid_request", "invalid V2 infer request"),
    ("POST", V2, {**_v2(), "outputs": [{"name": "nope"}]}, 422, "invalid_request", "unknown outputs"),
    ("GET", "/v2/models/lora-0/versions/1", None, 404, "http_error", "no route"),  # tritonclient's model_version=
    ("POST", V2, b"x" * 30_000, 413, "payload_too_large", "exceeds 20000 bytes"),  # refused by the middleware
]


@pytest.mark.parametrize(("method", "path", "body", "status", "etype", "words"), V2_ERRORS)
def test_v2_errors_take_the_open_inference_protocol_shape(srv, method, path, body, status, etype, words):
    """The V2 spec's error is {"error": "<message>"}: tritonclient raises InferenceServerException(msg=body["error"])
    and its str() is "[status] " + msg, which raised TypeError on {"error": {"type", "message"}} (the C++ client
    read "inference failed with unknown error"). The service's type rides beside it (error_type)."""
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = srv.client.request(method, path, **({} if body is None else kwargs))
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    err = r.json()
    assert isinstance(err["error"], str) and words in err["error"], err
    assert err["error_type"] == etype
    assert words in f"[{r.status_code}] " + err["error"]  # what tritonclient's str(exc) builds


def test_a_client_leaving_mid_body_is_not_counted_as_a_server_error(srv):
    """Nobody to answer: recorded as 499 (nginx's "client closed request"), not as a 500 "server bug"."""
    import socket

    def requests_total(status: str) -> float:
        lines = srv.client.get("/metrics").text.splitlines()
        return sum(
            float(ln.split()[-1])
            for ln in lines
            if ln.startswith("service_requests_total{") and f'status="{status}"' in ln
        )

    before = requests_total("500"), requests_total("499")
    with socket.create_connection(("127.0.0.1", srv.port)) as c:
        head = f"POST {CLASSIFY} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        c.sendall(head.encode() + b'{"model"')
        time.sleep(0.2)
    deadline = time.monotonic() + 10
    while requests_total("499") == before[1] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (requests_total("500"), requests_total("499")) == (before[0], before[1] + 1)


def test_admin_requires_the_key(srv):
    for method, path in [("GET", "/v1/models"), ("PUT", "/v1/adapters/lora-0"), ("DELETE", "/v1/adapters/lora-0")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "k3y"}):
            r = srv.client.request(method, path, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert r.json()["error"]["type"] == "unauthorized"
    assert srv.admin.get("/v1/models").status_code == 200
    # inference, health and metrics stay open
    assert srv.client.get("/healthz").status_code == 200 and srv.client.get("/metrics").status_code == 200


def test_chunked_body_over_limit_is_413(srv):
    def chunks():
        for _ in range(30):
            yield b" " * 1000

    r = httpx.post(f"{srv.url}{CLASSIFY}", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "payload_too_large"


def _queued_rows(s) -> float:
    line = next(ln for ln in s.client.get("/metrics").text.splitlines() if ln.startswith("service_queue_depth_rows"))
    return float(line.split()[-1])


def test_queue_full_is_429_with_retry_after(tmp_path):
    store = make_store(tmp_path / "store", arch="bert", n_adapters=1, full=False)
    # Two requests queued make the batcher wait 1.5 s for company, so the queue of 4 rows fills up.
    with (
        running(store.root, max_queue=4, max_wait_ms=1500, max_batch_tokens=100_000) as s,
        ThreadPoolExecutor(2) as pool,
    ):
        for _attempt in range(15):  # the first request may be taken alone before the second arrives: retry
            waiting = [pool.submit(s.classify, "lora-0", ["a", "b"]), pool.submit(s.classify, "lora-0", ["c"])]
            deadline = time.monotonic() + 1.0
            while _queued_rows(s) < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            r = s.classify("lora-0", ["d", "e"])
            assert [w.result().status_code for w in waiting] == [200, 200]
            if r.status_code != 200:
                break
        assert r.status_code == 429, r.text
        assert r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "queue_full"


def test_a_body_sent_as_a_form_is_told_to_send_json(tmp_path):
    """`curl -d` sends application/x-www-form-urlencoded: the HF route got pydantic's 'Input should be a
    valid dictionary or object to extract fields from'."""
    store = make_store(tmp_path / "store", arch="bert", n_adapters=1, full=False)
    with running(store.root) as s:
        r = s.client.post(
            "/models/lora-0",
            content=b'{"inputs": "Stocks rallied"}',
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
    assert r.status_code == 422 and "Content-Type: application/json" in r.json()["error"], r.text


def test_rows_nobody_waits_for_do_not_fill_the_queue(tmp_path):
    """Rows of requests that timed out (or were cancelled) stay queued until the next batch is picked; a
    request arriving meanwhile must not get 429 because of them."""
    from service.batcher import Batcher, Job
    from service.config import ServiceConfig
    from service.errors import QueueFull
    from service.metrics import EngineMetrics
    from service.runtime import Runtime

    store = make_store(tmp_path / "store", arch="bert", n_adapters=1, full=False)
    rt = Runtime(store, ServiceConfig(store=store.root, precision="fp32", max_queue=4))
    batcher = Batcher(rt, EngineMetrics())  # not started: nothing takes rows off the queue

    def job(n: int, **kw) -> Job:
        return Job("lora-0", ["x"] * n, [[0, 5, 2]] * n, None, lambda j, e: None, **kw)

    batcher.submit(job(2, deadline_s=time.time() - 1))  # its front-end answered 504 already
    gone = job(2)
    batcher.submit(gone)
    gone.cancelled = True  # its client left
    batcher.submit(job(3))  # the queue holds 4 rows, none of them wanted
    with pytest.raises(QueueFull, match="3 rows waiting, limit 4"):
        batcher.submit(job(2))  # live rows still count


def test_request_timeout_is_504_and_engine_survives(tmp_path):
    store = make_store(tmp_path / "store", arch="bert", n_adapters=1, full=False)
    with running(store.root, request_timeout_s=0.5) as s:
        pid = s.app.state.supervisor.pid
        os.kill(pid, signal.SIGSTOP)  # an engine that does not answer (stuck, swapping, overloaded)
        try:
            t0 = time.monotonic()
            r = s.classify("lora-0", "slow")
            assert time.monotonic() - t0 < 5
        finally:
            os.kill(pid, signal.SIGCONT)
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
        assert "request-timeout-s" in r.json()["error"]["message"]
        s.app.state.config.request_timeout_s = 10  # the same engine keeps serving
        assert s.classify("lora-0", "fast enough").status_code == 200
        assert s.app.state.supervisor.pid == pid


def test_an_api_key_with_surrounding_whitespace_authenticates():
    """A key read from a file keeps its newline (SERVICE_API_KEY="$(cat key)" does not, a config does): every
    admin call was refused."""
    from types import SimpleNamespace

    from service.auth import require_admin
    from service.errors import Unauthorized

    def request(header: str) -> SimpleNamespace:
        state = SimpleNamespace(config=SimpleNamespace(api_key=" s3cret\n"))
        return SimpleNamespace(app=SimpleNamespace(state=state), headers={"authorization": header})

    require_admin(request("Bearer s3cret"))
    with pytest.raises(Unauthorized):
        require_admin(request("Bearer s3cre"))


def test_huggingface_hub_reads_the_hf_routes_errors(srv, monkeypatch):
    """huggingface_hub's HfHubHTTPError takes the body's `error` as the server's message: the HF route's errors
    come as the HF Inference API's and TEI's {"error": message, "error_type": type}, on every way a request to it
    fails (was {"error": {"type", "message"}}: server_message was a dict's repr, and huggingface_hub < 0.28
    raised AttributeError instead of HfHubHTTPError, so its retry on 503 never ran)."""
    from huggingface_hub import InferenceClient, constants
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import reset_sessions

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # offline mode blocks loopback URLs too
    reset_sessions()
    try:
        with pytest.raises(HfHubHTTPError) as e:
            InferenceClient(model=f"{srv.url}/models/nope").text_classification("x")
        assert e.value.response.status_code == 404
        assert e.value.server_message == (
            "model 'nope' is not loaded; loaded: full, lora-0; load it with PUT /v1/adapters/nope"
        )
        with pytest.raises(HfHubHTTPError) as e:
            InferenceClient(model=f"{srv.url}/models/lora-0").text_classification("y" * 201)
        assert e.value.response.status_code == 422 and e.value.server_message.startswith("inputs[0] has 201 char")
    finally:
        monkeypatch.undo()
        reset_sessions()
    json_ct = {"content-type": "application/json"}
    cases = [  # (path, request kwargs, status, error_type): the route, FastAPI's validation, the body-limit middleware
        ("/models/lora-0", {"json": {"inputs": ["x"] * 9}}, 413, "payload_too_large"),
        ("/models/lora-0", {"json": {"inputs": "x", "parameters": {"top_k": 0}}}, 422, "invalid_request"),
        ("/models/lora-0", {"content": b"{", "headers": json_ct}, 422, "invalid_request"),
        ("/models/lora-0", {"content": b"\x1f\x8b\x08", "headers": json_ct}, 422, "invalid_request"),
        ("/models/lora-0", {"json": {"inputs": ["z" * 199] * 120}}, 413, "payload_too_large"),
        ("/models/org/lora-0", {"json": {"inputs": "x"}}, 404, "http_error"),  # a Hub-style id with a slash
        ("/models/lora-0", {"content": iter([b" " * 1000] * 30), "headers": json_ct}, 413, "payload_too_large"),
    ]
    for path, kwargs, status, etype in cases:
        r = srv.client.post(path, **kwargs)
        assert r.status_code == status, r.text
        assert r.json() == {"error": r.json()["error"], "error_type": etype} and isinstance(r.json()["error"], str)
    # the service's own routes keep {"error": {"type", "message"}}
    r = srv.classify("nope", "x")
    assert r.status_code == 404 and set(r.json()["error"]) == {"type", "message"}, r.text
