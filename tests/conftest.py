"""Shared fixtures: tiny random transformers models built offline, and padded batches for them."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

transformers = pytest.importorskip("transformers")

VOCAB = 99
# every architecture lmlab imports, with the transformers config that builds a tiny one
TINY = {
    "bert": lambda: transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        num_labels=3,
        pad_token_id=0,
    ),
    "roberta": lambda: transformers.RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=66,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    ),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    ),
    "t5": lambda: transformers.T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_decoder_layers=3,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        decoder_start_token_id=0,
    ),
    "t5-gated": lambda: transformers.T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        decoder_start_token_id=0,
    ),
    "bart": lambda: transformers.BartConfig(
        vocab_size=VOCAB,
        d_model=32,
        encoder_layers=2,
        decoder_layers=3,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=37,
        decoder_ffn_dim=37,
        max_position_embeddings=64,
    ),
    "switch": lambda: transformers.SwitchTransformersConfig(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=40,
        num_layers=2,
        num_sparse_encoder_layers=1,
        num_decoder_layers=2,
        num_sparse_decoder_layers=1,
        num_heads=4,
        num_experts=4,
        expert_capacity=3,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        decoder_start_token_id=0,
    ),
    "mixtral": lambda: transformers.MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    ),
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    ),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=40,
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=3,
        mlp_only_layers=[0],
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    ),
}
ARCH_CONFIG = {
    "BertModel": "bert",
    "BertForMaskedLM": "bert",
    "BertForPreTraining": "bert",
    "BertForSequenceClassification": "bert",
    "RobertaForMaskedLM": "roberta",
    "GPT2LMHeadModel": "gpt2",
    "T5ForConditionalGeneration": "t5",
    "BartForConditionalGeneration": "bart",
    "BartForSequenceClassification": "bart",
    "SwitchTransformersForConditionalGeneration": "switch",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "LlamaForCausalLM": "llama",
}


def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Random init leaves norms at 1/0 and biases at 0; noise everywhere so every tensor matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("final_logits_bias"):
                b.add_(torch.randn(b.shape, generator=g) * 0.1)


def build_hf(arch: str, config_name: str | None = None, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = TINY[config_name or ARCH_CONFIG[arch]]()
    model = getattr(transformers, arch)(config).eval()
    perturb(model, seed)
    return model


def padded_batch(lengths: list[int], pad_id: int, seed: int = 0, low: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded random ids (never the pad id in real positions) and their attention mask."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(low, VOCAB, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return ids.masked_fill(mask == 0, pad_id), mask


@pytest.fixture
def hf_folder(tmp_path):
    """Save a tiny random transformers model to a temp folder: (folder, hf_model)."""

    def make(arch: str, config_name: str | None = None, **save_kw):
        model = build_hf(arch, config_name)
        folder = tmp_path / arch
        model.save_pretrained(folder, **save_kw)
        return folder, model

    return make


TINY_WORDS = "the a land people lord king city river house field water stone".split()


def tiny_config(base: str, tok):
    """A preset shrunk to 2 layers of width 64 with the tokenizer's vocabulary and special ids."""
    from lmlab.config import preset

    return preset(
        base, vocab_size=tok.vocab_size, n_layers=2, d_model=64, n_heads=2, d_ff=128, max_seq_len=64, **tok.model_ids()
    )


def random_decoder(tok, folder, max_seq_len: int, seed: int = 0, **save_kw):
    """A tiny random GPT (2 layers, width 64) for `tok` with a longer context, saved with its tokenizer
    in `folder` (save_pretrained's keywords, e.g. format="hf")."""
    import lmlab
    from lmlab.config import preset

    torch.manual_seed(seed)
    cfg = preset(
        "gpt2-tiny",
        vocab_size=tok.vocab_size,
        n_layers=2,
        d_model=64,
        n_heads=2,
        d_ff=128,
        max_seq_len=max_seq_len,
        **tok.model_ids(),
    )
    lmlab.Model(cfg).save_pretrained(folder, **save_kw)
    tok.save(folder)
    return folder


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """40 documents of the built-in corpus, blank-line separated (the distributed and checkpoint tests'
    text; test_trainer.py has a corpus of its own)."""
    from lmlab.data.corpus import demo_corpus, read_documents

    docs = [d for _, d in zip(range(40), read_documents(demo_corpus("kjv"), doc_sep="blank"))]
    path = tmp_path_factory.mktemp("kjv-corpus") / "corpus.txt"
    path.write_text("\n\n".join(docs) + "\n")
    return path


def tiny_text() -> list[str]:
    """A few hundred lines the tiny tokenizers are trained on: random words, then a refrain."""
    import random

    words = [*TINY_WORDS, "good", "bad", "Moses", "Aaron", "Egypt"]
    text = [" ".join(random.Random(i).choices(words, k=12)) for i in range(200)]
    return text + [f"and the lord said unto moses {i} let my people go into the land" for i in range(50)]


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory):
    """Tiny random decoder ("gpt"), encoder ("bert"), encoder-decoder ("t5") and prefix-LM ("prefix") folders, each with a tokenizer trained on a few
    hundred lines: what `lmlab pretrain` leaves behind, in a second."""
    import lmlab
    from lmlab.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("tiny-pretrained")
    text = tiny_text()
    out = {}
    for name, kind, base in (
        ("bert", "wordpiece", "bert-tiny"),
        ("gpt", "bpe", "gpt2-tiny"),
        ("t5", "unigram", "t5-tiny"),
        ("prefix", "bpe", "prefix-lm-tiny"),
    ):
        tok = train_tokenizer(kind, text, 400)
        torch.manual_seed(0)
        lmlab.Model(tiny_config(base, tok)).save_pretrained(root / name)
        tok.save(root / name)
        out[name] = root / name
    return out


def headless_chromium():
    """Debian's chromium through selenium, headless; the test is skipped where either is missing
    (.ci/run installs chromium and chromium-driver). The caller quits it."""
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(driver_path), options=opts)


def chat_files(folder, n: int, n_dev: int, seed: int = 0):
    """(train, dev) JSONL conversations in `folder`: the user says two tiny words, the assistant repeats
    them; the last `n_dev` of `n` are the dev file."""
    import json
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = " ".join(rng.choices(TINY_WORDS, k=2))
        rows.append({"messages": [{"role": "user", "content": words}, {"role": "assistant", "content": words}]})
    train, dev = folder / "chat-train.jsonl", folder / "chat-dev.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[: n - n_dev]))
    dev.write_text("".join(json.dumps(r) + "\n" for r in rows[n - n_dev :]))
    return train, dev


@pytest.fixture(scope="session")
def kjv_lines(tmp_path_factory):
    """800 verses of the built-in corpus, one document per line (the comparison tests' small corpus)."""
    import gzip

    from lmlab.data.corpus import demo_corpus

    lines = [v for v in gzip.open(demo_corpus("kjv"), "rt").read().splitlines() if v.strip()][:800]
    path = tmp_path_factory.mktemp("kjv") / "kjv.txt"
    path.write_text("\n".join(lines) + "\n")
    return path
