#!/usr/bin/env python3
"""A tiny fake of the Anthropic API, enough for the real Claude Code CLI to run a task.

Python 3.11 standard library only. Listens on 127.0.0.1 (never anything else) and answers:

  HEAD / and HEAD|GET /api/hello  200 (the CLI's connectivity checks)
  POST /v1/messages[?beta=true]   a fixed assistant answer, as SSE when "stream" is true
                                  (message_start, content_block_start, content_block_delta,
                                  content_block_stop, message_delta, message_stop) or as one
                                  JSON message when it is false
  POST /v1/messages/count_tokens  {"input_tokens": N}
  anything else                   404 with an Anthropic-shaped error body

Scenarios (--mode, or env FAKE_ANTHROPIC_MODE):
  ok            every message request gets the text answer (--text / FAKE_ANTHROPIC_TEXT,
                repeated --text-repeat / FAKE_ANTHROPIC_TEXT_REPEAT times: a large answer)
  unauthorized  every message request gets 401 authentication_error
  not_found     every message request gets 404 not_found_error naming the request's model,
                as the API answers a model that does not exist ("model: <name>")
  tool_use      the first message request of a conversation (no tool_result in it yet)
                gets a tool_use block (--tool / FAKE_ANTHROPIC_TOOL, JSON {"name","input"};
                default Read of /etc/hostname), later ones the text answer. In the tool's
                input, the text {cwd} becomes the working directory the CLI names in its
                system prompt ("Primary working directory: …"), so a Write can target the
                job's own checkout
  stall         message requests get no answer at all (for timeouts)
  rate_limited  message requests get 429 with the subscription's usage window rejected, the
                way the real API answers a Claude subscription that used up its window: a
                rate_limit_error body and the `anthropic-ratelimit-unified-*` headers the CLI
                reads (status, reset, representative-claim, and the per-window 5h-* ones);
                the reset is --reset-in seconds from now (env FAKE_ANTHROPIC_RESET_IN)
  warning       the text answer, with headers saying the window is at 91 % (allowed_warning)

Every request is appended as one JSON line to --log (env FAKE_ANTHROPIC_LOG): method, path,
the headers that matter (credentials only as "present"), and the parsed JSON body.
With --port 0 the kernel picks the port; it is written to --port-file once listening.

  python3 server.py --port 0 --port-file /tmp/port --log /tmp/requests.jsonl
"""

import argparse
import http.server
import json
import os
import re
import sys
import threading
import time
import uuid

DEFAULT_TEXT = "Hello from the fake Anthropic API."


