"""Make a fine-tuned run cheaper on CPU: merge LoRA, prune heads and FFN neurons, int8, ONNX.

Every function reads a run directory (see the run-directory contract) and writes a new one beside it:

    merge_lora(run_dir, out_dir)             plain transformers model, loadable with from_pretrained
    compress_run(run_dir, out_dir, ...)      prune and/or int8-quantize; writes compress.json
    export_onnx(run_dir, out_dir)            fp32 ONNX, checked against PyTorch
    load_compressed(out_dir)                 a model with the HF call shape: (input_ids, attention_mask) -> .logits

`ftkit.choose.choose_inference` measures fp32, bf16, torch int8 and ONNX int8 and keeps the fastest within
0.5 point of fp32's accuracy.

`ftkit.predict.predict_texts` runs any of them (batched, length-sorted).

int8 goes through ONNX Runtime dynamic quantization (per-channel int8 weights, int8 activations quantized
per batch at run time). On 2 CPU cores it ran MiniLM-L6 fine-tuned on BBC News at 3.4x the throughput of a
fp32 `transformers.pipeline` at the same test accuracy, while torchao's int8 dynamic config ran slower than
fp32 in eager mode and needs torch.compile to pay off (bench/README.md). A compressed run holds only safetensors or
ONNX (protobuf) files plus JSON, so loading it never unpickles anything.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors.torch import load_file
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import ModelOutput

from ftkit import DataError
from ftkit.hardware import has_vnni
from ftkit.models import MODEL_CLASSES
from ftkit.predict import load_run, run_config, run_tokenizer
from ftkit.run import RUN_FILE, package_versions, read_run_info
from ftkit.text import pad_batch

COMPRESS_FILE = "compress.json"
ONNX_ATOL = 1e-4  # fp32 ONNX vs PyTorch; int8 is judged by labels and accuracy instead
_KEEP = (
    "config.json",
    RUN_FILE,
)  # copied from the source run; metrics and model card are not (they no longer hold)


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------


def read_compress_record(run_dir: str | Path) -> dict:
    """`compress.json` of a run directory written by this module, or `{}` for any other run."""
    path = Path(run_dir) / COMPRESS_FILE
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}: expected a JSON object")
    return record


def _model_file(run_dir: Path, record: dict) -> Path:
    """The model file `compress.json` names, which must be a file inside the run directory."""
    name = record.get("file")
    path = (run_dir / str(name)).resolve() if isinstance(name, str) and name else None
    if path is None or not path.is_relative_to(run_dir.resolve()) or not path.is_file():
        raise DataError(f"{run_dir / COMPRESS_FILE}: file {name!r} is not a file inside {run_dir}")
    return path


def load_torch_model(run_dir: str | Path) -> PreTrainedModel:
    """The PyTorch model of a full, LoRA (merged in memory) or pruned run directory, in eval mode.

    Everything downstream (pruning, export) sees one plain transformers model.
    """
    run_dir = Path(run_dir)
    record = read_compress_record(run_dir)
    if record.get("format") == "onnx":
        raise DataError(f"{run_dir} holds an ONNX model; open it with load_compressed()")
    if record.get("layers"):
        # Pruned layers have shapes config.json cannot express: build the full model, shrink it, load.
        task = read_run_info(run_dir)["task"]
        if task not in MODEL_CLASSES:
            raise DataError(f"{run_dir / RUN_FILE}: pruned layers of a {task!r} run cannot be loaded")
        model = MODEL_CLASSES[task].from_config(run_config(run_dir))
        for layer, shape in zip(_layers(model), record["layers"], strict=True):
            _shrink_layer(layer, shape["heads"], shape["intermediate"])
        model.load_state_dict(load_file(_model_file(run_dir, record)), strict=True)
        return model.eval()
    model, _tokenizer, _info = load_run(run_dir)
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    return model.eval()


@dataclass
class OnnxModel:
    """An ONNX Runtime session with the call shape of a transformers model: `model(input_ids=..,
    attention_mask=..).logits` is a torch tensor, and `config` holds the labels. A multi-task graph
    answers with every head's `logits_<head>` instead, as `MultiTaskTagger` does."""

    session: object  # onnxruntime.InferenceSession
    config: PretrainedConfig

    def __call__(self, input_ids, attention_mask, token_type_ids=None, **_ignored) -> ModelOutput:
        feed = {"input_ids": np.asarray(input_ids, dtype=np.int64)}
        feed["attention_mask"] = np.asarray(attention_mask, dtype=np.int64)
        if any(i.name == "token_type_ids" for i in self.session.get_inputs()):  # NER case types, pairs
            types = np.zeros_like(feed["input_ids"]) if token_type_ids is None else token_type_ids
            feed["token_type_ids"] = np.asarray(types, dtype=np.int64)
        names = [o.name for o in self.session.get_outputs()]
        outputs = self.session.run(None, feed)
        return ModelOutput(**{n: torch.from_numpy(v) for n, v in zip(names, outputs, strict=True)})

    def eval(self) -> OnnxModel:
        return self


