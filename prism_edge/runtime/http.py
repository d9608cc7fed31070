"""A minimal JSON-over-HTTP endpoint on rank 0, so non-Python clients can use a running cluster.

  GET  /health       {"alive": true, "devices": 4, "model": ..., "config": {...}, "requests": 12}
  POST /v1/generate  {"prompt": "...", "max_new_tokens": 32, "do_sample": false, "temperature": 1.0,
                     "top_k": 0, "top_p": 1.0, "seed": null, "chat": false}  or  {"input_ids": [[...]], ...}
                     -> {"text": "...", "token_ids": [...], "stopped_by": "...", "prefill_stats": {...}}
  POST /v1/forward   {"texts": ["...", ...]}  or  {"input_ids": [[...]], "attention_mask": [[...]]}
                     or {"pixel_values": [[[[...]]]]};  optional "outputs": all | last | mean | pooled,
                     "max_length": 512, "top_k": 5
                     -> {"outputs": {name: nested lists}, "next_tokens": [...] (LM, last), "stats": {...}}

Requests run one at a time (the cluster is one pipeline).  A bad request gets 400 with
{"error": "..."} and leaves the cluster serving; a lost device gets 503 and stops the server.
No authentication and no TLS: bind it to localhost or a trusted network.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from .cluster import Cluster, ClusterError

MAX_BODY = 64 * 1024 * 1024


def default_mode(cluster: Cluster) -> str:
    """What a request returns unless it asks: LM -> next-token (last), classifier -> pooled, else mean."""
    head = cluster.adapter.head
    if cluster.adapter.geometry.causal:
        return "last"
    if head == "classify":
        return "pooled"
    return "mean"


def encode_texts(cluster: Cluster, texts: list[str], max_length: int = 512) -> dict[str, torch.Tensor]:
    tok = cluster.tokenizer
    if tok is None or not callable(tok) or cluster.adapter.family == "vit":
        raise ValueError("this model takes no text (no tokenizer); send input_ids or pixel_values")
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
        raise ValueError('"texts" must be a non-empty list of non-empty strings')
    if getattr(tok, "pad_token", None) is None and getattr(tok, "eos_token", None) is not None:
        tok.pad_token = tok.eos_token
    enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def _tensor(value, name: str, dtype: torch.dtype, dims: int) -> torch.Tensor:
    try:
        t = torch.tensor(value, dtype=dtype)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f'"{name}" must be a rectangular nested list of numbers ({err})') from None
    if t.dim() != dims:
        raise ValueError(f'"{name}" must have {dims} dimensions, got {t.dim()}')
    return t


def handle_forward(cluster: Cluster, body: dict) -> dict:
    if not isinstance(body, dict):
        raise ValueError("the request body must be a JSON object")
    mode = body.get("outputs") or default_mode(cluster)
    if "texts" in body:
        inputs = encode_texts(cluster, body["texts"], int(body.get("max_length", 512)))
    elif "input_ids" in body:
        inputs = {"input_ids": _tensor(body["input_ids"], "input_ids", torch.long, 2)}
        for key in ("attention_mask", "token_type_ids"):
            if key in body:
                inputs[key] = _tensor(body[key], key, torch.long, 2)
    elif "pixel_values" in body:
        inputs = {"pixel_values": _tensor(body["pixel_values"], "pixel_values", torch.float32, 4)}
    else:
        raise ValueError('send "texts", "input_ids" (with optional "attention_mask") or "pixel_values"')
    out = cluster(**inputs, outputs=mode)
    reply: dict = {"mode": mode, "outputs": {}, "stats": out.stats.to_dict()}
    for name in out.keys():
        if name in ("stats", "plan"):
            continue
        value = getattr(out, name)
        if name == "logits" and mode == "last":
            probs = torch.softmax(value[:, 0].float(), dim=-1)
            top = probs.topk(int(body.get("top_k", 5)), dim=-1)
            tok = cluster.tokenizer
            reply["next_tokens"] = [
                [{"id": int(i), "token": tok.decode([int(i)]) if tok is not None else None, "prob": round(float(p), 6)}
                 for p, i in zip(ps, ids)]
                for ps, ids in zip(top.values, top.indices)
            ]
            if not body.get("return_logits"):
                continue
        reply["outputs"][name] = value.tolist()
    if "input_ids" in inputs:
        reply["tokens"] = [int(m.sum()) for m in inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))]
    return reply


def handle_generate(cluster: Cluster, body: dict) -> dict:
    from .generate import Sampling

    if not isinstance(body, dict):
        raise ValueError("the request body must be a JSON object")
    tok = cluster.tokenizer
    if "prompt" in body:
        if tok is None or not isinstance(body["prompt"], str) or not body["prompt"]:
            raise ValueError('"prompt" must be a non-empty string (and the model needs a tokenizer)')
        prompt = body["prompt"]
        if body.get("chat") and getattr(tok, "chat_template", None):
            prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tok(prompt, return_tensors="pt", add_special_tokens=not body.get("chat"))["input_ids"]
    elif "input_ids" in body:
        ids = _tensor(body["input_ids"], "input_ids", torch.long, 2)
    else:
        raise ValueError('send "prompt" (text) or "input_ids" ([[...]]) to /v1/generate')
    sampling = Sampling(bool(body.get("do_sample", False)), float(body.get("temperature", 1.0)),
                        int(body.get("top_k", 0)), float(body.get("top_p", 1.0)), body.get("seed"))
    eos = getattr(tok, "eos_token_id", None) if tok is not None else None
    stops = tuple(int(i) for i in body.get("stop_ids", [])) + ((eos,) if isinstance(eos, int) else ())
    gen = cluster.generate(ids, max_new_tokens=int(body.get("max_new_tokens", 32)), sampling=sampling,
                           stop_ids=stops)
    text = tok.decode(gen.new_ids, skip_special_tokens=True) if tok is not None else None
    return {"text": text, "token_ids": gen.new_ids, "stopped_by": gen.stopped_by,
            "prefill_stats": gen.prefill_stats.to_dict(), "decode_bytes_per_token": gen.decode_bytes_per_token}


class _Handler(BaseHTTPRequestHandler):
    cluster: Cluster
    server_version = "prism-edge"

    def log_message(self, fmt, *args):  # quiet: the launcher prints its own lines
        pass

    def _send(self, code: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path.rstrip("/") in ("/health", ""):
            self._send(200 if self.cluster.alive else 503, self.cluster.describe())
        else:
            self._send(404, {"error": f"no such endpoint {self.path}; use GET /health or POST /v1/forward"})

    def do_POST(self):
        routes = {"/v1/forward": handle_forward, "/v1/generate": handle_generate}
        handler = routes.get(self.path.rstrip("/"))
        if handler is None:
            self._send(404, {"error": f"no such endpoint {self.path}; use POST /v1/forward or /v1/generate"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length <= 0 or length > MAX_BODY:
            self._send(400, {"error": f"send a JSON body of 1 byte to {MAX_BODY} bytes"})
            return
        try:
            body = json.loads(self.rfile.read(length))
            self._send(200, handler(self.cluster, body))
        except json.JSONDecodeError as err:
            self._send(400, {"error": f"the body is not valid JSON: {err}"})
        except ValueError as err:
            self._send(400, {"error": str(err)})
        except ClusterError as err:
            self._send(503, {"error": str(err)})
            threading.Thread(target=self.server.shutdown, daemon=True).start()


def make_server(cluster: Cluster, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """An HTTP server bound to host:port (port 0: any free port; see server.server_address)."""
    handler = type("Handler", (_Handler,), {"cluster": cluster})
    return ThreadingHTTPServer((host, port), handler)
