"""`ftkit serve` as a real server process on a free loopback port, a real HTTP client (http.client).

One server for the module (its start-up is the cost); the graceful-shutdown test stops it, so it runs
last. The queue is filled deterministically through the FTKIT_SERVE_HOLD_FILE hook: while the file
exists the inference thread waits, and /health says when a batch is running and how many requests wait.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

from ftkit.cli import main as cli
from ftkit.serve import Batching

LABELS = ["business", "sports", "tech"]
TEXTS = [
    "Shares in the bank fell after its profits dropped.",
    "The striker scored twice in the cup final.",
    "A new phone chip runs faster on less power.",
    "Rain.",
    "Markets rallied as the central bank held interest rates, while the striker's club posted a loss "
    "and a chip maker raised its forecast for the year.",
]
# oneDNN or torch linears: `auto` measures in each process and may pick differently in two of them.
TORCH = ["--linear_backend", "torch"]
LIMITS = {"max_queue": 2, "max_texts": 8, "max_text_chars": 400, "max_body_bytes": 4000}


def _write_run(model, tokenizer, out: Path, task: str, **info) -> Path:
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    run = {"format_version": 1, "task": task, "max_length": 32, "labels": names, "lora": False, **info}
    (out / "ftkit_run.json").write_text(json.dumps(run))
    return out


@pytest.fixture(scope="module")
def run_dir(tiny_model, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_model,
        num_labels=3,
        id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)},
    )
    return _write_run(
        model,
        AutoTokenizer.from_pretrained(tiny_model),
        tmp_path_factory.mktemp("run"),
        "text-classification",
    )


def ftkit_predict(run_dir: Path, texts: list[str], tmp_path: Path) -> list[dict]:
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert (
        cli(["predict", str(run_dir), "--input", str(tmp_path / "in.txt"), "--output", str(out), *TORCH]) == 0
    )
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def without_origin(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "origin"} for r in rows]


class Server:
    def __init__(self, run_dir: Path, work: Path):
        self.hold = work / "hold"
        self.log = work / "server.log"
        args = [f"--{k}={v}" for k, v in LIMITS.items()]
        env = {**os.environ, "FTKIT_SERVE_HOLD_FILE": str(self.hold)}
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ftkit.cli", "serve", str(run_dir), "--port", "0", *args, *TORCH],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        self.port = int(
            self.wait_for_log(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", timeout=120).group(1)
        )

    def wait_for_log(self, pattern: str, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if found := re.search(pattern, self.log.read_text()):
                return found
            assert self.proc.poll() is None or pattern.startswith("Finished"), self.log.read_text()
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} not in the server log:\n{self.log.read_text()}")

    def request(self, method: str, path: str, body=None, headers=None, chunked: bool = False):
        """(status, headers, JSON body) of one request on a new connection."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            if isinstance(body, dict | list):
                body = json.dumps(body)
            conn.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
            response = conn.getresponse()
            data = response.read()
            return (
                response.status,
                dict(response.getheaders()),
                json.loads(data) if data[:1] in b"{[" else data,
            )
        finally:
            conn.close()

    def predict(self, body):
        return self.request("POST", "/predict", body)

    def wait_for_health(self, **expected):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            health = self.request("GET", "/health")[2]
            if all(health[k] == v for k, v in expected.items()):
                return health
            time.sleep(0.02)
        raise AssertionError(f"/health never showed {expected}: {health}")


@pytest.fixture(scope="module")
def server(run_dir, tmp_path_factory):
    server = Server(run_dir, tmp_path_factory.mktemp("serve"))
    yield server
    if server.proc.poll() is None:
        server.proc.kill()
        server.proc.wait(30)


