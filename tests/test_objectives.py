"""Objectives: masking and noise statistics match their settings; labels have the right shapes and ignores."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from lmlab.data.corpus import demo_corpus, read_documents
from lmlab.data.objectives import IGNORE_INDEX, Batches, ObjectiveConfig, make_objective, span_noise_mask, t5_lengths
from lmlab.data.store import TokenStore
from lmlab.tokenizer import train_tokenizer

DOCS = list(itertools.islice(read_documents(demo_corpus("kjv"), doc_sep="blank"), 150))


def _store(kind: str, tmp_path_factory) -> tuple:
    tok = train_tokenizer(kind, DOCS, 2000)
    store = TokenStore.build(DOCS, tok, tmp_path_factory.mktemp(kind) / "store")
    return tok, store


@pytest.fixture(scope="module")
def wordpiece(tmp_path_factory):
    return _store("wordpiece", tmp_path_factory)


@pytest.fixture(scope="module")
def unigram(tmp_path_factory):
    return _store("unigram", tmp_path_factory)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return _store("bpe", tmp_path_factory)


def _examples(name, tok, store, seq_len=128, n=None, **kw):
    obj = make_objective(ObjectiveConfig(name, seq_len, **kw), store, np.arange(store.n_docs), tok, "all")
    batches = Batches(obj, 1, seed=0)
    units = range(len(obj)) if n is None else range(min(n, len(obj)))
    return obj, [batches.example(u, 0) for u in units]


def test_store_holds_documents_in_order(bpe):
    tok, store = bpe
    assert store.n_docs == len(DOCS) and store.dtype == np.uint16
    assert store.doc(3).tolist() == tok.encode(DOCS[3], add_special_tokens=False)


def test_mlm_masks_15_percent_with_80_10_10(wordpiece):
    tok, store = wordpiece
    obj, examples = _examples("mlm", tok, store)
    special = np.array(sorted(tok.special_ids))
    n_candidates = chosen = masked = kept = 0
    originals = obj.stream
    for u, ex in enumerate(examples):
        original = np.concatenate(
            [[tok.cls_id], np.asarray(originals[u * obj.window : (u + 1) * obj.window]), [tok.sep_id]]
        )
        pick = ex["labels"] != IGNORE_INDEX
        assert not np.isin(original[pick], special).any()  # special tokens are never chosen
        assert (ex["input_ids"][~pick] == original[~pick]).all()
        assert (ex["labels"][pick] == original[pick]).all()
        n_candidates += int((~np.isin(original, special)).sum())
        chosen += int(pick.sum())
        masked += int((ex["input_ids"][pick] == tok.mask_id).sum())
        kept += int((ex["input_ids"][pick] == original[pick]).sum())
    assert n_candidates >= 100_000
    assert abs(chosen / n_candidates - 0.15) <= 0.005
    assert abs(masked / chosen - 0.8) <= 0.015
    assert abs(kept / chosen - 0.1) <= 0.015  # includes the rare random draw of the same token
    assert abs((chosen - masked - kept) / chosen - 0.1) <= 0.015


def test_whole_word_masking_masks_complete_words(wordpiece):
    tok, store = wordpiece
    _, examples = _examples("mlm", tok, store, n=300, whole_word=True)
    cont = tok.continuation_mask().numpy()
    for ex in examples:
        original = np.where(ex["labels"] != IGNORE_INDEX, ex["labels"], ex["input_ids"])
        picked = ex["labels"] != IGNORE_INDEX
        for i in range(1, len(original)):
            if cont[original[i]] and not np.isin(original[i - 1], list(tok.special_ids)):
                assert picked[i] == picked[i - 1]  # a '##' piece shares its word's fate


def test_mlm_nsp_pairs_segments_half_random(wordpiece):
    tok, store = wordpiece
    _, examples = _examples("mlm-nsp", tok, store, seq_len=64)
    labels = np.array([int(e["next_sentence_label"]) for e in examples])
    assert len(labels) > 1000 and abs(labels.mean() - 0.5) <= 0.04
    for ex in examples[:200]:
        ids, types, mask = ex["input_ids"], ex["token_type_ids"], ex["attention_mask"]
        n = int(mask.sum())
        assert ids[0] == tok.cls_id and ids[n - 1] == tok.sep_id and (ids[n:] == tok.pad_id).all()
        first_sep = int(np.flatnonzero(ids == tok.sep_id)[0])
        assert (types[: first_sep + 1] == 0).all() and (types[first_sep + 1 : n] == 1).all()
        assert (ex["labels"][n:] == IGNORE_INDEX).all()


def test_span_corruption_density_and_mean_span(unigram):
    tok, store = unigram
    obj, examples = _examples("span", tok, store, seq_len=128)
    sentinels = set(tok.sentinel_ids)
    noise = spans = 0
    for ex in examples:
        targets = ex["labels"][ex["labels"] != IGNORE_INDEX]
        assert targets[-1] == tok.eos_id and targets[0] == tok.sentinel_ids[0]
        n_spans = sum(int(t in sentinels) for t in targets)
        assert n_spans == sum(int(t in sentinels) for t in ex["input_ids"])
        spans += n_spans
        noise += len(targets) - n_spans - 1
        assert int(ex["attention_mask"].sum()) == 128  # corrupted inputs fill seq_len exactly
    raw = obj.window * len(examples)
    assert abs(noise / raw - 0.15) <= 0.005
    assert abs(noise / spans - 3.0) <= 0.1


def test_span_noise_mask_statistics():
    rng = np.random.default_rng(0)
    masks = [span_noise_mask(500, 0.15, 3.0, rng) for _ in range(200)]
    density = np.mean([m.mean() for m in masks])
    n_spans = sum(int((m & ~np.concatenate([[False], m[:-1]])).sum()) for m in masks)
    assert abs(density - 0.15) <= 0.002
    assert abs(sum(m.sum() for m in masks) / n_spans - 3.0) <= 0.05
    assert t5_lengths(512, 0.15, 3.0) == (568, 114)  # T5's published numbers for inputs of 512


def test_infilling_replaces_spans_with_single_masks(unigram):
    tok, store = unigram
    _, examples = _examples("infilling", tok, store, seq_len=64, n=300)
    masked_share = []
    for ex in examples:
        inputs = ex["input_ids"][ex["attention_mask"] == 1]
        target = ex["labels"][ex["labels"] != IGNORE_INDEX]
        assert target[-1] == tok.eos_id and tok.mask_id in inputs
        kept = len(inputs) - int((inputs == tok.mask_id).sum())
        masked_share.append(1 - kept / len(target))
    assert 0.2 < np.mean(masked_share) < 0.4  # about 30% of tokens removed


def test_prefix_lm_ignores_the_prefix(bpe):
    tok, store = bpe
    _, examples = _examples("prefix-lm", tok, store, seq_len=64, n=500)
    splits = []
    for ex in examples:
        k = int(ex["prefix_lengths"])
        assert 1 <= k <= 63
        assert (ex["labels"][:k] == IGNORE_INDEX).all() and (ex["labels"][k:] == ex["input_ids"][k:]).all()
        splits.append(k)
    assert np.std(splits) > 10  # drawn, not fixed


def test_prefix_seq2seq_reads_the_prefix_and_predicts_every_later_token(unigram):
    """T5's prefix-LM objective for an encoder-decoder: the window's prefix (and </s>) in the encoder,
    every token after the split as the decoder's target, so its loss is the prefix-LM's question."""
    tok, store = unigram
    obj, examples = _examples("prefix-seq2seq", tok, store, seq_len=64, n=300)
    splits = []
    for u, ex in enumerate(examples):
        window = obj.chunk(u)
        inputs = ex["input_ids"][ex["attention_mask"] == 1]
        target = ex["labels"][ex["labels"] != IGNORE_INDEX]
        k = len(inputs) - 1
        assert inputs[-1] == tok.eos_id and (inputs[:-1] == window[:k]).all()
        assert (target == window[k:]).all() and k + len(target) == 64
        splits.append(k)
    assert min(splits) >= 1 and max(splits) <= 63 and np.std(splits) > 10


def test_clm_labels_are_the_inputs(bpe):
    tok, store = bpe
    _, examples = _examples("clm", tok, store, seq_len=32, n=10)
    assert all((e["labels"] == e["input_ids"]).all() and e["input_ids"].shape == (32,) for e in examples)


def test_batches_resume_exactly_and_masks_are_dynamic_only_for_roberta(wordpiece):
    tok, store = wordpiece
    obj = make_objective(ObjectiveConfig("mlm", 64), store, np.arange(store.n_docs), tok, "all")
    a = Batches(obj, 4, seed=1)
    for _ in range(5):
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(3)]
    b = Batches(obj, 4, seed=1)
    b.load_state_dict(state)
    for e, g in zip(expected, [b.next_batch() for _ in range(3)]):
        assert all(torch.equal(e[k], g[k]) for k in e)
    assert not np.array_equal(a.example(0, 0)["labels"], a.example(0, 1)["labels"])  # re-drawn per epoch
    nsp = make_objective(ObjectiveConfig("mlm-nsp", 64), store, np.arange(store.n_docs), tok, "all")
    s = Batches(nsp, 4, seed=1)
    assert np.array_equal(s.example(0, 0)["labels"], s.example(0, 5)["labels"])  # BERT: static masks


def test_objective_must_suit_the_family():
    from lmlab.data.objectives import check_objective
    from lmlab.errors import ConfigError

    with pytest.raises(ConfigError, match="objective 'mlm' trains encoder models, not 'decoder'"):
        check_objective("mlm", "decoder")


def test_doc_mask_examples_mark_each_tokens_document_and_do_not_predict_across(bpe, wordpiece):
    """--doc-mask: document ids from the separators (a separator ends its document); clm drops the label
    that would predict a document's first token from the previous one; prefix-lm gives every document
    its own prefix; RoBERTa's <s> and </s> join the first and last documents."""
    tok, store = bpe
    sep = tok.eos_id
    _, examples = _examples("clm", tok, store, seq_len=256, n=40, doc_mask=True)
    crossings = 0
    for ex in examples:
        ids, docs, labels = ex["input_ids"], ex["document_ids"], ex["labels"]
        assert docs[0] == 0 and (np.diff(docs) >= 0).all()
        starts = np.flatnonzero(np.diff(docs)) + 1
        assert (ids[starts - 1] == sep).all() and (docs[1:][ids[:-1] == sep] == docs[:-1][ids[:-1] == sep] + 1).all()
        assert (labels[starts] == IGNORE_INDEX).all()
        rest = np.setdiff1d(np.arange(len(ids)), starts)
        assert (labels[rest] == ids[rest]).all()
        crossings += len(starts)
    assert crossings > 10  # the windows do hold several documents
    _, examples = _examples("prefix-lm", tok, store, seq_len=256, n=40, doc_mask=True)
    for ex in examples:
        docs, prefix, labels = ex["document_ids"], ex["prefix_mask"], ex["labels"]
        for d in np.unique(docs):
            inside = np.flatnonzero(docs == d)
            k = int(prefix[inside].sum())
            assert k >= 1 and prefix[inside[:k]].all()  # a prefix at the document's start
            assert (labels[inside[:k]] == IGNORE_INDEX).all() and (labels[inside[k:]] != IGNORE_INDEX).all()
    wtok, wstore = wordpiece
    _, examples = _examples("mlm", wtok, wstore, seq_len=256, n=10, doc_mask=True)
    assert all(len(e["document_ids"]) == 256 and e["document_ids"][-1] == e["document_ids"][-2] for e in examples)
    with pytest.raises(Exception, match=r"--doc-mask: the mlm-nsp objective does not keep documents apart"):
        _examples("mlm-nsp", wtok, wstore, seq_len=64, n=1, doc_mask=True)  # refused before it reads anything


