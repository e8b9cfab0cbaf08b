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
