"""Training-step throughput of the default encoder under variants, interleaved in one process.

Isolates the model step (forward, backward, AdamW) from data, evaluation and Trainer overheads, to
decide which change is worth making in the recipes. Variants run in alternating rounds so that load
from other processes hits all of them alike; the median step per variant is reported.

    python bench/step_speed.py                                 # the default variant set
    python bench/step_speed.py --variants b16 b32 b16-nodrop b16-eager b16-bf16 --rounds 5
    python bench/step_speed.py --variants b16 b16-compile --steps 8
    python bench/step_speed.py --seq_len 256 --variants b16-noattdrop-bf16 b16-noattdrop-bf16-compile
    python bench/step_speed.py --seq_len 256 --variants b16-noattdrop-bf16 --profile   # where the step goes

Variant names: b<batch>[-nodrop|-noattdrop][-eager][-bf16][-compile][-onednn][-t1] (nodrop: no dropout
at all; noattdrop: no attention dropout; onednn: fp32 linear layers through oneDNN; t1: one torch
thread).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from flops import bf16_peak, gemm_peak, machine, model_shape, train_flops  # noqa: E402

SEQ_LEN = 128  # BBC News: every article is longer than 128 tokens, so every batch is full


def build(variant: str, seq_len: int = SEQ_LEN, seed: int = 0):
    import torch
    from transformers import AutoModelForSequenceClassification

    from ftkit.packages import default_model_path

    parts = variant.split("-")
    batch = int(parts[0][1:])
    kwargs = {"num_labels": 5, "use_safetensors": True}
    if "nodrop" in parts:
        kwargs.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if "noattdrop" in parts:  # attention dropout only: sdpa keeps its fused CPU kernel
        kwargs.update(attention_probs_dropout_prob=0.0)
    kwargs["attn_implementation"] = "eager" if "eager" in parts else "sdpa"
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(default_model_path(), **kwargs)
    model.train()
    if "onednn" in parts:
        from ftkit.fastlinear import use_onednn_linear

        use_onednn_linear(model, "onednn")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    step_model = torch.compile(model) if "compile" in parts else model
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (batch, seq_len), generator=gen)
    ids[:, 0], ids[:, -1] = 101, 102
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.randint(0, 5, (batch,), generator=gen),
    }
    bf16 = "bf16" in parts
    threads = 1 if "t1" in parts else None

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = step_model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, batch, threads, model_shape(model)


def main(argv: list[str] | None = None) -> dict:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--variants", nargs="+", default=["b8", "b16", "b32", "b16-nodrop", "b16-eager", "b16-bf16"]
    )
    p.add_argument("--seq_len", type=int, default=SEQ_LEN, help="tokens per row (textcls's head_tail: 256)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="timed steps per variant and round")
    p.add_argument("--out", help="write the figures as JSON here")
    p.add_argument(
        "--profile",
        action="store_true",
        help="then profile 2 steps of each variant: self CPU time by operator category, largest copies",
    )
    args = p.parse_args(argv)

    default_threads = torch.get_num_threads()
    peak = [gemm_peak(), gemm_peak(backend="onednn")]
    built = {}
    for v in args.variants:
        start = time.perf_counter()
        step, batch, threads, shape = build(v, args.seq_len)
        if threads:
            torch.set_num_threads(threads)
        step()  # first step: kernel selection, compilation for -compile
        torch.set_num_threads(default_threads)
        built[v] = (step, batch, threads, shape, time.perf_counter() - start)
    times: dict[str, list[float]] = {v: [] for v in args.variants}
    for _ in range(args.rounds):
        for v, (step, _, threads, _, _) in built.items():
            torch.set_num_threads(threads or default_threads)
            for _ in range(args.steps):
                start = time.perf_counter()
                step()
                times[v].append(time.perf_counter() - start)
            torch.set_num_threads(default_threads)
    peak_after = [gemm_peak(), gemm_peak(backend="onednn")]
    gflops_peak = max(p["gflops_best"] for p in peak + peak_after)  # the faster of MKL and oneDNN
    # MFU is against the machine's best peak: bf16 on CPUs that run it natively (5x fp32 with AMX).
    best_peak = max(gflops_peak, bf16_peak())
    rows = []
    for v, (_, batch, _threads, shape, setup) in built.items():
        med = statistics.median(times[v])
        flops = train_flops(shape, [args.seq_len] * batch)
        rows.append(
            {
                "variant": v,
                "step_s": med,
                "tokens_per_s": batch * args.seq_len / med,
                "gflops": flops / med / 1e9,
                "mfu": flops / med / 1e9 / best_peak,
                "mfu_fp32_peak": flops / med / 1e9 / gflops_peak,
                "setup_and_first_step_s": setup,
            }
        )
    print(
        f"fp32 GEMM peak {gflops_peak:.1f} GFLOP/s, the faster of MKL and oneDNN ({default_threads} threads); "
        f"best peak (MFU) {best_peak:.1f}; "
        f"load {os.getloadavg()}"
    )
    print(f"{'variant':<20}{'step s':>8}{'tok/s':>9}{'GFLOP/s':>9}{'MFU':>7}{'setup s':>9}")
    for r in rows:
        print(
            f"{r['variant']:<20}{r['step_s']:>8.3f}{r['tokens_per_s']:>9.0f}{r['gflops']:>9.1f}"
            f"{r['mfu']:>7.0%}{r['setup_and_first_step_s']:>9.1f}"
        )
    result = {"machine": machine(), "peak_gflops": gflops_peak, "best_peak_gflops": best_peak}
    result.update({"seq_len": args.seq_len, "peak": peak + peak_after, "load": os.getloadavg(), "rows": rows})
    if args.profile:
        result["profiles"] = {v: profile_step(v, built[v][0], built[v][2] or default_threads) for v in built}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def profile_step(variant: str, step, threads: int, steps: int = 2) -> dict:
    """Self CPU time per step by operator category (profile_train.py's), and the copies by shape:
    under bf16 autocast these are the dtype casts around every linear layer and their gradients."""
    import torch
    from profile_train import category
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(threads)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events) / 1e3 / steps
    by_cat: dict[str, float] = {}
    for e in events:
        cat = category(e.key)
        by_cat[cat] = by_cat.get(cat, 0.0) + e.self_cpu_time_total / 1e3 / steps
    copies = sorted((e for e in events if e.key == "aten::copy_"), key=lambda e: -e.self_cpu_time_total)
    top = [
        {
            "shapes": str(e.input_shapes[:2]),
            "ms_per_step": e.self_cpu_time_total / 1e3 / steps,
            "calls": e.count // steps,
        }
        for e in copies[:6]
    ]
    print(
        f"\n{variant}: self CPU time per step {total:.0f} ms (profiled; the timed step above is the reference)"
    )
    for cat, ms in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        print(f"  {cat:<28}{ms:>8.1f} ms {ms / total:>5.0%}")
    print("  largest copies (dtype casts):")
    for c in top:
        print(f"    {c['shapes']:<40}{c['calls']:>5} per step {c['ms_per_step']:>8.1f} ms")
    return {"ms_per_step": total, "categories_ms": by_cat, "copies": top}


if __name__ == "__main__":
    main()