@pytest.mark.parametrize("name", ["span", "infilling", "prefix-seq2seq"])
def test_doc_mask_encoder_decoder_examples_give_both_sides_their_documents(unigram, name):
    """Every encoder token and every target token carries the document it comes from: the same documents
    on both sides, in order; and a T5 model takes the batch."""
    tok, store = unigram
    obj, examples = _examples(name, tok, store, seq_len=128, n=200, doc_mask=True)
    several = 0
    for ex in examples:
        source, target = ex["document_ids"], ex["decoder_document_ids"]
        assert len(source) == len(ex["input_ids"]) and len(target) == len(ex["labels"])
        assert (np.diff(source) >= 0).all() and (np.diff(target) >= 0).all()
        real = ex["attention_mask"] == 1
        labelled = ex["labels"] != IGNORE_INDEX
        assert set(source[real]) <= set(target[labelled]) | set(source[real][:1])
        several += len(set(source[real])) > 1
    assert several > 5  # windows do hold several documents
    from lmlab import Model
    from lmlab.config import preset

    cfg = preset("t5-tiny", vocab_size=tok.vocab_size, n_layers=1, d_model=32, n_heads=2, d_ff=64, **tok.model_ids())
    batch = obj.collate(examples[:4])
    out = Model(cfg)(**{k: v for k, v in batch.items()})
    assert torch.isfinite(out.loss)


