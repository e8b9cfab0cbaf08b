"""The lmlab Model: shared token embeddings, one or two Stacks of Blocks, and the heads.

family            stacks                                      self-attention mask
encoder           encoder                                     bidirectional
decoder           decoder                                     causal
prefix-lm         decoder                                     bidirectional over the prefix, causal after
encoder-decoder   encoder + decoder (with cross-attention)    bidirectional / causal
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from lmlab.config import ModelConfig
from lmlab.errors import LmlabError
from lmlab.families import IGNORE_INDEX
from lmlab.model.attention import KVCache, build_mask
from lmlab.model.block import Block, make_norm
from lmlab.model.heads import LMHead, MLMHead, Pooler, SequenceClassifier, SpanHead, TokenTagger, pool
from lmlab.model.moe import RoutingRecord
from lmlab.model.positions import RelativePositionBias, RotaryEmbedding, sinusoidal_table


@dataclass
class ModelOutput:
    """What a forward pass returns; field names follow transformers' outputs."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    nsp_logits: torch.Tensor | None = None  # BertForPreTraining calls these seq_relationship_logits
    start_logits: torch.Tensor | None = None
    end_logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    encoder_last_hidden_state: torch.Tensor | None = None
    past_key_values: KVCache | None = None
    aux_loss: torch.Tensor | None = None  # sum of the MoE layers' weighted auxiliary losses
    token_loss: torch.Tensor | None = None  # the token-averaged part of `loss` (lm / mlm / tagger heads)
    routing: tuple[RoutingRecord, ...] | None = None  # one per MoE layer, in order (lmlab.model.moe)

    @property
    def prediction_logits(self) -> torch.Tensor | None:  # transformers' BertForPreTraining name
        return self.logits

    @property
    def seq_relationship_logits(self) -> torch.Tensor | None:
        return self.nsp_logits


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """0-based positions that restart with every document of a packed sequence: (B, T) -> (B, T)."""
    B, T = document_ids.shape
    t = torch.arange(T, device=document_ids.device).expand(B, T)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    first = torch.where(starts, t, torch.zeros_like(t)).cummax(dim=1).values  # where each token's document began
    return t - first


