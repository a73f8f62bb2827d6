"""Requests found by fuzzing the HTTP API (beyond test_service_limits.BAD and the schemathesis run): each got a
500, a 400 without advice, a wrong count in /metrics, a 200 for a malformed body, or a 405 for a HEAD probe."""

from __future__ import annotations

import json
import socket
import struct
import time

import pytest
from service_helpers import running
from test_service_limits import error_of
from tiny import make_store

V2 = "/v2/models/lora-0/infer"
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    store = make_store(tmp_path_factory.mktemp("fuzz") / "store", arch="bert", n_adapters=1)
    with running(store.root, api_key="k3y", max_inputs=8, max_input_chars=200, max_body_bytes=20_000) as s:
        yield s


# Finding 1: the HF route answers 400 "There was an error parsing the body" (no hint what to do)
@pytest.mark.parametrize(
    "body",
    [
        b'{"inputs": "caf\xe9"}',  # latin-1, as sent with 'charset=latin-1'
        b'{"inputs": "x", "z": ' + b"[" * 3000 + b"]" * 3000 + b"}",  # nesting: RecursionError in json.loads
        b'{"inputs": "x", "z": ' + b"9" * 5000 + b"}",  # int over Python's 4300-digit limit
        b"\x1f\x8b\x08\x00" + b"\x00" * 20,  # a gzip body (Content-Encoding is not supported)
    ],
    ids=["latin1", "deep", "bigint", "gzip"],
)
def test_hf_unparseable_body_is_422_saying_what_to_send(srv, body):
    r = srv.client.post("/models/lora-0", content=body, headers={"content-type": "application/json; charset=latin-1"})
    assert r.status_code == 422, r.text
    assert error_of("/models/lora-0", r.json()) == ("invalid_request", r.json()["error"]), r.text
    assert "UTF-8" in r.json()["error"], r.text


def _requests_total(srv, endpoint: str, status: str) -> float:
    return sum(
        float(ln.split()[-1])
        for ln in srv.client.get("/metrics").text.splitlines()
        if ln.startswith("service_requests_total{") and f'endpoint="{endpoint}"' in ln and f'status="{status}"' in ln
    )


# Finding 2: a client leaving mid-body is a 500 "server bug" on V2 (traceback logged) and a 400 on HF
@pytest.mark.parametrize(("path", "endpoint"), [(V2, "kserve"), ("/models/lora-0", "hf")])
def test_client_leaving_mid_body_is_499_on_every_inference_route(srv, path, endpoint):
    before = {s: _requests_total(srv, endpoint, s) for s in ("499", "500", "400")}
    with socket.create_connection(("127.0.0.1", srv.port)) as c:
        c.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n".encode()
        )
        c.sendall(b'{"inputs"')
        time.sleep(0.2)
    deadline = time.monotonic() + 10
    while _requests_total(srv, endpoint, "499") == before["499"] and time.monotonic() < deadline:
        time.sleep(0.05)
    after = {s: _requests_total(srv, endpoint, s) for s in ("499", "500", "400")}
    assert after == {**before, "499": before["499"] + 1}, (before, after)


# Finding 3: malformed V2 requests answered 200 (texts "None", truncated/garbled binary tensors, negative dims)
def _bin(header: dict, payload: bytes, header_len: int | None = None):
    h = json.dumps(header).encode()
    return h + payload, {"Inference-Header-Content-Length": str(len(h) if header_len is None else header_len)}


def _tensor(shape, **kw) -> dict:
    return {"inputs": [{"name": "text", "shape": shape, "datatype": "BYTES", **kw}]}


ELEMS = struct.pack("<I", 5) + b"hello" + struct.pack("<I", 1) + b"x"  # 14 bytes, 2 elements
BAD_V2 = {
    "data-null": (json.dumps(_tensor([1], data=[None])).encode(), {}),
    "data-object": (json.dumps(_tensor([1], data=[{"a": 1}])).encode(), {}),
    "negative-dims": (json.dumps(_tensor([-1, -1], data=["hi"])).encode(), {}),
    "size-past-body": _bin(_tensor([2], parameters={"binary_data_size": 10_000}), ELEMS),
    "bytes-after-last-element": _bin(_tensor([2], parameters={"binary_data_size": 20}), ELEMS + b"\0" * 6),
    "invalid-utf8": _bin(_tensor([1], parameters={"binary_data_size": 7}), struct.pack("<I", 3) + b"\xff\xfe\xfd"),
}


@pytest.mark.parametrize("case", list(BAD_V2))
def test_malformed_v2_request_is_422(srv, case):
    body, headers = BAD_V2[case]
    r = srv.client.post(V2, content=body, headers={**JSON, **headers})
    assert r.status_code == 422, r.text
    assert r.json()["error_type"] == "invalid_request" and isinstance(r.json()["error"], str)


def test_negative_v2_header_length_is_named(srv):
    body, headers = _bin(_tensor([2], parameters={"binary_data_size": 14}), ELEMS, header_len=-1)
    r = srv.client.post(V2, content=body, headers={**JSON, **headers})
    assert r.status_code == 422 and "Inference-Header-Content-Length" in r.json()["error"], r.text


# Finding 4: top_k: true is read as top_k=1 and answered 200
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/classify", {"model": "lora-0", "inputs": "x", "top_k": True}),
        ("/models/lora-0", {"inputs": "x", "parameters": {"top_k": True}}),
    ],
)
def test_top_k_bool_is_422(srv, path, body):
    r = srv.client.post(path, json=body)
    assert r.status_code == 422 and "top_k" in error_of(path, r.json())[1], r.text


# Finding 5: HEAD on the health routes is 405 (probes such as HAProxy's or `curl -I` fail)
@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"])
def test_head_on_health_routes_is_200(srv, path):
    assert srv.client.head(path).status_code == 200


def test_still_serving_after_all(srv):
    assert srv.classify("lora-0", "still fine").status_code == 200
