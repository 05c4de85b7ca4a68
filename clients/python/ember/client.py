"""A typed JSON-RPC client for Ember: one keep-alive connection per thread, errors as exceptions
carrying the JSON-RPC code and data, retries (with backoff) only for calls that change nothing.
Stdlib only. URLs: http://host:port or unix:///path/to/socket."""
from __future__ import annotations

import http.client
import itertools
import json
import os
import socket
import threading
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple


class EmberError(Exception):
    """A JSON-RPC error answered by the server."""

    def __init__(self, code: int, message: str, data: Optional[dict] = None):
        self.code = code
        self.message = message
        self.data = data or {}
        self.kind: Optional[str] = self.data.get("kind")
        self.path: Optional[str] = self.data.get("path")
        self.hint: Optional[str] = self.data.get("hint")
        detail = f" [{self.kind}]" if self.kind else ""
        where = f" at {self.path}" if self.path else ""
        hint = f": {self.hint}" if self.hint else ""
        super().__init__(f"{code} {message}{detail}{where}{hint}")


class TransportError(Exception):
    """The server could not be reached or answered outside JSON-RPC (status, body)."""

    def __init__(self, message: str, status: Optional[int] = None, body: str = ""):
        self.status = status
        self.body = body
        super().__init__(message if status is None else f"{message} (HTTP {status}: {body[:200]})")


#: Calls that change no state, safe to resend after a dropped connection: the server's table.
from .protocol import RETRY_SAFE


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


