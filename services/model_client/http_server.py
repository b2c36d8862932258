"""The device's local HTTP API (FastAPI + uvicorn), as on-device assistants expose one.

    POST /v1/generate    {"prompt", "max_tokens", "temperature", "top_k", "top_p", "stop", "seed",
                          "stream", "use_memory", "ttft_budget_ms"} -> the text, memory info
                         (levels attached, and those a TTFT budget left pending) and timings as
                         JSON; with "stream": true, server-sent events: one
                         `data: {"text": piece}` per text piece, then `event: done` with the
                         same JSON as the plain answer
    POST /v1/prefetch    {"prompt", "max_bytes"} -> 202: the partial prompt's path, and which of
                         its blocks started fetching in the background (MemoryModel.prefetch)
    GET  /v1/health      model loaded, bank configured and reachable (gRPC health), busy
    GET  /docs, /openapi.json

Bad input (malformed JSON, wrong types, empty or over-long prompt, more tokens than allowed, bad
sampling values, a seed outside [0, 2**64), a prompt longer than the model's context) -> 422
`{"detail": "<one line>"}`, before anything is fetched.
The model holds shared state (attached memory, one KV cache per generation), so generations
run one at a time. No single client can hold the others off:
  - a request is read whole and checked before it waits for the model; the body is capped
    (413) and must arrive within `request_timeout_s` (408), connections per client and in all
    are capped (503) (membank/http_limits.py);
  - waiting requests take turns by client (generation_gate.py): a client with
    `max_per_client` requests waiting or running gets 429, a full queue or a wait over
    `queue_timeout_s` 503, both with `Retry-After`;
  - a generation runs on its own task while it holds the model and puts its pieces in a queue;
    the response is written from that queue, so a client reading slowly never holds the model,
    and a client gone mid-stream stops its generation;
  - a generation stops after `generation_timeout_s` (finish_reason "time").

    python -m services.model_client.http_server --model runs/demo/export \\
        --bank 127.0.0.1:50051 --port 8000
    # --bank 127.0.0.1:50051+50052: block bodies over the bank server's data plane (targets.py)
    curl -N localhost:8000/v1/generate -H 'Content-Type: application/json' \\
        -d '{"prompt": "The atomic number of Ruthenium is", "stream": true}'

Every flag is also a `MEMBANK_CLIENT_*` environment variable (services/model_client/settings.py).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import socket
import sys
import time
from typing import AsyncIterator

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from membank.http_limits import BodyLimit
from services.model_client.bank import Bank, BankError
from services.model_client.generation_gate import GateBusy, GenerationGate
from services.model_client.memory_model import GenerateResult, GenerationStream, MemoryModel
from services.model_client.sampling import SamplingParams
from services.model_client.settings import DeviceSettings

log = logging.getLogger("membank.device")
LISTENING = "membank device: listening on http://"   # the launch line tests and scripts read


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="text to continue")
    max_tokens: int | None = Field(None, ge=1, description="new tokens at most (server default "
                                   "when absent; over the server's limit: 422)")
    temperature: float = Field(0.0, ge=0, description="0: greedy")
    top_k: int = Field(0, ge=0, description="0: no top-k cut")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus mass; 1: no cut")
    stop: list[str] | str = Field(default_factory=list, description="stop strings (not returned)")
    # a torch.Generator seed is 64 bits: checked here, before anything is fetched
    seed: int | None = Field(None, ge=0, lt=2 ** 64,
                             description="seed for sampling, in [0, 2**64); none: not "
                                         "reproducible")
    stream: bool = Field(False, description="server-sent events, one per text piece")
    use_memory: bool = Field(True, description="false: the anchor alone, no bank fetch")
    ttft_budget_ms: float | None = Field(
        None, ge=0, le=600_000,
        description="time to first token allowed: the path's levels verified by then are "
                    "attached, the rest fetched for later prompts (server default when absent; "
                    "none there: the whole path)")


class PrefetchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="the prompt as typed so far")
    max_bytes: int | None = Field(None, ge=0, description="fetch at most this many bytes of "
                                  "blocks, shallow levels first (server default when absent)")


class PrefetchResponse(BaseModel):
    path: list[int]
    version: str
    encoding: str
    attached: list[tuple[int, int]] = Field(description="in the model's memory already")
    ready: list[tuple[int, int]] = Field(description="cached, or on their way already")
    started: list[tuple[int, int]] = Field(description="fetching now, in the background")
    over_budget: list[tuple[int, int]] = Field(description="left out: beyond max_bytes")
    started_bytes: int
    timings_ms: dict[str, float] = Field(description="embed, route")


class GenerateResponse(BaseModel):
    text: str
    finish_reason: str = Field(description="eos, stop (a stop string), length, or time (the "
                                           "server's generation_timeout_s)")
    new_tokens: int
    memory: bool = Field(description="true when fetched memory was attached")
    anchor_only_reason: str | None = None
    path: list[int] | None = None
    version: str = Field("", description="the bank version whose manifest fetched the path")
    level_versions: list[str] = Field([], description="the bank version each attached level "
                                      "of the path was checked against (one value: the path "
                                      "is one version)")
    fetched_blocks: list[tuple[int, int]] = []
    fetched_bytes: int = 0
    cached_blocks: list[tuple[int, int]] = Field([], description="from the device cache")
    prefetched_blocks: list[tuple[int, int]] = Field(
        [], description="fetched in the background before this prompt (a prefetch, or levels "
                        "an earlier TTFT budget left behind)")
    levels_attached: list[int] = Field([], description="the path's levels decoded with")
    levels_pending: list[int] = Field([], description="levels the TTFT budget left out, still "
                                                      "fetching for later prompts")
    timings_ms: dict[str, float] = Field(
        description="embed, route, fetch, attach, prefill, decode, ttft (time to first token)")


class BankHealth(BaseModel):
    configured: bool
    targets: list[str] = []
    reachable: bool | None = None   # None: no bank configured
    error: str | None = None        # why it is not reachable


class Health(BaseModel):
    status: str
    model_loaded: bool
    busy: bool = Field(description="a generation is running (others queue)")
    queued: int = Field(0, description="requests waiting for their turn")
    bank: BankHealth


def create_app(model: MemoryModel, settings: DeviceSettings, bank: Bank | None = None):
    """The device API as an ASGI app: the FastAPI routes behind a request body cap."""
    app = FastAPI(title="membank device", version="1",
                  description="A small anchor model with hierarchical memories fetched from a "
                              "bank, served on the device.")
    gate = GenerationGate(max_waiting=settings.max_queued, max_per_peer=settings.max_per_client,
                          max_wait_s=settings.queue_timeout_s)

    @app.exception_handler(RequestValidationError)
    async def one_line_422(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _first_error(exc.errors())}, status_code=422)

    def sampling(req: GenerateRequest) -> SamplingParams:
        if not req.prompt.strip():
            raise HTTPException(422, "prompt is empty")
        if len(req.prompt) > settings.max_prompt_chars:
            raise HTTPException(422, f"prompt has {len(req.prompt)} characters; this server "
                                     f"takes at most {settings.max_prompt_chars}")
        max_tokens = req.max_tokens if req.max_tokens is not None else settings.default_max_tokens
        if max_tokens > settings.max_tokens:
            raise HTTPException(422, f"max_tokens {max_tokens} is more than this server allows "
                                     f"({settings.max_tokens})")
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=req.temperature,
                                  top_k=req.top_k, top_p=req.top_p, stop=stop, seed=req.seed)
        except ValueError as e:
            raise HTTPException(422, str(e)) from None

    @app.post("/v1/generate", response_model=GenerateResponse, tags=["generate"],
              responses={200: {"content": {"text/event-stream": {}},
                               "description": "JSON, or server-sent events with stream=true"},
                         422: {"description": "bad input, one-line `detail`"},
                         429: {"description": "this client has too many requests in"},
                         503: {"description": "busy: the queue is full or the wait too long"}})
    async def generate(req: GenerateRequest, request: Request):
        params = sampling(req)
        budget = req.ttft_budget_ms if req.ttft_budget_ms is not None \
            else settings.ttft_budget_ms
        try:  # only tokenizes and checks the prompt: nothing runs until it is iterated
            stream = await run_in_threadpool(model.generate_stream, req.prompt, bank,
                                             use_memory=req.use_memory, params=params,
                                             ttft_budget_ms=budget)
        except ValueError as e:  # the prompt does not fit the model (too many tokens)
            raise HTTPException(422, str(e)) from None
        peer = request.client.host if request.client else "?"
        try:
            await gate.acquire(peer)
        except GateBusy as e:
            stream.close()
            return JSONResponse({"detail": e.detail}, status_code=e.status,
                                headers={"Retry-After": str(e.retry_after)})
        run = _Generation(stream, release=lambda: gate.release(peer),
                          time_limit_s=settings.generation_timeout_s)
        if req.stream:
            return StreamingResponse(_events(run), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        await asyncio.shield(run.task)
        if run.error is not None:
            raise HTTPException(500, f"generation failed: {_one_line(run.error)}")
        return _response(stream.result)

    @app.post("/v1/prefetch", response_model=PrefetchResponse, status_code=202,
              tags=["generate"],
              responses={422: {"description": "bad input, one-line `detail`"},
                         503: {"description": "no bank, or the bank's manifest unreadable"}})
    async def prefetch(req: PrefetchRequest):
        """Route the prompt typed so far and start fetching its path's blocks in the background
        (shallow first, within max_bytes), so the finished prompt finds them cached. Answers at
        once; it does not wait for the model (the room is not touched)."""
        if not req.prompt.strip():
            raise HTTPException(422, "prompt is empty")
        if len(req.prompt) > settings.max_prompt_chars:
            raise HTTPException(422, f"prompt has {len(req.prompt)} characters; this server "
                                     f"takes at most {settings.max_prompt_chars}")
        if bank is None:
            raise HTTPException(503, "no bank configured: nothing to prefetch")
        max_bytes = req.max_bytes if req.max_bytes is not None else settings.prefetch_max_bytes
        try:
            got = await run_in_threadpool(model.prefetch, req.prompt, max_bytes=max_bytes,
                                          bank=bank)
        except BankError as e:
            raise HTTPException(503, f"bank unavailable: {_one_line(e)}") from None
        return PrefetchResponse(**dataclasses.asdict(got))

    @app.get("/v1/health", response_model=Health, tags=["health"])
    async def health() -> Health:
        state = BankHealth(configured=bank is not None, targets=settings.bank)
        if bank is not None:
            # reachable = the bank answers GetManifest for this model's bank (what a prompt
            # needs first)
            try:
                await run_in_threadpool(bank.get_manifest, model.bank_id)
                state.reachable = True
            except (BankError, ValueError) as e:
                state.reachable, state.error = False, _one_line(e)
        return Health(status="ok", model_loaded=True, busy=gate.busy, queued=gate.waiting,
                      bank=state)

    return BodyLimit(app, settings.max_body_bytes)


_END = object()


class _Generation:
    """One generation, run by its own task while it holds the model (the gate): each step on a
    worker thread, each piece into `pieces`, `_END` last. Whoever writes the response drains
    `pieces` at the client's pace without holding anything; `abandoned` (the client left)
    stops the generation at its next step."""

    def __init__(self, stream: GenerationStream, *, release, time_limit_s: float):
        self.stream, self.release, self.time_limit_s = stream, release, time_limit_s
        self.pieces: asyncio.Queue = asyncio.Queue()   # at most max_tokens pieces
        self.abandoned = False
        self.error: BaseException | None = None
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        pieces = iter(self.stream)
        deadline = time.monotonic() + self.time_limit_s
        timed_out = False
        try:
            while not self.abandoned:
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                # a step on a worker thread (awaited to its end even if cancelled), so the event
                # loop keeps serving health and new requests
                piece = await run_in_threadpool(next, pieces, None)
                if piece is None:
                    break
                self.pieces.put_nowait(piece)
        except Exception as e:
            log.exception("generation failed")
            self.error = e
        finally:
            self.stream.close()   # the generator's own clean-up: result.text is final
            if timed_out:
                self.stream.result.finish_reason = "time"
            self.release()
            self.pieces.put_nowait(_END)


def _response(result: GenerateResult) -> dict:
    d = dataclasses.asdict(result)
    d.pop("prompt")
    return GenerateResponse(**d).model_dump()


def _sse(data: dict, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data)}\n\n".encode()


async def _events(run: _Generation) -> AsyncIterator[bytes]:
    """One event per text piece, then `done` with the result (or `error`)."""
    try:
        while (piece := await run.pieces.get()) is not _END:
            yield _sse({"text": piece})
        if run.error is not None:  # the status line is gone already: report in-band, then end
            yield _sse({"detail": _one_line(run.error)}, event="error")
        else:
            yield _sse(_response(run.stream.result), event="done")
    finally:
        run.abandoned = True   # done, or the client left: either way nothing more is wanted


def _first_error(errors) -> str:
    """FastAPI's validation errors as one line: where, and what is wrong."""
    if not errors:
        return "invalid request"
    e = errors[0]
    if e.get("type") == "json_invalid":
        return f"body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}"
    where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {e.get('msg', 'invalid')}{more}"


