"""`ftkit` command line: a thin layer over the library functions."""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from importlib import resources
from pathlib import Path

from ftkit import DataError

logger = logging.getLogger("ftkit")


def recipes_dir() -> Path:
    """The recipes folder: the clone's `recipes/`, or the copy bundled in an installed wheel."""
    clone = Path(__file__).resolve().parent.parent / "recipes"
    if clone.is_dir():
        return clone
    return Path(str(resources.files("ftkit.bundled_recipes")))


def cmd_predict(args: argparse.Namespace) -> None:
    from ftkit.predict import load_for_inference, predict_rows, read_inputs, read_pair_inputs
    from ftkit.run import read_run_info, write_rows

    run_info, pairs = read_run_info(args.run_dir), None
    if run_info.get("text_pair_column"):  # trained on sentence pairs: a table with both texts
        texts, pairs, origins = read_pair_inputs(
            args.input, run_info, args.text_column, args.text_pair_column
        )
    elif args.text_pair_column:
        raise DataError(
            f"{args.run_dir}: this run was trained on single texts; it takes no --text_pair_column"
        )
    else:
        texts, origins = read_inputs(args.input, args.text_column)
    model, tokenizer, info = load_for_inference(args.run_dir, args.linear_backend)
    rows = predict_rows(model, tokenizer, texts, origins, info, args.batch_size, progress=True, pairs=pairs)
    out = Path(args.output or Path(args.run_dir) / f"predictions-{Path(args.input).stem}.jsonl")
    write_rows(rows, out)
    print(f"{len(rows)} predictions written to {out}")


def cmd_cp(args: argparse.Namespace) -> None:
    src_dir = recipes_dir()
    if args.recipe == "accelerate":  # the launch configs (recipes/accelerate/*.yaml) into a folder
        dest = Path(args.dest)
        dest.mkdir(parents=True, exist_ok=True)
        for config in sorted((src_dir / "accelerate").glob("*.yaml")):
            if (dest / config.name).exists() and not args.force:
                raise DataError(f"{dest / config.name} exists; pass --force to overwrite")
            shutil.copyfile(config, dest / config.name)
        print(f"copied the accelerate configs to {dest}: accelerate launch --config_file {dest}/ddp.yaml ...")
        return
    names = sorted(p.stem for p in src_dir.glob("*.py") if not p.name.startswith("_"))
    if args.recipe not in names:  # a name, not a path: "../x" or "/tmp/x" must not pick any .py file
        raise DataError(f"no recipe {args.recipe!r}; available: {', '.join(names)}")
    src = src_dir / f"{args.recipe}.py"
    dest = Path(args.dest)
    if dest.is_dir():
        dest = dest / src.name
    # The recipe's configs, as <recipe>.yaml and <recipe>_<variant>.yaml (not another recipe's that
    # shares the prefix), each copied beside the recipe under the new name.
    configs = [
        (c, dest.with_name(dest.stem + c.stem[len(args.recipe) :] + ".yaml"))
        for c in sorted((src_dir / "configs").glob(f"{args.recipe}*.yaml"))
        if c.stem == args.recipe or c.stem.startswith(f"{args.recipe}_")
    ]
    existing = [str(p) for p in (dest, *(t for _, t in configs)) if p.exists()]
    if existing and not args.force:
        raise DataError(f"{', '.join(existing)} exist(s); pass --force to overwrite")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    copied = [dest]
    for config, target in configs:
        shutil.copyfile(config, target)
        copied.append(target)
    print("copied: " + ", ".join(map(str, copied)))
    print(f"run it: python {dest} --config {copied[1] if len(copied) > 1 else '...'}")


def _labelled_texts(args: argparse.Namespace) -> tuple[list[str], list[str], str]:
    """Texts and gold labels for `compress --choose`: --texts with a label column, else the run's test
    predictions (test_predictions.jsonl holds each text and its gold label)."""
    import json

    from ftkit.data import read_table

    if args.texts:
        # Label lists (JSON) are kept as lists: a multi-label run's choice scores them.
        rows, _, label_column = read_table(args.texts, args.text_column, args.label_column, multi_label=True)
        return [r["text"] for r in rows], [r["label"] for r in rows], f"{args.texts} (column {label_column})"
    path = Path(args.run_dir) / "test_predictions.jsonl"
    if not path.is_file():
        raise DataError(f"{path} not found: pass --texts with labelled validation texts")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    how = f"{path} (the run's test split: no --texts given, so the choice is not held out from the test set)"
    return [r["text"] for r in rows], [r["gold"] for r in rows], how