class Client:
    """Ember client. `api_key` defaults to $EMBER_API_KEY. Methods mirror the protocol
    (Protocol/openrpc.json); `call` reaches any method by name."""

    def __init__(self, url: str = "http://127.0.0.1:8377", api_key: Optional[str] = None, timeout: float = 3600.0,
                 retries: int = 3, backoff: float = 0.2):
        self.url = url.rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("EMBER_API_KEY")
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._local = threading.local()
        self._ids = itertools.count(1)
        self._id_lock = threading.Lock()
        if self.url.startswith("unix://"):
            self._unix = self.url[len("unix://"):]
            self._host = None
        else:
            rest = self.url.split("://", 1)[-1]
            self._unix = None
            host, _, port = rest.partition("/")[0].rpartition(":")
            self._host = (host.strip("[]") or "127.0.0.1", int(port or 8377)) if host else (rest.partition("/")[0], 80)

    # -- transport -------------------------------------------------------------------------

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = _UnixConnection(self._unix, self.timeout) if self._unix else \
                http.client.HTTPConnection(self._host[0], self._host[1], timeout=self.timeout)
            self._local.conn = conn
        return conn

    def _drop(self):
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
        self._local.conn = None

    def request(self, method: str, path: str, body: Optional[bytes] = None, retry: bool = False) -> Tuple[int, bytes]:
        """One HTTP exchange on this thread's keep-alive connection."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        attempts = self.retries + 1 if retry else 1
        for attempt in range(attempts):
            try:
                conn = self._connection()
                conn.request(method, path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                if resp.getheader("Connection", "").lower() == "close":
                    self._drop()
                if resp.status == 503 and attempt + 1 < attempts:
                    time.sleep(self.backoff * 2 ** attempt)
                    continue
                return resp.status, data
            except (ConnectionError, http.client.HTTPException, socket.timeout, OSError) as e:
                self._drop()
                if attempt + 1 >= attempts:
                    raise TransportError(f"cannot reach Ember at {self.url}: {e}") from e
                time.sleep(self.backoff * 2 ** attempt)
        raise TransportError("unreachable")

    def next_id(self) -> int:
        with self._id_lock:
            return next(self._ids)

    def call(self, method: str, params: Optional[dict] = None, id: Any = None) -> Any:
        """Calls `method`; returns its result or raises EmberError / TransportError."""
        rid = self.next_id() if id is None else id
        payload = {"jsonrpc": "2.0", "method": method, "id": rid}
        if params:
            payload["params"] = {k: v for k, v in params.items() if v is not None}
        status, body = self.request("POST", "/rpc", json.dumps(payload).encode(), retry=method in RETRY_SAFE)
        return self._result(status, body)

    @staticmethod
    def _result(status: int, body: bytes) -> Any:
        try:
            obj = json.loads(body) if body else None
        except ValueError:
            raise TransportError("answer is not JSON", status, body.decode("utf-8", "replace"))
        if isinstance(obj, dict) and "error" in obj and isinstance(obj["error"], dict) and "code" in obj["error"]:
            e = obj["error"]
            raise EmberError(e["code"], e.get("message", ""), e.get("data"))
        if status != 200 or not isinstance(obj, dict) or "result" not in obj:
            raise TransportError("unexpected answer", status, body.decode("utf-8", "replace"))
        return obj["result"]

    def batch(self, calls: Iterable[Tuple[str, Optional[dict]]]) -> List[Any]:
        """Sends calls as one JSON-RPC batch; returns results (or EmberError instances) in order."""
        payload = []
        for method, params in calls:
            entry = {"jsonrpc": "2.0", "method": method, "id": self.next_id()}
            if params:
                entry["params"] = params
            payload.append(entry)
        status, body = self.request("POST", "/rpc", json.dumps(payload).encode())
        if status != 200:
            raise TransportError("batch failed", status, body.decode("utf-8", "replace"))
        answers = {a["id"]: a for a in json.loads(body)}
        out = []
        for entry in payload:
            a = answers.get(entry["id"])
            if a is None:
                out.append(TransportError(f"no answer for {entry['method']}"))
            elif "error" in a:
                e = a["error"]
                out.append(EmberError(e["code"], e.get("message", ""), e.get("data")))
            else:
                out.append(a["result"])
        return out

    def notify(self, method: str, params: Optional[dict] = None) -> None:
        payload = {"jsonrpc": "2.0", "method": method}
        if params:
            payload["params"] = params
        self.request("POST", "/rpc", json.dumps(payload).encode())

    def healthy(self) -> bool:
        try:
            status, _ = self.request("GET", "/healthz")
            return status == 200
        except TransportError:
            return False

    def metrics(self) -> Dict[str, float]:
        """GET /metrics parsed into {"name{labels}": value}."""
        status, body = self.request("GET", "/metrics", retry=True)
        if status != 200:
            raise TransportError("metrics failed", status, body.decode("utf-8", "replace"))
        out = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def wait_until_healthy(self, timeout: float = 60.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.healthy():
                return
            time.sleep(0.1)
        raise TransportError(f"Ember at {self.url} did not become healthy within {timeout:.0f} s")

    # -- methods ---------------------------------------------------------------------------

    def info(self) -> dict:
        return self.call("server.info")

    def loss_defaults(self) -> dict:
        """Every loss mode's options and defaults as the server applies them:
        {"common": {...}, "modes": {mode: {option: default or None}}}."""
        return self.info()["loss_defaults"]

    def tokenize(self, text: Optional[str] = None, texts: Optional[Sequence[str]] = None, add_special_tokens: bool = True):
        r = self.call("tokenize", {"text": text, "texts": list(texts) if texts is not None else None,
                                   "add_special_tokens": add_special_tokens})
        return r.get("tokens", r.get("token_lists"))

    def detokenize(self, tokens=None, token_lists=None, skip_special_tokens: bool = False):
        r = self.call("detokenize", {"tokens": tokens, "token_lists": token_lists, "skip_special_tokens": skip_special_tokens})
        return r.get("text", r.get("texts"))

    def chat_render(self, messages: Sequence[dict], tools: Optional[Sequence[dict]] = None, add_generation_prompt: bool = True,
                    template_kwargs: Optional[dict] = None) -> dict:
        """{text, tokens}: the conversation through the model's chat template (as apply_chat_template)."""
        return self.call("chat.render", {"messages": list(messages), "tools": list(tools) if tools is not None else None,
                                         "add_generation_prompt": add_generation_prompt, "template_kwargs": template_kwargs})

    def generate(self, prompts: Optional[Sequence[str]] = None, prompt_tokens: Optional[Sequence[Sequence[int]]] = None,
                 n: int = 1, max_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 min_p: float = 0.0, seed: Optional[int] = None, stop: Optional[Sequence[str]] = None,
                 stop_token_ids: Optional[Sequence[int]] = None, logprobs: bool = True, top_logprobs: int = 0,
                 entropy: bool = False, proxy: Optional[dict] = None, ignore_eos: bool = False, id: Any = None,
                 adapter: Optional[str] = None, messages: Optional[Sequence] = None, tools: Optional[Sequence[dict]] = None,
                 template_kwargs: Optional[dict] = None) -> dict:
        """Samples continuations (under a LoRA `adapter` when named); `id` lets another thread `cancel(id)` it."""
        return self.call("generate", {
            "prompts": list(prompts) if prompts is not None else None,
            "prompt_tokens": [list(p) for p in prompt_tokens] if prompt_tokens is not None else None,
            "n": n, "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p,
            "seed": seed, "stop": list(stop) if stop else None, "stop_token_ids": list(stop_token_ids) if stop_token_ids else None,
            "logprobs": logprobs, "top_logprobs": top_logprobs, "entropy": entropy, "proxy": proxy,
            "ignore_eos": ignore_eos, "adapter": adapter, "messages": list(messages) if messages is not None else None,
            "tools": list(tools) if tools is not None else None, "template_kwargs": template_kwargs}, id=id)

    def logprob(self, sequences: Sequence[dict], temperature: float = 1.0, top_logprobs: int = 0, entropy: bool = False,
                proxy: Optional[dict] = None, adapter: Optional[str] = None,
                probe_tokens: Optional[Sequence[int]] = None) -> dict:
        return self.call("logprob", {"sequences": list(sequences), "temperature": temperature, "top_logprobs": top_logprobs,
                                     "entropy": entropy, "proxy": proxy, "adapter": adapter,
                                     "probe_tokens": list(probe_tokens) if probe_tokens else None})

    def train_step(self, loss: dict, batch: Optional[Sequence[dict]] = None, rollouts: Optional[Sequence[dict]] = None,
                   advantage_estimator: Optional[str] = None, drop_constant_groups: Optional[bool] = None,
                   optimizer: Optional[dict] = None, mini_batches: Optional[int] = None,
                   micro_batch_tokens: Optional[int] = None, dry_run: bool = False, adapter: Optional[str] = None,
                   rollout_correction: Optional[dict] = None) -> dict:
        """One update of the full model, or of the LoRA `adapter` (base frozen) when named;
        `rollout_correction` ({mode, level, cap}) weighs off-policy samples (Protocol/README.md)."""
        return self.call("train_step", {
            "loss": loss, "batch": list(batch) if batch is not None else None,
            "rollouts": list(rollouts) if rollouts is not None else None, "advantage_estimator": advantage_estimator,
            "drop_constant_groups": drop_constant_groups, "optimizer": optimizer, "mini_batches": mini_batches,
            "micro_batch_tokens": micro_batch_tokens, "dry_run": dry_run or None, "adapter": adapter,
            "rollout_correction": rollout_correction})

    def configure_optimizer(self, adapter: Optional[str] = None, **settings) -> dict:
        return self.call("optimizer.configure", {**settings, "adapter": adapter})

    def snapshot_reference(self, adapter: Optional[str] = None) -> dict:
        return self.call("reference.snapshot", {"adapter": adapter})

    # LoRA adapters
    def create_adapter(self, name: str, rank: int, alpha: Optional[float] = None, target_modules=None, seed: int = 0,
                       use_rslora: bool = False) -> dict:
        """A new adapter (exactly the base model until trained); target_modules defaults to "all-linear"."""
        return self.call("adapters.create", {"name": name, "rank": rank, "alpha": alpha, "target_modules": target_modules,
                                             "seed": seed, "use_rslora": use_rslora})

    def list_adapters(self) -> List[dict]:
        return self.call("adapters.list")["adapters"]

    def delete_adapter(self, name: str) -> str:
        return self.call("adapters.delete", {"name": name})["deleted"]

    def load_adapter(self, name: str, path: str) -> dict:
        """Reads a PEFT folder (inside the server's checkpoint dir or an --adapter-dir)."""
        return self.call("adapters.load", {"name": name, "path": path})

    def save_adapter(self, name: str) -> dict:
        """Writes the adapter as a PEFT folder; the result's `path` names it."""
        return self.call("adapters.save", {"name": name})

    def merge_adapter(self, name: str, checkpoint: str) -> dict:
        """Writes base + adapter as a full Hugging Face checkpoint named `checkpoint`."""
        return self.call("adapters.merge", {"name": name, "checkpoint": checkpoint})

    # Replicas (ember-server --follow URL)
    def weights_sync(self, version: Optional[int] = None, timeout: Optional[float] = None) -> dict:
        """On a replica: pull the trainer's weights now (first waiting until it has published
        `version`, when given); answers once they are applied, with `weights_version`."""
        return self.call("weights.sync", {"version": version, "timeout": timeout})

    def release_rollouts(self, rollout_ids: Sequence[str]) -> int:
        return self.call("rollouts.release", {"rollout_ids": list(rollout_ids)})["released"]

    def save_checkpoint(self, name: str) -> dict:
        return self.call("checkpoint.save", {"name": name})

    def load_checkpoint(self, name: str) -> dict:
        return self.call("checkpoint.load", {"name": name})

    def list_checkpoints(self) -> List[str]:
        return self.call("checkpoint.list")["names"]

    def cancel(self, request_id: Any) -> int:
        return self.call("cancel", {"request_id": request_id})["cancelled"]
