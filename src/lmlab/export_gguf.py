"""GGUF files for llama.cpp (and ollama / LM Studio on top of it): an lmlab model with its tokenizer,
written with the ggml project's own Python writer (the `gguf` package: `pip install "lmlab[gguf]"`).

The weights go through the transformers layout lmlab already exports (lmlab.hf), then to llama.cpp's
tensor names by gguf's own name map, with the layout changes llama.cpp's converter makes: GPT-2's
Conv1D weights back to (out, in), and LLaMA's query / key rows from transformers' half-split rotary
order to the interleaved order llama.cpp's RoPE reads. The tokenizer is written in full: every token,
its type, the BPE merges, the special ids, and the pre-tokenizer named explicitly ("gpt-2": lmlab's
byte-level BPE splits text with GPT-2's regular expression), so llama.cpp never has to recognise the
vocabulary by checksum.

Written here: GPT-2-style decoders (learned positions, LayerNorm, GELU), LLaMA-style decoders (RoPE,
RMSNorm, SwiGLU, grouped-query attention) and Mixtral-style MoE decoders (LLaMA with top-k SwiGLU
experts: llama.cpp's "llama" architecture with its expert tensors stacked per layer), Qwen2-MoE-style
decoders (a gated shared expert beside them), and BERT-style encoders as embedding models (llama.cpp's
"bert" architecture, mean pooling, the WordPiece vocabulary in llama.cpp's word-start form). Every
other architecture is refused with the reason.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmlab.errors import ConfigError

QUANTS = ("f32", "f16", "q8_0", "q4_0")
# transformers model types written -> llama.cpp's architecture (llama.cpp runs Mixtral as LLaMA with experts)
ARCHS = {"gpt2": "gpt2", "llama": "llama", "mixtral": "llama", "qwen2_moe": "qwen2moe", "bert": "bert"}
WHY_NOT = {  # the families GGUF export refuses, and why
    "encoder": "llama.cpp runs BERT-style encoders (learned positions, LayerNorm, GELU) as embedding models",
    "encoder-decoder": "llama.cpp's T5 needs its SentencePiece vocabulary, and it has no BART or Switch "
    "Transformers architecture; not written yet",
    "prefix-lm": "a prefix-LM's bidirectional prefix has no llama.cpp architecture",
}


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _quant_types():
    import gguf

    q = gguf.GGMLQuantizationType
    return {
        "f32": (q.F32, gguf.LlamaFileType.ALL_F32),
        "f16": (q.F16, gguf.LlamaFileType.MOSTLY_F16),
        "q8_0": (q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
        "q4_0": (q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
    }


def _interleave_rotary(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a query / key projection from transformers' rotary order (each head's first half of
    dimensions, then its second half) to the interleaved pairs (x0, x1), (x2, x3)... llama.cpp uses."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _tensors(model: Any, model_type: str) -> list[tuple[str, torch.Tensor]]:
    """(llama.cpp name, float32 tensor in llama.cpp's layout) for every weight."""
    import re

    import gguf

    from lmlab.hf import lmlab_to_hf

    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[ARCHS[model_type].upper()], cfg.n_layers)
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    hf = lmlab_to_hf(state, cfg, model_type)
    rotary = model_type in ("llama", "mixtral")  # llama.cpp's Qwen2 rotates halves, as transformers does
    experts: dict[str, dict[int, torch.Tensor]] = {}  # "...experts.w1" -> expert index -> weight
    out: list[tuple[str, torch.Tensor]] = []
    for key, t in hf.items():
        if model_type == "bert":  # the encoder alone: llama.cpp runs it as an embedding model
            key = key.removeprefix("bert.")
            if key.startswith(("cls.", "classifier.", "qa_outputs.", "pooler.")):
                continue
        expert = re.fullmatch(r"(.*\.experts)\.(\d+)\.(\w+)\.weight", key)
        if expert:  # llama.cpp reads one (experts, rows, columns) tensor per projection and layer
            experts.setdefault(f"{expert[1]}.{expert[3]}.weight", {})[int(expert[2])] = t
            continue
        if model_type == "gpt2" and key.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            t = t.t()  # Conv1D stores (in, out)
        if rotary and key.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            t = _interleave_rotary(t, cfg.n_heads)
        if rotary and key.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            t = _interleave_rotary(t, cfg.kv_heads)
        out.append((_gguf_name(names, key, model_type), t.contiguous()))
    for key, per_expert in experts.items():
        stacked = torch.stack([per_expert[e] for e in sorted(per_expert)])
        out.append((_gguf_name(names, key, model_type), stacked.contiguous()))
    if model_type != "bert" and not any(n == "output.weight" for n, _ in out):
        # tied: llama.cpp reads the output projection by name
        out.append(("output.weight", state["tok_embed.weight"].contiguous()))
    return out


