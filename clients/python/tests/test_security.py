"""Security sweep against the real server process: API keys on every route, read-only
mode against every mutating method, checkpoint-name traversal, request smuggling, size limits,
slow clients and hostile JSON."""
import json
import os
import select
import socket
import threading
import time

import pytest

from conftest import ROOT, RunningServer
from ember import Client, EmberError

KEY = "k3y-0f-the-test"
ROUTES = [("GET", "/healthz"), ("GET", "/metrics"), ("GET", "/v1/models"), ("POST", "/rpc"), ("GET", "/rpc"),
          ("POST", "/v1/completions"), ("GET", "/no/such/route"), ("POST", "/")]
OPENRPC = json.load(open(os.path.join(ROOT, "Protocol", "openrpc.json")))
METHODS = [m["name"] for m in OPENRPC["methods"]]
MUTATING = ["train_step", "optimizer.configure", "reference.snapshot", "checkpoint.save", "checkpoint.load"]


def address(url):
    host, port = url[len("http://"):].rsplit(":", 1)
    return host.strip("[]"), int(port)


def exchange(url, raw, timeout=10.0):
    """Sends raw bytes, reads until the server closes or `timeout`; returns the bytes received."""
    s = socket.create_connection(address(url), timeout=timeout)
    s.sendall(raw)
    chunks = []
    try:
        while True:
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
    except socket.timeout:
        pass
    s.close()
    return b"".join(chunks)


def statuses(data):
    return [int(line.split()[1]) for line in data.split(b"\r\n") if line.startswith(b"HTTP/1.1 ")]


def request(method, path, body=b"", headers=()):
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
    for h in headers:
        head += h + "\r\n"
    return head.encode() + b"\r\n" + body


def rpc_body(method, params=None, rpc_id=1):
    call = {"jsonrpc": "2.0", "method": method, "id": rpc_id}
    if params is not None:
        call["params"] = params
    return json.dumps(call).encode()


@pytest.fixture(scope="module")
def keyed(model_dir, tmp_path_factory):
    s = RunningServer(model_dir, ["--api-key", KEY, "--checkpoint-dir", str(tmp_path_factory.mktemp("keyed-ckpt"))])
    yield s
    assert s.stop() == 0


def test_every_route_and_method_needs_the_key(keyed):
    bodies = {"/rpc": rpc_body("server.info"), "/v1/completions": b'{"prompt": "a", "max_tokens": 1}'}
    wrong = ["", "Bearer", "Bearer ", "Bearer wrong", f"Bearer {KEY}x", f"Bearer {KEY[:-1]}", f"bearer {KEY}",
             f"Basic {KEY}", f"Token {KEY}", f"{KEY}"]
    for method, path in ROUTES:
        body = bodies.get(path, b"") if method == "POST" else b""
        for auth in wrong:
            headers = [f"Authorization: {auth}"] if auth else []
            got = statuses(exchange(keyed.url, request(method, path + f"?api_key={KEY}", body, headers + ["Connection: close"])))
            if path == "/healthz":
                assert got == [200]
            else:
                assert got == [401], (method, path, auth, got)
        got = statuses(exchange(keyed.url, request(method, path, body, [f"Authorization: Bearer {KEY}", "Connection: close"])))
        assert got and got[0] != 401, (method, path)
    # Every JSON-RPC method, single and in a batch, is refused without the key, and nothing runs.
    for m in METHODS:
        data = exchange(keyed.url, request("POST", "/rpc", rpc_body(m, {}), ["Connection: close"]))
        assert statuses(data) == [401] and b"unauthorized" in data, m
    batch = json.dumps([json.loads(rpc_body(m, {}, i)) for i, m in enumerate(METHODS)]).encode()
    assert statuses(exchange(keyed.url, request("POST", "/rpc", batch, ["Connection: close"]))) == [401]
    assert Client(keyed.url, api_key=KEY).info()["weights_version"] == 0


