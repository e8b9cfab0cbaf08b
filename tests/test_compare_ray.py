"""`lmlab compare --ray`: the units as Ray tasks give the sequential run's results, survive a killed worker,
spread over the nodes of a cluster, and without Ray the flag names the extra."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from reliability import ray_units
from reliability.ray_units import alive, parent, unit_processes

import lmlab
from lmlab.compare import CompareConfig

# four units (two families x two seeds) of a few seconds each; --unit-cpus 1 here and on Ray: the same torch
# threads, so the same floating-point sums (2 threads and 1 differ in the 5th digit of a loss)
SETTINGS = {**ray_units.SETTINGS, "tasks": []}


@pytest.fixture(scope="module")
def kjv(kjv_lines):
    return kjv_lines


def _compare(out: Path, kjv: Path, events: list | None = None, **kw) -> dict:
    from lmlab.compare import compare

    cc = CompareConfig(**{**SETTINGS, **kw}, out=str(out), data=[str(kjv)])
    compare(cc, (lambda kind, info: events.append((kind, info))) if events is not None else None)
    return json.loads((out / "results.json").read_text())


def _same(a: dict, b: dict) -> None:
    assert ray_units.same_results(a, b)


def _ran_on(results: dict) -> dict[str, dict]:
    return {f"{c['name']}/seed{r['seed']}": r["ran_on"] for c in results["contenders"] for r in c["runs"]}


@pytest.fixture(scope="module")
def sequential(tmp_path_factory, kjv):
    return _compare(tmp_path_factory.mktemp("sequential") / "run", kjv)


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # a new one, of 2 CPUs
    yield ray
    ray.shutdown()


def test_units_run_two_at_a_time_on_ray_and_give_the_sequential_results(local_ray, sequential, kjv, tmp_path):
    events: list = []
    # ship: the inputs go through Ray's object store and every unit's folder comes back (here the node
    # would also see the folder; auto, the default, is what the next test takes)
    results = _compare(tmp_path / "run", kjv, events, ray="local", ray_files="ship")
    _same(results, sequential)
    ran_on = _ran_on(results)
    assert len(ran_on) == 4 and {w["attempt"] for w in ran_on.values()} == {1}
    # two at a time (2 CPUs, 1 per unit): at the start of each unit, at most one other was running, and
    # some unit started while another ran
    spans = sorted((w["started"], w["ended"]) for w in ran_on.values())
    together = [sum(s <= start < e for s, e in spans) for start, _ in spans]
    assert max(together) == 2, spans
    for key in ran_on:  # the folder came back whole, its spec naming this folder's paths
        unit = tmp_path / "run" / "runs" / key
        assert (unit / "model" / "model.safetensors").is_file() and (unit / "pretrain" / "metrics.jsonl").is_file()
        assert json.loads((unit / "spec.json").read_text())["dir"] == str(unit)
    placed = [info["where"] for kind, info in events if kind == "unit" and info.get("where")]
    assert placed and all(w.startswith(ran_on["decoder/seed0"]["host"]) for w in placed)
    again: list = []  # resuming: every unit is kept by its fingerprint, none is sent to Ray again
    _compare(tmp_path / "run", kjv, again, ray="local")
    assert [i["status"] for k, i in again if k == "unit"] == ["done (kept)"] * 4


@pytest.mark.slow  # about 30 s; the campaign: pytest -m slow tests/test_compare_ray.py
def test_a_unit_on_several_processes_runs_its_torchrun_in_a_placement_group(local_ray, kjv, tmp_path):
    kw = dict(families=["decoder"], seeds=1, precision="fp32", unit_cpus=2)
    one = _compare(tmp_path / "one", kjv, **kw)
    two = _compare(tmp_path / "two", kjv, nproc=2, ray="local", **kw)
    run_one, run_two = one["contenders"][0]["runs"][0], two["contenders"][0]["runs"][0]
    assert run_two["pretrain"]["processes"] == 2 and run_two["ran_on"]["placement_group"]
    losses = [[row[-1] for row in r["pretrain"]["curve"]] for r in (run_one, run_two)]
    assert len(losses[0]) >= 2 and losses[1] == pytest.approx(losses[0], abs=1e-5, rel=0)  # one process's


def _kill_workers(out: Path, kjv: Path, key: str, times: int) -> tuple[dict, list[int]]:
    """Run the comparison on Ray, SIGKILLing the Ray worker under the unit `key` once it is under way, in
    `times` attempts; returns what the comparison gave (results or error) and the unit processes killed."""
    done: dict = {}

    def run() -> None:
        try:
            done["results"] = _compare(out, kjv, ray="local")
        except lmlab.LmlabError as e:
            done["error"] = str(e)

    driver = threading.Thread(target=run)
    driver.start()
    killed: list[int] = []
    stage = out / "runs" / key / "stage.json"
    deadline = time.time() + 120
    while len(killed) < times and time.time() < deadline and driver.is_alive():
        pid = unit_processes(out).get(key, (None,))[0]
        if pid not in (None, *killed) and stage.is_file() and '"done"' not in stage.read_text():  # mid-way
            os.kill(parent(pid), signal.SIGKILL)  # the Ray worker running the task
            killed.append(pid)
        time.sleep(0.02)
    driver.join(timeout=300)
    assert len(killed) == times, "the unit finished before its worker could be killed"
    assert not any(alive(pid) for pid in killed)  # each attempt's unit died with its worker
    return done, killed


def test_a_unit_whose_ray_worker_is_killed_runs_again_and_the_results_hold(local_ray, sequential, kjv, tmp_path):
    done, _ = _kill_workers(tmp_path / "run", kjv, "decoder/seed0", times=1)
    _same(done["results"], sequential)
    ran_on = _ran_on(done["results"])
    assert ran_on["decoder/seed0"]["attempt"] == 2
    assert all(w["attempt"] == 1 for k, w in ran_on.items() if k != "decoder/seed0")


@pytest.mark.slow  # about 30 s; the campaign: pytest -m slow tests/test_compare_ray.py
def test_a_unit_lost_twice_stops_the_comparison_by_name_and_a_rerun_resumes(local_ray, sequential, kjv, tmp_path):
    done, _ = _kill_workers(tmp_path / "run", kjv, "decoder/seed0", times=2)
    assert "results" not in done
    assert "the unit decoder seed 0 was lost twice on Ray" in done["error"]
    events: list = []
    again = _compare(tmp_path / "run", kjv, events, ray="local")
    _same(again, sequential)
    statuses = {
        f"{i['contender']}/seed{i['seed']}": i["status"] for k, i in events if k == "unit" and "done" in i["status"]
    }
    assert statuses["decoder/seed0"] == "done"  # run again; a unit finished before the stop is kept
    assert "done (kept)" in statuses.values()


def test_without_ray_the_flag_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed: `import ray` raises ImportError
    with pytest.raises(lmlab.ConfigError, match=r"pip install 'lmlab\[ray\]'"):
        _compare(tmp_path / "run", tmp_path / "none.txt", ray="local")
    assert not (tmp_path / "run").exists()  # refused before any work


def test_ray_settings_are_checked_and_stay_out_of_the_fingerprint():
    cc = CompareConfig(**SETTINGS)
    same = CompareConfig(**{**SETTINGS, "unit_cpus": 4}, ray="127.0.0.1:6379", unit_gpus=1, ray_files="ship")
    assert cc.fingerprint() == same.fingerprint()
    for bad, match in (
        (dict(unit_gpus=1), "give --ray too"),
        (dict(unit_cpus=0), "--unit-cpus must be at least 1"),
        (dict(ray="local", unit_gpus=1.5), "whole number"),
        (dict(ray="local", ray_files="nfs"), "--ray-files 'nfs' is unknown"),
    ):
        with pytest.raises(lmlab.ConfigError, match=match):
            CompareConfig(**{**SETTINGS, **bad}).validate()


def test_a_unit_that_asks_for_more_than_any_node_has_is_refused(local_ray, kjv, tmp_path):
    with pytest.raises(lmlab.ConfigError, match=r"asks for 1 CPUs and 1 GPUs .* which no node .* has"):
        _compare(tmp_path / "run", kjv, ray="local", unit_gpus=1.0)


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait_for(ready, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while not ready():
        assert time.time() < deadline, "the Ray cluster did not come up"
        time.sleep(0.5)


TWO_NODE_DRIVER = """
import json, sys, time
import ray
from lmlab.compare import CompareConfig, compare
settings = json.loads(sys.argv[1])
ray.init(address=settings["ray"], log_to_driver=False)
deadline = time.time() + 60
while sum(n["Alive"] for n in ray.nodes()) < 2:
    assert time.time() < deadline, "the second Ray node did not join"
    time.sleep(0.5)
