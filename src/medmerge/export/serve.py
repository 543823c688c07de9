"""`medmerge serve`: a local answer page, and the OpenAI chat API over the same engine.

GET  /                     the page (no external assets; works offline)
GET  /api/info             {"model", "engine", "notice"}
POST /api/ask              {"question": "..."} → text/plain, streamed piece by piece, ending with the safety
                           notice; 400 {"error": "..."} for an empty or over-long question
GET  /v1/models            OpenAI model list (one model)
POST /v1/chat/completions  OpenAI chat completions, streamed (server-sent events) or not
                           (`medmerge.export.openai_api`); the safety notice ends every answer
Bound to 127.0.0.1 by default: the page is for the person at this machine. One answer at a time (one
engine); up to `max_queued` requests wait, more are refused with 429 and Retry-After.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from medmerge.config import AnswerConfig
from medmerge.errors import MedmergeError
from medmerge.export.answer import AnswerQueue, Busy, check_question, notice_suffix
from medmerge.export.engines import Engine, prompt_ids
from medmerge.export.openai_api import add_openai_routes, model_id

log = logging.getLogger(__name__)

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>medmerge: ask</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font: 16px/1.5 system-ui, sans-serif; max-width: 46rem; margin: 2rem auto; padding: 0 1rem; }
 textarea { width: 100%; box-sizing: border-box; font: inherit; padding: .5rem; }
 button { font: inherit; padding: .4rem 1.2rem; margin-top: .5rem; }
 #answer { white-space: pre-wrap; border: 1px solid #ccc; border-radius: 6px; padding: .8rem;
           min-height: 6rem; margin-top: 1rem; background: #fafafa; }
 #answer.error { color: #a00; }
 #status, #meta { color: #666; font-size: .9rem; }
</style></head>
<body>
<h1>Ask a medical question</h1>
<p id="meta"></p>
<form id="form">
 <label for="question">Question</label>
 <textarea id="question" name="question" rows="3" maxlength="__MAXCHARS__" required></textarea>
 <button id="ask" type="submit">Ask</button> <span id="status"></span>
</form>
<div id="answer" aria-live="polite"></div>
<script>
const $ = (id) => document.getElementById(id);
fetch("/api/info").then((r) => r.json()).then((i) => { $("meta").textContent = `${i.model} · ${i.engine}`; });
$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const out = $("answer"), button = $("ask");
  out.textContent = ""; out.className = ""; button.disabled = true; $("status").textContent = "answering…";
  try {
    const response = await fetch("/api/ask", {method: "POST", headers: {"Content-Type": "application/json"},
                                              body: JSON.stringify({question: $("question").value})});
    if (!response.ok) {
      const body = await response.json();
      out.className = "error"; out.textContent = body.error || response.statusText;
      $("status").textContent = "error"; return;
    }
    const reader = response.body.getReader(), decoder = new TextDecoder();
    for (;;) {
      const {done, value} = await reader.read();
      if (done) break;
      out.textContent += decoder.decode(value, {stream: true});
    }
    $("status").textContent = "done";
  } catch (err) {
    out.className = "error"; out.textContent = String(err); $("status").textContent = "error";
  } finally { button.disabled = false; }
});
$("question").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("form").requestSubmit();
});
</script>
</body></html>
"""


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_app(engine: Engine, config: AnswerConfig, model_name: str) -> FastAPI:
    """The FastAPI application serving `engine`: the page, its API and the OpenAI API, one answer queue."""
    answers = AnswerQueue(engine, config.max_queued)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        answers.close()

    app = FastAPI(title="medmerge", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.answers = answers
    page = PAGE.replace("__MAXCHARS__", str(config.max_question_chars))

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/api/info")
    def info() -> dict[str, str]:
        return {"model": model_name, "engine": engine.name, "notice": config.notice}

    @app.post("/api/ask")
    async def ask(request: Request) -> Any:
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": 'body: expected JSON {"question": "..."}'}, status_code=400)
        question = body.get("question") if isinstance(body, dict) else None
        if not isinstance(question, str):
            return JSONResponse({"error": "question: expected a string"}, status_code=400)
        try:
            prompt = prompt_ids(engine, check_question(question, config), config.system_prompt)
            job = answers.submit(prompt, config.max_new_tokens, config.decoding)
        except MedmergeError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        except Busy as exc:
            return JSONResponse(
                {"error": str(exc)}, status_code=429, headers={"Retry-After": str(exc.retry_after)}
            )

        async def text() -> AsyncIterator[str]:
            async for piece in job.pieces():
                yield piece
            if suffix := notice_suffix(config):
                yield suffix

        return StreamingResponse(
            text(), media_type="text/plain; charset=utf-8", headers={"Cache-Control": "no-store"}
        )

    add_openai_routes(app, answers, config, model_name)
    return app


def run_server(engine: Engine, config: AnswerConfig, model_name: str, host: str, port: int) -> None:
    """Serve the page until interrupted."""
    import uvicorn

    if not is_loopback(host):
        log.warning("serving on %s: reachable from other machines (default is 127.0.0.1)", host)
    app = create_app(engine, config, model_name)
    print(
        f"medmerge serve: http://{host}:{port}/ ({model_name}, engine {engine.name}, "
        f"{config.decoding.label()}); "
        f"OpenAI API: base_url http://{host}:{port}/v1, model {model_id(model_name)!r}; Ctrl-C stops",
        flush=True,
    )
    uvicorn.run(app, host=host, port=port, log_level="warning")
