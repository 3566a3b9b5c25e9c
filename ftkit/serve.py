"""`ftkit serve RUN_DIR`: a run's predictions over HTTP, batched across concurrent requests.

    ftkit serve runs/textcls-fast --port 8000          # the --choose result of `ftkit compress`
    curl -s localhost:8000/predict -d '{"texts": ["Shares fell 5%.", "A late goal won the cup."]}'
    curl -s localhost:8000/predict -d '{"text": "One text."}'
    curl -s localhost:8000/predict -d '{"texts": ["A man plays."], "text_pairs": ["Music."]}'  # pair runs
    curl -s localhost:8000/metadata                      # task, labels, variant, limits, versions
    # http://localhost:8000/docs: the OpenAPI page

Each answer is the row `ftkit predict` writes for the text (`ftkit.predict.predict_rows`, the model
loaded by `ftkit.predict.load_for_inference`), with `origin` the text's place in the request
(`texts[0]`, ..., or `text`). A run written by `ftkit compress --choose` is served as it records (the
fastest variant measured on the machine it was chosen on); `variant` picks a torch runtime instead.

Requests wait in a bounded queue; one inference thread takes what waits (at most `max_batch_size`
texts, waiting up to `max_wait_ms` for more when fewer wait) and runs it as one call, so concurrent
clients share batches. A full queue answers 503 with Retry-After; bad input a 4xx JSON
`{"detail": "..."}` saying what is wrong. SIGTERM/SIGINT stop accepting connections, then the requests
already accepted are answered before the process exits.

Test hook: with FTKIT_SERVE_HOLD_FILE=PATH set, the inference thread waits before each batch while PATH
exists (tests fill the queue deterministically this way, with no timing involved).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from ftkit import DataError

logger = logging.getLogger(__name__)

VARIANTS = ("recorded", "fp32", "bf16", "torch-int8")
HOLD_ENV = "FTKIT_SERVE_HOLD_FILE"


@dataclass(frozen=True)
class Limits:
    """What one request may hold; beyond it the request gets 413 and the message says which limit."""

    max_body_bytes: int = 1_000_000
    max_texts: int = 256
    max_text_chars: int = 100_000


@dataclass(frozen=True)
class Batching:
    """Dynamic batching: at most `max_batch_size` texts per model call, `max_wait_ms` to wait for more
    when fewer are queued, `max_queue` requests waiting before 503. `max_batch_size=1`: no batching."""

    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 256


class RequestError(Exception):
    """A request the server refuses: HTTP `status` and a message saying what is wrong."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Predictor:
    """A loaded run: `predict(texts, origins)` gives `ftkit predict`'s rows; `variant` says what runs."""

    model: Any
    tokenizer: Any
    info: dict[str, Any]
    variant: dict[str, Any]
    run_dir: str
    batch_size: int = 32

    def predict(self, texts: list, origins: list[str]) -> list[dict[str, Any]]:
        """Rows for `texts`: strings, or (text, second text) tuples for a sentence-pair run."""
        from ftkit.predict import predict_rows

        pairs = None
        if self.info.get("text_pair_column"):
            texts, pairs = [t for t, _ in texts], [p for _, p in texts]
        return predict_rows(
            self.model, self.tokenizer, texts, origins, self.info, self.batch_size, pairs=pairs
        )


def recorded_variant(run_dir: str | Path) -> dict[str, Any]:
    """What a run directory runs as: its compress.json (the --choose result, int8, ONNX, pruned) or fp32."""
    from ftkit.compress import read_compress_record

    record = read_compress_record(run_dir)
    if not record:
        return {"name": "fp32", "from": "plain run (no compress.json)"}
    if record.get("format") == "onnx":
        name = "onnx-int8" if record.get("quantize") == "int8" else "onnx-fp32"
    else:
        name = record.get("runtime", "fp32")
    variant: dict[str, Any] = {"name": name, "from": "compress.json", "pruned": bool(record.get("layers"))}
    if "choice" in record:
        choice = record["choice"]
        variant["chosen_by"] = f"ftkit compress --choose ({choice.get('rule')})"
        variant["candidates"] = choice.get("candidates")
        variant["chosen_on"] = choice.get("machine", {}).get("cpu")
    return variant


