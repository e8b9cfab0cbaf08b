"""ONNX folders for ONNX Runtime: an lmlab model as graphs exported with torch.onnx (dynamo), with its
tokenizer (`pip install "lmlab[onnx]"`).

What is written, by family (every input and output has a dynamic batch and length):

- encoders (and any model whose head is a task head): `model.onnx`, inputs `input_ids`, `attention_mask`
  (and `token_type_ids` when the model has segments); outputs `last_hidden_state`, `sentence_embedding`
  (mean over the real tokens, L2-normalised: what `lmlab.embed.sentence_embeddings` returns), `pooler_output`
  when the model has BERT's pooler, and the head's outputs (`logits`; `start_logits` / `end_logits` for
  span QA; `nsp_logits`).
- decoders and prefix-LMs with an lm head: `model.onnx` with the KV cache as inputs and outputs, in
  transformers' naming: inputs `input_ids`, `attention_mask` (past + new tokens), `position_ids`,
  (`prefix_lengths` for a prefix-LM) and `past_key_values.{i}.key` / `.value` of shape
  (batch, kv_heads, past, head_dim); outputs `logits` and `present.{i}.key` / `.value`. A first call
  passes a past of length 0.
- encoder-decoders: `encoder.onnx` (`input_ids`, `attention_mask` -> `last_hidden_state`) and
  `decoder.onnx` (`decoder_input_ids`, `decoder_attention_mask`, `decoder_position_ids`,
  `encoder_hidden_states`, `encoder_attention_mask` and the decoder's self-attention cache ->
  `logits` and `present.*`; the cross-attention keys are recomputed from `encoder_hidden_states` each
  call).

`onnx.json` beside the graphs names the files, inputs, outputs and the shapes of the cache. Optionally
the graphs go through ONNX Runtime's transformer optimizer (`optimize`) and are dynamically quantized
to int8 (`quantize="int8"`: int8 weights per channel, activations quantized at run time; written as
`*.int8.onnx` beside the float32 graphs). Mixture-of-Experts layers are refused: their grouped expert
GEMM takes data-dependent shapes the exporter cannot trace.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.errors import ConfigError

QUANTS = ("int8",)
OPSET = 18


class _ConcatKV:
    """One layer's cache as graph values: the past comes in as a tensor and leaves concatenated with
    the new keys and values (lmlab.model.attention.LayerKV's interface, without its in-place buffer)."""

    def __init__(self, k: torch.Tensor | None = None, v: torch.Tensor | None = None) -> None:
        self.k, self.v = k, v
        self.length = 0 if k is None else k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is not None:
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        self.k, self.v, self.length = k, v, k.shape[2]
        return k, v


class _GraphCache:
    """lmlab.model.attention.KVCache's interface over _ConcatKV layers; cross-attention layers start
    empty, so every call computes them from the encoder's states."""

    def __init__(self, past: tuple[torch.Tensor, ...], cross: bool) -> None:
        self.layers = [_ConcatKV(past[i], past[i + 1]) for i in range(0, len(past), 2)]
        self.cross = [_ConcatKV() for _ in self.layers] if cross else []

    @property
    def seen(self) -> int:
        return self.layers[0].length

    def flat(self) -> list[torch.Tensor]:
        return [t for layer in self.layers for t in (layer.k, layer.v)]


def _mean_embedding(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(h.dtype)[..., None]
    return F.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)


class EncoderGraph(nn.Module):
    """input ids -> hidden states, the sentence embedding and the head's outputs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.outputs = ["last_hidden_state", "sentence_embedding"]
        cfg = model.config
        if model.pooler is not None:
            self.outputs.append("pooler_output")
        if model.span_head is not None:
            self.outputs += ["start_logits", "end_logits"]
        elif any(h in cfg.heads for h in ("lm", "mlm", "classify", "tag")):
            self.outputs.append("logits")
        if model.nsp_head is not None:
            self.outputs.append("nsp_logits")

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        out = self.model(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        values = {
            "last_hidden_state": out.last_hidden_state,
            "sentence_embedding": _mean_embedding(out.last_hidden_state, attention_mask),
            "pooler_output": out.pooler_output,
            "start_logits": out.start_logits,
            "end_logits": out.end_logits,
            "logits": out.logits,
            "nsp_logits": out.nsp_logits,
        }
        return tuple(values[name] for name in self.outputs)


class DecoderGraph(nn.Module):
    """(new ids, mask over past + new, positions, past keys / values) -> logits and the grown cache."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.prefix = model, model.config.family == "prefix-lm"

    def forward(self, input_ids, attention_mask, position_ids, *rest):  # noqa: ANN001, ANN201 - graph signature
        prefix_lengths, past = (rest[0], rest[1:]) if self.prefix else (None, rest)
        cache = _GraphCache(past, cross=False)
        out = self.model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            prefix_lengths=prefix_lengths,
            past_key_values=cache,
        )
        return (out.logits, *cache.flat())