def cmd_compress(args: argparse.Namespace) -> None:
    from ftkit.compress import compress_run
    from ftkit.predict import read_inputs, read_pair_inputs
    from ftkit.run import read_run_info

    info = read_run_info(args.run_dir)

    def read_texts(path: str) -> list:
        if info.get("text_pair_column"):  # a run trained on sentence pairs ranks and checks on pairs
            texts, pairs, _ = read_pair_inputs(path, info, args.text_column)
            return list(zip(texts, pairs, strict=True))
        return read_inputs(path, args.text_column)[0]

    if args.choose and info.get("text_pair_column"):
        raise DataError(
            "--choose does not measure runs trained on sentence pairs yet; use --quantize int8 (checked "
            "against PyTorch on --texts) and ftkit predict on a labelled pair table"
        )
    if args.choose:
        from ftkit.choose import choose_inference

        texts, labels, accuracy_on = _labelled_texts(args)
        candidates = args.candidates.split(",") if args.candidates else None
        record = choose_inference(
            args.run_dir, args.out, texts, labels, accuracy_on=accuracy_on, candidates=candidates
        )
        for name, figures in record["choice"]["candidates"].items():
            print(f"{name:>10}: {figures}")
        print(f"chosen: {record['choice']['chosen']}; run written to {args.out} (ftkit predict serves it)")
        return
    texts = read_texts(args.texts) if args.texts else None
    recover_texts = read_texts(args.recover_texts) if args.recover_texts else None
    out = compress_run(
        args.run_dir,
        args.out,
        quantize=args.quantize,
        prune_heads=args.prune_heads,
        prune_ffn=args.prune_ffn,
        recover_steps=args.recover_steps,
        merge_lora=args.merge_lora,
        texts=texts,
        recover_texts=recover_texts,
    )
    print(f"compressed run written to {out}")


def cmd_export_onnx(args: argparse.Namespace) -> None:
    from ftkit.compress import export_onnx

    print(f"ONNX model written to {export_onnx(args.run_dir, args.out)}")


def cmd_bench_predict(args: argparse.Namespace) -> None:
    from ftkit.bench import bench_predict, markdown

    print(
        markdown(
            bench_predict(
                args.runs,
                test_file=args.test_file,
                batch_size=args.batch_size,
                speed_tokens=args.speed_tokens,
                out_dir=args.out,
            )
        )
    )