def load_predictor(
    run_dir: str | Path, variant: str = "recorded", batch_size: int = 32, linear_backend: str = "auto"
) -> Predictor:
    """Load `run_dir` for serving with the safe loaders of `ftkit predict` (safetensors/ONNX only, no
    code from the run directory). `variant="recorded"` runs it as `ftkit predict` does (with
    `linear_backend` for a plain run, as its option); a torch runtime (fp32, bf16, torch-int8) is
    applied to the run's torch model instead."""
    from ftkit.predict import load_for_inference, run_tokenizer
    from ftkit.run import read_run_info

    if variant not in VARIANTS:
        raise DataError(f"--variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    if variant == "recorded":
        model, tokenizer, info = load_for_inference(run_dir, linear_backend)
        described = recorded_variant(run_dir)
    else:
        from ftkit.choose import apply_runtime
        from ftkit.compress import load_torch_model, read_compress_record

        record = read_compress_record(run_dir)
        if record.get("format") == "onnx":
            source = f", {record['source']}" if record.get("source") else ""
            raise DataError(
                f"{run_dir} holds an ONNX model: --variant {variant} needs a torch run "
                f"(serve the run it was made from{source})"
            )
        model = apply_runtime(load_torch_model(run_dir), variant)
        tokenizer, info = run_tokenizer(run_dir), read_run_info(run_dir)
        described = {"name": variant, "from": "--variant"}
    described["precision"] = described["name"].rsplit("-", 1)[-1]  # fp32, bf16 or int8
    return Predictor(model, tokenizer, info, described, str(run_dir), batch_size)


# ---------------------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------------------


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def parse_texts(body: bytes, limits: Limits, pairs: bool = False) -> tuple[list, list[str]]:
    """(texts, origins) of a request body `{"texts": [...]}` or `{"text": "..."}`, or RequestError:
    400 not JSON, 422 wrong shape, types or empty texts, 413 over a limit. For a sentence-pair run
    (`pairs`) the body also has the second texts, `"text_pairs": [...]` (as many) or `"text_pair"`, and
    the texts come back as (text, second text) tuples."""
    if len(body) > limits.max_body_bytes:
        raise RequestError(413, f"body has {len(body)} bytes; the limit is {limits.max_body_bytes}")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(400, f"body is not JSON: {err}") from None
    shape = 'expected a JSON object {"texts": ["...", ...]} or {"text": "..."}'
    if pairs:
        shape = 'this run reads sentence pairs: expected {"texts": [...], "text_pairs": [...]} or {"text": "...", "text_pair": "..."}'
    if not isinstance(data, dict):
        raise RequestError(422, f"{shape}, got {_kind(data)}")
    if unknown := sorted(
        set(data) - ({"texts", "text", "text_pairs", "text_pair"} if pairs else {"texts", "text"})
    ):
        raise RequestError(422, f"unknown field(s) {', '.join(map(repr, unknown))}: {shape}")
    if pairs:
        return _parse_pairs(data, limits, shape)
    if len(data) != 1:
        raise RequestError(422, f"{shape}: give one of them" if data else f"{shape}, got an empty object")
    texts = _checked(data, "texts", "text", limits)
    return texts, ["text"] if "text" in data else [f"texts[{i}]" for i in range(len(texts))]


def _parse_pairs(data: dict, limits: Limits, shape: str) -> tuple[list[tuple[str, str]], list[str]]:
    """(text, second text) tuples and origins of a pair request (see `parse_texts`)."""
    if set(data) not in ({"texts", "text_pairs"}, {"text", "text_pair"}):
        raise RequestError(422, f"{shape}, got the field(s) {', '.join(map(repr, sorted(data)))}")
    one = "text" in data
    firsts, seconds = (
        _checked(data, "texts", "text", limits),
        _checked(data, "text_pairs", "text_pair", limits),
    )
    if len(firsts) != len(seconds):
        raise RequestError(
            422, f'"texts" has {len(firsts)} texts and "text_pairs" {len(seconds)}: give one pair each'
        )
    origins = ["text"] if one else [f"texts[{i}]" for i in range(len(firsts))]
    return list(zip(firsts, seconds, strict=True)), origins


def _checked(data: dict, many: str, single: str, limits: Limits) -> list[str]:
    """The texts of `data[single]` (one string) or `data[many]` (a list of strings), checked: 422 wrong
    types or empty texts, 413 over a limit. One side of a pair request, or the texts of any other."""
    if single in data and not isinstance(data[single], str):
        raise RequestError(422, f'"{single}" must be a string, got {_kind(data[single])}')
    name = single if single in data else many
    values = [data[single]] if single in data else data[many]
    if not isinstance(values, list):
        raise RequestError(422, f'"{many}" must be a list of strings, got {_kind(values)}')
    if not values:
        raise RequestError(422, f'"{many}" is empty: give at least one text')
    if len(values) > limits.max_texts:
        raise RequestError(413, f'"{many}" has {len(values)} texts; the limit is {limits.max_texts}')
    for i, text in enumerate(values):
        where = name if single in data else f"{many}[{i}]"
        if not isinstance(text, str):
            raise RequestError(422, f"{where} must be a string, got {_kind(text)}")
        if not text.strip():
            raise RequestError(422, f"{where} is empty (or only whitespace)")
        if len(text) > limits.max_text_chars:
            raise RequestError(
                413, f"{where} has {len(text)} characters; the limit is {limits.max_text_chars}"
            )
    return values


# ---------------------------------------------------------------------------------------------------------
# Dynamic batching
# ---------------------------------------------------------------------------------------------------------


@dataclass
class _Job:
    texts: list[str]
    origins: list[str]
    future: asyncio.Future


@dataclass
class Batcher:
    """A bounded queue of requests and one inference thread that runs them in batches.

    `submit` raises `asyncio.QueueFull` when `max_queue` requests wait. The loop task takes the first
    waiting request, adds what else waits (or arrives within `max_wait_ms`) up to `max_batch_size`
    texts, and runs them as one `predict` call in the thread, so the event loop keeps accepting and
    answering while the model runs. A request larger than `max_batch_size` runs alone, in batches.
    """

    predict: Callable[[list[str], list[str]], list[dict]]
    options: Batching = field(default_factory=Batching)
    hold_file: str | None = None
    stats: dict[str, int] = field(default_factory=lambda: {"batches": 0, "texts": 0, "running": 0})

    def __post_init__(self):
        self.queue: asyncio.Queue[_Job] = asyncio.Queue(self.options.max_queue)
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ftkit-infer")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.thread.shutdown(wait=True)

    def submit(self, texts: list[str], origins: list[str]) -> asyncio.Future:
        job = _Job(texts, origins, asyncio.get_running_loop().create_future())
        self.queue.put_nowait(job)
        return job.future

    async def _collect(self, first: _Job) -> tuple[list[_Job], _Job | None]:
        """The batch that starts with `first`, and the request that did not fit (it starts the next)."""
        loop = asyncio.get_running_loop()
        jobs, size = [first], len(first.texts)
        deadline = loop.time() + self.options.max_wait_ms / 1000
        while size < self.options.max_batch_size:
            try:
                job = self.queue.get_nowait()  # what already waits joins at once
            except asyncio.QueueEmpty:
                if (left := deadline - loop.time()) <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self.queue.get(), left)
                except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11 on
                    break
            if size + len(job.texts) > self.options.max_batch_size:
                return jobs, job
            jobs.append(job)
            size += len(job.texts)
        return jobs, None

    def _run(self, jobs: list[_Job]) -> list[list[dict]]:
        while self.hold_file and os.path.exists(self.hold_file):  # test hook: see the module docstring
            time.sleep(0.01)
        rows = self.predict([t for j in jobs for t in j.texts], [o for j in jobs for o in j.origins])
        out, start = [], 0
        for job in jobs:
            out.append(rows[start : start + len(job.texts)])
            start += len(job.texts)
        return out

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        carried = None
        while True:
            jobs, carried = await self._collect(carried or await self.queue.get())
            self.stats["running"] = sum(len(j.texts) for j in jobs)
            try:
                results = await loop.run_in_executor(self.thread, self._run, jobs)
            except Exception as err:  # a bug in the model path: those requests get 500, the server goes on
                logger.exception("inference failed on a batch of %d request(s)", len(jobs))
                results = [err] * len(jobs)
            self.stats["batches"] += 1
            self.stats["texts"] += self.stats["running"]
            self.stats["running"] = 0
            for job, result in zip(jobs, results, strict=True):
                if job.future.done():  # the client went away
                    continue
                if isinstance(result, Exception):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)