def test_answers_equal_ftkit_predict(server, run_dir, tmp_path):
    expected = ftkit_predict(run_dir, TEXTS, tmp_path)

    status, _, answer = server.predict({"texts": TEXTS})  # one request: the same batches as ftkit predict
    assert status == 200
    assert without_origin(answer["predictions"]) == without_origin(expected)
    assert [r["origin"] for r in answer["predictions"]] == [f"texts[{i}]" for i in range(len(TEXTS))]
    assert server.predict({"text": TEXTS[1]})[2]["predictions"] == [{**expected[1], "origin": "text"}]

    # Concurrent one-text requests can share batches (other padding): same labels and fields,
    # probabilities equal to float noise. Two clients: never more than two requests wait, so no 503.
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda t: server.predict({"texts": [t]}), TEXTS * 4))
    assert {status for status, _, _ in answers} == {200}
    for (_, _, got), want in zip(answers, expected * 4, strict=True):
        (row,) = got["predictions"]
        assert row.keys() == want.keys() and row["label"] == want["label"] and row["text"] == want["text"]
        assert all(abs(row[f"p_{n}"] - want[f"p_{n}"]) <= 1e-5 for n in LABELS)


def test_metadata_health_and_docs(server, run_dir):
    status, _, about = server.request("GET", "/metadata")
    assert status == 200
    assert about["task"] == "text-classification" and about["labels"] == LABELS
    assert about["variant"]["name"] == "fp32" and about["long_text"] == {"max_length": 32}
    assert about["limits"]["max_texts"] == LIMITS["max_texts"]
    assert about["batching"] == {**asdict(Batching()), "max_queue": 2}  # the CLI's defaults are the library's
    assert about["versions"]["fastapi"] and about["versions"]["torch"]
    assert server.request("GET", "/health")[2]["status"] == "ok"
    status, _, page = server.request("GET", "/docs")
    assert status == 200 and b"swagger" in page.lower()
    assert "/predict" in server.request("GET", "/openapi.json")[2]["paths"]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ("{not json", 400, "body is not JSON"),
        (b"\xff\xfe", 400, "body is not JSON"),
        ("[1, 2]", 422, "expected a JSON object"),
        ({}, 422, "got an empty object"),
        ({"texts": "one"}, 422, '"texts" must be a list of strings, got a string'),
        ({"texts": ["ok", 7]}, 422, "texts[1] must be a string, got a number"),
        ({"text": None}, 422, '"text" must be a string, got null'),
        ({"texts": []}, 422, '"texts" is empty'),
        ({"texts": ["ok", "  "]}, 422, "texts[1] is empty"),
        ({"texts": ["a"], "text": "b"}, 422, "give one of them"),
        ({"texts": ["a"], "lang": "en"}, 422, "unknown field(s) 'lang'"),
        ({"texts": ["a"] * 9}, 413, '"texts" has 9 texts; the limit is 8'),
        ({"text": "x" * 401}, 413, "text has 401 characters; the limit is 400"),
        ({"texts": ["é" * 390] * 2}, 413, "bytes; the limit is 4000"),  # 6 bytes per character as \\u00e9
    ],
)
def test_bad_input_gets_a_4xx_that_says_what_is_wrong(server, body, status, message):
    got_status, headers, answer = server.predict(body)
    assert (got_status, headers["content-type"]) == (status, "application/json")
    assert message in answer["detail"]


def test_chunked_body_over_the_limit_is_refused(server):
    chunks = iter([b'{"texts": ["' + b"a" * 3000, b"b" * 3000 + b'"]}'])  # no Content-Length
    status, _, answer = server.request("POST", "/predict", chunks, chunked=True)
    assert status == 413 and "exceeds the limit of 4000 bytes" in answer["detail"]
    assert server.predict({"text": "still fine"})[0] == 200


