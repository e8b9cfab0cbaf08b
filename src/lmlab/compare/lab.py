"""The comparison lab: the families side by side on one text, under one budget.

`compare(cc)` trains one shared tokenizer, plans every contender's budget, builds the held-out
measurements that do not depend on a model (the Kneser-Ney baseline, the unigram baseline, the
multiple-choice questions, the fine-tuning tasks), runs each (contender, seed) unit in its own process
(lmlab.compare.unit; here one after another, or side by side as Ray tasks with --ray: lmlab.compare.ray_units),
and writes results.json, report.md and report.html (lmlab.compare.report).
Rerunning the same command skips every unit whose result.json carries the same fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmlab.compare import measure
from lmlab.compare.baselines import chance, task_baselines
from lmlab.compare.contenders import Contender, batch_tokens, contenders, model_config, train_flops_per_step
from lmlab.compare.launch import failure, read_json, start_unit, write_json
from lmlab.compare.results import UnitResult
from lmlab.compare.settings import CompareConfig
from lmlab.data.corpus import corpus_files, demo_corpus, read_corpus
from lmlab.data.objectives import Batches, ObjectiveConfig, make_objective
from lmlab.data.store import build_store
from lmlab.errors import ConfigError, DataError
from lmlab.info import model_stats, stack_matmul_weights
from lmlab.runtime import can_compile
from lmlab.tokenizer import load_tokenizer, train_shared_tokenizer

# the demo's budget: equal training FLOPs, the smallest on the recorded budget curve at which a decoder of
# the default body beats the Kneser-Ney trigram's held-out bits per byte (docs/benchmarks.md: 1.24 at
# 3.2e12, 1.16 at 6.4e12 against the trigram's 1.20); --quick: a third
DEMO_FLOPS = 6.4e12
RESULTS_FORMAT = 2  # 2: per-example evidence; results of another format are measured again
MIN_STEPS = 20  # fewer optimizer steps than this train nothing worth comparing
MANY_PASSES = 8  # a budget that goes over the training text more often than this is noted in the report
EVENT = Callable[[str, dict[str, Any]], None]


def _cache(cc: CompareConfig) -> Path:
    return Path(cc.cache_dir) if cc.cache_dir else Path(os.environ.get("LMLAB_CACHE", Path.home() / ".cache" / "lmlab"))


def machine() -> dict[str, Any]:
    import tokenizers
    import transformers  # noqa: F401  (only its version, when it is installed)

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__}
    info["tokenizers"] = tokenizers.__version__
    from importlib.metadata import version

    info["lmlab"] = version("lmlab")
    info["cpu"], info["flags"] = _cpu()
    info["threads"] = torch.get_num_threads()
    return info


def _cpu() -> tuple[str, list[str]]:
    model, flags = platform.processor() or "unknown", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("unknown", "", "x86_64"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                flags = sorted(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in have)
                break
    except OSError:
        pass
    return model, flags


class Plan:
    """What a comparison will run: the contenders with their configs, FLOPs per step and steps."""

    def __init__(self, cc: CompareConfig, tok: Any, store: Any, splits: dict[str, np.ndarray]) -> None:
        self.cc, self.rows = cc, []
        budget = cc.budget_value
        if budget is None:
            budget = {"flops": DEMO_FLOPS, "tokens": 2.8e6, "minutes": 2.0}[cc.budget]
            if cc.quick:
                budget /= 3
        self.budget = budget
        for c in contenders(cc):
            cfg = model_config(cc, c, tok)
            ocfg = ObjectiveConfig(c.objective, cc.seq_len, mask_prob=cc.mask_prob)
            obj = make_objective(ocfg, store, splits["train"], tok, "train")
            sample = Batches(obj, cc.batch_size, 0)
            counts = [
                batch_tokens({k: v.numpy() for k, v in sample.next_batch().items()}, cfg, tok.pad_id) for _ in range(8)
            ]
            tokens = {k: float(np.mean([t[k] for t in counts])) for k in counts[0]}
            flops = train_flops_per_step(cfg, stack_matmul_weights(cfg, cc.seq_len), tokens)
            stats = model_stats(cfg, cc.seq_len)
            tokens_per_step = cc.batch_size * obj.tokens_per_example
            steps = minutes = None
            if cc.budget == "flops":
                steps = int(budget // flops)
            elif cc.budget == "tokens":
                steps = int(budget // tokens_per_step)
            else:
                minutes = budget
            self.rows.append(
                {
                    "contender": c,
                    "cfg": cfg,
                    "flops_per_step": flops,
                    "steps": steps,
                    "minutes": minutes,
                    "tokens_per_step": tokens_per_step,
                    "stack_tokens_per_step": tokens,
                    "params": stats.total_params,
                    "active_params": stats.active_params,
                    "non_embedding_params": stats.non_embedding_params,
                }
            )
        short = [r for r in self.rows if r["steps"] is not None and r["steps"] < MIN_STEPS]
        if short:
            need = max(r["flops_per_step"] if cc.budget == "flops" else r["tokens_per_step"] for r in self.rows)
            unit = "training FLOPs" if cc.budget == "flops" else "training tokens"
            raise ConfigError(
                f"a budget of {budget:.3g} {unit} gives {short[0]['contender'].name} only {short[0]['steps']} steps; "
                f"the smallest useful budget is {need * MIN_STEPS:.3g} {unit} ({MIN_STEPS} steps of the costliest contender)"
            )


# the built-in corpora `--data NAME` names: (file of lmlab.data.demo, its fine-tuning tasks, the least
# held-out fraction: the Chinese corpus is small, and a fifth of it gives about 200 questions)
BUILTIN_DATA: dict[str, tuple[str, tuple[str, ...], float]] = {
    "kjv": ("kjv", ("kjv-sections", "kjv-italics", "nave-qa"), 0.0),
    "zh": ("zh-poems", ("zh-poets",), 0.2),
}


def builtin_data(cc: CompareConfig) -> str | None:
    """The built-in corpus a comparison reads (no --data: kjv), or None for the user's files."""
    if not cc.data:
        return "kjv"
    if len(cc.data) == 1 and cc.data[0] in BUILTIN_DATA and not Path(cc.data[0]).exists():
        return cc.data[0]
    return None


