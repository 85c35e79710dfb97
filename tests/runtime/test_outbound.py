"""Hub pushes reach the OutboundSender registered for the remote URL's scheme, built once with the
Agent's settings (only those its factory takes), rebuilt when the settings change; a scheme nobody
sends to is a 400 with the reason. The request handler is exercised directly (no runtime).
"""

from __future__ import annotations

from typing import Any, ClassVar

from medagent.channels.base import OutboundReply, register_outbound_sender
from medagent.cloud.messages import (
    ErrorMessage,
    ReloadConfigRequest,
    ReloadConfigResponse,
    TransmitRequest,
)
from medagent.runtime.channel_set import ChangeReport
from medagent.runtime.outbound import OutboundSenders
from medagent.runtime.requests import RequestHandler

SCHEME = "medagent-test-echo"


class EchoSender:
    """A plugin kind's sender: answers with the body reversed; records how it was built."""

    built: ClassVar[list[EchoSender]] = []

    def __init__(self, *, keep_alive: bool = False) -> None:
        self.keep_alive = keep_alive
        self.closed = False
        self.calls: list[tuple[str, str, str, str | None]] = []
        EchoSender.built.append(self)

    async def send(self, remote: str, body: str, content_type: str, *, return_ack: str | None = None,
                   timeout: float | None = None) -> OutboundReply:
        assert not self.closed
        self.calls.append((remote, body, content_type, return_ack))
        if body == "fail":
            raise ConnectionRefusedError(f"connect to {remote} refused")
        return OutboundReply(body[::-1], "text/plain", 202)

    async def close(self) -> None:
        self.closed = True


register_outbound_sender(SCHEME, EchoSender)


async def no_reload() -> ChangeReport:
    return ChangeReport(kept=["a"])


def handler(senders: OutboundSenders, reload: Any = no_reload) -> RequestHandler:
    return RequestHandler(reload, dict, senders)


async def test_a_push_goes_to_the_sender_of_its_scheme_with_the_text_body() -> None:
    EchoSender.built.clear()
    senders = OutboundSenders({"keep_alive": True, "max_clients_per_remote": 1})  # the factory takes keep_alive only
    requests = handler(senders)
    remote = f"{SCHEME}://127.0.0.1:9"
    reply = await requests.handle(TransmitRequest(remote=remote, content_type="text/plain", body="Grüße", return_ack="first"))
    assert (reply.status_code, reply.content_type, reply.body) == (202, "text/plain", "eßürG")
    await requests.handle(TransmitRequest(remote=remote, content_type="text/plain", body="again"))
    [sender] = EchoSender.built  # one sender per scheme
    assert sender.keep_alive is True
    assert sender.calls[0] == (remote, "Grüße", "text/plain", "first")

    await senders.configure({"keep_alive": False})  # new Agent settings: the old sender is closed
    assert sender.closed
    await requests.handle(TransmitRequest(remote=remote, content_type="text/plain", body="x"))
    assert len(EchoSender.built) == 2 and EchoSender.built[1].keep_alive is False
    await senders.close()
    assert EchoSender.built[1].closed


async def test_send_failures_and_unknown_schemes_are_400_with_the_reason() -> None:
    requests = handler(OutboundSenders())
    reply = await requests.handle(TransmitRequest(remote=f"{SCHEME}://h:1", content_type="text/plain", body="fail"))
    assert (reply.status_code, reply.content_type, reply.body) == (400, "text/plain", f"connect to {SCHEME}://h:1 refused")
    reply = await requests.handle(TransmitRequest(remote="ftp://h:1", content_type="text/plain", body="x"))
    assert (reply.status_code, reply.body) == (400, "cannot send to 'ftp' destinations")


async def test_reload_answers_200_or_agent_error_naming_each_failed_channel() -> None:
    async def partly_failed() -> ChangeReport:
        return ChangeReport(kept=["a"], failed={"b": "cannot listen on 127.0.0.1:1: Permission denied"},
                            invalid={"c": "invalid endpoint: x"})

    assert isinstance(await handler(OutboundSenders()).handle(ReloadConfigRequest()), ReloadConfigResponse)
    answer = await handler(OutboundSenders(), partly_failed).handle(ReloadConfigRequest())
    assert isinstance(answer, ErrorMessage)
    assert answer.body == ("reload failed: channel c: invalid endpoint: x; "
                           "channel b: cannot listen on 127.0.0.1:1: Permission denied")
