"""One config for every model family, and the named presets.

A family is a handful of settings, not a class: BERT is `family="encoder"` with post-norm,
learned positions and segment embeddings; GPT-2 is `family="decoder"` with pre-norm; T5 is
`family="encoder-decoder"` with RMSNorm and relative position bias; and so on. Every field is
read somewhere in `lmlab.model`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lmlab.errors import ConfigError
from lmlab.families import FAMILIES, FamilySpec

FAMILY_NAMES = tuple(FAMILIES)


def option(default: Any, help: str, choices: tuple[str, ...] | None = None, flag: bool = True) -> Any:
    """A dataclass field with its help text and choices, from which lmlab.cli builds a flag. A callable
    default (list, dict, a dataclass) is a default factory; flag=False keeps it off the command line."""
    meta = {"help": help, "choices": choices, "flag": flag}
    if callable(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


POSITIONS = ("learned", "sinusoidal", "relative", "rope", "none")
INITS = ("normal", "t5")
NORMS = ("layernorm", "rmsnorm")
PLACEMENTS = ("pre", "post")
# name -> (element-wise function, gated?). Gated FFNs compute act(x W_gate) * (x W_up).
ACTIVATIONS = {
    "relu": ("relu", False),
    "gelu": ("gelu", False),
    "gelu_tanh": ("gelu_tanh", False),
    "silu": ("silu", False),
    "swiglu": ("silu", True),
    "geglu": ("gelu", True),
    "geglu_tanh": ("gelu_tanh", True),
    "reglu": ("relu", True),
}
HEADS = ("mlm", "nsp", "lm", "classify", "tag", "span")
POOLINGS = ("cls", "last", "mean")
MOE_ROUTERS = ("topk", "noisy", "dense", "expert-choice", "soft")
VOCAB_HEADS = ("mlm", "nsp", "lm")  # pre-training heads; which a family may carry is FamilySpec.lm_heads
TASK_HEADS = ("classify", "tag", "span")  # fine-tuning heads (lmlab.model.heads)
# the FFN slot's registry: name -> builder(cfg, layer_index) -> module. lmlab.model.ffn registers
# "dense" and lmlab.model.moe "moe"; the registry lives here so that validation needs no model code.
FFN_KINDS: dict[str, Any] = {}


@dataclass
class ModelConfig:
    """Architecture of an lmlab model. Sizes follow the names used in papers (d_model, d_ff)."""

    family: str = "decoder"
    vocab_size: int = 50257
    d_model: int = 768
    n_layers: int = 12  # encoder depth for encoder-decoder, else the one stack's depth
    n_decoder_layers: int | None = None  # encoder-decoder only; defaults to n_layers
    n_heads: int = 12
    n_kv_heads: int | None = None  # grouped-query attention; None = n_heads
    head_dim: int | None = None  # None = d_model // n_heads (T5 sets it separately)
    d_ff: int = 3072
    max_seq_len: int = 1024

    # positions
    position: str = "learned"
    position_offset: int = 0  # learned table rows skipped before position 0 (BART, RoBERTa: 2)
    position_from_padding: bool = False  # RoBERTa: count positions over non-pad tokens only
    rope_theta: float = 10000.0
    rel_buckets: int = 32  # T5 relative attention bias
    rel_max_distance: int = 128

    # normalisation and residual layout
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    norm_placement: str = "pre"  # pre: x + f(norm(x)); post: norm(x + f(x)) (BERT, BART)
    embed_norm: bool = False  # norm right after the embeddings (BERT, BART)
    final_norm: bool = True  # norm after the last block (GPT-2, T5)

    activation: str = "gelu"
    bias: bool = True  # biases in linear layers and LayerNorms
    qkv_bias: bool | None = None  # biases on the q/k/v projections only; None = bias (Qwen2: True with bias=False)
    attn_scale: float | None = None  # None = 1/sqrt(head_dim); T5 uses 1.0
    scale_embeddings: bool = False  # multiply token embeddings by sqrt(d_model) (BART option)
    type_vocab_size: int = 0  # segment (token type) embeddings; 0 = none
    tie_embeddings: bool = True
    head_input_scale: float = 1.0  # T5 scales the decoder output by d_model**-0.5 before the tied head
    lm_head_bias: bool = False  # BART's final_logits_bias

    dropout: float = 0.1
    attn_dropout: float = 0.1
    init_std: float = 0.02
    # "normal": N(0, init_std) with GPT-2's depth-scaled residual projections (every preset); "t5": Mesh
    # TensorFlow's fan-in scaled init, as transformers initialises T5 (Model._init_t5; docs/benchmarks.md
    # measures both on tiny T5s: faster seq2seq learning from scratch, worse extractive QA)
    init: str = "normal"  # one of INITS

    heads: tuple[str, ...] = ("lm",)
    pooler: bool = False  # BERT pooler: tanh(W h_[CLS]) feeds nsp / classify
    num_labels: int = 2
    classifier_pooling: str | None = None  # cls / last / mean; None = cls for encoders, else last
    ffn: str = "dense"  # the FFN slot: a name registered in lmlab.model.ffn.FFN_KINDS ("dense", "moe")

    # Mixture-of-Experts (ffn="moe"; see lmlab.model.moe)
    moe_experts: int = option(0, "FFN experts per MoE layer (any --moe-* flag turns the FFNs into MoE layers)")
    moe_top_k: int = option(2, "experts per token (expert-choice: average experts per token)")
    moe_every: int = option(1, "MoE in every N-th layer, dense FFNs between")
    moe_first_dense: int = option(0, "the first N layers keep a dense FFN (DeepSeekMoE's first_k_dense_replace)")
    moe_d_ff: int | None = option(None, "expert FFN width (default: d_ff)")
    moe_activation: str | None = option(None, "expert activation, e.g. swiglu (default: the model's)")
    moe_router: str = option("topk", "router kind", choices=MOE_ROUTERS)
    moe_renormalize: bool | None = option(
        None, "rescale the k chosen weights to sum to 1 (Mixtral; default: when k > 1)"
    )
    moe_capacity_factor: float | None = option(None, "expert capacity factor with token dropping (default: dropless)")
    moe_capacity: int | None = option(None, "fixed assignments per expert per sequence (Switch's expert_capacity)")
    moe_jitter: float = option(0.0, "Switch: multiplicative router-input noise in training, U(1-eps, 1+eps)")
    moe_slots: int = option(1, "Soft MoE: slots per expert")
    moe_aux_weight: float = option(0.01, "Switch load-balancing loss weight (alpha)")
    moe_z_weight: float = option(0.0, "ST-MoE router z-loss weight")
    moe_importance_weight: float = option(0.0, "Shazeer CV^2 importance loss weight")
    moe_load_weight: float = option(0.0, "Shazeer CV^2 load loss weight (noisy router)")
    moe_shared_experts: int = option(0, "experts every token passes through (DeepSeekMoE)")
    moe_shared_d_ff: int | None = option(None, "total width of the shared experts (default: moe_d_ff x their number)")
    moe_shared_gate: bool = option(False, "sigmoid gate on the shared experts' output (Qwen2-MoE)")
    moe_zero_experts: int = option(0, "MoE++ zero experts (output 0)")
    moe_copy_experts: int = option(0, "MoE++ copy experts (output the input)")
    moe_constant_experts: int = option(0, "MoE++ constant experts (a learned mix of the input and a constant vector)")
    moe_gating_residual: bool = option(
        False, "MoE++ gating residuals: router logits add a projection of the previous MoE layer's"
    )

    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    unk_token_id: int | None = None
    mask_token_id: int | None = None
    cls_token_id: int | None = None
    sep_token_id: int | None = None
    decoder_start_token_id: int | None = None

    name: str | None = None  # the preset it came from, for display
    labels: list[str] | None = field(default=None)  # class / tag names for classify and tag

    def __post_init__(self) -> None:
        self.heads = tuple(self.heads)
        self.validate()

    # ---- derived sizes ---------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def decoder_layers(self) -> int:
        return self.n_decoder_layers if self.n_decoder_layers is not None else self.n_layers

    @property
    def spec(self) -> FamilySpec:
        """The family's spec: stacks, mask policy, defaults (lmlab.families)."""
        return FAMILIES[self.family]

    @property
    def pooling(self) -> str:
        return self.classifier_pooling or self.spec.pooling

    @property
    def use_qkv_bias(self) -> bool:
        return self.bias if self.qkv_bias is None else self.qkv_bias

    @property
    def has_absolute_positions(self) -> bool:
        """Learned or sinusoidal positions: a table with max_seq_len rows, so longer inputs cannot run."""
        return self.position in ("learned", "sinusoidal")

    def check_length(self, n: int, what: str | None = None) -> None:
        """ConfigError when `n` tokens cannot run through this model's position table; `what` names the
        setting or input that asked for them ("seq_len=512")."""
        if self.has_absolute_positions and n > self.max_seq_len:
            raise ConfigError(
                f"{what or f'a sequence of {n} tokens'} is longer than the model's "
                f"max_seq_len={self.max_seq_len} ({self.position} positions have no row for it)"
            )

    def fit_default(self, default: int, flag: str, share: int = 1) -> tuple[int, str | None]:
        """A length setting's default, made to fit this model: `default`, or max_seq_len // share where
        the model's absolute positions allow fewer (`share` = 2 leaves half the window to a prompt),
        with a note saying so. A value the user gives is checked with `check_length` instead."""
        if not self.has_absolute_positions or default * share <= self.max_seq_len:
            return default, None
        value = max(1, self.max_seq_len // share)
        return value, (
            f"{flag} is {value} here, not the usual default of {default}: the model's max_seq_len is "
            f"{self.max_seq_len} ({self.position} positions)"
        )

    @property
    def task_head(self) -> str | None:
        """The fine-tuning head (classify / tag / span) this model carries, if any."""
        return next((h for h in self.heads if h in TASK_HEADS), None)

    # ---- Mixture-of-Experts, resolved once ---------------------------------------------------
    def is_moe_layer(self, layer_index: int) -> bool:
        """MoE in every moe_every-th layer (the last of each group) after the first moe_first_dense layers."""
        return (
            self.ffn == "moe"
            and layer_index >= self.moe_first_dense
            and layer_index % self.moe_every == self.moe_every - 1
        )

    @property
    def expert_d_ff(self) -> int:
        return self.moe_d_ff or self.d_ff

    @property
    def expert_activation(self) -> str:
        return self.moe_activation or self.activation

    @property
    def shared_d_ff(self) -> int:
        """Total width of the shared experts (0 without them)."""
        if not self.moe_shared_experts:
            return 0
        return self.moe_shared_d_ff or self.expert_d_ff * self.moe_shared_experts

    @property
    def moe_renormalizes(self) -> bool:
        """Whether the k chosen routing weights are rescaled to sum to 1 (default: when k > 1)."""
        return self.moe_top_k > 1 if self.moe_renormalize is None else self.moe_renormalize

    @property
    def moe_router_width(self) -> int:
        """The router's outputs: one per expert (FFN and MoE++), or one per slot for Soft MoE."""
        return self.moe_experts * self.moe_slots if self.moe_router == "soft" else self.moe_total_experts

    @property
    def moe_total_experts(self) -> int:
        """FFN experts plus MoE++ zero-computation experts: the router's width."""
        return self.moe_experts + self.moe_zero_experts + self.moe_copy_experts + self.moe_constant_experts

    @property
    def has_encoder(self) -> bool:
        return self.spec.has_encoder

    @property
    def has_decoder(self) -> bool:
        return self.spec.has_decoder

    # ---- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        def bad(field_name: str, msg: str) -> ConfigError:
            return ConfigError(f"ModelConfig.{field_name}: {msg}")

        for name, allowed in (
            ("family", FAMILY_NAMES),
            ("position", POSITIONS),
            ("norm", NORMS),
            ("norm_placement", PLACEMENTS),
            ("init", INITS),
        ):
            if getattr(self, name) not in allowed:
                raise bad(name, f"got {getattr(self, name)!r}, expected one of {', '.join(allowed)}")
        if self.activation not in ACTIVATIONS:
            raise bad("activation", f"got {self.activation!r}, expected one of {', '.join(ACTIVATIONS)}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise bad(name, f"must be a positive integer, got {getattr(self, name)!r}")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise bad("n_heads", f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set head_dim")
        if self.n_heads % self.kv_heads:
            raise bad("n_kv_heads", f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.kv_heads}")
        if self.position == "rope" and self.dim_head % 2:
            raise bad("head_dim", f"RoPE needs an even head dimension, got {self.dim_head}")
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise bad(name, f"must be in [0, 1), got {getattr(self, name)}")
        for head in self.heads:
            if head not in HEADS:
                raise bad("heads", f"unknown head {head!r}, expected some of {', '.join(HEADS)}")
            if head in VOCAB_HEADS and head not in self.spec.lm_heads:
                need = [f.name for f in FAMILIES.values() if head in f.lm_heads]
                raise bad("heads", f"head {head!r} needs family {' or '.join(need)}, not {self.family!r}")
        if self.task_head and any(h in VOCAB_HEADS for h in self.heads):
            raise bad(
                "heads",
                f"{self.heads}: a task head ({self.task_head}) writes the same logits as a "
                "vocabulary head; a model carries one or the other",
            )
        if sum(h in TASK_HEADS for h in self.heads) > 1:
            raise bad("heads", f"{self.heads}: at most one task head (classify, tag or span)")
        if len(set(self.heads)) != len(self.heads):
            raise bad("heads", f"a head is listed twice: {self.heads}")
        if "nsp" in self.heads and not self.pooler:
            raise bad("pooler", "the nsp head reads the pooled [CLS] state: set pooler=True")
        if self.classifier_pooling is not None and self.classifier_pooling not in POOLINGS:
            raise bad("classifier_pooling", f"got {self.classifier_pooling!r}, expected one of {', '.join(POOLINGS)}")
        if self.position_from_padding and self.pad_token_id is None:
            raise bad("position_from_padding", "needs pad_token_id")
        if self.spec.seq2seq and self.n_decoder_layers is not None and self.n_decoder_layers <= 0:
            raise bad("n_decoder_layers", f"must be positive, got {self.n_decoder_layers}")
        if self.ffn == "moe":
            self._validate_moe(bad)
        if FFN_KINDS and self.ffn not in FFN_KINDS:
            raise bad("ffn", f"unknown FFN kind {self.ffn!r}, registered: {', '.join(FFN_KINDS)}")

    def _validate_moe(self, bad: Any) -> None:
        if self.moe_experts < 1:
            raise bad("moe_experts", f"an MoE FFN needs at least 1 expert, got {self.moe_experts}")
        for name in ("moe_zero_experts", "moe_copy_experts", "moe_constant_experts", "moe_shared_experts"):
            if getattr(self, name) < 0:
                raise bad(name, f"must be >= 0, got {getattr(self, name)}")
        if self.moe_router not in MOE_ROUTERS:
            raise bad("moe_router", f"unknown router {self.moe_router!r}, expected one of {', '.join(MOE_ROUTERS)}")
        if self.moe_router != "dense" and not 1 <= self.moe_top_k <= self.moe_total_experts:
            raise bad(
                "moe_top_k",
                f"top-k={self.moe_top_k} must be between 1 and the number of experts ({self.moe_total_experts})",
            )
        if self.moe_capacity_factor is not None and self.moe_capacity_factor <= 0:
            raise bad("moe_capacity_factor", f"must be > 0 (or None for dropless), got {self.moe_capacity_factor}")
        if self.moe_capacity is not None and self.moe_capacity < 1:
            raise bad("moe_capacity", f"must be >= 1 (or None), got {self.moe_capacity}")
        if self.moe_every < 1:
            raise bad("moe_every", f"must be >= 1, got {self.moe_every}")
        if self.moe_first_dense < 0:
            raise bad("moe_first_dense", f"must be >= 0, got {self.moe_first_dense}")
        if self.moe_activation is not None and self.moe_activation not in ACTIVATIONS:
            raise bad("moe_activation", f"got {self.moe_activation!r}, expected one of {', '.join(ACTIVATIONS)}")
        if not 0.0 <= self.moe_jitter < 1.0:
            raise bad("moe_jitter", f"must be in [0, 1), got {self.moe_jitter}")
        if self.moe_slots < 1:
            raise bad("moe_slots", f"must be >= 1, got {self.moe_slots}")
        for name in ("moe_aux_weight", "moe_z_weight", "moe_importance_weight", "moe_load_weight"):
            if getattr(self, name) < 0:
                raise bad(name, f"must be >= 0, got {getattr(self, name)}")
        if self.moe_load_weight and self.moe_router != "noisy":
            raise bad(
                "moe_load_weight", "the CV^2 load loss is defined through the router noise: it needs moe_router='noisy'"
            )
        if self.moe_router in ("expert-choice", "soft") and self.moe_total_experts != self.moe_experts:
            raise bad(
                "moe_router",
                f"{self.moe_router!r} routing takes FFN experts only, not MoE++ zero/copy/constant experts",
            )
        if self.moe_router == "soft" and self.spec.has_decoder:
            raise bad(
                "moe_router",
                "Soft MoE mixes every token of a sequence into each slot, so a causal "
                f"{self.family!r} model would see the future; use it with family='encoder'",
            )

    # ---- (de)serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["heads"] = list(self.heads)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"{source}: unknown ModelConfig field(s) {', '.join(unknown)}")
        return cls(**d)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


# ---- presets --------------------------------------------------------------------------------
def _bert(**kw: Any) -> ModelConfig:
    base = dict(
        family="encoder",
        vocab_size=30522,
        max_seq_len=512,
        norm_placement="post",
        embed_norm=True,
        final_norm=False,
        norm_eps=1e-12,
        activation="gelu",
        type_vocab_size=2,
        heads=("mlm", "nsp"),
        pooler=True,
        pad_token_id=0,
        unk_token_id=100,
        cls_token_id=101,
        sep_token_id=102,
        mask_token_id=103,
    )
    return ModelConfig(**{**base, **kw})


def _roberta(**kw: Any) -> ModelConfig:
    base = dict(
        family="encoder",
        vocab_size=50265,
        max_seq_len=512,
        position_offset=2,
        position_from_padding=True,
        norm_placement="post",
        embed_norm=True,
        final_norm=False,
        activation="gelu",
        type_vocab_size=1,
        heads=("mlm",),
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        unk_token_id=3,
        cls_token_id=0,
        sep_token_id=2,
        mask_token_id=50264,
    )
    return ModelConfig(**{**base, **kw})


def _gpt2(**kw: Any) -> ModelConfig:
    base = dict(
        family="decoder",
        vocab_size=50257,
        max_seq_len=1024,
        activation="gelu_tanh",
        heads=("lm",),
        bos_token_id=50256,
        eos_token_id=50256,
    )
    return ModelConfig(**{**base, **kw})


def _t5(**kw: Any) -> ModelConfig:
    d_model = kw.get("d_model", 512)
    base = dict(
        family="encoder-decoder",
        vocab_size=32128,
        max_seq_len=512,
        position="relative",
        norm="rmsnorm",
        norm_eps=1e-6,
        activation="relu",
        bias=False,
        attn_scale=1.0,
        head_dim=64,
        heads=("lm",),
        head_input_scale=d_model**-0.5,
        pad_token_id=0,
        eos_token_id=1,
        unk_token_id=2,
        decoder_start_token_id=0,
    )
    return ModelConfig(**{**base, **kw})


def _bart(**kw: Any) -> ModelConfig:
    base = dict(
        family="encoder-decoder",
        vocab_size=50265,
        max_seq_len=1024,
        position_offset=2,
        norm_placement="post",
        embed_norm=True,
        final_norm=False,
        activation="gelu",
        lm_head_bias=True,
        heads=("lm",),
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        unk_token_id=3,
        mask_token_id=50264,
        decoder_start_token_id=2,
    )
    return ModelConfig(**{**base, **kw})


# no dropout: CPU-sized runs see each token about once, and drawing dropout's random masks is a large
# share of a CPU step (docs/benchmarks.md, training throughput with and without dropout)
_TINY = dict(vocab_size=8192, d_model=256, n_heads=4, d_ff=1024, max_seq_len=512, dropout=0.0, attn_dropout=0.0)


def _moe(base: str, **kw: Any) -> ModelConfig:
    """An MoE variant of a preset: 8 experts as wide as its FFN, Switch load-balancing loss 0.01."""
    cfg = PRESETS[base]()
    return cfg.replace(**{"ffn": "moe", "moe_experts": 8, **kw})


PRESETS: dict[str, Any] = {
    "bert-base": lambda: _bert(),
    "bert-large": lambda: _bert(d_model=1024, n_layers=24, n_heads=16, d_ff=4096),
    "roberta-base": lambda: _roberta(),
    "gpt2": lambda: _gpt2(),
    "gpt2-medium": lambda: _gpt2(d_model=1024, n_layers=24, n_heads=16, d_ff=4096),
    "t5-small": lambda: _t5(d_model=512, n_layers=6, n_heads=8, d_ff=2048),
    "t5-base": lambda: _t5(d_model=768, n_layers=12, n_heads=12, d_ff=3072),
    "bart-base": lambda: _bart(d_model=768, n_layers=6, n_heads=12, d_ff=3072),
    # tiny variants for CPU experiments (pre-training resizes the vocabulary to its tokenizer)
    "bert-tiny": lambda: _bert(
        **_TINY, n_layers=4, pad_token_id=0, unk_token_id=1, cls_token_id=2, sep_token_id=3, mask_token_id=4
    ),
    "gpt2-tiny": lambda: _gpt2(**_TINY, n_layers=4, bos_token_id=0, eos_token_id=0),
    "t5-tiny": lambda: _t5(**{**_TINY, "d_model": 256}, n_layers=4, head_dim=64),
    "bart-tiny": lambda: _bart(**_TINY, n_layers=3, mask_token_id=4),
    # LLaMA / Mixtral layout: RMSNorm, RoPE, SwiGLU, grouped-query attention, no biases, untied head
    "llama-tiny": lambda: _gpt2(
        **{**_TINY, "d_ff": 704},
        n_layers=4,
        n_kv_heads=2,
        position="rope",
        norm="rmsnorm",
        norm_eps=1e-5,
        activation="swiglu",
        bias=False,
        tie_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    ),
    "prefix-lm-tiny": lambda: ModelConfig(
        family="prefix-lm",
        **{**_TINY, "d_ff": 704},
        n_layers=4,
        position="rope",
        norm="rmsnorm",
        activation="swiglu",
        bias=False,
        heads=("lm",),
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    ),
    # ---- Mixture-of-Experts: one word per routing scheme (see lmlab.model.moe) ----
    # CPU-sized: GPT-2-tiny or LLaMA-style tiny decoders, 8 experts the size of the dense FFN unless noted
    "switch-tiny": lambda: _moe(
        "gpt2-tiny", moe_top_k=1, moe_capacity_factor=1.25, moe_every=2, moe_jitter=0.01, moe_z_weight=0.001
    ),
    "gshard-tiny": lambda: _moe("gpt2-tiny", moe_top_k=2, moe_capacity_factor=1.0, moe_every=2),
    "mixtral-tiny": lambda: _moe("llama-tiny", moe_top_k=2),
    "moepp-tiny": lambda: _moe(
        "llama-tiny",
        moe_top_k=2,
        moe_zero_experts=1,
        moe_copy_experts=1,
        moe_constant_experts=2,
        moe_gating_residual=True,
    ),
    # fine-grained: 16 experts of a quarter width, 3 routed + 1 shared = the dense FFN's active width
    "deepseekmoe-tiny": lambda: _moe(
        "llama-tiny",
        moe_experts=16,
        moe_d_ff=176,
        moe_top_k=3,
        moe_shared_experts=1,
        moe_renormalize=False,
        moe_first_dense=1,
    ),
    # Soft MoE mixes tokens across a sequence, so it is an encoder: 8 experts x 16 slots = 128 tokens
    "softmoe-tiny": lambda: _moe("bert-tiny", moe_router="soft", moe_slots=16, moe_every=2),
    "bert-tiny-moe": lambda: _moe("bert-tiny", moe_top_k=2, moe_every=2),
    "t5-tiny-moe": lambda: _moe(
        "t5-tiny", moe_top_k=1, moe_capacity_factor=1.25, moe_every=2, moe_jitter=0.01, moe_z_weight=0.001
    ),  # Switch Transformer's own layout
    "bart-tiny-moe": lambda: _moe("bart-tiny", moe_top_k=2, moe_every=2),
    "prefix-lm-tiny-moe": lambda: _moe("prefix-lm-tiny", moe_top_k=2, moe_every=2),
    # published shapes (for `lmlab info`; training them needs far more than a CPU)
    "switch-base-8": lambda: _moe(
        "t5-base",
        moe_top_k=1,
        moe_capacity_factor=1.25,
        moe_every=2,
        moe_jitter=0.01,
        moe_z_weight=0.001,
        moe_aux_weight=0.001,
    ),
    "mixtral-8x7b": lambda: _moe(
        "llama-tiny",
        vocab_size=32000,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        d_ff=14336,
        max_seq_len=32768,
        rope_theta=1e6,
        moe_top_k=2,
        moe_aux_weight=0.001,
    ),
    "deepseek-moe-16b": lambda: _moe(
        "llama-tiny",
        vocab_size=102400,
        d_model=2048,
        n_layers=28,
        n_heads=16,
        n_kv_heads=None,
        d_ff=10944,
        max_seq_len=4096,
        norm_eps=1e-6,
        moe_experts=64,
        moe_d_ff=1408,
        moe_top_k=6,
        moe_shared_experts=2,
        moe_renormalize=False,
        moe_first_dense=1,
        moe_aux_weight=0.001,
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset's config, with any fields overridden."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    cfg = PRESETS[name]()
    cfg.name = name
    if "d_model" in overrides and "head_input_scale" not in overrides and cfg.head_input_scale == cfg.d_model**-0.5:
        overrides["head_input_scale"] = overrides["d_model"] ** -0.5  # T5's d_model**-0.5 follows the new width
    return cfg.replace(**overrides) if overrides else cfg