# ---------------------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------------------


def metadata(predictor: Predictor, batching: Batching, limits: Limits) -> dict[str, Any]:
    """What `GET /metadata` answers: the run (task, labels, base model, long-text policy), the variant
    served, batching, limits and package versions."""
    from ftkit.run import package_versions

    info = predictor.info
    keys = ("max_length", "long_text", "stride", "max_chunks", "context", "decode", "case_feature")
    return {
        "run_dir": predictor.run_dir,
        "task": info["task"],
        "labels": info.get("labels"),
        "heads": info.get("heads"),  # multi-task runs: labels per head
        "base_model": info.get("base_model") or "embedded default (all-MiniLM-L6-v2)",
        "lora": info.get("lora", False),
        "long_text": {k: info[k] for k in keys if k in info},
        "temperature": info.get("temperature", 1.0),
        "variant": predictor.variant,
        "batching": asdict(batching),
        "limits": asdict(limits),
        "versions": package_versions(
            ("ftkit", "torch", "transformers", "onnxruntime", "fastapi", "starlette", "uvicorn")
        ),
    }


class PredictRequest(BaseModel):
    """The body of POST /predict, for the OpenAPI page (requests are checked by `parse_texts`)."""

    texts: list[str] | None = Field(None, description="the texts; or give `text`")
    text: str | None = Field(None, description="one text")
    text_pairs: list[str] | None = Field(
        None, description="sentence-pair runs: the second texts, one per text"
    )
    text_pair: str | None = Field(None, description="sentence-pair runs: the second text of `text`")


