"""Reliability campaigns: lmlab attacked the way its users' systems get attacked, with figures.

    python -m tests.reliability crash --kills 50          # kill -9 training runs, resume, compare weights
    python -m tests.reliability hostile                   # model folders broken on purpose, each refused
    python -m tests.reliability fuzz --examples 2000      # every reader on random and mutated files
    python -m tests.reliability server --requests 10000   # malformed bodies against lmlab serve
    python -m tests.reliability stateful --scenarios 200  # schemathesis call sequences over the OpenAPI links
    python -m tests.reliability slow --connections 300    # slowloris against a server process

`crash` (crash.py) kills `lmlab pretrain` runs with SIGKILL in the middle of training steps,
evaluations and checkpoint writes, one process and two (torchrun), resumes each run until it
finishes, and requires the final weights to equal an uninterrupted run's bit for bit. `hostile`
(hostile.py) breaks model folders (safetensors headers, offsets, shapes, dtypes, index paths,
pickles, absurd config.json sizes) and requires each to be refused by name. `fuzz` (fuzz.py) feeds
every data reader random and mutated files through hypothesis, allows only lmlab's own errors out,
and checks every result against a reference reader of the format. `server` (server.py) sends
malformed bodies; `stateful` (stateful.py) runs schemathesis' state machine over the links of
/openapi.json, checking each answer against its documented schema; `slow` (slow.py) holds
connections open with headers that never end, with and without --header-timeout. A small subset
runs in the default test suite (tests/test_reliability.py, tests/test_serve_fuzz.py);
docs/reliability.md has the figures of the full campaigns and the commands that produced them.
"""
