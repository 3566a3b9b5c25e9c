"""Shared test fixtures: a tiny random BERT and a locally trained WordPiece tokenizer, no network."""

from __future__ import annotations

import os
import string
from pathlib import Path

# Tiny models gain nothing from intra-op threads; one thread per process keeps tests (and the
# subprocesses they launch, which inherit this) fast on a 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

FIXTURES = Path(__file__).parent / "fixtures"


def _corpus() -> list[str]:
    lines = []
    for path in sorted(FIXTURES.rglob("*")):
        if path.is_file() and path.suffix in {".csv", ".txt", ".conll", ".jsonl", ".tsv"}:
            lines += path.read_text(encoding="utf-8", errors="replace").splitlines()
    return lines


def build_tiny_model(out_dir: Path) -> Path:
    """Write a 2-layer, hidden-32 BERT with random weights and a WordPiece tokenizer to `out_dir`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, BertTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=list(string.printable.strip())
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.post_processor = processors.BertProcessing(
        ("[SEP]", tok.token_to_id("[SEP]")), ("[CLS]", tok.token_to_id("[CLS]"))
    )
    fast = BertTokenizerFast(tokenizer_object=tok, do_lower_case=True, model_max_length=128)
    fast.save_pretrained(out_dir)

    config = BertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(out_dir)  # safetensors by default
    return out_dir


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-bert")))


@pytest.fixture
def fixtures() -> Path:
    return FIXTURES