def create_app(predictor: Predictor, batching: Batching | None = None, limits: Limits | None = None):
    """The FastAPI app serving `predictor`: POST /predict, GET /health, GET /metadata, /docs."""
    batching, limits = batching or Batching(), limits or Limits()
    about = metadata(predictor, batching, limits)
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(_app):
        # Started inside the server's event loop; uvicorn runs the shutdown half only after the
        # connections of accepted requests are answered (graceful shutdown), so nothing queued is lost.
        state["batcher"] = Batcher(predictor.predict, batching, os.environ.get(HOLD_ENV))
        state["batcher"].start()
        yield
        await state["batcher"].stop()

    app = FastAPI(
        title=f"ftkit serve: {Path(predictor.run_dir).name}",
        description=f"{about['task']} run {predictor.run_dir}, served as {predictor.variant['name']}",
        lifespan=lifespan,
    )

    errors = {
        status: {"description": why, "content": {"application/json": {"example": {"detail": "..."}}}}
        for status, why in (
            (400, "body is not JSON"),
            (413, "body, a text or the number of texts over the limit"),
            (422, "wrong shape or types, empty texts"),
            (503, "queue full: retry after Retry-After seconds"),
        )
    }

    @app.post(
        "/predict",
        summary="ftkit predict's rows for the texts: {'predictions': [row per text]}",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": PredictRequest.model_json_schema()}},
            }
        },
        responses=errors,
    )
    async def predict(request: Request):
        try:
            declared = request.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
                raise RequestError(413, f"body has {declared} bytes; the limit is {limits.max_body_bytes}")
            body = bytearray()
            async for chunk in request.stream():  # chunked bodies have no length: counted as they come
                body += chunk
                if len(body) > limits.max_body_bytes:
                    raise RequestError(413, f"body exceeds the limit of {limits.max_body_bytes} bytes")
            texts, origins = parse_texts(
                bytes(body), limits, pairs=bool(predictor.info.get("text_pair_column"))
            )
            future = state["batcher"].submit(texts, origins)
        except RequestError as err:
            return JSONResponse({"detail": str(err)}, status_code=err.status)
        except asyncio.QueueFull:
            return JSONResponse(
                {
                    "detail": f"server busy: {batching.max_queue} requests wait already (the queue limit); retry"
                },
                status_code=503,
                headers={"Retry-After": "1"},
            )
        try:
            rows = await future
        except Exception as err:
            return JSONResponse({"detail": f"prediction failed: {type(err).__name__}: {err}"}, 500)
        return JSONResponse({"predictions": rows})

    @app.get("/health", summary="ok, and the queue: requests waiting, texts running, served so far")
    async def health():
        batcher = state["batcher"]
        return {"status": "ok", "queued": batcher.queue.qsize(), **batcher.stats}

    @app.get("/metadata", summary="task, labels, base model, long-text policy, variant, limits, versions")
    async def get_metadata():
        return about

    return app


def serve(
    run_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    variant: str = "recorded",
    linear_backend: str = "auto",
    batching: Batching | None = None,
    limits: Limits | None = None,
    shutdown_timeout: float = 30.0,
) -> None:
    """Load `run_dir` and serve it with uvicorn until SIGTERM/SIGINT (`ftkit serve`)."""
    import uvicorn

    batching = batching or Batching()
    predictor = load_predictor(run_dir, variant, batching.max_batch_size, linear_backend)
    logger.info("serving %s (%s) as %s", run_dir, predictor.info["task"], predictor.variant["name"])
    uvicorn.run(
        create_app(predictor, batching, limits),
        host=host,
        port=port,
        access_log=False,  # a line per request costs the event loop time at load; /health counts instead
        timeout_graceful_shutdown=shutdown_timeout,
        log_level="info",
    )
