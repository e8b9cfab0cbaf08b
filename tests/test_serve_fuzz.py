"""schemathesis against `lmlab serve`'s own /openapi.json: whatever the schema allows, no 5xx answer."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def served_app(tiny_pretrained, tmp_path_factory):
    from test_serve import chat_folder

    from lmlab.serve.app import ServeConfig, create_app

    folder = chat_folder(tiny_pretrained["gpt"], tmp_path_factory.mktemp("fuzz") / "gpt")
    app = create_app(ServeConfig(model=str(folder), name="tiny"), load_now=True)
    yield app
    app.state.lmlab.engine.stop()


@pytest.fixture(scope="module")
def api_schema(served_app):
    return schemathesis.openapi.from_asgi("/openapi.json", served_app)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_the_schema_allows_gets_a_server_error(case):
    response = case.call()
    assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])
    if response.status_code >= 400:
        assert set(response.json()) == {"error"}, response.text[:300]  # OpenAI's error shape, always


@pytest.mark.parametrize("positive_only", [True, False], ids=["valid-bodies", "any-bodies"])
def test_call_sequences_that_follow_the_schemas_links_keep_the_server_healthy(served_app, positive_only):
    """schemathesis' stateful run (tests/reliability/stateful.py; the full campaign is
    `python -m tests.reliability stateful`): models, then a model by its id, then completions, chat
    and embeddings that name it, completions that go on from the last text. Every answer has a
    documented status, content type and schema, and /health stays 200."""
    from hypothesis import settings as hsettings
    from reliability import stateful

    record: dict = {}
    machine = stateful.machine(served_app, record, positive_only)
    machine.run(
        settings=hsettings(
            max_examples=15,
            stateful_step_count=6,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
    )
    assert record["steps"] >= 30
    assert record["links"]["GET /v1/models -> [200] model -> GET /v1/models/{model_id}"] > 0
    if positive_only:
        assert any(k.endswith(" 200") and "completions" in k for k in record["statuses"])