def test_queue_full_gets_503_then_the_server_recovers(server):
    batches = server.request("GET", "/health")[2]["batches"]
    server.hold.touch()  # the inference thread waits before its next batch while this file exists
    with ThreadPoolExecutor(3) as pool:
        try:
            running = pool.submit(server.predict, {"texts": [TEXTS[0]]})
            server.wait_for_health(running=1, queued=0)  # taken by the inference thread, held
            waiting = [pool.submit(server.predict, {"texts": [t]}) for t in TEXTS[1:3]]
            server.wait_for_health(queued=LIMITS["max_queue"])
            status, headers, answer = server.predict({"texts": [TEXTS[3]]})
            assert (
                status == 503
                and headers["retry-after"] == "1"
                and "2 requests wait already" in answer["detail"]
            )
        finally:
            server.hold.unlink()
        accepted = [running.result(), *(w.result() for w in waiting)]
    assert [(s, a["predictions"][0]["text"]) for s, _, a in accepted] == [(200, t) for t in TEXTS[:3]]
    assert server.request("GET", "/health")[2]["batches"] == batches + 2  # the two that waited: one batch
    assert server.predict({"texts": TEXTS[3:]})[0] == 200  # recovered


def test_sigterm_drains_the_request_in_flight_then_exits(server):
    """Last in the module: it stops the server."""
    server.hold.touch()
    with ThreadPoolExecutor(1) as pool:
        try:
            in_flight = pool.submit(server.predict, {"texts": TEXTS[:2]})
            server.wait_for_health(running=2)
            server.proc.send_signal(signal.SIGTERM)
            server.wait_for_log("Waiting for connections to close")  # logged once the listener is closed
            with pytest.raises(ConnectionRefusedError):  # no new connections while draining
                server.request("GET", "/health")
        finally:
            server.hold.unlink()
        status, _, answer = in_flight.result()
    assert status == 200 and [r["text"] for r in answer["predictions"]] == TEXTS[:2]
    # uvicorn re-raises the signal once drained: the exit status says SIGTERM, after a clean shutdown.
    assert server.proc.wait(30) == -signal.SIGTERM
    server.wait_for_log("Finished server process")
    assert "Traceback" not in server.log.read_text()


# In-process: the serving path of other kinds of run equals `ftkit predict` (no server needed).


def test_the_choose_result_is_served_as_recorded(run_dir, tmp_path, monkeypatch):
    from ftkit import choose
    from ftkit.serve import load_predictor

    monkeypatch.setattr(choose, "measure_speed", lambda models, batch: {"fp32": 10.0, "torch-int8": 30.0})
    monkeypatch.setattr(choose, "measure_accuracy", lambda models, *a: {"fp32": 0.5, "torch-int8": 0.5})
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text(
        "".join(json.dumps({"text": t, "label": LABELS[i % 3]}) + "\n" for i, t in enumerate(TEXTS))
    )
    out = tmp_path / "chosen"
    args = ["--choose", "--candidates", "fp32,torch-int8", "--texts", str(labelled)]
    assert cli(["compress", str(run_dir), "--out", str(out), *args]) == 0

    predictor = load_predictor(out)  # torch-int8: no oneDNN linears to choose
    assert predictor.variant["name"] == "torch-int8" and "--choose" in predictor.variant["chosen_by"]
    got = predictor.predict(TEXTS, [str(i) for i in range(len(TEXTS))])
    assert without_origin(got) == without_origin(ftkit_predict(out, TEXTS, tmp_path))
    assert load_predictor(out, "fp32").variant == {"name": "fp32", "from": "--variant", "precision": "fp32"}


def test_ner_entities_with_offsets_are_served_as_predicted(tiny_model, tmp_path):
    from ftkit.serve import load_predictor

    torch.manual_seed(0)
    tags = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG"]
    model = AutoModelForTokenClassification.from_pretrained(
        tiny_model,
        num_labels=len(tags),
        id2label=dict(enumerate(tags)),
        label2id={t: i for i, t in enumerate(tags)},
    )
    run = _write_run(
        model, AutoTokenizer.from_pretrained(tiny_model), tmp_path / "ner", "token-classification", stride=8
    )
    texts = ["Anna Berg met the Reuters board in Tokyo.", "Nobody here."]
    got = load_predictor(run, linear_backend="torch").predict(texts, ["0", "1"])
    assert without_origin(got) == without_origin(ftkit_predict(run, texts, tmp_path))
    assert all(
        t[e["start"] : e["end"]] == e["text"] for t, r in zip(texts, got, strict=True) for e in r["entities"]
    )
