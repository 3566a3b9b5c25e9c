"""Load test of `ftkit serve` on loopback: throughput and p50/p95/p99 latency at 1, 8 and 32 clients.

    cp -r RUN /tmp/serve-bbc && ftkit compress /tmp/serve-bbc --out /tmp/serve-bbc-choose --choose
    flock /tmp/ftkit-measure.lock python bench/serve_load.py --runs /tmp/serve-bbc /tmp/serve-bbc-choose

For each run (the fp32 run, then its fastest form) and each batching mode (on: the defaults, 32 texts
and 5 ms; off: `--max_batch_size 1`), one server process on a free loopback port; then for each client
count, that many threads send one-text requests back to back (http.client, a new connection each) for
`--seconds`, after a warm-up. Throughput is texts answered over the wall time from the first request to
the last answer; latency is each request's round trip. Texts are the run's test texts cut to
`--tokens` tokens (on the character offset of the last token kept), so every request costs the same.

The reference is `ftkit bench-predict`'s measurement (`ftkit.bench.bench_predict`, fewer texts and
rounds) on the same runs and texts at batch 32, run first in the same process (so under the same lock):
its batch-32 throughput and its batch-1 p50 latency per run.
Targets (issue 20): 32 clients, batching on, >= 75% of the batch-32 throughput; p99 at 1 client <= 2x
the batch-1 p50. Results go to bench/results/DATE-vm-serve-load.json, with the CPU and the load.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from ftkit.bench import PIPELINE
from ftkit.hardware import cpu_info
from ftkit.predict import run_tokenizer

HERE = Path(__file__).resolve().parent


def cut_texts(run_dir: Path, test_file: Path, tokens: int, limit: int) -> list[dict]:
    """Test rows (text, gold) of a test_predictions.jsonl, each text cut to its first `tokens` tokens of
    the run's tokenizer (specials included)."""
    rows = [json.loads(x) for x in test_file.read_text().splitlines() if x.strip()]
    rows = rows[:limit]
    tok = run_tokenizer(run_dir)
    enc = tok([r["text"] for r in rows], truncation=True, max_length=tokens, return_offsets_mapping=True)
    out = []
    for row, offsets in zip(rows, enc["offset_mapping"], strict=True):
        end = max(b for _, b in offsets)  # specials have (0, 0)
        out.append({"text": row["text"][:end], "gold": row["gold"]})
    return out


def start_server(run_dir: Path, extra: list[str], log: Path) -> tuple[subprocess.Popen, int]:
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ftkit.cli", "serve", str(run_dir), "--port", "0", *extra],
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if found := re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", log.read_text()):
            return proc, int(found.group(1))
        if proc.poll() is not None:
            raise SystemExit(f"server exited:\n{log.read_text()}")
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"server did not start:\n{log.read_text()}")


def post(port: int, text: str) -> float:
    """Seconds for one /predict round trip of one text (a new connection, as a plain client makes)."""
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request(
        "POST", "/predict", body=json.dumps({"texts": [text]}), headers={"Content-Type": "application/json"}
    )
    response = conn.getresponse()
    body = response.read()
    conn.close()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {body[:200]!r}")
    return time.perf_counter() - start