def _one_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def serve(settings: DeviceSettings) -> None:
    """Load the model, bind the port (0: a free one, printed), run uvicorn until stopped."""
    import uvicorn

    model = MemoryModel.from_pretrained(settings.export_dir, encoding=settings.encoding,
                                        trust=settings.trust(), dtype=settings.dtype,
                                        cache=settings.device_cache())
    if settings.bank:
        _ = model.bank_id  # an export without manifest.json cannot name its bank: fail at start
    bank = settings.open_bank()
    if bank is not None:
        model.embedder.encode(["warm up"])  # load MiniLM now, not on the first request
    sock = socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host, settings.port))
    sock.listen(128)  # connections made once the line below is printed wait for uvicorn
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(create_app(model, settings, bank), log_level=settings.log_level.lower(),
                            timeout_graceful_shutdown=2,
                            **settings.connection_limits().uvicorn_options())
    print(f"{LISTENING}{host}:{port}", flush=True)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        model.close()                   # its background fetches
        if bank is not None:
            bank.close()


def main(argv: list[str] | None = None) -> None:
    try:
        settings = DeviceSettings.from_args(argv)
    except ValidationError as e:
        raise SystemExit(f"membank device: error: {_first_error(e.errors())}") from None
    logging.basicConfig(level=settings.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        serve(settings)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"membank device: error: {_one_line(e)}") from None


if __name__ == "__main__":
    main()
