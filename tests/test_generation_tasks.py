"""Fine-tuning for generation: seq2seq (every generative family) and chat (templates, assistant-only
labels, `lmlab chat`). Metrics are checked against sacrebleu and rouge-score themselves, chat ids
against transformers' apply_chat_template on the saved folder."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_WORDS, chat_files, tiny_text

import lmlab
from lmlab import chat, metrics
from lmlab.cli import main
from lmlab.families import IGNORE_INDEX
from lmlab.finetune import FinetuneConfig, finetune, predict
from lmlab.tasks.base import pad_id
from lmlab.tasks.chat import encode_conversation, prepare_tokenizer, read_conversations
from lmlab.tasks.seq2seq import Layout, Seq2SeqData, encode_pairs, read_pairs
from lmlab.tokenizer import load_tokenizer
from lmlab.train.trainer import evaluate as teacher_forced

FIXTURES = Path(__file__).parent / "fixtures" / "tasks"
sacrebleu = pytest.importorskip("sacrebleu")
rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")


def _settings(**kw):
    base = dict(max_len=48, max_target_len=16, separator="\n\n###\n\n", source_prefix="", truncate=False, beams=1)
    return SimpleNamespace(**{**base, **kw})


def _copy_pairs(path, n, seed, k=3):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            words = " ".join(rng.choices(TINY_WORDS, k=k))
            f.write(json.dumps({"source": words, "target": words}) + "\n")
    return path


# ---- metrics --------------------------------------------------------------------------------------
def test_generation_metrics_equal_sacrebleu_and_rouge_score():
    rng = random.Random(0)
    words = "the lord said unto moses go and tell the people of the land that I am here".split()
    refs, preds = [], []
    for i in range(40):
        ref = [" ".join(rng.choices(words, k=rng.randint(4, 12))) + "." for _ in range(rng.randint(1, 3))]
        pred = [" ".join(w if rng.random() < 0.7 else rng.choice(words) for w in s[:-1].split()) + "." for s in ref]
        refs.append("\n".join(ref))  # multi-line summaries: one sentence per line
        preds.append("\n".join(pred) if i % 4 else "")  # some empty predictions too
    got = metrics.generation_scores(preds, refs)
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score, abs=1e-9)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(preds, [refs]).score, abs=1e-9)
    assert got["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    ref_scores = [scorer.score(r, p) for r, p in zip(refs, preds)]
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        expected = 100 * sum(s[key].fmeasure for s in ref_scores) / len(refs)
        assert got[key] == pytest.approx(expected, abs=1e-9), key
    assert got["rougeLsum"] != pytest.approx(got["rougeL"])  # sentence-level LCS differs from the whole-text one
    assert got["exact_match"] == 100 * sum(p == r for p, r in zip(preds, refs)) / len(refs)
    assert metrics.generation_scores(["a b c", "x"], ["a b c", "y"])["exact_match"] == 50.0


def test_rouge_lsum_splits_one_line_summaries_into_sentences():
    """A one-line multi-sentence summary is scored sentence by sentence, as rouge-score scores the same
    summary written one sentence per line."""
    ref = 'The king went to the city. He saw the river! "Why?" he asked. Then he left.'
    pred = "The king saw the city. He went to the river. He left."
    assert metrics.sentences(ref) == [
        "The king went to the city.",
        "He saw the river!",
        '"Why?" he asked.',
        "Then he left.",
    ]
    scorer = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=True)
    expected = scorer.score("\n".join(metrics.sentences(ref)), "\n".join(metrics.sentences(pred)))["rougeLsum"]
    unsplit = scorer.score(ref, pred)["rougeLsum"]
    got = metrics.generation_scores([pred], [ref])["rougeLsum"]
    assert got == pytest.approx(100 * expected.fmeasure) and expected.fmeasure != pytest.approx(unsplit.fmeasure)


# ---- seq2seq: reading and label masks ----------------------------------------------------------------
def test_pair_files_of_every_format_are_read(tmp_path):
    assert [p.target for p in read_pairs(FIXTURES / "pairs.jsonl")][1] == "You shall not steal."
    tsv = read_pairs(FIXTURES / "pairs.tsv", "kjv", "web")
    assert tsv[1].source == "Honour thy father and thy mother." and tsv[1].where.endswith("pairs.tsv:3")
    assert read_pairs(FIXTURES / "pairs.csv")[0].target == "You shall not murder."


@pytest.mark.parametrize("family", ["gpt", "prefix", "t5"])
def test_seq2seq_labels_cover_the_target_only(family, tiny_pretrained):
    tok = load_tokenizer(tiny_pretrained[family])
    cfg = lmlab.load(tiny_pretrained[family]).config
    pairs = read_pairs(FIXTURES / "pairs.jsonl")[1:2] + read_pairs(FIXTURES / "pairs.tsv", "kjv", "web")[:1]
    layout = Layout.of(tok, cfg, _settings(max_len=64, max_target_len=28, source_prefix="tr: "))
    rows, prompts, cut = encode_pairs(pairs, tok, layout, truncate=False)
    assert cut == {"sources": 0, "targets": 0}
    for pair, row, prompt in zip(pairs, rows, prompts):
        source = tok.encode("tr: " + pair.source, add_special_tokens=False)
        target = tok.encode(pair.target, add_special_tokens=False)
        labels = row["labels"].tolist()
        if family == "t5":  # encoder: source </s>; decoder labels: target </s>
            assert row["input_ids"].tolist() == source + [tok.eos_id] == prompt
            assert labels == target + [tok.eos_id]
            continue
        sep = tok.encode("\n\n###\n\n", add_special_tokens=False)
        assert prompt == source + sep and row["input_ids"].tolist() == source + sep + target + [tok.eos_id]
        assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)  # no source or separator token is labelled
        kept = [y for y in labels if y != IGNORE_INDEX]
        assert kept == target + [tok.eos_id] and tok.decode(kept) == pair.target
        assert row.get("prefix_lengths") == (len(prompt) if family == "prefix" else None)


def test_seq2seq_bad_input_names_file_line_and_limit(tiny_pretrained, tmp_path):
    gpt = tiny_pretrained["gpt"]
    tok, cfg = load_tokenizer(gpt), lmlab.load(gpt).config
    layout = Layout.of(tok, cfg, _settings(max_len=40, max_target_len=16))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"source": "a", "target": "b"}\n{"src": "a", "target": "b"}\n')
    with pytest.raises(lmlab.DataError, match=r"bad.jsonl:2: no 'source' field \(found 'src', 'target'\)"):
        read_pairs(bad)
    bad.write_text('{"source": "a", "target": "b"}\n\n{"source": "a", "target": "  "}\n')
    with pytest.raises(lmlab.DataError, match=r"bad.jsonl:3: the target \('target'\) is empty"):
        read_pairs(bad)
    bad.write_text(json.dumps({"source": "the land " * 30, "target": "b"}) + "\n")
    with pytest.raises(lmlab.DataError, match=r"bad.jsonl:1: the source has \d+ tokens; the limit is 17 source"):
        encode_pairs(read_pairs(bad), tok, layout, truncate=False)
    rows, prompts, cut = encode_pairs(read_pairs(bad), tok, layout, truncate=True)
    assert cut["sources"] == 1 and len(prompts[0]) == 17 + len(layout.separator)
    bad.write_text(json.dumps({"source": "a", "target": "the land " * 30}) + "\n")
    with pytest.raises(
        lmlab.DataError,
        match=r"bad.jsonl:1: the target has \d+ tokens \+ the end token; the limit is --max-target-len 16",
    ):
        encode_pairs(read_pairs(bad), tok, layout, truncate=False)
    labels = encode_pairs(read_pairs(bad), tok, layout, truncate=True)[0][0]["labels"].tolist()
    kept = [y for y in labels if y != IGNORE_INDEX]
    assert len(kept) == 16 and kept[-1] == tok.eos_id  # cut to --max-target-len, the end token kept
    with pytest.raises(lmlab.ConfigError, match="seq2seq needs a generative model"):
        Layout.of(load_tokenizer(tiny_pretrained["bert"]), lmlab.load(tiny_pretrained["bert"]).config, _settings())
    out = tmp_path / "o"
    with pytest.raises(lmlab.ConfigError, match="the encoder model cannot be fine-tuned for seq2seq"):
        finetune(FinetuneConfig(task="seq2seq", model=str(tiny_pretrained["bert"]), train=str(bad), out=str(out)))


# ---- seq2seq: training, evaluation, prediction ----------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt", "prefix", "t5"])
def test_seq2seq_finetunes_evaluates_and_predicts(family, tiny_pretrained, tmp_path, capsys):
    train, dev = _copy_pairs(tmp_path / "train.jsonl", 400, 0), _copy_pairs(tmp_path / "dev.jsonl", 24, 1)
    out = tmp_path / "ft"
    fc = FinetuneConfig(
        task="seq2seq",
        model=str(tiny_pretrained[family]),
        train=str(train),
        eval=str(dev),
        out=str(out),
        epochs={"gpt": 8, "prefix": 12, "t5": 3}[family],  # prefix-LMs learn to copy less steadily (5 seeds: EM 83-100)
        lr=3e-3,
        batch_size=16,
        max_len=64,
        max_target_len=32,
    )
    result = finetune(fc)
    ev = result["eval"]
    assert {
        "bleu",
        "chrf",
        "rouge1",
        "rouge2",
        "rougeL",
        "rougeLsum",
        "exact_match",
        "loss",
        "gen_tokens_per_s",
    } <= set(ev)
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 24 and records[0]["where"].endswith("dev.jsonl:1")
    again = metrics.generation_scores([r["prediction"] for r in records], [r["target"] for r in records])
    assert ev["chrf"] == pytest.approx(again["chrf"]) and ev["exact_match"] == pytest.approx(again["exact_match"])
    # per pair, for lmlab compare's intervals: sentence chrF keyed by the pair's line
    evidence = ev["evidence"]
    assert evidence["ids"] == [str(i) for i in range(1, 25)]
    assert evidence["num"] == pytest.approx(
        [sacrebleu.sentence_chrf(r["prediction"], [r["target"]]).score for r in records]
    )
    base, tok = lmlab.load(tiny_pretrained[family]), load_tokenizer(tiny_pretrained[family])
    rows = encode_pairs(read_pairs(dev), tok, Layout.of(tok, base.config, fc), truncate=False)[0]
    before = teacher_forced(base, [Seq2SeqData(rows, pad_id(tok), False).collate(rows)], torch.device("cpu"))
    assert ev["loss"] < before["loss"] - 1.0
    if family != "t5":  # decoders learn to copy three words (the tiny T5, character-level, learns slower)
        assert ev["exact_match"] >= 60 and ev["chrf"] >= 80
    preds = predict(str(out), str(dev), batch_size=16)
    assert [p["prediction"] for p in preds] == [r["prediction"] for r in records]
    assert main(["predict", "--model", str(out), "--data", str(dev), "--out", str(tmp_path / "p.jsonl")]) == 0
    lines = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [p["prediction"] for p in lines] == [r["prediction"] for r in records] and "target" in lines[0]


def test_seq2seq_beams_and_truncation_notes(tiny_pretrained, tmp_path):
    train = _copy_pairs(tmp_path / "train.jsonl", 40, 0, k=12)
    events = []
    result = finetune(
        FinetuneConfig(
            task="seq2seq",
            model=str(tiny_pretrained["gpt"]),
            train=str(train),
            eval=str(train),
            out=str(tmp_path / "ft"),
            epochs=1,
            lr=1e-3,
            max_len=40,
            max_target_len=12,
            truncate=True,
            beams=3,
        ),
        lambda kind, info: events.append(info["text"]) if kind == "note" else None,
    )
    assert any(n.startswith("--truncate cut 40 targets of the training file") for n in events)
    assert result["notes"] == events and result["eval"]["beams"] == 3


# ---- chat -------------------------------------------------------------------------------------------------
MULTI_TURN = json.loads((FIXTURES / "chat.jsonl").read_text().splitlines()[0])["messages"]


def _chat_tokenizer(folder, tmp_path):
    tok = load_tokenizer(folder)
    added = prepare_tokenizer(tok, None)
    tok.save(tmp_path / "tok")
    return tok, added


def test_default_chat_template_adds_its_tokens_and_matches_transformers(tiny_pretrained, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok, added = _chat_tokenizer(tiny_pretrained["gpt"], tmp_path)
    assert added == 2 and tok.chat_template == chat.DEFAULT_TEMPLATE
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")

    def hf_ids(messages, **kw):
        out = hf.apply_chat_template(messages, tokenize=True, **kw)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    ours = encode_conversation(tok, MULTI_TURN)["input_ids"]
    assert ours == hf_ids(MULTI_TURN)
    prompt = chat.render(tok.chat_template, MULTI_TURN[:2], add_generation_prompt=True, **tok.template_variables())
    assert tok.encode(prompt, add_special_tokens=False) == hf_ids(MULTI_TURN[:2], add_generation_prompt=True)
    assert hf.decode(ours) == chat.render(tok.chat_template, MULTI_TURN)
    assert load_tokenizer(tmp_path / "tok").chat_template == chat.DEFAULT_TEMPLATE


def test_a_custom_template_renders_like_transformers(tiny_pretrained, tmp_path):
    """A Llama-2-like template using bos / eos variables, loop controls and raise_exception."""
    transformers = pytest.importorskip("transformers")
    template = (
        "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
        "{% for message in messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('roles must alternate') }}{% endif %}"
        "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + (system + ' ' if loop.first and system else '')"
        " + message['content'] + ' [/INST]' }}"
        "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
    )
    file = tmp_path / "llama.jinja"
    file.write_text(template)
    tok = load_tokenizer(tiny_pretrained["gpt"])
    assert prepare_tokenizer(tok, str(file)) == 0
    tok.save(tmp_path / "tok")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    out = hf.apply_chat_template(MULTI_TURN, tokenize=True)
    assert encode_conversation(tok, MULTI_TURN)["input_ids"] == list(out["input_ids"] if hasattr(out, "keys") else out)
    row = encode_conversation(tok, MULTI_TURN)
    labelled = tok.decode([y for y in row["labels"] if y != IGNORE_INDEX], skip_special_tokens=False)
    assert labelled == " Hi there.<|endoftext|> Fine, thank you.<|endoftext|>"
    assert chat.end_of_turn(tok, template) == "<|endoftext|>"
    bad = MULTI_TURN[:2] + [MULTI_TURN[3]]
    with pytest.raises(
        lmlab.ConfigError, match="(?s)failed to render.*roles must alternate.*--- the template ---.*raise_exception"
    ):
        encode_conversation(tok, bad)


def test_chat_labels_cover_the_assistant_turns_only(tiny_pretrained, tmp_path):
    tok, _ = _chat_tokenizer(tiny_pretrained["gpt"], tmp_path)
    row = encode_conversation(tok, MULTI_TURN)
    labelled = [y for y in row["labels"] if y != IGNORE_INDEX]
    assert tok.decode(labelled, skip_special_tokens=False) == "Hi there.<|im_end|>Fine, thank you.<|im_end|>"
    assert tok.decode(labelled) == "Hi there.Fine, thank you."  # the assistant text, nothing of the other turns
    for start in (i for i, y in enumerate(row["labels"]) if y != IGNORE_INDEX):
        assert row["labels"][start] == row["input_ids"][start]


def test_chat_files_and_their_errors(tmp_path):
    convs = read_conversations(FIXTURES / "completion.jsonl")
    assert convs[0][1] == [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello."}]
    assert [m["role"] for m in convs[1][1]] == ["system", "user", "assistant"]
    bad = tmp_path / "bad.jsonl"
    cases = [
        ('{"messages": [{"role": "robot", "content": "x"}]}', r"bad.jsonl:2: message 0 has the unknown role 'robot'"),
        ('{"messages": [{"role": "user", "content": "x"}]}', r"bad.jsonl:2: the conversation has no assistant turn"),
        ('{"messages": [{"role": "user", "content": 3}]}', r"bad.jsonl:2: message 0: 'content' must be a string"),
        ('{"text": "x"}', r"bad.jsonl:2: expected a 'messages' list .* found 'text'"),
        ('{"prompt": "x", "completion": ""}', r"bad.jsonl:2: the completion is empty"),
    ]
    for line, message in cases:
        bad.write_text((FIXTURES / "chat.jsonl").read_text().splitlines()[1] + "\n" + line + "\n")
        with pytest.raises(lmlab.DataError, match=message):
            read_conversations(bad)


def test_resize_token_embeddings_keeps_old_logits():
    torch.manual_seed(0)
    model = lmlab.Model(lmlab.preset("gpt2-tiny", vocab_size=50, n_layers=1, d_model=32, n_heads=2, d_ff=64))
    ids = torch.randint(0, 50, (2, 7))
    before = model(ids).logits
    old = model.tok_embed.weight.detach().clone()
    model.resize_token_embeddings(53)
    after = model(ids).logits
    assert after.shape[-1] == 53 and model.config.vocab_size == 53
    torch.testing.assert_close(after[..., :50], before)
    torch.testing.assert_close(model.tok_embed.weight[50:], old.mean(0).expand(3, -1))


def test_chat_finetune_saves_template_and_stops_and_chats(tiny_pretrained, tmp_path, monkeypatch, capsys):
    train, dev = chat_files(tmp_path, 200, 4)
    out = tmp_path / "chat"
    notes = []
    result = finetune(
        FinetuneConfig(
            task="chat",
            model=str(tiny_pretrained["gpt"]),
            train=str(train),
            eval=str(dev),
            out=str(out),
            epochs=8,
            lr=3e-3,
            max_len=64,
            max_target_len=12,
        ),
        lambda kind, info: notes.append(info["text"]) if kind == "note" else None,
    )
    assert notes == ["added the chat template's special tokens <|im_start|>, <|im_end|>"]
    assert result["eval"]["token_accuracy"] > 0.5 and "chrf" in result["eval"]
    tok = load_tokenizer(out)
    model = lmlab.load(out)
    assert model.config.vocab_size == tok.vocab_size == load_tokenizer(tiny_pretrained["gpt"]).vocab_size + 2
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == chat.DEFAULT_TEMPLATE
    end = tok.backend.token_to_id("<|im_end|>")
    assert chat.stop_ids(out, tok) == [tok.eos_id, end]
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 4
    replies = predict(str(out), str(dev))
    evaluated = [json.loads(line)["prediction"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["reply"] for r in replies] == evaluated  # the reply to the context of the last assistant turn
    # one answer
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--chat", "the king", "--max-new-tokens", "8"]) == 0
    answer = capsys.readouterr().out.strip()
    assert answer and "<|im" not in answer
    session = chat.ChatSession(model, tok, chat.stop_ids(out, tok), system="Repeat.", max_new_tokens=8)
    session.reply("the king")
    assert [m["role"] for m in session.messages()] == ["system", "user", "assistant"]
    for _ in range(6):  # 64-token window: old turns must go, the system message stays
        session.reply("the land the river the city")
    assert session.messages()[0] == {"role": "system", "content": "Repeat."} and session.dropped > 0
    # the interactive command through a pipe
    monkeypatch.setattr(
        "sys.stdin", io.StringIO("the king\n/system Repeat.\n/bogus\nthe city\n/reset\n/quit\nnever read\n")
    )
    assert main(["chat", "--model", str(out), "--max-new-tokens", "6"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert text.count("assistant>") == 2 and "(system message set)" in text and "(conversation reset)" in text
    assert "unknown command /bogus" in text
    with pytest.raises(lmlab.ConfigError, match="has no chat template"):
        chat.ChatSession(lmlab.load(tiny_pretrained["gpt"]), load_tokenizer(tiny_pretrained["gpt"]), [0])


def test_length_defaults_fit_a_64_position_model_and_given_values_are_checked(tiny_pretrained, tmp_path, capsys):
    """The tiny decoder has 64 learned positions: finetune --task chat, generate --chat and eval run with
    their defaults (each saying once that it took less than the usual default); a value given is refused."""
    gpt, out, train = str(tiny_pretrained["gpt"]), tmp_path / "chat", tmp_path / "chat.jsonl"
    turns = [[{"role": "user", "content": w}, {"role": "assistant", "content": w}] for w in TINY_WORDS[:12]]
    train.write_text("".join(json.dumps({"messages": m}) + "\n" for m in turns))
    args = ["finetune", "--task", "chat", "--model", gpt, "--train", str(train), "--epochs", "1"]
    assert main([*args, "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert said.count("--max-len is 64 here, not the usual default of 128") == 1
    saved = json.loads((out / "finetune.json").read_text())["config"]
    assert (saved["max_len"], saved["max_target_len"]) == (64, 32)
    assert main(["generate", "--model", str(out), "--chat", "the king"]) == 0
    assert "--max-new-tokens is 32 here" in capsys.readouterr().err
    text = tmp_path / "text.txt"
    text.write_text("\n".join(tiny_text()[:40]) + "\n")
    assert main(["eval", "--model", gpt, "--data", str(text)]) == 0
    assert "--seq-len is 64 here" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "again"), "--max-len", "128"]) == 2
    assert "--max-len 128 is longer than the model's max_seq_len=64" in capsys.readouterr().err


def test_qa_and_seq2seq_length_defaults_fit_the_model(tiny_pretrained):
    from lmlab.finetune import fit_lengths

    small = lmlab.load(tiny_pretrained["bert"]).config  # 64 learned positions
    qa = FinetuneConfig(task="qa", model="m", train="t", out="o")
    notes = fit_lengths(qa, small)
    assert (qa.max_len, qa.doc_stride) == (64, 16) and len(notes) == 2
    big = small.replace(max_seq_len=512)
    qa = FinetuneConfig(task="qa", model="m", train="t", out="o")
    assert fit_lengths(qa, big) == [] and (qa.max_len, qa.max_target_len, qa.doc_stride) == (128, 64, 32)
    given = FinetuneConfig(task="qa", model="m", train="t", out="o", max_len=48, doc_stride=20)
    fit_lengths(given, small)
    assert (given.max_len, given.doc_stride) == (48, 20)


def test_chat_is_refused_for_encoder_decoders(tiny_pretrained, tmp_path):
    with pytest.raises(lmlab.ConfigError, match="encoder-decoder model cannot be fine-tuned for chat"):
        finetune(
            FinetuneConfig(
                task="chat", model=str(tiny_pretrained["t5"]), train=str(FIXTURES / "chat.jsonl"), out=str(tmp_path)
            )
        )


def test_prefix_lm_chat_sees_the_context_bidirectionally(tiny_pretrained, tmp_path):
    from lmlab.tasks.chat import encode_all

    tok, _ = _chat_tokenizer(tiny_pretrained["prefix"], tmp_path)
    rows, kept, counts = encode_all(read_conversations(FIXTURES / "chat.jsonl"), tok, 200, prefix=True, truncate=False)
    for row in rows:
        first = next(i for i, y in enumerate(row["labels"]) if y != IGNORE_INDEX)
        assert row["prefix_lengths"] == first
    with pytest.raises(
        lmlab.DataError, match=r"chat.jsonl:1: the conversation has \d+ tokens; the limit is --max-len 20"
    ):
        encode_all(read_conversations(FIXTURES / "chat.jsonl"), tok, 20, prefix=True, truncate=False)
    rows, kept, counts = encode_all(read_conversations(FIXTURES / "chat.jsonl"), tok, 20, prefix=True, truncate=True)
    assert counts["conversations cut"] == 2 and counts["conversations dropped"] + len(rows) == 2


def test_seq2seq_from_the_command_line(tiny_pretrained, tmp_path, capsys):
    train = tmp_path / "train.tsv"
    rng = random.Random(0)
    rows = ["archaic\tmodern"] + [" ".join(rng.choices(TINY_WORDS, k=3)) + "\tx" for _ in range(32)]
    train.write_text("\n".join(row.replace("\tx", "\t" + row.split("\t")[0]) for row in rows) + "\n")
    out = tmp_path / "ft"
    args = ["finetune", "--task", "seq2seq", "--model", str(tiny_pretrained["gpt"]), "--train", str(train)]
    args += ["--eval", str(train), "--out", str(out), "--source-field", "archaic", "--target-field", "modern"]
    assert main([*args, "--epochs", "1", "--max-len", "48", "--max-target-len", "16", "--separator", " = "]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "bleu" in text and "BLEU signature: nrefs:1|case:mixed" in text and "predictions.jsonl" in text
    saved = json.loads((out / "finetune.json").read_text())
    assert saved["layout"] == "decoder" and saved["config"]["separator"] == " = "
    assert main([*args, "--max-len", "48", "--max-target-len", "16", "--source-field", "nope"]) == 2
    assert "train.tsv:2: no 'nope' field" in " ".join(capsys.readouterr().err.split())