def _gguf_name(names: Any, key: str, model_type: str) -> str:
    name = names.get_name(key, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise ConfigError(f"GGUF: no llama.cpp tensor name for {key!r} ({model_type})")
    return name


def _tokenizer_metadata(writer: Any, tok: Any, n_vocab: int, source: str) -> None:
    import gguf

    data = json.loads(tok.backend.to_str())
    vocab = tok.backend.get_vocab(with_added_tokens=True)
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ConfigError(f"{source}: the tokenizer's ids are not contiguous from 0; GGUF lists tokens by id")
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = tok.special_ids | {a["id"] for a in data.get("added_tokens", []) if a.get("special")}
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))]
    if tok.kind == "wordpiece":
        # llama.cpp's WordPiece marks the start of a word, not its continuation: "##ing" -> "ing", and
        # "word" -> "\u2581word" (the phantom space), special tokens as they are
        tokens = [t if i in special else (t[2:] if t.startswith("##") else "\u2581" + t) for i, t in enumerate(tokens)]
    # llama.cpp takes its vocabulary size from the token list: embedding rows past the tokenizer's
    # tokens are listed as unused placeholders, as llama.cpp's own converter does
    tokens += [f"[PAD{i}]" for i in range(len(tokens), n_vocab)]
    types += [gguf.TokenType.UNUSED] * (len(tokens) - len(types))
    if tok.kind == "bpe":
        writer.add_tokenizer_model("gpt2")
        # GPT-2's pre-tokenizer regex: what tokenizers' ByteLevel(use_regex=True) splits by
        writer.add_tokenizer_pre("gpt-2")
    else:
        writer.add_tokenizer_model("bert")
        writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if tok.kind == "bpe":
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])])
    roles = {"pad": writer.add_pad_token_id, "unk": writer.add_unk_token_id, "mask": writer.add_mask_token_id}
    if tok.kind == "bpe":
        roles |= {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id}
    else:  # BERT's [CLS] text [SEP]: llama.cpp adds [CLS] as its BOS and [SEP] as its separator
        roles |= {"cls": writer.add_bos_token_id, "sep": writer.add_sep_token_id}
    for role, add in roles.items():
        if tok.id_of(role) is not None:
            add(tok.id_of(role))
    # lmlab's BPE encoding adds no special tokens, so neither does llama.cpp; WordPiece adds [CLS] and [SEP]
    writer.add_add_bos_token(tok.kind == "wordpiece")
    writer.add_add_eos_token(False)
    if tok.kind == "wordpiece":
        writer.add_add_sep_token(True)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


def write_gguf(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], quantize: str = "f16", force: bool = False
) -> dict[str, Any]:
    """Write the model folder (or checkpoint) `src` with its tokenizer as one GGUF file `dst`.
    quantize: f32 | f16 | q8_0 | q4_0 for the 2-D weights (norms and biases stay float32, as llama.cpp's
    own converter keeps them). Returns what was written."""
    try:
        import gguf
    except ImportError:
        raise ConfigError('GGUF export needs the gguf package: pip install "lmlab[gguf]"') from None
    from lmlab.hf import hf_model_type
    from lmlab.io import load, resolve
    from lmlab.tokenizer import load_tokenizer

    if quantize not in QUANTS:
        raise ConfigError(f"--quantize {quantize!r} is unknown for GGUF; expected one of {', '.join(QUANTS)}")
    dst = Path(dst)
    if dst.exists() and not force:
        raise ConfigError(f"{dst} exists; pass --force to replace it")
    model = load(src)
    cfg = model.config
    if cfg.family not in ("decoder", "encoder"):
        raise ConfigError(
            f"GGUF export writes decoders (GPT-2, LLaMA, Mixtral and Qwen2-MoE style) and BERT-style encoders; "
            f"{src} is {_a(cfg.family)} model: {WHY_NOT[cfg.family]}"
        )
    try:
        model_type = hf_model_type(cfg)
    except ConfigError as e:  # llama.cpp's graphs are transformers' architectures: the same exactness
        raise ConfigError(f"GGUF export: {src}: {e}") from None
    if model_type not in ARCHS:
        why = f": {WHY_NOT[cfg.family]}" if cfg.family == "encoder" else ""
        raise ConfigError(f"GGUF export: {src} maps to transformers' {model_type}, which is not written{why}")
    folder = resolve(src)
    if folder.parent.name == "checkpoints" and not (folder / "tokenizer.json").is_file():
        folder = folder.parent.parent
    tok = load_tokenizer(folder)
    wants = "bpe" if cfg.family == "decoder" else "wordpiece"
    if tok.kind != wants:
        kind = {"bpe": "a byte-level BPE", "wordpiece": "a WordPiece"}[wants]
        raise ConfigError(f"{src}: {_a(cfg.family)}'s GGUF takes {kind} vocabulary; this one is {tok.kind}")
    if tok.vocab_size > cfg.vocab_size:
        raise ConfigError(f"{src}: the tokenizer has {tok.vocab_size} tokens, the model's embedding {cfg.vocab_size}")

    qtype, file_type = _quant_types()[quantize]
    tmp = dst.with_name(dst.name + ".partial")
    writer = gguf.GGUFWriter(tmp, ARCHS[model_type])
    writer.add_name(cfg.name or Path(str(src)).name)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length((cfg.moe_d_ff or cfg.d_ff) if model_type == "mixtral" else cfg.d_ff)
    writer.add_head_count(cfg.n_heads)
    writer.add_vocab_size(cfg.vocab_size)
    notes = []
    if model_type == "bert":  # an embedding model: bidirectional, mean-pooled as lmlab.embed pools
        writer.add_layer_norm_eps(cfg.norm_eps)
        writer.add_causal_attention(False)
        writer.add_pooling_type(gguf.PoolingType.MEAN)
        writer.add_token_type_count(cfg.type_vocab_size or 1)
        notes.append("llama.cpp runs it as an embedding model (mean pooling); its MLM / task heads are not written")
    elif model_type == "gpt2":
        writer.add_layer_norm_eps(cfg.norm_eps)
        if cfg.activation != "gelu_tanh":
            notes.append(
                f"llama.cpp's GPT-2 graph computes GELU with the tanh approximation; this model uses {cfg.activation}"
            )
    else:
        writer.add_head_count_kv(cfg.n_kv_heads or cfg.n_heads)
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_rope_dimension_count(cfg.dim_head)
        if cfg.head_dim is not None and cfg.head_dim * cfg.n_heads != cfg.d_model:
            writer.add_key_length(cfg.head_dim)
            writer.add_value_length(cfg.head_dim)
        if model_type in ("mixtral", "qwen2_moe"):
            writer.add_expert_count(cfg.moe_experts)
            writer.add_expert_used_count(cfg.moe_top_k)
        if model_type == "qwen2_moe":
            writer.add_expert_feed_forward_length(cfg.moe_d_ff or cfg.d_ff)
            shared = cfg.moe_shared_d_ff or (cfg.moe_d_ff or cfg.d_ff) * cfg.moe_shared_experts
            writer.add_expert_shared_feed_forward_length(shared)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _tokenizer_metadata(writer, tok, cfg.vocab_size, str(src))
    kinds: dict[str, int] = {}
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    for name, t in _tensors(model, model_type):
        data = t.numpy().astype(np.float32)
        if data.ndim < 2 or qtype == gguf.GGMLQuantizationType.F32:
            kind = gguf.GGMLQuantizationType.F32
        elif qtype != gguf.GGMLQuantizationType.F16 and data.shape[-1] % block:
            kind = gguf.GGMLQuantizationType.F16  # rows that do not fill whole quantization blocks
        else:
            kind = qtype
        if kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, data)
        elif kind == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, data.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
        kinds[kind.name] = kinds.get(kind.name, 0) + 1
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(tmp, dst)  # whole or not at all
    return {
        "out": dst,
        "architecture": ARCHS[model_type],
        "quantize": quantize,
        "tensors": kinds,
        "bytes": dst.stat().st_size,
        "notes": notes,
    }
