"""Tokenizers: train WordPiece / byte-level BPE / Unigram with Hugging Face `tokenizers`, or load one.

`Tokenizer` wraps a `tokenizers.Tokenizer` and knows which token plays which role (pad, mask,
sentinels, ...). It saves as tokenizer.json + tokenizer_config.json, which transformers'
`PreTrainedTokenizerFast` / `AutoTokenizer` also read.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as Backend

from lmlab.errors import CheckpointError, ConfigError
from lmlab.families import TOKENIZER_KINDS

KINDS = TOKENIZER_KINDS
ROLES = ("pad", "unk", "cls", "sep", "mask", "bos", "eos")
N_SENTINELS = 100
# the special tokens each kind is trained with, by role; sentinels are extra for unigram (T5)
SPECIALS = {
    "wordpiece": {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"},
    "bpe": {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "pad": "<pad>", "mask": "<mask>"},
    "unigram": {"pad": "<pad>", "eos": "</s>", "unk": "<unk>", "mask": "<mask>"},
}
# one vocabulary for every family (lmlab compare): byte-level BPE with RoBERTa / BART's role tokens
# (<s> starts an encoder's input and pools it, </s> ends segments and documents, <mask> for MLM)
# and T5's sentinels, so all contenders read the same ids
SHARED_SPECIALS = {"pad": "<pad>", "cls": "<s>", "bos": "<s>", "sep": "</s>", "eos": "</s>", "mask": "<mask>"}
# role names as transformers' tokenizer_config.json writes them
_HF_ROLE = {r: f"{r}_token" for r in ROLES}


class Tokenizer:
    """A trained tokenizer plus the roles of its special tokens."""

    def __init__(
        self,
        backend: Backend,
        kind: str,
        specials: dict[str, str],
        sentinels: list[str] | None = None,
        chat_template: str | None = None,
    ):
        self.backend, self.kind, self.specials = backend, kind, dict(specials)
        self.sentinels = list(sentinels or [])
        self.chat_template = chat_template  # Jinja source (lmlab.chat), saved in tokenizer_config.json
        for role, tok in self.specials.items():
            if backend.token_to_id(tok) is None:
                raise CheckpointError(f"tokenizer: the {role} token {tok!r} is not in the vocabulary")

    # ---- ids ---------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def id_of(self, role: str) -> int | None:
        tok = self.specials.get(role)
        return None if tok is None else self.backend.token_to_id(tok)

    pad_id = property(lambda self: self.id_of("pad"))
    unk_id = property(lambda self: self.id_of("unk"))
    cls_id = property(lambda self: self.id_of("cls"))
    sep_id = property(lambda self: self.id_of("sep"))
    mask_id = property(lambda self: self.id_of("mask"))
    bos_id = property(lambda self: self.id_of("bos"))
    eos_id = property(lambda self: self.id_of("eos"))

    @property
    def sentinel_ids(self) -> list[int]:
        return [self.backend.token_to_id(t) for t in self.sentinels]

    @property
    def special_ids(self) -> set[int]:
        ids = {self.id_of(r) for r in self.specials} | set(self.sentinel_ids)
        return {i for i in ids if i is not None}

    def continuation_mask(self) -> torch.Tensor:
        """(V,) True for tokens that continue a word (WordPiece '##x'; BPE/Unigram pieces without a word-start mark)."""
        vocab = self.backend.get_vocab(with_added_tokens=True)
        out = torch.zeros(self.vocab_size, dtype=torch.bool)
        for tok, i in vocab.items():
            if i in self.special_ids:
                continue
            if self.kind == "wordpiece":
                out[i] = tok.startswith("##")
            elif self.kind == "bpe":
                out[i] = not tok.startswith("Ġ")
            elif self.kind == "unigram":
                out[i] = not tok.startswith("▁")
        return out

    def model_ids(self) -> dict[str, int | None]:
        """Special ids in ModelConfig's field names."""
        return {
            "pad_token_id": self.pad_id,
            "unk_token_id": self.unk_id,
            "cls_token_id": self.cls_id,
            "sep_token_id": self.sep_id,
            "mask_token_id": self.mask_id,
            "bos_token_id": self.bos_id,
            "eos_token_id": self.eos_id,
        }

    def add_special_tokens(self, tokens: list[str]) -> int:
        """Add tokens the text can never split (e.g. a chat template's markers) at the end of the
        vocabulary; returns how many were new. A model reading the ids needs as many embedding rows
        (`Model.resize_token_embeddings(tok.vocab_size)`)."""
        new = [t for t in tokens if self.backend.token_to_id(t) is None]
        if new:
            self.backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in new])
        return len(new)

    def template_variables(self) -> dict[str, str]:
        """The special tokens a chat template may use, named as transformers passes them (bos_token, ...)."""
        return {_HF_ROLE[r]: t for r, t in self.specials.items()}

    # ---- text --------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_many(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        """Encode in parallel (the Rust backend uses every core)."""
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token(self, i: int) -> str:
        return self.backend.id_to_token(i)

    # ---- files -------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike[str]) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "lmlab_kind": self.kind,
            "additional_special_tokens": self.sentinels,
        }
        cfg.update({_HF_ROLE[r]: t for r, t in self.specials.items()})
        if self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def _backend(kind: str, lowercase: bool) -> Backend:
    """An untrained tokenizer of `kind` with its normaliser, pre-tokenizer and decoder."""
    if kind == "wordpiece":
        tok = Backend(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
        # BERT's normaliser puts spaces around every CJK character, so each becomes its own word
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
        )
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        return tok
    if kind == "bpe":
        tok = Backend(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        return tok
    tok = Backend(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else []))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return tok