def test_read_only_refuses_every_mutating_method(model_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    server = RunningServer(model_dir, ["--read-only", "--checkpoint-dir", str(ckpt)])
    client = Client(server.url)
    seq = {"tokens": [1, 2, 3, 4, 5, 6], "response_start": 2}
    before = client.logprob([seq])["results"][0]["logprobs"]
    params = {"train_step": {"loss": {"mode": "ppo"}, "batch": [dict(seq, advantage=1.0)]},
              "optimizer.configure": {"lr": 0.5}, "reference.snapshot": {}, "checkpoint.save": {"name": "x"},
              "checkpoint.load": {"name": "x"}}
    assert sorted(params) == sorted(MUTATING)
    assert set(MUTATING) <= set(METHODS)
    for m in MUTATING:
        with pytest.raises(EmberError) as e:
            client.call(m, params[m])
        assert e.value.kind == "read_only" and e.value.code == -32011, m
        # Also inside a batch and as a notification (which has no answer to carry the error).
        out = client.batch([(m, params[m])])
        assert isinstance(out[0], EmberError) and out[0].kind == "read_only"
        client.notify(m, params[m])
    # A dry run computes without changing anything, so it is allowed.
    assert client.train_step(loss={"mode": "ppo"}, batch=[dict(seq, advantage=1.0)], dry_run=True)["weights_version"] == 0
    time.sleep(0.2)
    assert client.info()["weights_version"] == 0
    assert client.logprob([seq])["results"][0]["logprobs"] == before
    assert not os.path.exists(ckpt) or os.listdir(ckpt) == []
    # Read-only methods still work.
    for m, p in [("server.info", None), ("tokenize", {"text": "hi"}), ("checkpoint.list", {}),
                 ("generate", {"prompts": ["a"], "max_tokens": 2})]:
        client.call(m, p)
    assert server.stop() == 0


def test_checkpoint_names_cannot_escape_the_folder(server, tmp_path):
    client = Client(server.url)
    outside = tmp_path / "outside"
    os.makedirs(outside)
    names = ["../x", "..", ".", "", "/tmp/x", f"{outside}/x", "a/b", "a\\b", "..\\x", ".hidden", "x/../../y",
             "a\x00b", "%2e%2e%2fx", "x" * 129, "ok.v3", "\u2024\u2024/x", "name\n", " x", "~root"]
    for name in names:
        for method in ("checkpoint.save", "checkpoint.load"):
            with pytest.raises(EmberError) as e:
                client.call(method, {"name": name})
            assert e.value.code == -32602 and e.value.path == "params.name", (method, name)
    for bad in (None, 3, ["x"], {"a": 1}):
        with pytest.raises(EmberError) as e:
            client.call("checkpoint.save", {"name": bad})
        assert e.value.code == -32602
    assert os.listdir(outside) == []
    assert not os.path.exists("/tmp/x")


@pytest.mark.parametrize("raw", [
    # Content-Length and Transfer-Encoding together: the classic CL.TE / TE.CL smuggling shapes.
    b"POST /rpc HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /metrics HTTP/1.1\r\n\r\n",
    b"POST /rpc HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 48\r\n\r\n0\r\n\r\nGET /metrics HTTP/1.1\r\n\r\n",
    # Two different lengths, a signed length, an obfuscated encoding.
    b"POST /rpc HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 28\r\n\r\nGET /metrics HTTP/1.1\r\n\r\n",
    b"POST /rpc HTTP/1.1\r\nContent-Length: +28\r\n\r\nGET /metrics HTTP/1.1\r\n\r\n",
    b"POST /rpc HTTP/1.1\r\nContent-Length: -1\r\n\r\nGET /metrics HTTP/1.1\r\n\r\n",
    b"POST /rpc HTTP/1.1\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\nGET /metrics HTTP/1.1\r\n\r\n",
    b"POST /rpc HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\nGET /metrics HTTP/1.1\r\n\r\n",
    # A header folded onto the next line, a bare LF inside a header, a bad chunk size.
    b"POST /rpc HTTP/1.1\r\nContent-Length:\r\n 28\r\n\r\nGET /metrics HTTP/1.1\r\n\r\n",
    b"POST /rpc HTTP/1.1\r\nX: a\rContent-Length: 28\r\n\r\nGET /metrics HTTP/1.1\r\n\r\n",
    b"POST /rpc HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nGET /metrics HTTP/1.1\r\n\r\n",
])
def test_smuggling_shapes_are_rejected_and_the_connection_closed(server, raw):
    data = exchange(server.url, raw, timeout=5)
    got = statuses(data)
    assert got == [400], (raw, data[:200])
    assert b"ember_" not in data, "the smuggled request was not served"


def test_header_and_body_limits(model_dir):
    server = RunningServer(model_dir, ["--max-body-mb", "1"])
    assert statuses(exchange(server.url, request("GET", "/healthz", headers=["X-Big: " + "a" * 70_000]))) == [431]
    assert statuses(exchange(server.url, request("GET", "/healthz", headers=[f"X-{i}: {'b' * 100}" for i in range(1000)]))) == [431]
    assert statuses(exchange(server.url, b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n")) in ([431], [414], [400])
    # Declared too large: answered before the body is sent.
    s = socket.create_connection(address(server.url), timeout=10)
    s.sendall(b"POST /rpc HTTP/1.1\r\nContent-Length: 2000000\r\n\r\n")
    assert statuses(s.recv(4096)) == [413]
    s.close()
    # Chunked past the limit.
    chunk = b"a" * 65536
    raw = b"POST /rpc HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + (b"10000\r\n" + chunk + b"\r\n") * 20 + b"0\r\n\r\n"
    assert statuses(exchange(server.url, raw)) == [413]
    # Within the limits, still served.
    assert Client(server.url).info()["name"] == "ember"
    assert server.stop() == 0


def test_slow_clients_are_timed_out_while_others_are_served(model_dir):
    server = RunningServer(model_dir, ["--request-timeout", "1", "--idle-timeout", "2"])
    results = {}

    def trickle(key, head, tail):
        """Sends `head`, then `tail` one byte every 50 ms, reading whatever the server answers."""
        s = socket.create_connection(address(server.url), timeout=10)
        started = time.time()
        data = b""
        try:
            s.sendall(head)
            for b in tail:
                if select.select([s], [], [], 0)[0]:
                    break
                s.send(bytes([b]))
                time.sleep(0.05)
            data = s.recv(4096)
        except OSError:
            pass
        results[key] = (statuses(data), time.time() - started)

    def slow_headers():  # the headers would take ~6 s to arrive
        trickle("headers", b"", b"POST /rpc HTTP/1.1\r\nContent-Length: 10\r\nX-Padding: " + b"p" * 100)

    def slow_body():  # the body would take ~5 s
        trickle("body", b"POST /rpc HTTP/1.1\r\nContent-Length: 100\r\n\r\n{", b" " * 99)

    def idle():
        s = socket.create_connection(address(server.url), timeout=10)
        started = time.time()
        data = s.recv(4096)  # an idle connection that never sends is closed after the idle timeout
        results["idle"] = (data, time.time() - started)

    threads = [threading.Thread(target=f) for f in (slow_headers, slow_body, idle)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    client = Client(server.url)
    for _ in range(5):
        assert client.info()["name"] == "ember"  # served while the slow clients hang on
    for t in threads:
        t.join(timeout=20)
    assert results["headers"][0] == [408] and results["headers"][1] < 4, results
    assert results["body"][0] == [408] and results["body"][1] < 4, results
    assert results["idle"][0] == b"" and 1.5 < results["idle"][1] < 6, results
    assert server.stop() == 0


def test_hostile_json_gives_errors_not_crashes(server):
    bodies = [b"[" * 200_000 + b"]" * 200_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
              b'{"jsonrpc":"2.0","method":"logprob","params":{"sequences":[{"tokens":[1e999,2],"response_start":1}]},"id":1}',
              b'{"jsonrpc":"2.0","method":"logprob","params":{"sequences":[{"tokens":[123456789012345678901234567890,2],"response_start":1}]},"id":1}',
              b'{"jsonrpc":"2.0","method":"generate","params":{"prompts":["\xff\xfe\xc0\x80"],"max_tokens":2},"id":1}',
              b'{"jsonrpc":"2.0","method":"tokenize","params":{"text":"\\ud800"},"id":1}',
              b'{"jsonrpc":"2.0","method":"generate","params":{"prompts":["a"],"max_tokens":-5},"id":1}',
              b'{"jsonrpc":"2.0","method":"generate","params":{"prompts":["a"],"max_tokens":1e300},"id":1}',
              b'{"jsonrpc":"2.0","method":"train_step","params":{"loss":{"mode":"ppo"},"batch":[{"tokens":[1,2],"response_start":1,"advantage":1}],"mini_batches":1e18},"id":1}',
              b'{"jsonrpc":"2.0","method":"detokenize","params":{"tokens":[-1, 99999999]},"id":1}',
              b"\x00\x01\x02", b'{"jsonrpc":"2.0","method":"server.info","id":' + b"9" * 5000 + b"}"]
    for body in bodies:
        data = exchange(server.url, request("POST", "/rpc", body, ["Connection: close"]))
        assert statuses(data) == [200], body[:80]
        answer = json.loads(data.split(b"\r\n\r\n", 1)[1])
        assert "error" in answer and answer["error"]["code"] in (-32700, -32600, -32602, -32001, -32017), (body[:80], answer)
    assert Client(server.url).info()["name"] == "ember"


def test_a_connection_stays_open_for_the_idle_timeout_after_a_long_call(model_dir):
    # The idle timeout counts from the last answer, not from the request: a 3 s long poll on a
    # server with a 2 s idle timeout leaves its connection usable for the next call.
    server = RunningServer(model_dir, ["--idle-timeout", "2"])
    try:
        s = socket.create_connection(address(server.url), timeout=10)
        started = time.time()
        s.sendall(b"GET /v1/weights/manifest?after=0&timeout=3 HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:     # a 304 has headers only
            chunk = s.recv(65536)
            assert chunk, "closed before the long poll answered"
            data += chunk
        assert time.time() - started >= 2.5 and statuses(data) == [304]
        time.sleep(1)   # idle 1 s: within the timeout
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert statuses(s.recv(4096)) == [200]
        s.close()
    finally:
        assert server.stop() == 0
