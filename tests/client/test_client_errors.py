"""Problem details become typed exceptions; only connection errors and 5xx are retried."""

from __future__ import annotations

import httpx
import lionmq
import pytest
from conftest import FAST_RETRY
from lionmq import Client
from lionmq_fake import FakeNode


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, lionmq.BadRequest),
        (401, lionmq.Unauthorized),
        (404, lionmq.ChannelNotFound),
        (413, lionmq.PayloadTooLarge),
        (422, lionmq.InvalidRequest),
        (429, lionmq.ChannelFull),
        (409, lionmq.LionMQError),
    ],
)
def test_client_errors_are_typed_and_not_retried(
    client: Client, node: FakeNode, status: int, kind: type[lionmq.LionMQError]
) -> None:
    node.faults.extend([status, status])
    with pytest.raises(kind) as caught:
        client.enqueue("jobs", {"a": 1})
    assert caught.value.status == status
    assert caught.value.title == "Injected"
    assert len(node.requests) == 1


def test_problem_fields_are_kept(client: Client) -> None:
    with pytest.raises(lionmq.ChannelNotFound) as caught:
        client.get_channel("missing")
    error = caught.value
    assert (error.status, error.title, error.detail) == (404, "Channel not found", "missing")
    assert error.type == "about:blank"
    assert "missing" in str(error)


@pytest.mark.parametrize(("status", "kind"), [(503, lionmq.ServiceUnavailable), (500, None)])
def test_server_errors_are_retried_then_raised(
    client: Client, node: FakeNode, status: int, kind: type[lionmq.LionMQError] | None
) -> None:
    node.faults.extend([status] * 5)
    with pytest.raises(kind or lionmq.ServerError) as caught:
        client.list_channels()
    assert caught.value.status == status
    assert len(node.requests) == FAST_RETRY.attempts


def test_a_body_that_is_not_problem_json_still_makes_an_error() -> None:
    transport = httpx.MockTransport(lambda r: httpx.Response(418, text="<html>teapot</html>"))
    with (
        Client("http://node", transport=transport) as client,
        pytest.raises(lionmq.LionMQError) as caught,
    ):
        client.health()
    assert caught.value.status == 418
    assert caught.value.title == "I'm a teapot"
    assert "teapot" in caught.value.detail


def test_an_unreadable_success_is_an_unexpected_response() -> None:
    transport = httpx.MockTransport(lambda r: httpx.Response(200, json={"ids": "nope"}))
    with (
        Client("http://node", transport=transport) as client,
        pytest.raises(lionmq.UnexpectedResponse),
    ):
        client.enqueue("jobs", 1)


def test_connection_errors_become_connection_failed(client: Client, node: FakeNode) -> None:
    node.faults.extend([httpx.ConnectError] * 5)
    with pytest.raises(lionmq.ConnectionFailed) as caught:
        client.health()
    assert caught.value.status is None
    assert "http://node" in str(caught.value)  # the node it could not reach
    assert isinstance(caught.value.__context__, httpx.ConnectError)
    assert len(node.requests) == FAST_RETRY.attempts


def test_token_is_sent_as_bearer() -> None:
    node = FakeNode(token="s3cret")
    with Client("http://node", transport=node.transport(), token="s3cret") as client:
        assert client.health()["status"] == "ok"
    with (
        Client("http://node", transport=node.transport(), token="wrong") as client,
        pytest.raises(lionmq.Unauthorized),
    ):
        client.health()
    with (
        Client("http://node", transport=node.transport()) as client,
        pytest.raises(lionmq.Unauthorized),
    ):
        client.health()
    assert node.requests[0].headers["authorization"] == "Bearer s3cret"


def test_every_error_is_a_lionmq_error() -> None:
    for name in lionmq.__all__:
        value = getattr(lionmq, name)
        if isinstance(value, type) and issubclass(value, Exception):
            assert issubclass(value, lionmq.LionMQError)
    assert issubclass(lionmq.ServiceUnavailable, lionmq.ServerError)