def train_tokenizer(
    kind: str,
    texts: Iterable[str],
    vocab_size: int,
    *,
    lowercase: bool | None = None,
    min_frequency: int = 2,
    n_sentinels: int = N_SENTINELS,
    length: int | None = None,
) -> Tokenizer:
    """Train a tokenizer of `kind` on an iterable of documents.

    wordpiece: BERT's (lower-cased by default, CJK characters split one by one, [CLS] x [SEP] template);
    bpe: GPT-2's byte-level BPE (all 256 bytes in the vocabulary, so no text is ever <unk>);
    unigram: T5's SentencePiece-style Unigram with </s> appended and <extra_id_N> sentinels.
    """
    if kind not in KINDS:
        raise ConfigError(f"tokenizer kind {kind!r} is unknown; expected one of {', '.join(KINDS)}")
    roles = SPECIALS[kind]
    sentinels = [f"<extra_id_{i}>" for i in range(n_sentinels)] if kind == "unigram" else []
    specials = list(dict.fromkeys(roles.values())) + sentinels
    lower = (kind == "wordpiece") if lowercase is None else lowercase
    if vocab_size <= len(specials) + (256 if kind == "bpe" else 0):
        raise ConfigError(
            f"vocab_size={vocab_size} is too small for a {kind} tokenizer with {len(specials)} special tokens"
        )
    if kind == "wordpiece":
        backend = _train_wordpiece(texts, vocab_size, min_frequency, specials, lower)
    elif kind == "bpe":
        backend = _backend(kind, lower)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(_nonempty(texts), trainer=trainer, length=length)
    else:
        backend = _train_unigram(texts, vocab_size, specials, roles["unk"], lower)
    if kind == "wordpiece":
        cls, sep = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
        )
    elif kind == "unigram":
        eos = backend.token_to_id("</s>")
        backend.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B:1 </s>:1", special_tokens=[("</s>", eos)]
        )
    return Tokenizer(backend, kind, roles, sentinels)


def train_shared_tokenizer(
    texts: Iterable[str], vocab_size: int, *, n_sentinels: int = N_SENTINELS, min_frequency: int = 2
) -> Tokenizer:
    """One byte-level BPE vocabulary that holds every family's special tokens (SHARED_SPECIALS and
    T5's <extra_id_N> sentinels), so an encoder, a decoder, an encoder-decoder and a prefix-LM trained
    on the same text read the same ids. Encoding adds no special tokens; each objective and task
    places them itself."""
    sentinels = [f"<extra_id_{i}>" for i in range(n_sentinels)]
    specials = list(dict.fromkeys(SHARED_SPECIALS.values())) + sentinels
    if vocab_size <= len(specials) + 256:
        raise ConfigError(
            f"vocab_size={vocab_size} is too small for a shared tokenizer: 256 bytes and {len(specials)} "
            "special tokens need more"
        )
    backend = _backend("bpe", False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_nonempty(texts), trainer=trainer)
    return Tokenizer(backend, "bpe", SHARED_SPECIALS, sentinels)