compare(CompareConfig(**settings))
"""


@pytest.mark.slow
def test_units_spread_over_the_nodes_of_a_two_node_cluster(sequential, kjv, tmp_path):
    pytest.importorskip("ray")
    # on the loopback without Ray 2.60's token authentication; docs/compare-on-ray.md starts a real cluster
    # with tokens
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    port = "6391"
    ray_cli = [str(Path(sys.executable).parent / "ray"), "start", "--block", "--num-cpus", "1", "--disable-usage-stats"]
    # --block: each node lives as long as its `ray start`, stopped below without touching any other Ray here
    nodes = [subprocess.Popen([*ray_cli, "--head", "--port", port, "--include-dashboard", "false"], env=env)]
    settings = {**SETTINGS, "out": str(tmp_path / "run"), "data": [str(kjv)], "ray": f"127.0.0.1:{port}"}
    try:
        _wait_for(lambda: _listening(int(port)))
        nodes.append(subprocess.Popen([*ray_cli, "--address", f"127.0.0.1:{port}"], env=env))
        # the driver, a process of its own as `lmlab compare` is: it waits for both nodes, then compares
        subprocess.run([sys.executable, "-c", TWO_NODE_DRIVER, json.dumps(settings)], env=env, check=True, timeout=600)
    finally:
        for node in reversed(nodes):
            node.terminate()
            node.wait(timeout=60)
        # `ray start` records its address for later drivers on this machine; the cluster is gone
        recorded = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if recorded.is_file() and recorded.read_text().strip().endswith(f":{port}"):
            recorded.unlink()
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    _same(results, sequential)
    ran_on = _ran_on(results)
    assert len({w["node"] for w in ran_on.values()}) == 2  # both nodes ran units
    for key in ran_on:
        assert (tmp_path / "run" / "runs" / key / "result.json").is_file()
        assert (tmp_path / "run" / "runs" / key / "model" / "model.safetensors").is_file()
