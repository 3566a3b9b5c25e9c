"""The benchmark's arithmetic: FLOPs per token on a hand-counted tiny BERT, MFU, time to target."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import BertConfig, BertForSequenceClassification

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from flops import ModelShape, mfu, model_shape, train_flops, train_flops_per_token  # noqa: E402

# Hand count for vocab 100, hidden 32, 2 layers, intermediate 64, 3 labels (biases included):
#   embedding LayerNorm                         2*32                     =     64
#   per layer: Q, K, V, O   4 * (32*32 + 32)                             =  4,224
#              2 LayerNorms 2 * (2*32)                                   =    128
#              FFN in       32*64 + 64                                   =  2,112
#              FFN out      64*32 + 32                                   =  2,080   -> 8,544 per layer
#   pooler 32*32 + 32 = 1,056; classifier 32*3 + 3 = 99
#   N_ne = 64 + 2*8,544 + 1,056 + 99 = 18,307 (word/position/type embedding tables excluded)
N_NE = 18_307


@pytest.fixture
def tiny_bert():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=3,
    )
    return BertForSequenceClassification(config)


def test_full_finetune_flops_per_token(tiny_bert):
    shape = model_shape(tiny_bert)
    assert shape == ModelShape(n_nonembedding=N_NE, n_trainable=N_NE + 100 * 32 + 128 * 32 + 2 * 32,
                               layers=2, hidden=32, frozen_body=False)  # fmt: skip
    # 6 * 18,307 = 109,842; attention 12 * L * d * T = 12 * 2 * 32 * 10 = 7,680
    assert train_flops_per_token(shape, 10) == 117_522
    # T = 4: 109,842 + 12 * 2 * 32 * 4 = 112,914; a batch sums over its tokens
    assert train_flops(shape, [10, 4]) == 10 * 117_522 + 4 * 112_914 == 1_626_876


def test_lora_flops_per_token(tiny_bert):
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=["query", "value"])
    shape = model_shape(get_peft_model(tiny_bert, config))
    # Trainable: A (32x4) + B (4x32) = 256 per adapted matrix, 2 per layer, 2 layers = 1,024,
    # plus the classifier's trainable copy (99). The frozen original head stays in N_ne.
    assert shape.frozen_body and shape.n_trainable == 1_123
    assert shape.n_nonembedding == N_NE
    # 4 * 18,307 + 12 * 2 * 32 * 10 + 6 * 1,123 = 73,228 + 7,680 + 6,738
    assert train_flops_per_token(shape, 10) == 87_646


def test_mfu_arithmetic():
    # 1.2 TFLOP in 10 s is 120 GFLOP/s; against a 200 GFLOP/s peak that is 60 %.
    assert mfu(1.2e12, 10.0, 200e9) == pytest.approx(0.6)
    # MiniLM-like shape: 6 * 1e6 + 12 * 6 * 384 * 128 = 9,538,944 FLOPs per token at T = 128;
    # 7 full rows = 896 tokens = 8,546,893,824 FLOPs; in 0.1 s that is 85.47 GFLOP/s, 85.5 % of 100.
    shape = ModelShape(
        n_nonembedding=1_000_000, n_trainable=1_000_000, layers=6, hidden=384, frozen_body=False
    )
    flops = train_flops(shape, [128] * 7)
    assert flops == 8_546_893_824
    assert mfu(flops, 0.1, 100e9) == pytest.approx(0.8546893824)