def test_pretraining_with_doc_mask_trains_and_records_it(tmp_path):
    from lmlab.pretrain import PretrainConfig, pretrain
    from lmlab.settings import TrainConfig

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(DOCS[:60]) + "\n")
    pc = PretrainConfig(
        out=str(tmp_path / "run"), family="prefix-lm", data=[str(corpus)], seq_len=64, vocab_size=400,
        doc_mask=True, cache_dir=str(tmp_path / "cache"),
        model={"n_layers": 1, "d_model": 32, "n_heads": 2, "d_ff": 64},
        train=TrainConfig(max_steps=12, batch_size=4, log_every=4, eval_every=12, warmup_steps=0, lr=3e-3),
    )  # fmt: skip
    summary = pretrain(pc)
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())]
    assert summary["steps"] == 12 and losses[-1] < losses[0]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["pretrain"]["doc_mask"] is True


def test_document_masking_is_on_for_new_runs_where_documents_are_packed_and_off_for_old_ones(tmp_path):
    from lmlab.pretrain import PretrainConfig, prepare
    from lmlab.settings import resumed_pretrain_config

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(DOCS[:30]) + "\n")
    for family, objective, expected in (
        ("decoder", None, True),
        ("encoder", "mlm-nsp", False),
        ("encoder", "mlm", True),
    ):
        pc = PretrainConfig(
            out=str(tmp_path / f"{family}-{objective}"), family=family, objective=objective, data=[str(corpus)],
            vocab_size=400, cache_dir=str(tmp_path / "cache"),
        )  # fmt: skip
        assert prepare(pc)[0].doc_mask is expected, (family, objective)
    old = tmp_path / "old"  # a run recorded before document masking existed
    old.mkdir()
    record = PretrainConfig(out=str(old), family="decoder").to_dict()
    del record["doc_mask"]
    (old / "run.json").write_text(json.dumps({"pretrain": record}))
    assert resumed_pretrain_config(old).doc_mask is False
