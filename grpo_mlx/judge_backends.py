"""Who answers the judge's requests: an OpenAI-compatible server, or an mlx-lm model in memory.

A backend has `id` (part of the cache key: the same messages to another judge are another
request) and `complete(requests, params) -> answers` (one answer text per list of messages).

- EndpointBackend: POST /v1/chat/completions with the standard library (urllib in a thread
  pool: no HTTP package is among our dependencies, and the requests are few and small), at most
  judge_concurrency in flight, each with a timeout, retried with exponential backoff on
  connection errors, timeouts, 408/429 and 5xx; the key, when the environment variable holds
  one, as a Bearer token. `URL#name` names the server's model (LM Studio, Ollama, remote APIs);
  without it the request names none, and mlx_lm.server answers with the model it loaded.
- LocalBackend: the project's batched sampler over the chat-templated requests, greedy unless
  judge_temperature is set (then keyed by a seed per request, so an answer does not depend on
  which other requests share the batch). `base=True` runs the policy with its adapters off.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from grpo_mlx.judge_rubric import JudgeError, JudgeSettings

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
MAX_BACKOFF = 8.0  # seconds between tries at most


def chat_url(url: str) -> tuple[str, str | None]:
    """(the chat-completions URL, the model name or None) of `URL[#name]`: a bare host, a
    /v1 base or the full path all work."""
    url, _, name = url.partition("#")
    url = url.rstrip("/")
    if not url.endswith("/chat/completions"):
        url += "/chat/completions" if url.endswith("/v1") else "/v1/chat/completions"
    return url, name or None


class EndpointBackend:
    def __init__(self, settings: JudgeSettings, backoff: float = 0.5):
        self.settings = settings
        self.url, self.model_name = chat_url(settings.model)
        self.id = f"{self.url}#{self.model_name or ''}"
        self.backoff = backoff  # seconds before the first retry; doubled each time

    def probe(self) -> None:
        """Refuse, in one sentence, a server nothing listens at: found before the model loads,
        not at the first step's rewards. Only a connection is opened; no request is sent."""
        parts = urllib.parse.urlsplit(self.url)
        host = parts.hostname or ""
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
            with socket.create_connection((host, port), timeout=min(self.settings.timeout, 5.0)):
                pass
        except (OSError, ValueError) as e:
            reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
            raise JudgeError(
                f"judge_model {self.settings.model}: cannot connect to {host}:{parts.port or ''} ({reason}); "
                "start the judge server first (e.g. mlx_lm.server --model MODEL --port PORT) or fix the URL"
            ) from None

    def complete(self, requests: list[list[dict]], params: dict) -> list[str]:
        if not requests:
            return []
        with ThreadPoolExecutor(max_workers=self.settings.concurrency, thread_name_prefix="judge") as pool:
            futures = [pool.submit(self.post, messages, params) for messages in requests]
            try:
                return [f.result() for f in futures]
            except BaseException:
                for f in futures:  # the run stops: send nothing more
                    f.cancel()
                raise

    def post(self, messages: list[dict], params: dict) -> str:
        """One request's answer text, retried; a JudgeError in one sentence when it cannot be had."""
        body = {"messages": messages, **params}
        if self.model_name:
            body["model"] = self.model_name
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.settings.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        tries = self.settings.retries + 1
        reason = ""
        for attempt in range(tries):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), MAX_BACKOFF))
            request = urllib.request.Request(self.url, json.dumps(body).encode(), headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.settings.timeout) as response:
                    reply = json.loads(response.read())
                return str(reply["choices"][0]["message"]["content"] or "")
            except urllib.error.HTTPError as e:
                detail = e.read()[:200].decode("utf-8", "replace").strip()
                reason = f"HTTP {e.code}{': ' + detail if detail else ''}"
                if e.code not in RETRY_STATUS:  # a bad key, a wrong model name: asking again will not help
                    hint = f" (is ${self.settings.api_key_env} set?)" if e.code in (401, 403) else ""
                    raise JudgeError(f"judge server {self.url} refused the request: {reason}{hint}") from None
            except TimeoutError:
                reason = f"no answer within judge_timeout = {self.settings.timeout:g} s"
            except urllib.error.URLError as e:
                reason = str(getattr(e, "reason", e))
            except (ConnectionError, OSError) as e:
                reason = f"{type(e).__name__}: {e}"
            except (ValueError, KeyError, IndexError, TypeError):
                reason = "the reply is not a chat completion (no choices[0].message.content)"
        raise JudgeError(f"judge server {self.url} gave no answer after {tries} tries: {reason}")


class LocalBackend:
    def __init__(self, model, tokenizer, name: str, settings: JudgeSettings, base: bool = False):
        self.model, self.tokenizer, self.settings, self.base = model, tokenizer, settings, base
        self.id = f"mlx:{name}"

    def complete(self, requests: list[list[dict]], params: dict) -> list[str]:
        from grpo_mlx import prompts
        from grpo_mlx.policy import adapters_disabled
        from grpo_mlx.sampler import generate_groups

        texts = [prompts.render_prompt(self.tokenizer, messages) for messages in requests]  # the template's defaults
        ids = [prompts.encode_prompt(self.tokenizer, t) for t in texts]
        seeds = [(int(hashlib.sha256(t.encode()).hexdigest()[:8], 16) ^ params["seed"]) % 2**31 for t in texts]
        answers: list[str] = []
        step = max(self.settings.concurrency, 1)
        for start in range(0, len(ids), step):  # judge_concurrency prompts in one batch
            chunk = slice(start, start + step)
            with adapters_disabled(self.model) if self.base else contextlib.nullcontext():
                roll = generate_groups(self.model, self.tokenizer, ids[chunk], 1, params["max_tokens"],
                                       params["temperature"], seeds=seeds[chunk])  # fmt: skip
            answers.extend(roll.texts)
        return answers