class Stack(nn.Module):
    """Embedded tokens -> hidden states: positions, segments, embedding norm, N Blocks, final norm."""

    def __init__(
        self, cfg: ModelConfig, n_layers: int, policy: str, cross: bool, segments: bool, name: str = "decoder"
    ) -> None:
        super().__init__()
        self.cfg, self.policy, self.name = cfg, policy, name
        self.checkpointing = False  # recompute each Block's activations in the backward (Model.gradient_checkpointing)
        d = cfg.d_model
        self.pos_embed = nn.Embedding(cfg.max_seq_len + cfg.position_offset, d) if cfg.position == "learned" else None
        if cfg.position == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(cfg.max_seq_len, d), persistent=False)
        self.rope = RotaryEmbedding(cfg.dim_head, cfg.rope_theta) if cfg.position == "rope" else None
        self.rel_bias = (
            RelativePositionBias(cfg.rel_buckets, cfg.rel_max_distance, cfg.n_heads, bidirectional=policy != "causal")
            if cfg.position == "relative"
            else None
        )
        self.type_embed = nn.Embedding(cfg.type_vocab_size, d) if segments and cfg.type_vocab_size else None
        self.embed_norm = make_norm(cfg) if cfg.embed_norm else None
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, i, cross=cross) for i in range(n_layers))
        self.final_norm = make_norm(cfg) if cfg.final_norm else None

    def init_buffers(self) -> None:
        if self.cfg.position == "sinusoidal":
            self.pos_table = sinusoidal_table(self.cfg.max_seq_len, self.cfg.d_model)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C) token embeddings
        position_ids: torch.Tensor,  # (B, T), 0-based
        token_type_ids: torch.Tensor | None = None,
        key_padding: torch.Tensor | None = None,  # (B, past + T), True/1 for real tokens
        prefix_lengths: torch.Tensor | None = None,
        cache: KVCache | None = None,
        memory: torch.Tensor | None = None,
        memory_padding: torch.Tensor | None = None,  # (B, S)
        output_hidden_states: bool = False,
        routing: list[RoutingRecord] | None = None,  # MoE layers append their records here
        documents: torch.Tensor | None = None,  # (B, T) packed documents: attention stays within each
        memory_documents: torch.Tensor | None = None,  # (B, S) the encoder tokens' documents
        prefix_mask: torch.Tensor | None = None,  # (B, T) tokens of each document's bidirectional prefix
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        B, T, _ = x.shape
        past = cache.seen if cache is not None else 0
        if self.pos_embed is not None:
            offset = self.cfg.position_offset
            x = x + self.pos_embed(position_ids + offset if offset else position_ids)
        elif self.cfg.position == "sinusoidal":
            x = x + self.pos_table[position_ids]
        if self.type_embed is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(position_ids)
            x = x + self.type_embed(token_type_ids)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        if self.training:
            x = self.drop(x)

        rope = self.rope(position_ids) if self.rope is not None else None
        bias = self.rel_bias(T, past + T, offset=past) if self.rel_bias is not None else None
        docs = (documents, documents) if documents is not None else None
        mask, is_causal = build_mask(
            self.policy, T, past + T, past, key_padding, prefix_lengths, bias, x.dtype, docs, prefix_mask
        )
        memory_mask = None  # cross-attention has no position bias; only the encoder's padding is masked
        if memory is not None and (memory_padding is not None or memory_documents is not None):
            cross_docs = (documents, memory_documents) if memory_documents is not None else None
            memory_mask, _ = build_mask("bidirectional", T, memory.shape[1], 0, memory_padding, documents=cross_docs)
        token_mask = key_padding[:, past:].bool() if key_padding is not None else None

        hidden = [x] if output_hidden_states else None
        previous = None  # the last MoE layer's router logits, for MoE++'s gating residual
        checkpoint = self.checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for i, layer in enumerate(self.layers):
            kw = dict(
                cache=cache.layers[i] if cache is not None else None,
                memory=memory,
                memory_mask=memory_mask,
                cross_cache=cache.cross[i] if cache is not None and cache.cross else None,
                token_mask=token_mask,
                previous=previous,
            )
            if checkpoint:  # the record comes from this forward only; the recomputation's is discarded
                x, record = torch.utils.checkpoint.checkpoint(
                    layer, x, mask, is_causal, rope, use_reentrant=False, **kw
                )
            else:
                x, record = layer(x, mask, is_causal, rope, **kw)
            if record is not None:
                record.layer = f"{self.name}.layers.{i}.ffn"
                previous = record.router_logits_TE
                if routing is not None:
                    routing.append(record)
            if hidden is not None:
                hidden.append(x)
        if self.final_norm is not None:
            x = self.final_norm(x)
            if hidden is not None:
                hidden[-1] = x
        return x, hidden