def _builtin_task(name: str, out: Path) -> dict[str, Any]:
    if name == "zh-poets":
        from lmlab.data.zh import build_zh_poets

        return build_zh_poets(out)
    from lmlab.data.kjv import builtin_task

    return builtin_task(name, out)


def build_tasks(cc: CompareConfig, out: Path, builtin_corpus: str | None) -> tuple[list[dict[str, Any]], list[str]]:
    """The fine-tuning tasks: the built-in corpus's own, and the user's files (a file is split 80/20 by
    line unless given as TRAIN:EVAL). Returns (tasks, notes)."""
    tasks, notes = [], []
    every = {name: corpus for corpus, (_, names, _) in BUILTIN_DATA.items() for name in names}
    for entry in cc.tasks:
        if entry == "builtin" or entry in every:
            wanted = BUILTIN_DATA[builtin_corpus][1] if entry == "builtin" and builtin_corpus else [entry]
            if builtin_corpus is None or any(every[name] != builtin_corpus for name in wanted):
                notes.append(
                    f"{entry}: the built-in tasks ({', '.join(every)}) are built from the built-in corpora; this "
                    "comparison reads other text, so they were left out"
                )
                continue
            for name in wanted:
                tasks.append(_limit(_builtin_task(name, out / "tasks"), cc, out))
            continue
        train, _, evaluation = entry.partition(":")
        path = Path(train)
        if not path.is_file():
            raise DataError(f"--tasks {entry}: {train}: no such file")
        task = _task_of(path)
        name = path.stem if path.stem not in ("train", "dev", "test") else path.parent.name or path.stem
        if evaluation:
            if not Path(evaluation).is_file():
                raise DataError(f"--tasks {entry}: {evaluation}: no such file")
            spec = {"name": name, "task": task, "train": str(path), "eval": evaluation}
        else:
            spec = _split_file(name, task, path, out / "tasks" / name)
        tasks.append(_limit(spec, cc, out))
    return tasks, notes


def _task_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".conll" or suffix == ".txt":
        return "ner"
    if suffix == ".json":
        return "qa"
    if suffix == ".jsonl":
        first = next((line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()), "{}")
        try:
            row = json.loads(first)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:1: not valid JSON ({e.msg})") from None
        if isinstance(row, dict) and "messages" in row or "prompt" in row and "completion" in row:
            return "chat"
        if isinstance(row, dict) and "source" in row and "target" in row:
            return "seq2seq"
    return "classify"


def _split_file(name: str, task: str, path: Path, folder: Path) -> dict[str, Any]:
    """Split one task file 80/20 into train / eval, by record (CoNLL: by sentence; SQuAD: by article)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    text = path.read_text(encoding="utf-8")
    if task == "qa":
        data = json.loads(text)
        articles = list(data.get("data", []))
        rng.shuffle(articles)
        cut = max(1, len(articles) // 5)
        parts = {"eval": {**data, "data": articles[:cut]}, "train": {**data, "data": articles[cut:]}}
        for k, v in parts.items():
            (folder / f"{k}.json").write_text(json.dumps(v))
        return {"name": name, "task": task, "train": str(folder / "train.json"), "eval": str(folder / "eval.json")}
    if task == "ner":
        records = [r for r in text.split("\n\n") if r.strip()]
        joiner, header, suffix = "\n\n", "", ".conll"
    elif path.suffix.lower() in (".tsv", ".csv"):
        lines = text.splitlines()
        header, records, joiner, suffix = (
            lines[0] + "\n",
            [line for line in lines[1:] if line.strip()],
            "\n",
            path.suffix,
        )
    else:
        records, joiner, header, suffix = [line for line in text.splitlines() if line.strip()], "\n", "", ".jsonl"
    if len(records) < 10:
        raise DataError(f"{path}: {len(records)} records; a task needs at least 10 to split into train and eval")
    order = list(range(len(records)))
    rng.shuffle(order)
    cut = max(2, len(records) // 5)
    for part, idx in (("eval", sorted(order[:cut])), ("train", sorted(order[cut:]))):
        (folder / f"{part}{suffix}").write_text(header + joiner.join(records[i] for i in idx) + "\n", encoding="utf-8")
    return {"name": name, "task": task, "train": str(folder / f"train{suffix}"), "eval": str(folder / f"eval{suffix}")}


def _limit(spec: dict[str, Any], cc: CompareConfig, out: Path) -> dict[str, Any]:
    """Keep the first cc.max_task_examples training records (and, when set, cc.max_eval_examples
    evaluation records): lines of TSV / CSV / JSONL, sentences of CoNLL, paragraphs of SQuAD JSON."""
    spec = dict(spec)
    for key, n in (("train", cc.max_task_examples), ("eval", cc.max_eval_examples)):
        if n is None:
            continue
        path = Path(spec[key])
        kept = out / "tasks" / spec["name"] / f"{key}-{n}{path.suffix}"
        limited = _first_records(path, spec["task"], n)
        if limited is not None:
            kept.parent.mkdir(parents=True, exist_ok=True)
            kept.write_text(limited, encoding="utf-8")
            spec[key], spec[f"{key}_full"] = str(kept), str(path)
    return spec


def _first_records(path: Path, task: str, n: int) -> str | None:
    """The text of `path` cut to its first n records, or None when it has no more than n."""
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix in (".tsv", ".csv", ".jsonl"):
        lines = text.splitlines()
        header = lines[:1] if suffix in (".tsv", ".csv") else []
        body = lines[len(header) :]
        return None if len(body) <= n else "\n".join(header + body[:n]) + "\n"
    if task == "ner":
        records = [r for r in text.split("\n\n") if r.strip()]
        return None if len(records) <= n else "\n\n".join(records[:n]) + "\n"
    if task == "qa":
        data = json.loads(text)
        if sum(len(a.get("paragraphs", [])) for a in data.get("data", [])) <= n:
            return None
        left, articles = n, []
        for article in data.get("data", []):
            if left > 0:
                articles.append({**article, "paragraphs": article.get("paragraphs", [])[:left]})
                left -= len(articles[-1]["paragraphs"])
        return json.dumps({**data, "data": articles})
    return None


def compare(cc: CompareConfig, on_event: EVENT | None = None) -> dict[str, Any]:
    """Run (or resume) the comparison `cc`; returns the results written to results.json."""
    from lmlab.compare.report import aggregate, write_reports

    emit = on_event or (lambda kind, info: None)
    cc.validate()
    if cc.ray:  # before any work: without the extra, say so now
        from lmlab.compare.ray_units import import_ray

        import_ray()
    if cc.quick:  # a third of the budget (Plan), one seed, fewer held-out measurements
        cc.seeds = 1
        cc.questions, cc.eval_windows = min(cc.questions, 200), min(cc.eval_windows, 64)
        cc.max_task_examples, cc.samples = min(cc.max_task_examples, 100), min(cc.samples, 4)
        cc.max_eval_examples = min(cc.max_eval_examples or 200, 200)
    out = Path(cc.out)
    out.mkdir(parents=True, exist_ok=True)
    builtin = builtin_data(cc)
    data = [str(demo_corpus(BUILTIN_DATA[builtin][0]))] if builtin else list(cc.data)
    if builtin:
        cc.doc_sep = "blank"
        cc.val_fraction = max(cc.val_fraction, BUILTIN_DATA[builtin][2])
    files = corpus_files(data)
    cache = _cache(cc)

    # one tokenizer for every contender
    emit("stage", {"text": "shared tokenizer"})
    tok_dir = out / "tokenizer"
    tok_key = cc.fingerprint({"only": "tokenizer", "files": [str(f) for f in files]})
    if not (tok_dir / "tokenizer.json").is_file() or read_json(tok_dir / "key.json").get("key") != tok_key:
        tok = train_shared_tokenizer(read_corpus(files, cc.doc_sep, cc.field), cc.vocab_size)
        tok.save(tok_dir)
        write_json(tok_dir / "key.json", {"key": tok_key})
    tok = load_tokenizer(tok_dir)
    store, _ = build_store(files, tok, cache, cc.doc_sep, cc.field)
    splits = store.split(cc.val_fraction, 0)
    val_stream = store.stream(splits["val"], tok.eos_id, "val")
    train_stream = store.stream(splits["train"], tok.eos_id, "train")
    need = cc.seq_len * 8
    if len(val_stream) < need:
        raise DataError(
            f"the held-out split ({len(splits['val'])} of {store.n_docs} documents, {len(val_stream):,} tokens) is "
            f"smaller than the {need:,} tokens (8 windows of seq_len={cc.seq_len}) the measurements need; "
            "give more text, more documents, or a larger --val-fraction"
        )
    plan = Plan(cc, tok, store, splits)
    passes = _passes(plan, len(train_stream))
    emit("plan", {"rows": [_plan_row(r, passes) for r in plan.rows], "seeds": cc.seeds, "budget": plan.budget})
    if cc.plan_only:
        summary = {"plan": [_plan_row(r, passes) for r in plan.rows], "budget": plan.budget, "seeds": cc.seeds}
        summary["train_tokens"] = len(train_stream)
        write_json(out / "plan.json", summary)
        emit("end", {"out": str(out)})
        return summary

    # what does not depend on a model
    emit("stage", {"text": "baselines and questions"})
    wins = measure.windows(val_stream, cc.seq_len, cc.eval_windows)
    base_key = cc.fingerprint({"only": "baselines", "tok": tok_key, "format": RESULTS_FORMAT})
    questions_path = out / "questions.jsonl"
    questions = measure.build_questions(tok, val_stream, cc.questions, seed=0)
    if len(questions) < 8:
        raise DataError(
            f"the held-out text yields {len(questions)} multiple-choice questions; at least 8 are needed "
            "(give more text or a larger --val-fraction)"
        )
    questions_path.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in questions), encoding="utf-8")
    tasks, notes = build_tasks(cc, out, builtin)
    most = max(passes.values(), default=0.0)
    if most > MANY_PASSES:
        name = max(passes, key=passes.get)
        notes.append(
            f"the budget shows {name} its {len(train_stream):,} training tokens {most:.0f} times over: it may learn "
            "the text by heart (give more text, or a smaller budget)"
        )
    if len(questions) < cc.questions:
        notes.append(
            f"the held-out text yields {len(questions)} multiple-choice questions of the {cc.questions} asked for: "
            "their intervals are wider (give more text or a larger --val-fraction)"
        )
    if cc.compile == "auto" and not can_compile():
        notes.append("torch.compile needs a C++ compiler (g++ or clang++) on a CPU; none was found: trained eager")
    baselines = read_json(out / "baselines.json")
    if baselines.get("key") != base_key:
        top = measure.unigram_top(tok, train_stream)
        kn = measure.kneser_ney_bpb(tok, train_stream, wins)
        evidence = {
            "bpb": {"Kneser-Ney trigram": kn.pop("evidence")},
            "masked_accuracy": {"unigram (most frequent token)": measure.unigram_evidence(tok, wins, top, cc.seq_len)},
            "mc_k0": {"chance": chance(questions)},
            "mc_k3": {"chance": chance(questions)},
        }
        for t in tasks:
            found = task_baselines(t)
            if found:
                evidence[f"task:{t['name']}"] = found
        baselines = {
            "key": base_key,
            "kneser_ney": kn,
            "unigram_top": top,
            "unigram_token": tok.decode([top]),
            "evidence": evidence,
        }
        write_json(out / "baselines.json", baselines)

    # the units: one process at a time here, or side by side as Ray tasks (lmlab.compare.ray_units)
    finished: dict[tuple[str, int], UnitResult] = {}
    pending: list[dict[str, Any]] = []
    task_keys = [_task_key(t) for t in tasks]
    for row in plan.rows:
        c: Contender = row["contender"]
        for seed in range(cc.seeds):
            unit_dir = out / "runs" / c.name / f"seed{seed}"
            spec = {
                "compare": cc.to_dict(),
                "contender": c.__dict__,
                "seed": seed,
                "dir": str(unit_dir),
                "tokenizer": str(tok_dir),
                "data": [str(f) for f in files],
                "cache": str(cache),
                "steps": row["steps"],
                "minutes": row["minutes"],
                "questions": str(questions_path),
                "unigram_top": baselines["unigram_top"],
                "tasks": tasks,
                "threads": cc.unit_cpus,  # None: every CPU this machine gives the unit
            }
            spec["fingerprint"] = cc.fingerprint(
                {
                    "contender": c.__dict__,
                    "seed": seed,
                    "steps": row["steps"],
                    "tasks": task_keys,
                    "tok": tok_key,
                    "format": RESULTS_FORMAT,
                }
            )
            done = read_json(unit_dir / "result.json")
            if done.get("fingerprint") == spec["fingerprint"]:
                done = UnitResult.from_dict(done, str(unit_dir / "result.json"))
                emit("unit", {"contender": c.name, "seed": seed, "status": "done (kept)", "result": done})
                finished[(c.name, seed)] = done
            else:
                pending.append(spec)
    if pending and cc.ray:
        from lmlab.compare.ray_units import run_on_ray

        finished.update(run_on_ray(cc, out, pending, emit))
    else:
        for spec in pending:
            finished[(spec["contender"]["name"], spec["seed"])] = _run_unit(spec, Path(spec["dir"]), emit)
    results = {
        row["contender"].name: [finished[(row["contender"].name, seed)] for seed in range(cc.seeds)]
        for row in plan.rows
    }
    summary = aggregate(cc, plan, results, baselines, tasks, notes, machine())
    write_reports(out, summary)
    emit("end", {"out": str(out)})
    return summary


def _task_key(task: dict[str, Any]) -> dict[str, Any]:
    """A task as the fingerprint sees it: its files by content, not by path (the built-in tasks are written
    into the output folder, which a user may move, to shared storage for --ray say, and resume there)."""

    def digest(path: str) -> str:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]

    return {"name": task["name"], "task": task["task"], "train": digest(task["train"]), "eval": digest(task["eval"])}


def _passes(plan: Plan, train_tokens: int) -> dict[str, float]:
    """How many times each contender's budget goes over the training text (FLOPs and tokens budgets)."""
    return {
        r["contender"].name: r["steps"] * r["tokens_per_step"] / max(train_tokens, 1)
        for r in plan.rows
        if r["steps"] is not None
    }


def _plan_row(r: dict[str, Any], passes: dict[str, float]) -> dict[str, Any]:
    c = r["contender"]
    return {
        "contender": c.name,
        "family": c.family,
        "params": r["params"],
        "steps": r["steps"],
        "flops_per_step": r["flops_per_step"],
        "train_flops": r["steps"] * r["flops_per_step"] if r["steps"] is not None else None,
        "tokens": r["steps"] * r["tokens_per_step"] if r["steps"] is not None else None,
        "passes": passes.get(c.name),
    }


def _run_unit(spec: dict[str, Any], unit_dir: Path, emit: EVENT) -> UnitResult:
    name, seed = spec["contender"]["name"], spec["seed"]
    proc, log = start_unit(spec, unit_dir)
    started = time.perf_counter()
    while proc.poll() is None:
        time.sleep(0.5)
        stage = read_json(unit_dir / "stage.json")
        emit(
            "unit",
            {
                "contender": name,
                "seed": seed,
                "status": "running",
                "stage": stage,
                "elapsed": time.perf_counter() - started,
            },
        )
    log.close()
    if proc.returncode != 0:
        raise ConfigError(failure(spec, unit_dir, proc.returncode))
    result = UnitResult.from_dict(read_json(unit_dir / "result.json"), str(unit_dir / "result.json"))
    emit("unit", {"contender": name, "seed": seed, "status": "done", "result": result})
    return result