def onnx_session(path: str | Path, threads: int | None = None):
    """Open an ONNX Runtime CPU session with one intra-op thread per physical core and no busy-waiting.

    Busy-waiting worker threads help on an idle machine but steal the cores from everything else on a
    shared one (and from each other when several processes run), so it is off.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def load_compressed(run_dir: str | Path) -> PreTrainedModel | OnnxModel:
    """Load any run directory written by this module (or a plain one) for inference.

    Returns an `OnnxModel` for ONNX variants and a transformers model otherwise; both are called as
    `model(input_ids=..., attention_mask=...).logits` and carry `.config` (id2label).
    """
    run_dir = Path(run_dir)
    record = read_compress_record(run_dir)
    if record.get("format") == "onnx":
        return OnnxModel(onnx_session(_model_file(run_dir, record)), run_config(run_dir))
    if record.get("runtime"):  # chosen by measurement (`ftkit compress --choose`, ftkit/choose.py)
        from ftkit.choose import apply_runtime

        return apply_runtime(load_torch_model(run_dir), record["runtime"])
    return load_torch_model(run_dir)


# ---------------------------------------------------------------------------------------------------------
# Merge
# ---------------------------------------------------------------------------------------------------------


def _copy_run_files(run_dir: Path, out_dir: Path, tokenizer) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in _KEEP:
        if (run_dir / name).exists():
            shutil.copy(run_dir / name, out_dir / name)
    tokenizer.save_pretrained(out_dir)
    info = read_run_info(out_dir)
    info.update(lora=False, compressed_from=str(run_dir))
    (out_dir / RUN_FILE).write_text(json.dumps(info, indent=2))


def merge_lora(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Merge a LoRA run's adapter into its base and save a plain transformers run directory."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    model = load_torch_model(run_dir)
    _copy_run_files(run_dir, out_dir, run_tokenizer(run_dir))
    model.save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------------------
# Structured pruning
# ---------------------------------------------------------------------------------------------------------


def _layers(model) -> list[torch.nn.Module]:
    """The transformer layers of a BERT-layout encoder (BERT, RoBERTa, ELECTRA, XLM-R, MiniLM)."""
    encoder = getattr(model.base_model, "encoder", None)
    if encoder is None or not hasattr(encoder.layer[0].attention, "self"):
        raise DataError(f"pruning supports BERT-layout encoders, not {type(model.base_model).__name__}")
    return list(encoder.layer)


def _head_size(layer) -> int:
    return layer.attention.self.attention_head_size


def _num_heads(layer) -> int:
    return layer.attention.self.query.out_features // _head_size(layer)


def _slice_linear(linear: torch.nn.Linear, index: torch.Tensor, dim: int) -> torch.nn.Linear:
    """A new Linear keeping only `index` of the outputs (dim 0) or inputs (dim 1)."""
    weight = linear.weight.detach().index_select(dim, index).clone()
    new = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None)
    new.weight.data.copy_(weight)
    if linear.bias is not None:
        new.bias.data.copy_(linear.bias.detach()[index] if dim == 0 else linear.bias.detach())
    return new


def _prune_layer(layer, heads: Sequence[int], neurons: Sequence[int]) -> None:
    """Physically keep only `heads` (indices into the layer's current heads) and FFN `neurons`."""
    att, size = layer.attention.self, _head_size(layer)
    index = torch.tensor([h * size + j for h in sorted(heads) for j in range(size)], dtype=torch.long)
    att.query, att.key, att.value = (
        _slice_linear(getattr(att, n), index, 0) for n in ("query", "key", "value")
    )
    att.num_attention_heads, att.all_head_size = len(heads), len(heads) * size
    layer.attention.output.dense = _slice_linear(layer.attention.output.dense, index, 1)
    keep = torch.tensor(sorted(neurons), dtype=torch.long)
    layer.intermediate.dense = _slice_linear(layer.intermediate.dense, keep, 0)
    layer.output.dense = _slice_linear(layer.output.dense, keep, 1)


def _shrink_layer(layer, heads: int, intermediate: int) -> None:
    """Give a freshly built layer the shapes of a pruned one (weights come from the state dict next)."""
    _prune_layer(layer, range(heads), range(intermediate))


def _task_loss(model, logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """A label-free loss: cross-entropy against the model's own predictions (output sum for regression).

    Gradient-based importance (Michel et al., 2019) needs a loss; using the model's argmax as the target
    needs no labels and equals the gold-label loss wherever the model is right, i.e. almost everywhere.
    """
    if model.config.num_labels == 1:
        return logits.sum()
    if model.config.problem_type == "multi_label_classification":  # each label against its own decision
        return F.binary_cross_entropy_with_logits(logits, (logits > 0).float().detach())
    if logits.dim() == 3:
        keep = attention_mask.bool()
        return F.cross_entropy(logits[keep], logits[keep].argmax(-1).detach())
    return F.cross_entropy(logits, logits.argmax(-1).detach())


def _batches(
    tokenizer, texts: Sequence, batch_size: int, max_length: int, case_feature: bool = False
) -> list[dict]:
    """Padded batches of `texts`. With `case_feature` (NER runs on uncased models) the rows are built as
    `ftkit predict` builds them: words from `split_words`, each sub-token's `token_type_ids` the shape of
    its word, texts longer than `max_length` as windows. (text, pair) tuples (runs trained on sentence
    pairs) are encoded as pairs, with their `token_type_ids` where the model takes them."""
    pairs = bool(texts) and isinstance(texts[0], tuple | list)
    if pairs:
        from ftkit.text import encode_pairs

        rows = encode_pairs(tokenizer, [a for a, _ in texts], [b for _, b in texts], max_length)
    elif case_feature:
        from ftkit.ner import encode_pieces, split_words, word_pieces, word_shape
        from ftkit.text import special_tokens_template

        words = [[w for w, _, _ in split_words(t)] for t in texts]
        features = encode_pieces(
            word_pieces(tokenizer, words),
            [[i] for i in range(len(words))],
            special_tokens_template(tokenizer),
            max_length,
            stride=0,
            shapes=[[word_shape(w) for w in ws] for ws in words],
        )
        rows = {k: features.rows[k] for k in ("input_ids", "token_type_ids")}
    else:
        rows = dict(tokenizer(list(texts), truncation=True, max_length=max_length))
    keys = (
        ["input_ids", "token_type_ids"]
        if case_feature or (pairs and "token_type_ids" in rows)
        else ["input_ids"]
    )
    n = len(rows["input_ids"])
    return [
        pad_batch({k: rows[k][start : start + batch_size] for k in keys}, tokenizer.pad_token_id)
        for start in range(0, n, batch_size)
    ]


def estimate_importance(model, batches: Sequence[dict]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Importance of every attention head and FFN neuron, layer by layer.

    Each head's context vector and each FFN activation is multiplied by a gate fixed at 1; the importance
    is |dL/dgate| summed over batches, which is the first-order estimate of the loss change when the unit
    is removed (Michel et al., 2019, "Are Sixteen Heads Really Better than One?").
    """
    layers = _layers(model)
    head_gates = [torch.ones(_num_heads(layer), requires_grad=True) for layer in layers]
    ffn_gates = [torch.ones(layer.intermediate.dense.out_features, requires_grad=True) for layer in layers]
    head_scores = [torch.zeros_like(g) for g in head_gates]
    ffn_scores = [torch.zeros_like(g) for g in ffn_gates]

    def gate_heads(gate, size):
        def hook(_module, args):
            x = args[0]
            return (x.view(*x.shape[:-1], -1, size).mul(gate[:, None]).flatten(-2),)

        return hook

    def gate_ffn(gate):
        return lambda _module, args: (args[0] * gate,)

    hooks = []
    for layer, hg, fg in zip(layers, head_gates, ffn_gates, strict=True):
        hooks.append(
            layer.attention.output.dense.register_forward_pre_hook(gate_heads(hg, _head_size(layer)))
        )
        hooks.append(layer.output.dense.register_forward_pre_hook(gate_ffn(fg)))
    was_training = model.training
    model.eval()  # no dropout: importance of the model as it predicts
    try:
        for batch in batches:
            logits = model(**batch).logits
            grads = torch.autograd.grad(
                _task_loss(model, logits, batch["attention_mask"]), head_gates + ffn_gates
            )
            for score, grad in zip(head_scores + ffn_scores, grads, strict=True):
                score += grad.abs()
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return head_scores, ffn_scores


def select_units(
    head_scores: list[torch.Tensor], ffn_scores: list[torch.Tensor], prune_heads: float, prune_ffn: float
) -> tuple[list[list[int]], list[list[int]]]:
    """Choose what to keep: heads ranked globally, FFN neurons per layer.

    Head scores are normalized per layer (L2, as Michel et al.) before the global ranking, so that layers
    with large gradients do not keep all their heads; each layer keeps at least one head. FFN neurons go by
    the same fraction in every layer, which keeps a regular shape and gives ONNX uniform matmuls.
    """
    normed = [s / (s.norm() + 1e-12) for s in head_scores]
    flat = sorted(
        ((float(v), layer, h) for layer, s in enumerate(normed) for h, v in enumerate(s)), key=lambda t: t[0]
    )
    n_drop = int(round(prune_heads * len(flat)))
    keep_heads = [set(range(len(s))) for s in normed]
    for _score, layer, head in flat:
        if n_drop == 0:
            break
        if len(keep_heads[layer]) > 1:
            keep_heads[layer].discard(head)
            n_drop -= 1
    keep_ffn = []
    for s in ffn_scores:
        n_keep = max(1, len(s) - int(round(prune_ffn * len(s))))
        keep_ffn.append(sorted(torch.topk(s, n_keep).indices.tolist()))
    return [sorted(k) for k in keep_heads], keep_ffn


def prune_model(model, keep_heads: list[list[int]], keep_ffn: list[list[int]]) -> list[dict]:
    """Remove heads and FFN neurons in place; return the per-layer shapes that compress.json records."""
    for layer, heads, neurons in zip(_layers(model), keep_heads, keep_ffn, strict=True):
        _prune_layer(layer, heads, neurons)
    return [
        {"heads": _num_heads(layer), "intermediate": layer.intermediate.dense.out_features}
        for layer in _layers(model)
    ]


def _distillation_loss(model, logits: torch.Tensor, target: torch.Tensor, attention_mask: torch.Tensor):
    """KL(teacher || student) per text (per real token for token classification); MSE for regression;
    multi-label: BCE against the teacher's per-label probabilities."""
    if model.config.num_labels == 1:
        return F.mse_loss(logits, target)
    if model.config.problem_type == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits, torch.sigmoid(target))
    keep = attention_mask.bool() if logits.dim() == 3 else slice(None)
    return F.kl_div(
        F.log_softmax(logits[keep], -1),
        F.log_softmax(target[keep], -1),
        log_target=True,
        reduction="batchmean",
    )


@torch.inference_mode()
def distillation_gap(model, teacher, batches: Sequence[dict]) -> float:
    """Mean distillation loss of `model` against `teacher` over `batches`, both in eval mode."""
    model.eval()
    losses = [
        _distillation_loss(model, model(**b).logits, teacher(**b).logits, b["attention_mask"]).item()
        for b in batches
    ]
    return float(np.mean(losses))


def recover(model, teacher, batches: Sequence[dict], steps: int, lr: float = 1e-5) -> list[float]:
    """Short recovery fine-tuning of a pruned model by distillation from the unpruned `teacher`.

    The target is the teacher's output (KL on softmax; MSE for regression), so any unlabeled texts work.
    The learning rate is low because AdamW's first steps move every weight by about `lr`; even so, a
    lightly pruned model can end further from its teacher on held-out texts (bench/README.md), which is
    why `compress_run` checks. Returns the loss per step.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        batch = batches[step % len(batches)]
        with torch.no_grad():
            target = teacher(**batch).logits
        loss = _distillation_loss(model, model(**batch).logits, target, batch["attention_mask"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


# ---------------------------------------------------------------------------------------------------------
# ONNX and int8
# ---------------------------------------------------------------------------------------------------------


def _output_names(model) -> list[str]:
    """`logits`, or one `logits_<head>` per head of a multi-task model (ftkit.multitask)."""
    heads = getattr(model, "labels", None)
    return [f"logits_{h}" for h in heads] if isinstance(heads, dict) else ["logits"]


def _all_logits(out) -> dict[str, np.ndarray]:
    """Every logits output of a model call (one for a transformers head, one per multi-task head)."""
    return {k: v.float().numpy() for k, v in out.items() if k.startswith("logits")}


def export_onnx_graph(model, path: Path, example: dict, attention: str = "eager") -> None:
    """torch.onnx (dynamo exporter) with dynamic batch and sequence length; inputs input_ids,
    attention_mask, and token_type_ids when `example` has them (NER runs with case types, sentence
    pairs on models with segment types); outputs `logits`, or every head's `logits_<head>` for a
    multi-task model.
    `attention` is the transformers attention implementation traced into the graph."""
    dim = torch.export.Dim.DYNAMIC
    names = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in example]
    # Plain matmul + softmax attention: ONNX Runtime runs its graph faster than the exported SDPA's
    # (int8 MiniLM-L6 on BBC: 206 vs 159 texts/s, bench/int8_paths.py); the outputs are the same.
    target = model if hasattr(model, "set_attn_implementation") else model.encoder  # multi-task: encoder
    previous = target.config._attn_implementation
    target.set_attn_implementation(attention)
    try:
        torch.onnx.export(
            model,
            (),
            str(path),
            kwargs={k: example[k] for k in names},
            input_names=names,
            output_names=_output_names(model),
            dynamic_shapes={k: {0: dim, 1: dim} for k in names},
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    finally:
        target.set_attn_implementation(previous)
    import onnx

    # The exporter leaves value_info entries whose shapes contradict the graph (seen: the classifier weight
    # as [num_labels, hidden] where a transposed copy is used), and ORT's quantizer re-runs shape inference
    # and stops on them. They are optional hints; without them ORT infers the shapes itself.
    proto = onnx.load(str(path))
    del proto.graph.value_info[:]
    onnx.save(proto, str(path))


def quantize_onnx(src: str | Path, dst: str | Path, reduce_range: bool | None = None) -> Path:
    """ONNX Runtime dynamic int8: weights int8 per output channel, activations quantized per batch.

    `reduce_range` (default: on where the CPU has no VNNI) quantizes weights to 7 bits. Without VNNI,
    ONNX Runtime multiplies u8 activations by s8 weights with 16-bit intermediate sums that saturate
    with 8-bit weights (measured on an AVX2-only AMD EPYC: int8 and fp32 labels of a small model agreed
    on 1 text in 3); 7-bit weights cannot saturate there."""
    reduce_range = not has_vnni() if reduce_range is None else reduce_range
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer warns once per tensor whose type it re-infers
    try:
        quantize_dynamic(
            str(src),
            str(dst),
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=reduce_range,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    finally:
        root.setLevel(level)
    return Path(dst)


def _check_onnx(model, path: Path, batch: dict) -> float:
    """Max |logit difference| between PyTorch and ONNX Runtime on one batch, over every output."""
    with torch.inference_mode():
        expected = _all_logits(model(**batch))
    got = _all_logits(OnnxModel(onnx_session(path), model.config)(**batch))
    if got.keys() != expected.keys():
        raise RuntimeError(f"ONNX outputs {sorted(got)} are not the model's {sorted(expected)}: {path}")
    return max(float(np.abs(got[k] - expected[k]).max()) for k in expected)


_PROBE_TEXTS = ["A short one.", "A somewhat longer sentence, so that the batch needs padding in it."]


def _write_onnx(
    model,
    tokenizer,
    out_dir: Path,
    quantize: str | None,
    texts: Sequence | None,
    case_feature: bool,
    pairs: bool = False,
) -> dict:
    """Export (and maybe quantize) `model` into out_dir; return the compress.json fields it adds.
    A pair run (`pairs`) is traced and checked on pairs, so the graph takes their token_type_ids."""
    max_length = min(tokenizer.model_max_length, 512)
    default = list(zip(_PROBE_TEXTS, _PROBE_TEXTS[::-1], strict=True)) if pairs else _PROBE_TEXTS
    probe = _batches(tokenizer, list(texts or default)[:8], 8, max_length, case_feature)[0]
    fp32 = out_dir / "model.onnx"
    export_onnx_graph(model, fp32, probe)
    diff = _check_onnx(model, fp32, probe)
    if diff > ONNX_ATOL:
        raise RuntimeError(f"ONNX export differs from PyTorch by {diff:.2e} > {ONNX_ATOL:.0e}: {fp32}")
    fields = {"format": "onnx", "file": fp32.name, "onnx_max_abs_diff": diff, "onnx_atol": ONNX_ATOL}
    if quantize:
        reduce_range = not has_vnni()
        quantize_onnx(fp32, out_dir / "model.int8.onnx", reduce_range)
        fp32.unlink()  # the int8 file is the variant; keep the directory's size honest
        int8 = out_dir / "model.int8.onnx"
        fields.update(
            file=int8.name, int8_max_abs_diff=_check_onnx(model, int8, probe), reduce_range=reduce_range
        )
    return fields


def export_onnx(run_dir: str | Path, out_dir: str | Path, *, texts: Sequence[str] | None = None) -> Path:
    """Export a run (full, LoRA or pruned) to fp32 ONNX in `out_dir`, checked against PyTorch.

    The check runs a padded batch (from `texts` if given) through both and fails if any logit differs by
    more than `ONNX_ATOL`. Returns `out_dir`, which `load_compressed` opens.
    """
    return compress_run(run_dir, out_dir, onnx=True, texts=texts)


def compress_run(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    quantize: str | None = None,
    prune_heads: float = 0.0,
    prune_ffn: float = 0.0,
    recover_steps: int = 0,
    merge_lora: bool = False,
    onnx: bool = False,
    texts: Sequence | None = None,
    recover_texts: Sequence | None = None,
    batch_size: int = 16,
) -> Path:
    """Write a compressed copy of a run directory and return `out_dir`.

    Steps, in order: LoRA runs are merged (always; `merge_lora=True` alone just writes the merged model);
    `prune_heads` / `prune_ffn` remove that fraction of attention heads / FFN neurons, ranked by importance
    on `texts` (validation texts, (text, pair) tuples for a pair run; required when pruning), then `recover_steps` of distillation from the
    unpruned model on `recover_texts` (default `texts`); `quantize="int8"` exports to ONNX and quantizes
    with ONNX Runtime (`onnx=True` exports fp32 ONNX without quantizing). Without ONNX the result is
    safetensors, reloadable with `load_compressed`. `compress.json` records what was done.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if quantize not in (None, "int8"):
        raise DataError(f"quantize must be None or 'int8', not {quantize!r}")
    pruning = prune_heads > 0 or prune_ffn > 0
    if not (quantize or pruning or merge_lora or onnx):
        raise DataError("nothing to do: pass quantize, prune_heads/prune_ffn, merge_lora or onnx")
    if pruning and not texts:
        raise DataError("pruning needs validation texts to estimate head/neuron importance (texts=...)")
    tokenizer = run_tokenizer(run_dir)
    info = read_run_info(run_dir)
    if info["task"] == "multi-task" and pruning:  # the heads' importance has no single loss to rank by
        raise DataError(f"{run_dir}: multi-task runs can be exported to ONNX and quantized, not pruned")
    max_length, case_feature = info["max_length"], info.get("case_feature", False)
    pairs = bool(info.get("text_pair_column"))
    for given in (texts, recover_texts):
        if given and pairs != isinstance(given[0], tuple | list):
            raise DataError(
                f"{run_dir}: trained on "
                + ("sentence pairs: give (text, pair) tuples" if pairs else "single texts: give strings")
            )
    model = load_torch_model(run_dir)
    # A compressed source (e.g. pruned, now quantized) passes on what was done to it.
    record = {**read_compress_record(run_dir), "source": str(run_dir), "format": "safetensors"}
    record["file"] = "model.safetensors"
    if pruning:
        batches = _batches(tokenizer, texts, batch_size, max_length, case_feature)
        heads, ffn = estimate_importance(model, batches)
        teacher = copy.deepcopy(model) if recover_steps else None
        layers = prune_model(model, *select_units(heads, ffn, prune_heads, prune_ffn))
        record.update(
            layers=layers, prune_heads=prune_heads, prune_ffn=prune_ffn, importance_texts=len(texts)
        )
        if recover_steps:
            # Recovery is kept only if it brings the model closer to the teacher on the importance
            # (validation) texts; with recover_texts from elsewhere this is a held-out check.
            recover_batches = _batches(
                tokenizer, recover_texts or texts, batch_size, max_length, case_feature
            )
            candidate = copy.deepcopy(model)
            losses = recover(candidate, teacher, recover_batches, recover_steps)
            gaps = [distillation_gap(m, teacher, batches) for m in (model, candidate)]
            kept = gaps[1] < gaps[0]
            model = candidate if kept else model
            record.update(
                recover_steps=recover_steps,
                recover_loss_first_last_10=[float(np.mean(losses[:10])), float(np.mean(losses[-10:]))],
                recover_gap_before_after=gaps,
                recover_kept=kept,
            )
        model.eval()
    _copy_run_files(run_dir, out_dir, tokenizer)
    if quantize or onnx:
        fields = _write_onnx(model, tokenizer, out_dir, quantize, texts, case_feature, pairs)
        record.update(fields, quantize=quantize)
    else:
        model.save_pretrained(out_dir)
    if pruning or quantize or onnx:  # a merged-only run is a plain HF model and needs no recipe to load
        record["versions"] = package_versions(("torch", "transformers", "onnx", "onnxruntime"))
        (out_dir / COMPRESS_FILE).write_text(json.dumps(record, indent=2))
    return out_dir