class Model(nn.Module):
    """A Transformer of any family; see the module docstring."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        cfg = self.config = config
        d = cfg.d_model
        self.tok_embed = nn.Embedding(cfg.vocab_size, d)
        spec = cfg.spec
        self.encoder = (
            Stack(cfg, cfg.n_layers, "bidirectional", cross=False, segments=True, name="encoder")
            if spec.has_encoder
            else None
        )
        self.decoder = None
        if spec.seq2seq:
            self.decoder = Stack(cfg, cfg.decoder_layers, spec.self_attention, cross=True, segments=False)
        elif spec.has_decoder:
            self.decoder = Stack(cfg, cfg.n_layers, spec.self_attention, cross=False, segments=True)

        self.pooler = Pooler(cfg) if cfg.pooler else None
        self.lm_head = LMHead(cfg) if "lm" in cfg.heads else None
        self.mlm_head = MLMHead(cfg) if "mlm" in cfg.heads else None
        self.nsp_head = nn.Linear(d, 2) if "nsp" in cfg.heads else None
        self.classifier = SequenceClassifier(d, cfg.num_labels) if "classify" in cfg.heads else None
        self.tagger = TokenTagger(d, cfg.num_labels) if "tag" in cfg.heads else None
        self.span_head = SpanHead(d) if "span" in cfg.heads else None
        self.head_drop = nn.Dropout(cfg.dropout)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter and derived buffer. The constructor calls it; call it again after
        building on the meta device and materialising (`to_empty`), e.g. once the model is sharded."""
        cfg = self.config
        for module in self.modules():
            self._init_module(module)
        if cfg.init == "t5":
            self._init_t5()
        else:
            # GPT-2: scale the init of projections that write into the residual stream by
            # 1/sqrt(2 * depth), so the residual's variance does not grow with depth.
            n_residual = 2 * (cfg.n_layers + (cfg.decoder_layers if cfg.spec.seq2seq else 0))
            for name, p in self.named_parameters():
                if name.endswith(
                    ("attn.out.weight", "ffn.down.weight", "ffn.experts.w_down", "ffn.shared.down.weight")
                ):
                    nn.init.normal_(p, mean=0.0, std=cfg.init_std / math.sqrt(n_residual))
        self.init_buffers()

    def _init_t5(self) -> None:
        """Mesh TensorFlow's fan-in init, as transformers initialises T5 (initializer_factor 1): the
        embedding (and an untied lm head) N(0, 1); queries N(0, (d_model * head_dim)^-1/2), keys, values,
        FFN inputs and relative-position biases N(0, d_model^-1/2); attention outputs
        N(0, (heads * head_dim)^-1/2) and FFN outputs N(0, d_ff^-1/2). T5 neither scales its attention
        logits nor its embeddings, so its signal sizes rest on this init. Task heads keep `init_std`.
        Opt-in (`init="t5"`): measured on tiny T5s it speeds up seq2seq learning from scratch but hurts
        extractive QA (docs/benchmarks.md)."""
        cfg = self.config
        d, hd = cfg.d_model, cfg.dim_head
        q_rows, kv_rows = cfg.n_heads * hd, cfg.kv_heads * hd
        fan_in = d**-0.5
        for name, p in self.named_parameters():
            if name == "tok_embed.weight" or name == "lm_head.weight":
                nn.init.normal_(p, std=1.0)
            elif name.endswith("rel_bias.weight"):
                nn.init.normal_(p, std=fan_in)
            elif name.endswith("attn.qkv.weight"):
                nn.init.normal_(p[:q_rows], std=(d * hd) ** -0.5)
                nn.init.normal_(p[q_rows : q_rows + 2 * kv_rows], std=fan_in)
            elif name.endswith("attn.q.weight"):
                nn.init.normal_(p, std=(d * hd) ** -0.5)
            elif name.endswith("attn.kv.weight"):
                nn.init.normal_(p, std=fan_in)
            elif name.endswith("attn.out.weight"):
                nn.init.normal_(p, std=q_rows**-0.5)
            elif name.endswith(("ffn.up.weight", "ffn.gate.weight", "ffn.shared.up.weight", "ffn.experts.w_up")):
                nn.init.normal_(p, std=fan_in)
            elif name.endswith(("ffn.down.weight", "ffn.shared.down.weight", "ffn.experts.w_down")):
                nn.init.normal_(p, std=p.shape[-1 if p.dim() == 2 else -2] ** -0.5)

    def _init_module(self, module: nn.Module) -> None:
        std = self.config.init_std
        if hasattr(module, "init_weights") and module is not self:  # experts and other parts that know their own
            module.init_weights()
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            module.reset_parameters()
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RelativePositionBias):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (MLMHead, LMHead)):
            if module.weight is not None:
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def init_buffers(self) -> None:
        """(Re)compute the buffers that are derived, not saved, e.g. after building on the meta device."""
        for module in self.modules():
            if module is not self and hasattr(module, "init_buffers"):
                module.init_buffers()

    @torch.no_grad()
    def resize_token_embeddings(self, n: int) -> None:
        """Give the vocabulary `n` rows (e.g. after adding a chat template's special tokens), as
        transformers' method of that name: the token embedding, an untied lm / mlm head weight and their
        biases keep their first rows; new rows start at the mean of the old ones (their biases at the
        mean bias), so a new token begins as an average token instead of a random one."""
        old = self.config.vocab_size
        if n == old:
            return
        if n < 1:
            raise LmlabError(f"resize_token_embeddings needs a positive size, got {n}")

        def resized(p: nn.Parameter) -> nn.Parameter:
            new = p.new_empty((n, *p.shape[1:]))
            keep = min(n, old)
            new[:keep] = p[:keep]
            if n > old:
                new[old:] = p.mean(0)
            return nn.Parameter(new, requires_grad=p.requires_grad)

        self.tok_embed.weight = resized(self.tok_embed.weight)
        self.tok_embed.num_embeddings = n
        for head in (self.lm_head, self.mlm_head):
            for name in ("weight", "bias"):
                if head is not None and getattr(head, name, None) is not None:
                    setattr(head, name, resized(getattr(head, name)))
        self.config = self.config.replace(vocab_size=n)

    # ---- pieces -----------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.tok_embed(input_ids)
        return x * math.sqrt(self.config.d_model) if self.config.scale_embeddings else x

    def default_positions(self, input_ids: torch.Tensor, past: int = 0) -> torch.Tensor:
        """0-based positions; RoBERTa counts only non-pad tokens (pad positions become -1)."""
        cfg = self.config
        B, T = input_ids.shape
        if cfg.position_from_padding:
            real = (input_ids != cfg.pad_token_id).long()
            return (torch.cumsum(real, dim=1) + past) * real - 1
        cfg.check_length(past + T)
        return torch.arange(past, past + T, device=input_ids.device).expand(B, T)

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """Decoder inputs from labels: start token, then labels[:-1] (-100 becomes pad)."""
        cfg = self.config
        start = cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else cfg.pad_token_id
        if start is None:
            raise LmlabError("shift_right needs decoder_start_token_id or pad_token_id in the config")
        shifted = labels.new_full(labels.shape, start)
        shifted[:, 1:] = labels[:, :-1]
        return shifted.masked_fill(shifted == IGNORE_INDEX, cfg.pad_token_id if cfg.pad_token_id is not None else 0)

    # ---- forward ------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None = None,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, T) 1 = real token (B, past + T with a cache)
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        decoder_position_ids: torch.Tensor | None = None,  # (B, T) 0-based; default: after the cache
        encoder_outputs: Any = None,  # (B, S, C) tensor or an output with .last_hidden_state
        prefix_lengths: torch.Tensor | None = None,  # (B,) prefix-lm: bidirectional prefix sizes
        document_ids: torch.Tensor | None = None,  # (B, T) packed documents (the encoder's, for seq2seq)
        decoder_document_ids: torch.Tensor | None = None,  # (B, T_dec) the decoder tokens' documents
        prefix_mask: torch.Tensor | None = None,  # (B, T) prefix-lm, packed: each document's prefix tokens
        labels: torch.Tensor | None = None,
        next_sentence_label: torch.Tensor | None = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        output_hidden_states: bool = False,
        labelled_logits_only: bool = False,  # with labels: vocabulary logits only where a label is set
    ) -> ModelOutput:
        """transformers-style forward. With `labelled_logits_only`, `logits` is (N, V) for the N labelled
        positions (row-major order; for causal LMs the positions whose next token is labelled): an MLM
        batch projects 15% of its tokens onto the vocabulary instead of all of them.

        With `document_ids` (a sequence packed from several documents), every token attends only to the
        tokens of its own document, with the family's mask inside it (causal, bidirectional, or each
        document's prefix in `prefix_mask` bidirectional), and positions restart at 0 with each document:
        a packed sequence computes what each document computes alone. Encoder-decoders take the decoder
        tokens' documents in `decoder_document_ids`; their cross-attention stays within the document too."""
        cfg = self.config
        if document_ids is not None:
            if past_key_values is not None or use_cache:
                raise LmlabError("document_ids describe a packed training sequence; they do not go with a KV cache")
            if position_ids is None:
                position_ids = document_positions(document_ids)
            if decoder_document_ids is not None and decoder_position_ids is None:
                decoder_position_ids = document_positions(decoder_document_ids)
        out = ModelOutput()
        mask_for_heads = attention_mask
        spec = cfg.spec
        routing: list[RoutingRecord] = []
        if not spec.has_decoder:  # encoder
            h, hidden = self.encoder(
                self.embed(input_ids),
                position_ids if position_ids is not None else self.default_positions(input_ids),
                token_type_ids,
                attention_mask,
                output_hidden_states=output_hidden_states,
                routing=routing,
                documents=document_ids,
            )
        elif spec.seq2seq:
            if encoder_outputs is None:
                memory, _ = self.encoder(
                    self.embed(input_ids),
                    position_ids if position_ids is not None else self.default_positions(input_ids),
                    None,
                    attention_mask,
                    routing=routing,
                    documents=document_ids,
                )
            else:
                memory = getattr(encoder_outputs, "last_hidden_state", encoder_outputs)
                if memory is None:  # an output object whose encoder state lives elsewhere
                    memory = encoder_outputs.encoder_last_hidden_state
            task = cfg.task_head
            if task in ("tag", "span"):  # per-token heads read the (bidirectional) encoder's states
                h, hidden = memory, None
            else:
                if decoder_input_ids is None and task == "classify":
                    # as BART / T5 classify: the decoder reads the input shifted right, the head its last state
                    decoder_input_ids, decoder_attention_mask = self.shift_right(input_ids), attention_mask
                if decoder_input_ids is None:
                    if labels is None:
                        raise LmlabError("an encoder-decoder forward needs decoder_input_ids or labels")
                    decoder_input_ids = self.shift_right(labels)
                cache = (
                    past_key_values
                    if past_key_values is not None
                    else (KVCache(cfg.decoder_layers, cross=True) if use_cache else None)
                )
                past = cache.seen if cache is not None else 0
                if decoder_position_ids is None:
                    decoder_position_ids = self.default_positions(decoder_input_ids, past)
                h, hidden = self.decoder(
                    self.embed(decoder_input_ids),
                    decoder_position_ids,
                    None,
                    decoder_attention_mask,
                    cache=cache,
                    memory=memory,
                    memory_padding=attention_mask,
                    output_hidden_states=output_hidden_states,
                    routing=routing,
                    documents=decoder_document_ids,
                    memory_documents=document_ids if decoder_document_ids is not None else None,
                )
                out.past_key_values = cache
                mask_for_heads = decoder_attention_mask
            out.encoder_last_hidden_state = memory
        else:  # decoder, prefix-lm
            cache = past_key_values if past_key_values is not None else (KVCache(cfg.n_layers) if use_cache else None)
            past = cache.seen if cache is not None else 0
            if position_ids is None:
                position_ids = self.default_positions(input_ids, past)
            if spec.self_attention == "prefix" and prefix_lengths is None and cfg.task_head:
                # a task head (UniLM's NLU fine-tuning): the whole input is the bidirectional prefix
                prefix_lengths = torch.full((input_ids.shape[0],), input_ids.shape[1], device=input_ids.device)
            h, hidden = self.decoder(
                self.embed(input_ids),
                position_ids,
                token_type_ids,
                attention_mask,
                prefix_lengths,
                cache=cache,
                output_hidden_states=output_hidden_states,
                routing=routing,
                documents=document_ids,
                prefix_mask=prefix_mask,
            )
            out.past_key_values = cache
        out.last_hidden_state = h
        out.hidden_states = tuple(hidden) if hidden is not None else None
        self._apply_heads(
            out, h, mask_for_heads, labels, next_sentence_label, start_positions, end_positions, labelled_logits_only
        )
        out.routing = tuple(routing) if routing else None
        aux = [r.aux_loss for r in routing if r.aux_loss is not None]
        if aux:
            out.aux_loss = torch.stack(aux).sum()
            if out.loss is not None:  # a non-zero auxiliary weight always reaches the training loss
                out.loss = out.loss + out.aux_loss
        return out

    def _token_loss(
        self, out: ModelOutput, head: nn.Module, h: torch.Tensor, targets: torch.Tensor | None, sparse: bool
    ) -> torch.Tensor | None:
        """Logits of an lm / mlm head and their loss; `sparse`: project only the labelled positions.
        Not under torch.compile: the selection's data-dependent shape would break the graph in two, and
        the compiled dense projection + loss is faster than both halves."""
        if targets is not None and sparse and not torch.compiler.is_compiling():
            keep = targets != IGNORE_INDEX
            out.logits = head(h[keep], self.tok_embed.weight)  # (N, V)
            return F.cross_entropy(out.logits.float(), targets[keep])
        out.logits = head(h, self.tok_embed.weight)
        if targets is None:
            return None
        return F.cross_entropy(
            out.logits.reshape(-1, out.logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX
        )

    def _apply_heads(
        self,
        out: ModelOutput,
        h: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None,
        next_sentence_label: torch.Tensor | None,
        start_positions: torch.Tensor | None,
        end_positions: torch.Tensor | None,
        sparse: bool = False,
    ) -> None:
        """Each head the config names writes its outputs and returns its loss (lmlab.model.heads)."""
        losses = []
        if self.pooler is not None:
            out.pooler_output = self.pooler(h)
        if self.lm_head is not None:
            targets = labels
            if labels is not None and self.config.spec.shifts_labels:  # position t predicts token t+1
                # shift the labels, not the logits: slicing logits would copy them in the backward pass
                targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
            out.token_loss = self._token_loss(out, self.lm_head, h, targets, sparse)
            losses.append(out.token_loss)
        if self.mlm_head is not None:
            out.token_loss = self._token_loss(out, self.mlm_head, h, labels, sparse)
            losses.append(out.token_loss)
        if self.nsp_head is not None:
            out.nsp_logits = self.nsp_head(out.pooler_output)
            if next_sentence_label is not None:
                losses.append(F.cross_entropy(out.nsp_logits.float(), next_sentence_label.reshape(-1)))
        if self.classifier is not None:
            v = pool(h, attention_mask, self.config.pooling)
            v = self.pooler.transform(v) if self.pooler is not None else v
            out.logits = self.classifier(self.head_drop(v))
            if labels is not None:
                losses.append(self.classifier.loss(out.logits, labels))
        if self.tagger is not None:
            out.logits = self.tagger(self.head_drop(h))
            if labels is not None:
                out.token_loss = self.tagger.loss(out.logits, labels)
                losses.append(out.token_loss)
        if self.span_head is not None:
            out.logits = self.span_head(h)
            out.start_logits, out.end_logits = self.span_head.split(out.logits)
            if start_positions is not None and end_positions is not None:
                losses.append(self.span_head.loss(out.start_logits, out.end_logits, start_positions, end_positions))
        losses = [x for x in losses if x is not None]
        if losses:
            out.loss = torch.stack(losses).sum()

    # ---- conveniences in transformers' style ---------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, path: str, dtype: torch.dtype | None = None, device: str | torch.device | None = None
    ) -> Model:
        """A folder's model (lmlab or transformers layout); `lmlab.load` also picks a decoding dtype."""
        from lmlab.checkpoint import load_folder

        model = load_folder(path, cls)
        return model.to(device=device, dtype=dtype) if dtype is not None or device is not None else model

    def save_pretrained(self, path: str, format: str = "lmlab") -> Any:
        """Write a folder: format="lmlab" (any model) or "hf" (transformers' Auto classes read it)."""
        from lmlab.checkpoint import save_folder

        return save_folder(self, path, format=format)

    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """Prompt + new token ids, as transformers returns them (see lmlab.generate.generate)."""
        from lmlab.generate import generate

        return generate(self, input_ids, attention_mask, **kwargs)

    def gradient_checkpointing_enable(self, enable: bool = True) -> None:
        """Recompute each Block's activations during the backward instead of keeping them (transformers'
        name): less memory, one more forward per step. Loss, gradients and routing records are unchanged."""
        for stack in (self.encoder, self.decoder):
            if stack is not None:
                stack.checkpointing = enable

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