def cmd_serve(args: argparse.Namespace) -> None:
    from ftkit.serve import Batching, Limits, serve

    batching = Batching(args.max_batch_size, args.max_wait_ms, args.max_queue)
    limits = Limits(args.max_body_bytes, args.max_texts, args.max_text_chars)
    for name, value in {**vars(batching), **vars(limits)}.items():
        if value < (0 if name == "max_wait_ms" else 1):
            raise DataError(
                f"--{name} must be {'>= 0' if name == 'max_wait_ms' else 'positive'}, got {value}"
            )
    serve(
        args.run_dir,
        host=args.host,
        port=args.port,
        variant=args.variant,
        linear_backend=args.linear_backend,
        batching=batching,
        limits=limits,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ftkit",
        description="Fine-tuning recipes for encoder models: predict with, copy and compress runs.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predict", help="predict labels (or entities) for new texts with a run directory")
    p.add_argument("run_dir", help="a run directory written by a recipe (full, LoRA or compressed)")
    p.add_argument(
        "--input",
        required=True,
        help=".txt (one text per line), or .csv/.tsv/.jsonl/.json/.parquet with a text column (runs trained "
        "on sentence pairs: a table with both texts, the columns named as in training)",
    )
    p.add_argument("--output", help="output .jsonl or .csv (default: RUN_DIR/predictions-<input>.jsonl)")
    p.add_argument("--text_column", help="text column of a table input (default: detected)")
    p.add_argument(
        "--text_pair_column", help="pair runs: the second text's column (default: the one the run trained on)"
    )
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument(
        "--linear_backend",
        choices=["auto", "onednn", "torch"],
        default="auto",
        help="fp32 linear layers of a torch run: as the recipes' option (auto: oneDNN where it measures faster)",
    )
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "serve", help="serve a run directory over HTTP (POST /predict, GET /health, /metadata, /docs)"
    )
    p.add_argument("run_dir", help="a run directory (a `compress --choose` result is served as it records)")
    p.add_argument("--host", default="127.0.0.1", help="default: loopback only")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (the log names it)")
    p.add_argument(
        "--variant",
        choices=["recorded", "fp32", "bf16", "torch-int8"],
        default="recorded",
        help="recorded: as `ftkit predict` runs the run (its compress.json: the --choose result, int8, "
        "ONNX; else fp32); or a torch runtime applied to the run's torch model",
    )
    p.add_argument(
        "--linear_backend",
        choices=["auto", "onednn", "torch"],
        default="auto",
        help="fp32 linear layers of a plain run, as `ftkit predict --linear_backend`",
    )
    p.add_argument(
        "--max_batch_size", type=int, default=32, help="texts per model call (default 32); 1: no batching"
    )
    p.add_argument(
        "--max_wait_ms",
        type=float,
        default=5.0,
        help="how long a batch waits for more requests to join (default 5)",
    )
    p.add_argument(
        "--max_queue",
        type=int,
        default=256,
        help="requests waiting before 503 with Retry-After (default 256)",
    )
    p.add_argument("--max_body_bytes", type=int, default=1_000_000, help="else 413 (default 1000000)")
    p.add_argument("--max_texts", type=int, default=256, help="texts per request, else 413 (default 256)")
    p.add_argument(
        "--max_text_chars", type=int, default=100_000, help="characters per text, else 413 (default 100000)"
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("cp", help="copy a recipe (and its configs) out of the repository to adapt it")
    p.add_argument("recipe", help="recipe name, e.g. textcls; `accelerate`: the launch configs")
    p.add_argument("dest", help="target file (my_task.py) or folder")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.set_defaults(func=cmd_cp)

    p = sub.add_parser(
        "compress", help="merge LoRA, prune heads/FFN neurons, int8-quantize a run for CPU inference"
    )
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="output run directory")
    p.add_argument("--quantize", choices=["int8"], help="dynamic int8 through ONNX Runtime")
    p.add_argument(
        "--prune-heads",
        dest="prune_heads",
        type=float,
        default=0.0,
        help="share of attention heads to remove",
    )
    p.add_argument(
        "--prune-ffn", dest="prune_ffn", type=float, default=0.0, help="share of FFN neurons to remove"
    )
    p.add_argument(
        "--recover-steps",
        dest="recover_steps",
        type=int,
        default=0,
        help="distillation steps after pruning, kept only if they bring the model closer to the unpruned one "
        "on --texts (a held-out check when --recover-texts are other texts)",
    )
    p.add_argument(
        "--merge-lora", dest="merge_lora", action="store_true", help="merge a LoRA adapter into the base"
    )
    p.add_argument(
        "--texts", help="validation texts (.txt, .csv, .jsonl) to rank heads/neurons; needed for pruning"
    )
    p.add_argument(
        "--recover-texts", dest="recover_texts", help="texts for recovery distillation (default: --texts)"
    )
    p.add_argument("--text_column", help="text column of a table file (default: detected)")
    p.add_argument(
        "--choose",
        action="store_true",
        help="measure fp32, bf16 (where native), torch int8 and ONNX int8 here (texts/s at batch 32, 128 "
        "tokens per text; accuracy on --texts with labels, else the run's test_predictions.jsonl) and keep "
        "the fastest within 0.5 point of fp32's accuracy; compress.json records every candidate",
    )
    p.add_argument("--candidates", help="with --choose: comma-separated subset (fp32 is always measured)")
    p.add_argument("--label_column", help="with --choose: label column of --texts (default: detected)")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("export-onnx", help="export a run to fp32 ONNX, checked against PyTorch")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export_onnx)

    p = sub.add_parser(
        "bench-predict", help="size, latency and throughput of runs vs transformers.pipeline fp32"
    )
    p.add_argument("runs", nargs="+", help="reference run first, then its variants")
    p.add_argument("--test_file", help="default: the reference run's test_predictions.jsonl")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument(
        "--speed_tokens",
        type=int,
        help="cut the speed and latency texts to this many tokens first: equal work for every variant "
        "whatever its long-text policy (e.g. 128); accuracy stays on the whole texts",
    )
    p.add_argument("--out", help="where to write bench_predict.json/.md (default: the reference run)")
    p.set_defaults(func=cmd_bench_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # ftkit's own progress at INFO; other libraries (ONNX export, quantizer, httpx...) warnings only.
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("ftkit").setLevel(logging.INFO)
    try:
        args.func(args)
    except DataError as err:  # a problem the user can fix; anything else is a bug: a traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
