"""Which int8 path for CPU inference? Measures the candidates on one model and one batch set, interleaved.

    PYTHONPATH=. python bench/int8_paths.py                      # MiniLM-L6 + random 5-class head, BBC texts
    PYTHONPATH=. python bench/int8_paths.py --run runs/textcls/R  # a fine-tuned run instead

Candidates: transformers.pipeline fp32 (the baseline), PyTorch fp32 eager, torch.ao quantize_dynamic
(deprecated in torch 2.13, for reference), torchao Int8DynamicActivationInt8WeightConfig in eager mode (if
torchao is installed), ONNX Runtime fp32 and ONNX Runtime dynamic int8 (ftkit's path: eager attention traced
into the graph), beside two int8 alternatives: the SDPA attention traced, and ONNX Runtime's transformer
optimizer fusions applied before quantizing. Each round runs every
candidate over the same batches (batch 32, 128-token texts); the median texts/s is printed with the label
agreement and the largest logit difference against PyTorch fp32.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

from ftkit.compress import export_onnx_graph, onnx_session, quantize_onnx
from ftkit.data import load_bbc_news
from ftkit.packages import default_model_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, help="a text-classification run (default: MiniLM + random head)")
    parser.add_argument("--texts", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    path = str(args.run or default_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=5).eval()
    rows, _ = load_bbc_news()
    texts = [r["text"] for r in rows][:: max(1, len(rows) // args.texts)][: args.texts]
    enc = tok(texts, truncation=True, max_length=args.max_length, padding=True, return_tensors="pt")
    batches = [
        {k: enc[k][i : i + args.batch_size] for k in ("input_ids", "attention_mask")}
        for i in range(0, len(texts), args.batch_size)
    ]
    pipe = pipeline("text-classification", model=model, tokenizer=tok, device=-1)

    def torch_fn(m):
        def run(b):
            with torch.inference_mode():
                return m(**b).logits.numpy()

        return run

    candidates = {"pipeline fp32": None, "torch fp32 eager": torch_fn(model)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ao = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8
        )
    candidates["torch.ao quantize_dynamic int8 (deprecated)"] = torch_fn(ao)
    if importlib.util.find_spec("torchao"):
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        tao = copy.deepcopy(model)
        quantize_(tao, Int8DynamicActivationInt8WeightConfig())
        candidates["torchao int8 dynamic, eager"] = torch_fn(tao)
    tmp = Path(tempfile.mkdtemp())
    export_onnx_graph(model, tmp / "model.onnx", batches[0])  # ftkit's: eager attention traced
    quantize_onnx(tmp / "model.onnx", tmp / "model.int8.onnx")
    export_onnx_graph(model, tmp / "sdpa.onnx", batches[0], attention="sdpa")
    quantize_onnx(tmp / "sdpa.onnx", tmp / "sdpa.int8.onnx")
    # ONNX Runtime's transformer optimizer (fused SkipLayerNorm, BiasGelu) before quantizing.
    from onnxruntime.transformers.optimizer import optimize_model

    config = model.config
    fused = optimize_model(str(tmp / "model.onnx"), "bert", config.num_attention_heads, config.hidden_size)
    fused.save_model_to_file(str(tmp / "fused.onnx"))
    quantize_onnx(tmp / "fused.onnx", tmp / "fused.int8.onnx")
    for name, file in (
        ("onnxruntime fp32", "model.onnx"),
        ("onnxruntime int8, SDPA attention traced", "sdpa.int8.onnx"),
        ("onnxruntime int8, transformer optimizer fusions", "fused.int8.onnx"),
        ("onnxruntime dynamic int8 (ftkit)", "model.int8.onnx"),
    ):
        session = onnx_session(tmp / file)
        candidates[name] = lambda b, s=session: s.run(None, {k: v.numpy() for k, v in b.items()})[0]

    reference = np.concatenate([candidates["torch fp32 eager"](b) for b in batches])
    quality = {}
    for name, fn in candidates.items():
        if fn is not None:
            out = np.concatenate([fn(b) for b in batches])
            agree = float((out.argmax(-1) == reference.argmax(-1)).mean())
            quality[name] = f"agree {agree:.3f}, max |dlogit| {np.abs(out - reference).max():.1e}"
    speed = {name: [] for name in candidates}
    load = os.getloadavg()[0]
    for _ in range(args.rounds):
        for name, fn in candidates.items():
            start = time.perf_counter()
            if fn is None:
                pipe(texts, batch_size=args.batch_size, truncation=True, max_length=args.max_length)
            else:
                for b in batches:
                    fn(b)
            speed[name].append(len(texts) / (time.perf_counter() - start))
    base = statistics.median(speed["pipeline fp32"])
    print(f"load average {load:.2f} -> {os.getloadavg()[0]:.2f}, torch threads {torch.get_num_threads()}")
    print(f"| path | texts/s (batch {args.batch_size}) | vs pipeline | vs torch fp32 |")
    print("|---|---:|---:|---|")
    for name, values in speed.items():
        v = statistics.median(values)
        print(f"| {name} | {v:.1f} | {v / base:.2f}x | {quality.get(name, '')} |")


if __name__ == "__main__":
    main()
