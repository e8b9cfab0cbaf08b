"""A schemathesis stateful run against `lmlab serve`: sequences of calls that follow the OpenAPI links
of its own /openapi.json (list the models, then one by its id, then completions, chat and
embeddings naming it, completions that go on from the text the last one wrote, embeddings of it),
each body otherwise generated from the schema. After every call: no 5xx, a status and content type
the schema documents, a body that matches the documented schema (an answer's, or OpenAI's error
JSON), and /health still 200.

    python -m tests.reliability stateful --scenarios 200
"""

from __future__ import annotations

import collections
import tempfile
import time
from pathlib import Path
from typing import Any

CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance", "response_schema_conformance")


def machine(app: Any, record: dict[str, Any], positive_only: bool = False) -> type:
    """The state machine class for `app`; `record` collects statuses per operation and links followed.
    With `positive_only` every body is valid by the schema (the sequences go deeper); otherwise
    schemathesis also sends bodies the schema forbids."""
    import schemathesis
    import schemathesis.checks as checks
    from schemathesis.generation import GenerationMode
    from starlette.testclient import TestClient

    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    if positive_only:
        schema.config.generation.update(modes=[GenerationMode.POSITIVE])
    chosen = [getattr(checks, name) for name in CHECKS]
    health = TestClient(app)
    record.setdefault("statuses", collections.Counter())
    record.setdefault("links", collections.Counter())
    record.setdefault("steps", 0)
    record.setdefault("scenarios", 0)

    class Machine(schema.as_state_machine()):  # type: ignore[misc]
        def setup(self) -> None:
            record["scenarios"] += 1

        def step(self, input: Any) -> Any:
            if input.transition is not None and input.is_applied:
                record["links"][input.transition.id] += 1
            return super().step(input)

        def validate_response(self, response: Any, case: Any, additional_checks: Any = None, **kw: Any) -> None:
            record["steps"] += 1
            record["statuses"][f"{case.operation.label} {response.status_code}"] += 1
            case.validate_response(response, checks=chosen, transport_kwargs=kw)
            if response.status_code >= 400:
                assert set(response.json()) == {"error"}, response.text[:300]
            assert health.get("/health").status_code == 200, "the server is no longer healthy"

    return Machine


def campaign(scenarios: int) -> list[dict[str, Any]]:
    """Two runs of `scenarios` scenarios (up to 8 calls each): bodies valid by the schema, then
    bodies valid or not. A failure (the first one, shrunk by hypothesis) is reported, not raised."""
    from hypothesis import HealthCheck, settings

    from lmlab.serve.app import ServeConfig, create_app

    from .server import folder

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = str(folder(Path(tmp)))
        for positive_only in (True, False):
            app = create_app(ServeConfig(model=model, name="tiny", dtype="float32"), load_now=True)
            record: dict[str, Any] = {}
            failure = None
            started = time.perf_counter()
            try:
                machine(app, record, positive_only).run(
                    settings=settings(
                        max_examples=scenarios,
                        stateful_step_count=8,
                        deadline=None,
                        derandomize=True,
                        database=None,
                        suppress_health_check=list(HealthCheck),
                    )
                )
            except Exception as e:  # noqa: BLE001  (a failure is the campaign's finding)
                failure = f"{type(e).__name__}: {str(e)[:3000]}"
            finally:
                app.state.lmlab.engine.stop()
            rows.append(
                {
                    "bodies": "valid by the schema" if positive_only else "valid or not",
                    "scenarios": record["scenarios"],
                    "calls": record["steps"],
                    "statuses": dict(sorted(record["statuses"].items())),
                    "links_followed": dict(sorted(record["links"].items())),
                    "seconds": round(time.perf_counter() - started, 1),
                    "failure": failure,
                }
            )
    return rows
