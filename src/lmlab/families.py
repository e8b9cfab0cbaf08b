"""What a model family *is*, in one place.

Every "which family" question in lmlab (which stacks to build, which mask the self-attention uses,
which preset / objective / tokenizer a run gets by default, how the model is evaluated on text,
which special tokens wrap a task's input, how a classifier pools) asks the family's `FamilySpec`.
Adding a family is one entry here, not a search for `family ==` tests.

This module imports nothing else of lmlab, so anything may import it.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100  # the label of a position that carries no loss (transformers' and torch's convention)
OBJECTIVES = ("clm", "mlm-nsp", "mlm", "span", "infilling", "prefix-lm", "prefix-seq2seq")  # lmlab.data.objectives
TOKENIZER_KINDS = ("wordpiece", "bpe", "unigram")  # lmlab.tokenizer


@dataclass(frozen=True)
class FamilySpec:
    name: str
    stacks: tuple[str, ...]  # "encoder", "decoder": the stacks of Blocks the model builds
    self_attention: str  # mask policy of the stack the heads read: bidirectional | causal | prefix
    default_preset: str  # the CPU-sized preset a run without --preset starts from
    default_objective: str  # the pre-training objective a run without --objective uses
    objectives: tuple[str, ...]  # every pre-training objective that can train this family
    tokenizer_kind: str  # wordpiece | bpe | unigram, trained when a run brings no tokenizer
    eval_method: str  # how `lmlab eval` scores text: pseudo-perplexity | clm | prefix-lm | span
    lm_heads: tuple[str, ...]  # the vocabulary heads this family can carry
    # special-token roles a task's input is wrapped in: (before, after), e.g. [CLS] text [SEP]
    wrap: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
    pooling: str = "last"  # default classification pooling: cls | last | mean
    tasks: tuple[str, ...] = ("classify", "ner", "qa")  # the fine-tuning tasks (lmlab.tasks) it can learn
    # the model shifts labels itself: position t's logits are scored against token t+1
    shifts_labels: bool = False

    @property
    def has_encoder(self) -> bool:
        return "encoder" in self.stacks

    @property
    def has_decoder(self) -> bool:
        return "decoder" in self.stacks

    @property
    def seq2seq(self) -> bool:
        """Two stacks: the input goes to the encoder, outputs come from the decoder."""
        return len(self.stacks) == 2

    @property
    def generative(self) -> bool:
        return "lm" in self.lm_heads


FAMILIES: dict[str, FamilySpec] = {
    "encoder": FamilySpec(
        name="encoder",
        stacks=("encoder",),
        self_attention="bidirectional",
        default_preset="bert-tiny",
        default_objective="mlm-nsp",
        objectives=("mlm-nsp", "mlm"),
        tokenizer_kind="wordpiece",
        eval_method="pseudo-perplexity",
        lm_heads=("mlm", "nsp"),
        wrap=(("cls",), ("sep",)),
        pooling="cls",
    ),
    "decoder": FamilySpec(
        name="decoder",
        stacks=("decoder",),
        self_attention="causal",
        default_preset="gpt2-tiny",
        default_objective="clm",
        objectives=("clm",),
        tokenizer_kind="bpe",
        eval_method="clm",
        lm_heads=("lm",),
        tasks=("classify", "ner", "qa", "seq2seq", "chat"),
        shifts_labels=True,
    ),
    "encoder-decoder": FamilySpec(
        name="encoder-decoder",
        stacks=("encoder", "decoder"),
        self_attention="causal",
        default_preset="t5-tiny",
        default_objective="span",
        objectives=("span", "infilling", "prefix-seq2seq"),
        tokenizer_kind="unigram",
        eval_method="span",
        lm_heads=("lm",),
        wrap=((), ("eos",)),
        tasks=("classify", "ner", "qa", "seq2seq"),
    ),
    "prefix-lm": FamilySpec(
        name="prefix-lm",
        stacks=("decoder",),
        self_attention="prefix",
        default_preset="prefix-lm-tiny",
        default_objective="prefix-lm",
        objectives=("prefix-lm", "clm"),
        tokenizer_kind="bpe",
        eval_method="prefix-lm",
        lm_heads=("lm",),
        tasks=("classify", "ner", "qa", "seq2seq", "chat"),
        shifts_labels=True,
    ),
}
FAMILY_NAMES = tuple(FAMILIES)


def family(name: str) -> FamilySpec:
    """The spec of a family name; a ValueError naming the known families otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown family {name!r}; expected one of {', '.join(FAMILIES)}") from None


def families_for_objective(objective: str) -> tuple[str, ...]:
    return tuple(f.name for f in FAMILIES.values() if objective in f.objectives)