def warm_up(port: int, texts: list[str], clients: int) -> None:
    """Concurrent requests first: connections, allocator, ONNX Runtime's first runs at these shapes."""
    threads = [threading.Thread(target=post, args=(port, texts[k % len(texts)])) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def load(port: int, texts: list[str], clients: int, seconds: float) -> dict:
    """`clients` threads sending back to back for `seconds`; figures over every request answered."""
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client(k: int) -> None:
        i = k
        while time.perf_counter() < stop:
            seconds_taken = post(port, texts[i % len(texts)])
            with lock:
                latencies.append(seconds_taken)
            i += clients

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ms = 1000 * np.asarray(latencies)
    return {
        "clients": clients,
        "requests": len(latencies),
        "wall_s": round(wall, 2),
        "texts_per_s": round(len(latencies) / wall, 2),
        **{f"p{q}_ms": round(float(np.percentile(ms, q)), 1) for q in (50, 95, 99)},
    }


def bench_predict(runs: list[Path], test_file: Path, out_dir: Path) -> dict:
    """`ftkit bench-predict`'s measurement (`ftkit.bench.bench_predict`, batch 32) on the runs and texts,
    with fewer texts and rounds than the command's defaults to keep the whole bench near 10 minutes."""
    from ftkit.bench import bench_predict as measure

    return measure(runs, test_file=test_file, speed_texts=64, latency_texts=24, rounds=2, out_dir=out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", nargs="+", type=Path, required=True, help="fp32 run first, then variants")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--seconds", type=float, default=12.0, help="per client count")
    parser.add_argument("--test_file", type=Path, help="default: the first run's test_predictions.jsonl")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--texts", type=int, default=32, help="test texts used (bench-predict's too)")
    parser.add_argument("--skip_bench_predict", action="store_true")
    parser.add_argument("--out", type=Path, help="default: bench/results/DATE-vm-serve-load.json")
    args = parser.parse_args(argv)

    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"serve-load-{os.getpid()}"
    work.mkdir(parents=True)
    test_file = args.test_file or args.runs[0] / "test_predictions.jsonl"
    rows = cut_texts(args.runs[0], test_file, args.tokens, args.texts)
    (work / "texts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = [r["text"] for r in rows]
    load_before = os.getloadavg()
    started = datetime.datetime.now()
    reference = None if args.skip_bench_predict else bench_predict(args.runs, work / "texts.jsonl", work)

    results = []
    for run in args.runs:
        for batching, extra in (("on", []), ("off", ["--max_batch_size", "1"])):
            proc, port = start_server(run, extra, work / f"{run.name}-{batching}.log")
            try:
                about = json.loads(urlopen_text(port, "/metadata"))
                for clients in map(int, args.clients.split(",")):
                    cell = {"run": str(run), "variant": about["variant"]["name"], "batching": batching}
                    warm_up(port, texts, clients)
                    before = json.loads(urlopen_text(port, "/health"))
                    cell |= load(port, texts, clients, args.seconds)
                    after = json.loads(urlopen_text(port, "/health"))
                    texts_run, batches = (
                        after["texts"] - before["texts"],
                        after["batches"] - before["batches"],
                    )
                    cell["mean_batch"] = round(texts_run / max(batches, 1), 1)
                    print(json.dumps(cell), flush=True)
                    results.append(cell)
            finally:
                proc.terminate()
                proc.wait(60)

    record = {
        "date": started.isoformat(timespec="seconds"),
        "machine": cpu_info(),
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "texts": len(texts),
        "tokens_per_text": args.tokens,
        "seconds_per_cell": args.seconds,
        "bench_predict": reference,
        "serve": results,
        "targets": targets(results, reference) if reference else None,
    }
    out = args.out or HERE / "results" / f"{started.date()}-vm-serve-load.json"
    out.write_text(json.dumps(record, indent=2))
    print(json.dumps(record["targets"], indent=2))
    print(f"machine: {record['machine']}; load {load_before} -> {record['load_avg_after']}; written to {out}")


def urlopen_text(port: int, path: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path)
    text = conn.getresponse().read().decode()
    conn.close()
    return text


def targets(results: list[dict], reference: dict) -> dict:
    """Per run: serve at 32 clients (batching on) against bench-predict batch 32, and p99 at 1 client
    (batching on) against bench-predict's batch-1 p50."""
    by_run = {r["run"]: r for name, r in reference["rows"].items() if name != PIPELINE}
    out = {}
    for run, ref in by_run.items():
        cells = {(c["batching"], c["clients"]): c for c in results if c["run"] == run}
        if ("on", 32) not in cells or ("on", 1) not in cells:
            continue
        ratio = cells["on", 32]["texts_per_s"] / ref["throughput_per_s"]
        p99_ratio = cells["on", 1]["p99_ms"] / ref["latency_p50_ms"]
        out[run] = {
            "variant": cells["on", 32]["variant"],
            "bench_predict_batch32_texts_per_s": ref["throughput_per_s"],
            "serve_32_clients_texts_per_s": cells["on", 32]["texts_per_s"],
            "throughput_ratio": round(ratio, 2),
            "throughput_target_met": ratio >= 0.75,
            "bench_predict_batch1_p50_ms": ref["latency_p50_ms"],
            "serve_1_client_p99_ms": cells["on", 1]["p99_ms"],
            "p99_over_p50": round(p99_ratio, 2),
            "latency_target_met": p99_ratio <= 2.0,
        }
    return out


if __name__ == "__main__":
    main()