# Private-use code points stand in for characters while a WordPiece vocabulary trains (_train_wordpiece)
_STAND_INS = (range(0xF0000, 0xFFFFE), range(0x100000, 0x10FFFE), range(0xE000, 0xF900))


class _StandIns:
    """Each character, as the first of a word and inside one, gets its own private-use stand-in, handed
    out in the order the corpus first shows it (for str.translate; `back` undoes it)."""

    def __init__(self) -> None:
        self._free = (chr(c) for r in _STAND_INS for c in r)
        self.first, self.inner = _Table(self, ""), _Table(self, "##")
        self.back: dict[str, tuple[str, str]] = {}  # stand-in -> (prefix, character)

    def take(self, ch: str, prefix: str) -> str:
        stand_in = next(self._free, None)
        if stand_in is None:
            raise ConfigError(
                "the corpus has more distinct characters than a WordPiece vocabulary can be trained on "
                f"({sum(len(r) for r in _STAND_INS) // 2:,})"
            )
        self.back[stand_in] = (prefix, ch)
        return stand_in

    def word(self, w: str) -> str:
        return w[0].translate(self.first) + w[1:].translate(self.inner)

    def token(self, t: str) -> str:
        """A trained token's WordPiece text: '##' and the characters for one that continues a word."""
        return self.back[t[0]][0] + "".join(self.back[c][1] for c in t)


class _Table(dict):
    def __init__(self, stand_ins: _StandIns, prefix: str) -> None:
        super().__init__()
        self.stand_ins, self.prefix = stand_ins, prefix

    def __missing__(self, code: int) -> str:
        self[code] = self.stand_ins.take(chr(code), self.prefix)
        return self[code]


def _train_wordpiece(
    texts: Iterable[str], vocab_size: int, min_frequency: int, specials: list[str], lowercase: bool
) -> Backend:
    """A WordPiece vocabulary trained the way `tokenizers`' WordPieceTrainer trains one (BPE merges over
    words whose inner characters carry '##'), made deterministic.

    That trainer numbers the '##x' symbols in hash-map order, which differs per process; merges whose
    counts tie are then broken by those numbers, so the same corpus gave different vocabularies from
    run to run. Here every character becomes a private-use stand-in, one for word-initial and one for
    inner use, and the plain BPE trainer (deterministic: it numbers its alphabet in character order)
    learns merges over the stand-ins; its tokens are translated back into WordPiece text."""
    backend = _backend("wordpiece", lowercase)
    normalize, split = backend.normalizer.normalize_str, backend.pre_tokenizer.pre_tokenize_str
    stand_ins = _StandIns()

    def words() -> Iterator[str]:
        for text in _nonempty(texts):
            yield " ".join(stand_ins.word(w) for w, _ in split(normalize(text)))

    bpe = Backend(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials, show_progress=False
    )
    bpe.train_from_iterator(words(), trainer=trainer)
    learned = sorted({stand_ins.token(t) for t in bpe.get_vocab(with_added_tokens=False) if t not in specials})
    vocab = {t: i for i, t in enumerate(specials + learned)}  # specials first, then in text order
    backend.model = models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return backend


# SentencePiece's EM sums over threads, and the last bits of its scores follow their number: a fixed
# count makes the vocabulary the same on every machine
_SENTENCEPIECE_THREADS = 4


def _train_unigram(texts: Iterable[str], vocab_size: int, specials: list[str], unk: str, lowercase: bool) -> Backend:
    """A Unigram vocabulary trained by SentencePiece (T5's own trainer), then served by `tokenizers`.

    `tokenizers`' UnigramTrainer breaks ties in hash-map order and sums its EM in parallel, so the same
    corpus gave different pieces and scores from run to run; SentencePiece's trainer is deterministic
    for a fixed thread count. The text is normalised by the backend's own normaliser first, and
    SentencePiece's whitespace handling (a '▁' before every word, pieces never crossing one) is the
    Metaspace pre-tokenizer's."""
    import sentencepiece as spm

    backend = _backend("unigram", lowercase)
    normalize = backend.normalizer.normalize_str
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=(normalize(t) for t in _nonempty(texts)),
            model_writer=model,
            model_type="unigram",
            vocab_size=vocab_size - len(specials) + 1,  # SentencePiece counts its own <unk>
            character_coverage=1.0,
            normalization_rule_name="identity",
            add_dummy_prefix=True,
            remove_extra_whitespaces=False,
            max_sentencepiece_length=16,
            max_sentence_length=1 << 30,
            hard_vocab_limit=False,
            unk_id=0,
            unk_piece=unk,
            bos_id=-1,
            eos_id=-1,
            pad_id=-1,
            num_threads=_SENTENCEPIECE_THREADS,
            minloglevel=2,
        )
    except RuntimeError as e:
        if "smaller than required_chars" in str(e):
            raise ConfigError(
                f"vocab_size={vocab_size} is smaller than the number of distinct characters in the "
                "corpus (CJK text has thousands); raise the vocabulary size"
            ) from None
        raise ConfigError(f"training a unigram tokenizer failed: {e}") from None
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    taken = set(specials)
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size()) if i != sp.unk_id()]
    vocab = [(t, 0.0) for t in specials] + [(p, score) for p, score in pieces if p not in taken]
    backend.model = models.Unigram(vocab, unk_id=specials.index(unk), byte_fallback=False)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return backend