class Seq2SeqEncoderGraph(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encoder(
            self.model.embed(input_ids), self.model.default_positions(input_ids), None, attention_mask
        )[0]


class Seq2SeqDecoderGraph(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(  # noqa: ANN201 - graph signature
        self,
        decoder_input_ids,
        decoder_attention_mask,
        decoder_position_ids,
        encoder_hidden_states,
        encoder_attention_mask,
        *past,  # noqa: ANN001
    ):
        cache = _GraphCache(past, cross=True)
        out = self.model(
            attention_mask=encoder_attention_mask,
            encoder_outputs=encoder_hidden_states,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            decoder_position_ids=decoder_position_ids,
            past_key_values=cache,
        )
        return (out.logits, *cache.flat())


def _cache_names(n_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]


def graphs(model: nn.Module) -> list[dict[str, Any]]:
    """What to export for this model: for each graph its file, module, example inputs (names, tensors),
    dynamic axes and output names."""
    cfg = model.config
    Dim = torch.export.Dim
    batch, seq, past, src = Dim("batch"), Dim("sequence"), Dim("past_sequence"), Dim("encoder_sequence")
    total = Dim.AUTO  # past + new: named "total_sequence" after export
    B, T, P, S = 2, 5, 3, 7
    ids = torch.randint(0, min(cfg.vocab_size, 100), (B, T)) + 5
    if cfg.pad_token_id is not None:
        ids = ids.masked_fill(
            ids == cfg.pad_token_id, cfg.pad_token_id + 1 if cfg.pad_token_id + 1 < cfg.vocab_size else 1
        )
    ones = torch.ones(B, T, dtype=torch.long)
    kv = (B, cfg.kv_heads, P, cfg.dim_head)
    spec = cfg.spec
    if spec.seq2seq and cfg.task_head is None:
        n = cfg.decoder_layers
        enc_ids = torch.randint(5, min(cfg.vocab_size, 100), (B, S))
        enc = {
            "file": "encoder.onnx",
            "module": Seq2SeqEncoderGraph(model),
            "inputs": {"input_ids": enc_ids, "attention_mask": torch.ones(B, S, dtype=torch.long)},
            "dynamic": {"input_ids": {0: batch, 1: src}, "attention_mask": {0: batch, 1: src}},
            "outputs": ["last_hidden_state"],
        }
        inputs = {
            "decoder_input_ids": ids,
            "decoder_attention_mask": torch.ones(B, P + T, dtype=torch.long),
            "decoder_position_ids": torch.arange(P, P + T).expand(B, T).contiguous(),
            "encoder_hidden_states": torch.randn(B, S, cfg.d_model),
            "encoder_attention_mask": torch.ones(B, S, dtype=torch.long),
        }
        dynamic: dict[str, Any] = {
            "decoder_input_ids": {0: batch, 1: seq},
            "decoder_attention_mask": {0: batch, 1: total},
            "decoder_position_ids": {0: batch, 1: seq},
            "encoder_hidden_states": {0: batch, 1: src},
            "encoder_attention_mask": {0: batch, 1: src},
        }
        for name in _cache_names(n, "past_key_values"):
            inputs[name], dynamic[name] = torch.randn(kv), {0: batch, 2: past}
        dec = {
            "file": "decoder.onnx",
            "module": Seq2SeqDecoderGraph(model),
            "inputs": inputs,
            "dynamic": dynamic,
            "outputs": ["logits", *_cache_names(n, "present")],
        }
        return [enc, dec]
    if spec.has_decoder and not spec.seq2seq and "lm" in cfg.heads:
        inputs = {
            "input_ids": ids,
            "attention_mask": torch.ones(B, P + T, dtype=torch.long),
            "position_ids": torch.arange(P, P + T).expand(B, T).contiguous(),
        }
        dynamic = {
            "input_ids": {0: batch, 1: seq},
            "attention_mask": {0: batch, 1: total},
            "position_ids": {0: batch, 1: seq},
        }
        if cfg.family == "prefix-lm":
            inputs["prefix_lengths"], dynamic["prefix_lengths"] = torch.tensor([P + 2, P]), {0: batch}
        for name in _cache_names(cfg.n_layers, "past_key_values"):
            inputs[name], dynamic[name] = torch.randn(kv), {0: batch, 2: past}
        module = DecoderGraph(model)
        return [
            {
                "file": "model.onnx",
                "module": module,
                "inputs": inputs,
                "dynamic": dynamic,
                "outputs": ["logits", *_cache_names(cfg.n_layers, "present")],
            }
        ]
    if spec.seq2seq:
        raise ConfigError(
            f"ONNX export of an encoder-decoder with a {cfg.task_head} head is not written yet "
            "(export the seq2seq model, or an encoder)"
        )
    module = EncoderGraph(model)
    inputs = {"input_ids": ids, "attention_mask": ones}
    dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    if model.encoder is not None and model.encoder.type_embed is not None:
        inputs["token_type_ids"], dynamic["token_type_ids"] = torch.zeros(B, T, dtype=torch.long), {0: batch, 1: seq}
    return [{"file": "model.onnx", "module": module, "inputs": inputs, "dynamic": dynamic, "outputs": module.outputs}]


def _dynamic_shapes(g: dict[str, Any]) -> tuple[Any, ...]:
    """The dynamic axes in the structure of the graph's forward: one entry per named parameter, then
    the variadic cache inputs as one tuple."""
    import inspect

    params = inspect.signature(g["module"].forward).parameters.values()
    fixed = sum(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)
    axes = [g["dynamic"].get(n, {}) for n in g["inputs"]]
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return (*axes[:fixed], tuple(axes[fixed:]))
    return tuple(axes)


def _name_dims(path: Path) -> None:
    """Give the axes torch.export named by itself (past + new) a readable name, and check the graph."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    names = {"batch", "sequence", "past_sequence", "encoder_sequence"}
    for value in list(proto.graph.input) + list(proto.graph.output):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param and dim.dim_param not in names:
                dim.dim_param = "total_sequence"
    onnx.save(proto, str(path))


def _optimize(path: Path) -> dict[str, int]:
    """ONNX Runtime's transformer fusions, in place (attention into MultiHeadAttention, residual + norm into
    SkipLayerNormalization, GELU, rotary embeddings...): the fusion pass onnxscript keeps for the graphs
    torch.onnx's dynamo exporter writes. Returns how often each fusion applied. (ONNX Runtime's older
    `onnxruntime.transformers.optimizer` was written for TorchScript exports: on these graphs it fuses
    only GELU and LayerNorm, and its GPT-2 pass fails on a bias-free projection.)"""
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model, counts = optimize_for_ort(ir.load(str(path)))
    ir.save(model, str(path))
    return {k: v for k, v in counts.items() if v}


def _quantize(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True)


def write_onnx(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    optimize: bool = False,
    quantize: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Export the model folder (or checkpoint) `src` to the folder `dst`: the ONNX graph(s), `onnx.json`
    and the tokenizer. Returns what was written."""
    try:
        import onnx  # noqa: F401
        import onnxscript
    except ImportError:
        raise ConfigError('ONNX export needs onnx and onnxscript: pip install "lmlab[onnx]"') from None
    from lmlab.io import load, resolve

    if quantize is not None and quantize not in QUANTS:
        raise ConfigError(f"--quantize {quantize!r} is unknown for ONNX; expected one of {', '.join(QUANTS)}")
    dst = Path(dst)
    if dst.exists() and not force:
        raise ConfigError(f"{dst} exists; pass --force to replace it")
    model = load(src).float().eval()
    cfg = model.config
    if cfg.ffn != "dense":
        raise ConfigError(
            f"ONNX export of Mixture-of-Experts layers is not written: {src}'s grouped expert GEMM takes "
            "data-dependent shapes that torch.export cannot trace"
        )
    if getattr(model, "decoding", None) is not None or any(type(m).__name__ == "Int8Linear" for m in model.modules()):
        raise ConfigError(f"{src}: export the float32 model; ONNX Runtime quantizes it (--quantize int8)")
    if optimize and cfg.family != "encoder":
        raise ConfigError(
            f"--optimize applies to encoders; {src} is a {cfg.family} model: onnxscript {onnxscript.__version__}'s "
            "attention fusion breaks graphs with a KV cache (ONNX Runtime then fails with a FusedMatMul "
            "dimension mismatch), and an unfused graph is what ONNX Runtime runs correctly"
        )
    folder = resolve(src)
    if folder.parent.name == "checkpoints" and not (folder / "config.json").is_file():
        folder = folder.parent.parent

    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    written: list[dict[str, Any]] = []
    for g in graphs(model):
        path = tmp / g["file"]
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                g["module"],
                tuple(g["inputs"].values()),
                str(path),
                input_names=list(g["inputs"]),
                output_names=g["outputs"],
                dynamic_shapes=_dynamic_shapes(g),
                opset_version=OPSET,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        _name_dims(path)
        entry: dict[str, Any] = {"file": g["file"], "inputs": list(g["inputs"]), "outputs": g["outputs"]}
        if optimize:
            entry["fused"] = _optimize(path)
        if quantize == "int8":
            entry["int8"] = path.with_suffix(".int8.onnx").name
            _quantize(path, tmp / entry["int8"])
        written.append(entry)

    manifest = {
        "format": "lmlab-onnx",
        "family": cfg.family,
        "heads": list(cfg.heads),
        "opset": OPSET,
        "graphs": written,
        "cache": {
            "layers": cfg.decoder_layers if cfg.spec.seq2seq else cfg.n_layers,
            "kv_heads": cfg.kv_heads,
            "head_dim": cfg.dim_head,
        },
        "pad_token_id": cfg.pad_token_id,
        "eos_token_id": cfg.eos_token_id,
        "decoder_start_token_id": cfg.decoder_start_token_id,
        "optimized": optimize,
    }
    (tmp / "onnx.json").write_text(json.dumps(manifest, indent=2) + "\n")
    tokenizer = False
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "vocab.txt"):
        if (folder / f).is_file():
            shutil.copy2(folder / f, tmp / f)
            tokenizer = tokenizer or f == "tokenizer.json"
    if dst.exists():
        shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
    os.replace(tmp, dst)  # whole or not at all
    return {
        "out": dst,
        "family": cfg.family,
        "graphs": written,
        "tokenizer": tokenizer,
        "bytes": sum(f.stat().st_size for f in dst.iterdir()),
    }


class OnnxDecoder:
    """Greedy decoding of an exported decoder or prefix-LM folder in ONNX Runtime: the prompt in one
    call, then one token per call with the cache passed back in, as `lmlab.generate` decodes (left
    padding, positions counted over real tokens, a prefix-LM's prompt as its bidirectional prefix).
    The reference loop the tests and `bench/generate.py` drive; `int8` runs the quantized graph."""

    def __init__(self, folder: str | os.PathLike[str], int8: bool = False, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.folder = Path(folder)
        self.manifest = json.loads((self.folder / "onnx.json").read_text())
        graph = self.manifest["graphs"][0]
        if self.manifest["family"] not in ("decoder", "prefix-lm") or "past_key_values.0.key" not in graph["inputs"]:
            raise ConfigError(f"{folder}: OnnxDecoder runs decoder graphs with a KV cache; this is {graph['file']}")
        name = graph.get("int8") if int8 else graph["file"]
        if name is None:
            raise ConfigError(f"{folder} has no int8 graph; export it with --quantize int8")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.folder / name), options, providers=["CPUExecutionProvider"])
        self.inputs = graph["inputs"]

    def __call__(self, feed: dict[str, Any]) -> list[Any]:
        return self.session.run(None, {k: v for k, v in feed.items() if k in self.inputs})

    def greedy(self, input_ids: Any, max_new_tokens: int, attention_mask: Any = None) -> Any:
        """(B, T) int64 prompt ids (left-padded, with their mask) -> (B, T + max_new_tokens) ids."""
        import numpy as np

        ids = np.asarray(input_ids, dtype=np.int64)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        B, T = ids.shape
        c = self.manifest["cache"]
        empty = np.zeros((B, c["kv_heads"], 0, c["head_dim"]), np.float32)
        feed: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": np.clip(mask.cumsum(-1) - 1, 0, None),
            "prefix_lengths": np.full((B,), T, dtype=np.int64),
        }
        feed.update({name: empty for name in self.inputs if name.startswith("past_key_values.")})
        out = [ids]
        for _ in range(max_new_tokens):
            logits, *present = self(feed)
            token = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
            out.append(token)
            feed["position_ids"] = feed["position_ids"][:, -1:] + 1
            feed["attention_mask"] = np.concatenate([feed["attention_mask"], np.ones((B, 1), np.int64)], axis=1)
            feed["input_ids"] = token
            feed.update({name.replace("present", "past_key_values"): t for name, t in zip(self.outputs, present)})
        return np.concatenate(out, axis=1)

    @property
    def outputs(self) -> list[str]:
        return self.manifest["graphs"][0]["outputs"][1:]
