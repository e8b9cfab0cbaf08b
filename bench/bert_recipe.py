"""Why the tiny BERT stayed on the unigram plateau, with transformers as the referee.

Three encoders of the same size (2 layers, 128 wide, 4 heads, FFN 512, no dropout) learn masked LM
(RoBERTa's dynamic masking, no NSP) from the same batches of the built-in corpus, with one shared
byte-level BPE vocabulary of 4,096, the same AdamW (decay / no-decay groups, betas 0.9 / 0.98, weight
decay 0.1), the same warm-up + cosine schedule and the same steps, alternating step by step in one
process:

  bert      lmlab post-LN with learned positions (BERT's layout)  vs transformers' BertForMaskedLM
  roformer  lmlab post-LN with rotary positions                     vs transformers' RoFormerForMaskedLM
  recipe    lmlab pre-LN with rotary positions (lmlab compare's encoder; transformers has no such BERT)

Both libraries initialise with the same std (`--init-std`, transformers' initializer_range).
Every `--eval-every` steps each model predicts every 7th token of the same held-out windows (all
masked at once), beside the unigram baseline (always the training split's most frequent token).

    python bench/bert_recipe.py                                # the recipe: T 64, batch 32, lr 2e-3, mask 0.3, std 0.05
    python bench/bert_recipe.py --init-std 0.02                # GPT-2 / BERT's initialisation
    python bench/bert_recipe.py --seq-len 128 --batch-size 16 --lr 5e-4 --mask 0.15 --warmup 20   # the old demo's
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from lmlab.compare.measure import masked_accuracy, unigram_top, windows
from lmlab.config import ModelConfig
from lmlab.data.corpus import demo_corpus, read_corpus
from lmlab.data.objectives import Batches, ObjectiveConfig, make_objective
from lmlab.data.store import build_store
from lmlab.model import Model
from lmlab.tokenizer import train_shared_tokenizer
from lmlab.train.optim import make_optimizer, make_scheduler


class _HF(torch.nn.Module):
    """A transformers masked LM behind lmlab's call: model(input_ids=..., labels=...) -> .loss / .logits."""

    def __init__(self, model: torch.nn.Module, config) -> None:
        super().__init__()
        self.model, self.config = model, config

    def forward(self, input_ids, labels=None, **_):
        return self.model(input_ids=input_ids, labels=labels)


def build(name: str, tok, a) -> list[tuple[str, torch.nn.Module]]:
    body = dict(
        family="encoder",
        vocab_size=tok.vocab_size,
        d_model=128,
        n_layers=2,
        n_heads=4,
        d_ff=512,
        dropout=0.0,
        attn_dropout=0.0,
        heads=("mlm",),
        init_std=a.init_std,
        **tok.model_ids(),
    )
    post = dict(norm_placement="post", embed_norm=True, final_norm=False, norm_eps=1e-12)
    if name == "recipe":
        return [("lmlab pre-LN rope", Model(ModelConfig(**body, position="rope", max_seq_len=512)))]
    import transformers

    hf_common = dict(
        vocab_size=tok.vocab_size,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=512,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        type_vocab_size=1,
        pad_token_id=tok.pad_id,
        tie_word_embeddings=True,
        initializer_range=a.init_std,
    )
    if name == "bert":
        ours = Model(ModelConfig(**body, **post, position="learned", max_seq_len=a.seq_len))
        hf = transformers.BertForMaskedLM(transformers.BertConfig(**hf_common, max_position_embeddings=a.seq_len))
        return [("lmlab post-LN learned", ours), ("transformers BertForMaskedLM", _HF(hf, ours.config))]
    ours = Model(ModelConfig(**body, **post, position="rope", max_seq_len=512))
    hf = transformers.RoFormerForMaskedLM(
        transformers.RoFormerConfig(**hf_common, embedding_size=128, max_position_embeddings=512)
    )
    return [("lmlab post-LN rope", ours), ("transformers RoFormerForMaskedLM", _HF(hf, ours.config))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--mask", type=float, default=0.3)
    ap.add_argument("--init-std", type=float, default=0.05, help="initialisation std of both libraries")
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--pairs", nargs="+", default=["bert", "roformer", "recipe"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the curves here")
    a = ap.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"# {cpu}, {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    files = [demo_corpus("kjv")]
    tok = train_shared_tokenizer(read_corpus(files, "blank"), 4096)
    store, _ = build_store(files, tok, "runs/cache", "blank")
    splits = store.split(0.05, 0)
    obj = make_objective(ObjectiveConfig("mlm", a.seq_len, mask_prob=a.mask), store, splits["train"], tok, "train")
    train_stream = store.stream(splits["train"], tok.eos_id, "train")
    wins = windows(store.stream(splits["val"], tok.eos_id, "val"), a.seq_len, 48)
    top = unigram_top(tok, train_stream)
    models = []
    for pair in a.pairs:
        torch.manual_seed(a.seed)
        for label, model in build(pair, tok, a):
            opt = make_optimizer(model, a.lr, 0.1, (0.9, 0.98))
            sched = make_scheduler(opt, a.warmup, a.steps, "cosine", 0.1)
            models.append({"label": label, "model": model, "opt": opt, "sched": sched, "curve": [], "time": 0.0})
    batches = Batches(obj, a.batch_size, a.seed)

    baseline = {}

    def evaluate(step: int) -> None:
        for m in models:
            m["model"].eval()
            r = masked_accuracy(m["model"], tok, wins, top)
            m["model"].train()
            m["curve"].append([step, r["accuracy"]])
        base = baseline["unigram"] = r["unigram_accuracy"]
        print(
            f"step {step:4d}  "
            + "  ".join(f"{m['label']} {m['curve'][-1][1]:.3f}" for m in models)
            + f"  unigram {base:.3f}"
        )

    evaluate(0)
    for step in range(1, a.steps + 1):
        batch = batches.next_batch()
        for m in models:  # the same batch for every model, alternating
            t0 = time.perf_counter()
            out = m["model"](input_ids=batch["input_ids"], labels=batch["labels"])
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(m["model"].parameters(), 1.0)
            m["opt"].step()
            m["sched"].step()
            m["opt"].zero_grad(set_to_none=True)
            m["time"] += time.perf_counter() - t0
        if step % a.eval_every == 0 or step == a.steps:
            evaluate(step)
    print(f"\nunigram baseline (always {tok.decode([top])!r}): {baseline['unigram']:.3f}")
    print("| model | " + " | ".join(f"step {s}" for s, _ in models[0]["curve"]) + " | s/step |")
    print("|---|" + "---|" * (len(models[0]["curve"]) + 1))
    for m in models:
        cells = " | ".join(f"{acc:.1%}" for _, acc in m["curve"])
        print(f"| {m['label']} | {cells} | {m['time'] / a.steps:.3f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {"args": vars(a), "unigram": baseline["unigram"], "curves": {m["label"]: m["curve"] for m in models}}, f
            )


if __name__ == "__main__":
    main()
