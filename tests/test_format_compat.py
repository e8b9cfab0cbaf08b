"""Folders saved by an older lmlab keep loading with the logits they had.

tests/fixtures/format_v1 holds folders written by lmlab at commit 8c3a8ba (format version 1, before the
architecture change): dense T5 and BERT, MoE++ (zero/copy/constant experts, gating residual),
DeepSeekMoE (shared gated expert, first layer dense) and Soft MoE, each with the logits that commit
computed for a fixed batch. Renamed state-dict keys are migrated by format version, never dropped.
The logits are bit-identical on the CPU kind that computed them (an AVX2 EPYC); another kind's float32
kernels sum in another order, which moves them by float32 rounding (3e-7 of the largest on an
AVX-512 EPYC), while a weight lost or misplaced in the migration moves them by far more than 1e-5.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lmlab

FIXTURES = Path(__file__).parent / "fixtures" / "format_v1"
NAMES = ["t5-dense", "bert-dense", "moepp", "deepseekmoe", "softmoe"]


@pytest.mark.parametrize("name", NAMES)
def test_a_format_v1_folder_loads_with_the_logits_it_had(name):
    folder = FIXTURES / name
    assert json.loads((folder / "config.json").read_text())["lmlab_format"] == 1
    expected = load_file(str(folder / "expected.safetensors"))
    model = lmlab.load(folder)
    ids = expected["input_ids"]
    kw = {"labels": ids} if model.config.family == "encoder-decoder" else {}
    with torch.no_grad():
        logits = model(input_ids=ids, **kw).logits
    scale = float(expected["logits"].abs().max())
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=2e-6 * scale)
