"""The OpenAI chat API of `medmerge serve`: any OpenAI client talks to the local model.

GET  /v1/models                 {"object": "list", "data": [{"id": MODEL, "object": "model", ...}]}
GET  /v1/models/{id}            that model (404 for another id)
POST /v1/chat/completions       {"model", "messages", "stream"?, "max_tokens"?, "temperature"?, ...}

The answer is decoded with the server's answer config (`AnswerConfig.decoding`); a request may change
`temperature`, `top_p`, `seed` and the cap `max_tokens` / `max_completion_tokens` (never above the
server's `max_new_tokens`), and, as extra body fields, `repetition_penalty`, `no_repeat_ngram_size` and
`stop_repeat_tokens`. The safety notice is the final content of every answer: the last content delta of a
stream, the end of `message.content` otherwise. `stream: true` sends OpenAI's `chat.completion.chunk`
objects as server-sent events, then `data: [DONE]`; `stream_options.include_usage` adds the usage chunk.
Causal models with a chat template get the whole conversation through it; other models answer the last
user message. Unsupported options (`n` > 1, `stop`, tools, response formats, logprobs, frequency or
presence penalties) are refused with 400 rather than ignored. A full answer queue gives 429 with
`Retry-After`. Errors use OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from medmerge.config import AnswerConfig
from medmerge.config.answer import Decoding
from medmerge.errors import MedmergeError
from medmerge.export.answer import AnswerQueue, Busy, Job, check_question, notice_suffix
from medmerge.export.engines import Engine, prompt_ids

ROLES = ("system", "developer", "user", "assistant")
DECODING_FIELDS = (
    "temperature",
    "top_p",
    "seed",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "stop_repeat_tokens",
)
UNSUPPORTED = ("stop", "tools", "functions", "tool_choice", "response_format", "logprobs", "top_logprobs")


class RequestError(Exception):
    """A 4xx answer in OpenAI's error shape."""

    def __init__(
        self, message: str, param: str | None = None, status: int = 400, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


def error_response(exc: RequestError | Busy) -> JSONResponse:
    if isinstance(exc, Busy):
        body = {"message": str(exc), "type": "rate_limit_error", "param": None, "code": "rate_limit_exceeded"}
        return JSONResponse({"error": body}, status_code=429, headers={"Retry-After": str(exc.retry_after)})
    kind = "invalid_request_error" if exc.status < 500 else "server_error"
    body = {"message": str(exc), "type": kind, "param": exc.param, "code": exc.code}
    return JSONResponse({"error": body}, status_code=exc.status)


def model_id(model_name: str) -> str:
    """The id clients use: the model's name, or its folder's name for a path."""
    return Path(model_name).name or model_name


def message_text(message: Any, index: int) -> tuple[str, str]:
    """(role, text) of one message; content may be a string or a list of text parts."""
    where = f"messages[{index}]"
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise RequestError(f"{where}: expected {{'role': one of {', '.join(ROLES)}, 'content': ...}}", where)
    content = message.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            raise RequestError(f"{where}.content: only text parts are supported", f"{where}.content")
        content = "".join(str(p.get("text", "")) for p in content)
    if not isinstance(content, str):
        raise RequestError(f"{where}.content: expected a string or a list of text parts", f"{where}.content")
    role = "system" if message["role"] == "developer" else message["role"]
    return role, content


def conversation_prompt(engine: Engine, body: dict[str, Any], config: AnswerConfig) -> list[int]:
    """Prompt ids for the request's messages (checked: the last one is the user's question)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages: expected a non-empty list", "messages")
    turns = [message_text(m, i) for i, m in enumerate(messages)]
    if turns[-1][0] != "user":
        raise RequestError("messages: the last message must be the user's question", "messages")
    try:
        question = check_question(turns[-1][1], config)
    except MedmergeError as exc:
        raise RequestError(str(exc), f"messages[{len(turns) - 1}].content") from None
    total = sum(len(text) for _, text in turns)
    if total > 8 * config.max_question_chars:
        raise RequestError(
            f"messages: {total} characters in all, over {8 * config.max_question_chars}", "messages"
        )
    system = next((text for role, text in turns if role == "system"), config.system_prompt)
    chat = [(role, text) for role, text in turns[:-1] if role != "system"]
    if not chat or engine.kind != "causal" or not getattr(engine.tokenizer, "chat_template", None):
        return prompt_ids(engine, question, system)
    suffix = notice_suffix(config)
    history = [
        {"role": r, "content": t.removesuffix(suffix) if r == "assistant" and suffix else t} for r, t in chat
    ]
    messages = ([{"role": "system", "content": system}] if system else []) + history
    text = engine.tokenizer.apply_chat_template(
        [*messages, {"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    return engine.tokenizer(text, add_special_tokens=False)["input_ids"]


def request_settings(body: dict[str, Any], config: AnswerConfig) -> tuple[int, Decoding]:
    """(max new tokens, decoding) of a request, from the server's config and the request's options."""
    for name in UNSUPPORTED:
        if body.get(name) not in (None, False, [], ""):
            raise RequestError(f"{name}: not supported by medmerge serve", name)
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise RequestError(f"{name}: not supported (use repetition_penalty)", name)
    if body.get("n") not in (None, 1):
        raise RequestError("n: only 1 answer per request", "n")
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is None:
        limit = config.max_new_tokens
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise RequestError("max_tokens: expected a positive integer", "max_tokens")
    changes = {k: body[k] for k in DECODING_FIELDS if body.get(k) is not None}
    try:
        decoding = Decoding.model_validate({**config.decoding.model_dump(), **changes})
    except ValueError as exc:
        first = exc.errors()[0] if hasattr(exc, "errors") else {"loc": ("",), "msg": str(exc)}
        where = ".".join(str(p) for p in first["loc"])
        raise RequestError(f"{where}: {first['msg']}", where) from None
    return min(limit, config.max_new_tokens), decoding


def _finish(job: Job) -> str:
    stream = job.stream
    return "length" if stream is None or stream.finish_reason == "length" else "stop"


def _usage(job: Job) -> dict[str, int]:
    completion = len(job.stream.tokens) if job.stream is not None else 0
    return {
        "prompt_tokens": len(job.prompt),
        "completion_tokens": completion,
        "total_tokens": len(job.prompt) + completion,
    }


def add_openai_routes(app: FastAPI, answers: AnswerQueue, config: AnswerConfig, model_name: str) -> None:
    """Mount the OpenAI endpoints on `app`, answering through `answers` (shared with the page)."""
    served = model_id(model_name)
    created = int(time.time())
    card = {"id": served, "object": "model", "created": created, "owned_by": "medmerge"}
    suffix = notice_suffix(config)

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{name:path}")
    def model(name: str) -> Any:
        if name not in (served, model_name):
            return error_response(
                RequestError(f"model {name!r}: not served here", "model", 404, "model_not_found")
            )
        return card

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        try:
            body = await request.json()
        except ValueError:
            return error_response(RequestError("body: expected a JSON object"))
        try:
            if not isinstance(body, dict):
                raise RequestError("body: expected a JSON object")
            if body.get("model") not in (served, model_name):
                raise RequestError(
                    f"model {body.get('model')!r}: not served here (GET /v1/models: {served!r})",
                    "model",
                    404,
                    "model_not_found",
                )
            prompt = conversation_prompt(answers.engine, body, config)
            max_new_tokens, decoding = request_settings(body, config)
            stream_options = body.get("stream_options") or {}
            job = answers.submit(prompt, max_new_tokens, decoding)
        except (RequestError, Busy) as exc:
            return error_response(exc)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": served}
        if body.get("stream"):
            usage = bool(isinstance(stream_options, dict) and stream_options.get("include_usage"))
            return StreamingResponse(
                _events(job, head, suffix, usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
            )
        try:
            text = "".join([piece async for piece in job.pieces()])
        except MedmergeError as exc:
            return error_response(RequestError(str(exc), status=500))
        message = {"role": "assistant", "content": text + suffix}
        choice = {"index": 0, "message": message, "finish_reason": _finish(job), "logprobs": None}
        return {**head, "object": "chat.completion", "choices": [choice], "usage": _usage(job)}


async def _events(job: Job, head: dict[str, Any], suffix: str, usage: bool) -> AsyncIterator[str]:
    """Server-sent events of one streamed answer, in OpenAI's chunk format."""

    def chunk(delta: dict[str, str], finish: str | None = None, **extra: Any) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        body = {**head, "object": "chat.completion.chunk", "choices": [choice], **extra}
        return f"data: {json.dumps(body)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    try:
        async for piece in job.pieces():
            yield chunk({"content": piece})
    except MedmergeError as exc:
        error = {"message": str(exc), "type": "server_error", "param": None, "code": None}
        yield f"data: {json.dumps({'error': error})}\n\n"
        return
    if suffix:
        yield chunk({"content": suffix})
    yield chunk({}, _finish(job))
    if usage:
        body = {**head, "object": "chat.completion.chunk", "choices": [], "usage": _usage(job)}
        yield f"data: {json.dumps(body)}\n\n"
    yield "data: [DONE]\n\n"