def _nonempty(texts: Iterable[str]) -> Iterator[str]:
    for t in texts:
        if t:
            yield t


_GUESS = {
    "pad": ("[PAD]", "<pad>"),
    "unk": ("[UNK]", "<unk>"),
    "cls": ("[CLS]", "<s>"),
    "sep": ("[SEP]", "</s>"),
    "mask": ("[MASK]", "<mask>"),
    "bos": ("<s>", "<|endoftext|>"),
    "eos": ("</s>", "<|endoftext|>"),
}


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Load tokenizer.json (or a folder with tokenizer.json, or a BERT vocab.txt) and its special-token roles."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    file = path / "tokenizer.json" if path.is_dir() else path
    if file.name == "tokenizer.json" and file.is_file():
        try:
            backend = Backend.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise CheckpointError(f"{file}: not a readable tokenizer.json ({e})") from None
    elif (folder / "vocab.txt").is_file():  # a bare BERT WordPiece vocabulary
        from tokenizers.implementations import BertWordPieceTokenizer

        backend = BertWordPieceTokenizer(str(folder / "vocab.txt"), lowercase=True)._tokenizer
    else:
        raise CheckpointError(f"{path}: no tokenizer.json or vocab.txt found")
    backend.no_padding()
    backend.no_truncation()
    cfg: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            try:
                cfg.update(json.loads((folder / name).read_text(encoding="utf-8")))
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{folder / name}: line {e.lineno}: not valid JSON ({e.msg})") from None
    specials: dict[str, str] = {}
    for role in ROLES:
        tok = cfg.get(_HF_ROLE[role])
        if isinstance(tok, dict):  # transformers sometimes writes AddedToken objects
            tok = tok.get("content")
        if tok is None and "lmlab_kind" not in cfg:  # lmlab writes every role; guess only for others
            tok = next((t for t in _GUESS[role] if backend.token_to_id(t) is not None), None)
        if tok is not None and backend.token_to_id(tok) is not None:
            specials[role] = tok
    kind = cfg.get("lmlab_kind") or _kind_of(backend)
    sentinels = [t if isinstance(t, str) else t.get("content") for t in cfg.get("additional_special_tokens", [])]
    sentinels = [t for t in sentinels if t and t.startswith("<extra_id_")]
    if not sentinels:
        sentinels = sorted(
            (t for t in backend.get_vocab() if t.startswith("<extra_id_")),
            key=lambda t: int(t[10:-1]) if t[10:-1].isdigit() else 0,
        )
    return Tokenizer(backend, kind, specials, sentinels, _chat_template(cfg, folder))


def _chat_template(cfg: dict, folder: Path) -> str | None:
    """A folder's chat template: tokenizer_config.json's `chat_template` (a string, or transformers' list
    of named templates, of which "default" is taken), else a chat_template.jinja file beside it."""
    template = cfg.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return template


def _kind_of(backend: Backend) -> str:
    model = json.loads(backend.to_str())["model"]["type"]
    return {"WordPiece": "wordpiece", "BPE": "bpe", "Unigram": "unigram"}.get(model, model.lower())


def encode_batch(
    tokenizer: Tokenizer, texts: list[str], max_length: int, pad_id: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and attention mask, (B, T), with the tokenizer's special tokens, cut at max_length."""
    rows = [e.ids[:max_length] for e in tokenizer.backend.encode_batch(texts)]
    pad = pad_id if pad_id is not None else (tokenizer.pad_id if tokenizer.pad_id is not None else 0)
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask
