"""How long a checkpoint stops training: the full format, the sharded one, and the sharded one written in
the background (`--async-save`), on a GPT-2-small-shaped model with its AdamW state, in one process.

For each format, in rounds that alternate the three:
- `blocked`: the time the training loop waits (the whole save for full and sharded; for async, the
  in-memory copy before the thread takes over);
- `total`: until the checkpoint is published (for async: until the background write has finished);
- the size on disk.
Then a check that each checkpoint resumes into the same weights.

    python bench/checkpoint.py                   # 12 layers, width 768 (124M parameters)
    python bench/checkpoint.py --layers 4 --d-model 512 --rounds 5
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import environment

from lmlab import Model, preset
from lmlab.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_sharded_checkpoint
from lmlab.train.optim import make_optimizer


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()

    torch.manual_seed(0)
    cfg = preset("gpt2", vocab_size=a.vocab, n_layers=a.layers, d_model=a.d_model, n_heads=a.heads, d_ff=4 * a.d_model)
    model = Model(cfg)
    optimizer = make_optimizer(model, 1e-4, 0.1, (0.9, 0.98))
    model(input_ids=torch.randint(0, a.vocab, (2, 16)), labels=torch.randint(0, a.vocab, (2, 16))).loss.backward()
    optimizer.step()  # the AdamW state exists, as in a checkpoint mid-run
    state = {"step": 1, "rng_torch": torch.get_rng_state()}
    print(environment(note=f"{model.num_parameters() / 1e6:.0f}M parameters, float32, AdamW"))

    times: dict[str, dict[str, list[float]]] = {k: {"blocked": [], "total": []} for k in ("full", "sharded", "async")}
    sizes: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for kind in times:
                run = Path(tmp) / f"{kind}-{r}"
                t0 = time.perf_counter()
                if kind == "full":
                    save_checkpoint(run, 1, model, optimizer, state)
                    blocked = time.perf_counter() - t0
                else:
                    pending = save_sharded_checkpoint(run, 1, model, optimizer, state, background=kind == "async")
                    blocked = time.perf_counter() - t0
                    pending.finish()
                times[kind]["total"].append(time.perf_counter() - t0)
                times[kind]["blocked"].append(blocked)
                sizes[kind] = _size(latest_checkpoint(run))
                if r:  # round 0's are read back below; the others only take disk space
                    shutil.rmtree(run)
        # each format reads back into the weights it saved
        for kind in times:
            fresh = Model(cfg)
            opt = make_optimizer(fresh, 1e-4, 0.1, (0.9, 0.98))
            load_checkpoint(latest_checkpoint(Path(tmp) / f"{kind}-0"), fresh, opt)
            same = all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters()))
            assert same, f"{kind}: the checkpoint did not restore the weights"

    print(f"\nmedian of {a.rounds} rounds; blocked = what the training loop waits\n")
    print("| format | blocked s | until published s | size MB |")
    print("|---|---|---|---|")
    for kind, t in times.items():
        blocked, total = statistics.median(t["blocked"]), statistics.median(t["total"])
        print(f"| {kind} | {blocked:.2f} | {total:.2f} | {sizes[kind] / 1e6:.0f} |")


if __name__ == "__main__":
    main()