def sse(event, data):
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-anthropic/1"

    def log_message(self, fmt, *args):  # quiet: requests go to the JSON log instead
        pass

    # -- helpers ---------------------------------------------------------------------------

    def record(self, body):
        path = self.server.opts.log
        if not path:
            return
        headers = {}
        for k, v in self.headers.items():
            lk = k.lower()
            if lk in ("x-api-key", "authorization"):
                headers[lk] = "present" if v else ""
            elif lk in ("anthropic-version", "anthropic-beta", "user-agent", "content-type", "x-app"):
                headers[lk] = v
        line = json.dumps({"method": self.command, "path": self.path, "headers": headers, "body": body})
        with self.server.log_lock, open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def send_bytes(self, status, content_type, data, extra=None):
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(data)))
        self.send_header("request-id", "req_fake_" + uuid.uuid4().hex[:16])
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_json(self, status, obj, extra=None):
        self.send_bytes(status, "application/json", json.dumps(obj).encode(), extra)

    def send_error_json(self, status, kind, message):
        self.send_json(status, {"type": "error", "error": {"type": kind, "message": message}})

    def read_body(self):
        n = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(n) if n else b""
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return {"_unparsed": raw.decode("utf-8", "replace")[:2000]}

    # -- routes ----------------------------------------------------------------------------

    def do_HEAD(self):
        self.record(None)
        if self.path.split("?")[0] in ("/", "/api/hello"):
            self.send_bytes(200, "application/json", b"")
        else:
            self.send_bytes(404, "application/json", b"")

    def do_GET(self):
        self.record(None)
        if self.path.split("?")[0] == "/api/hello":
            self.send_json(200, {"message": "hello"})
        else:
            self.send_error_json(404, "not_found_error", f"the fake has no {self.path}")

    def do_POST(self):
        body = self.read_body()
        self.record(body)
        path = self.path.split("?")[0]
        if path == "/v1/messages/count_tokens":
            self.send_json(200, {"input_tokens": 42})
        elif path == "/v1/messages":
            self.messages(body or {})
        else:
            self.send_error_json(404, "not_found_error", f"the fake has no {self.path}")

    def messages(self, body):
        opts = self.server.opts
        if opts.mode == "unauthorized":
            self.send_error_json(401, "authentication_error", "invalid x-api-key")
            return
        if opts.mode == "not_found":
            self.send_error_json(404, "not_found_error", f"model: {body.get('model')}")
            return
        if opts.mode == "stall":
            time.sleep(3600)
            return
        if opts.mode == "rate_limited":
            reset = str(int(time.time()) + opts.reset_in)
            headers = {
                "anthropic-ratelimit-unified-status": "rejected",
                "anthropic-ratelimit-unified-reset": reset,
                "anthropic-ratelimit-unified-representative-claim": "five_hour",
                "anthropic-ratelimit-unified-fallback": "unavailable",
                "anthropic-ratelimit-unified-5h-status": "rejected",
                "anthropic-ratelimit-unified-5h-reset": reset,
                "anthropic-ratelimit-unified-5h-utilization": "1.0",
                "anthropic-ratelimit-unified-7d-status": "allowed",
                "anthropic-ratelimit-unified-7d-reset": str(int(time.time()) + 5 * 86400),
                "anthropic-ratelimit-unified-7d-utilization": "0.42",
                "anthropic-ratelimit-unified-overage-status": "rejected",
                "anthropic-ratelimit-unified-overage-disabled-reason": "org_level_disabled",
                "retry-after": str(opts.reset_in),
            }
            self.send_json(429, {"type": "error", "error": {"type": "rate_limit_error", "message": "This request would exceed your account's rate limit. Please try again later."}}, headers)
            return
        model = body.get("model") or "claude-fake"
        tool = opts.mode == "tool_use" and not has_tool_result(body.get("messages") or [])
        if tool:
            call = json.loads(opts.tool.replace("{cwd}", working_directory(body) or "."))
            blocks = [{"type": "tool_use", "id": "toolu_fake_" + uuid.uuid4().hex[:12], "name": call["name"], "input": call.get("input", {})}]
            stop = "tool_use"
        else:
            blocks = [{"type": "text", "text": opts.text}]
            stop = "end_turn"
        msg_id = "msg_fake_" + uuid.uuid4().hex[:16]
        usage = {"input_tokens": 10, "output_tokens": 5, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
        if not body.get("stream"):
            self.send_json(200, {
                "id": msg_id, "type": "message", "role": "assistant", "model": model, "content": blocks,
                "stop_reason": stop, "stop_sequence": None, "usage": usage,
            })
            return
        out = [sse("message_start", {"type": "message_start", "message": {
            "id": msg_id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": dict(usage, output_tokens=1)}})]
        for i, block in enumerate(blocks):
            if block["type"] == "text":
                start = {"type": "text", "text": ""}
                delta = {"type": "text_delta", "text": block["text"]}
            else:
                start = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
                delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
            out.append(sse("content_block_start", {"type": "content_block_start", "index": i, "content_block": start}))
            out.append(sse("content_block_delta", {"type": "content_block_delta", "index": i, "delta": delta}))
            out.append(sse("content_block_stop", {"type": "content_block_stop", "index": i}))
        out.append(sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None}, "usage": {"output_tokens": 5}}))
        out.append(sse("message_stop", {"type": "message_stop"}))
        extra = {"cache-control": "no-cache"}
        if opts.mode == "warning":
            reset = str(int(time.time()) + opts.reset_in)
            extra.update({
                "anthropic-ratelimit-unified-status": "allowed_warning",
                "anthropic-ratelimit-unified-reset": reset,
                "anthropic-ratelimit-unified-representative-claim": "five_hour",
                "anthropic-ratelimit-unified-5h-status": "allowed_warning",
                "anthropic-ratelimit-unified-5h-reset": reset,
                "anthropic-ratelimit-unified-5h-utilization": "0.91",
                "anthropic-ratelimit-unified-5h-surpassed-threshold": "0.9",
            })
        self.send_bytes(200, "text/event-stream", "".join(out).encode(), extra)


def working_directory(body):
    system = body.get("system") or ""
    if isinstance(system, list):
        system = "\n".join(b.get("text", "") for b in system if isinstance(b, dict))
    match = re.search(r"Primary working directory: (\S+)", system)
    return match.group(1) if match else None


def has_tool_result(messages):
    for m in messages:
        content = m.get("content")
        if isinstance(content, list) and any(isinstance(c, dict) and c.get("type") == "tool_result" for c in content):
            return True
    return False


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=int(os.environ.get("FAKE_ANTHROPIC_PORT", "0")))
    p.add_argument("--port-file", default=os.environ.get("FAKE_ANTHROPIC_PORT_FILE"))
    p.add_argument("--log", default=os.environ.get("FAKE_ANTHROPIC_LOG"))
    p.add_argument("--mode", choices=["ok", "unauthorized", "not_found", "tool_use", "stall", "rate_limited", "warning"], default=os.environ.get("FAKE_ANTHROPIC_MODE", "ok"))
    p.add_argument("--tool", default=os.environ.get("FAKE_ANTHROPIC_TOOL", '{"name": "Read", "input": {"file_path": "/etc/hostname"}}'))
    p.add_argument("--reset-in", type=int, default=int(os.environ.get("FAKE_ANTHROPIC_RESET_IN", "3600")))
    p.add_argument("--text", default=os.environ.get("FAKE_ANTHROPIC_TEXT", DEFAULT_TEXT))
    p.add_argument("--text-repeat", type=int, default=int(os.environ.get("FAKE_ANTHROPIC_TEXT_REPEAT", "1")))
    opts = p.parse_args()
    opts.text = opts.text * max(opts.text_repeat, 1)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", opts.port), Handler)
    server.daemon_threads = True
    server.opts = opts
    server.log_lock = threading.Lock()
    port = server.server_address[1]
    if opts.port_file:
        tmp = opts.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(port))
        os.replace(tmp, opts.port_file)
    print(f"fake Anthropic API on http://127.0.0.1:{port} (mode {opts.mode})", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
