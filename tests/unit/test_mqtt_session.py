"""A session ends when any of its tasks ends (F4), even when another ignores cancel().

Pure asyncio, no broker: the stubborn task stands in for aiomqtt's ``publish`` on
Python 3.11, whose ``wait_for`` can swallow a cancellation (what left the BMS link
connected and deaf on c203a14, where a TaskGroup waited for it for ever).
"""

from __future__ import annotations

import asyncio
import time

import aiomqtt
import pytest

from controller.support.mqtt import SessionTaskEnded, inbox_type, run_until_any_ends


async def test_f4_session_ends_although_a_task_swallows_its_cancellation() -> None:
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                continue  # the cancellation is lost, as inside wait_for on 3.11

    async def receiver_dies() -> None:
        await asyncio.sleep(0.01)
        raise RuntimeError("receiver died")

    t0 = time.monotonic()
    with pytest.raises(SessionTaskEnded, match="bms-receive failed"):
        await asyncio.wait_for(
            run_until_any_ends(
                {"bms-receive": receiver_dies(), "bms-publish": stubborn()}, grace_s=0.2
            ),
            5.0,
        )
    assert time.monotonic() - t0 < 2.0
    release.set()  # let the stubborn task go (it was left behind, not awaited)
    await asyncio.sleep(0)


async def test_a_clean_end_returns_its_name_and_cancels_the_rest() -> None:
    cancelled = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.sleep(100)
        finally:
            cancelled.set()

    async def done() -> None:
        await asyncio.sleep(0)

    assert await run_until_any_ends({"pub": done(), "recv": forever()}) == "pub"
    assert cancelled.is_set()


async def test_a_receiver_that_just_returns_still_ends_the_session() -> None:
    async def returns() -> None:
        return None

    async def forever() -> None:
        await asyncio.sleep(100)

    assert await run_until_any_ends({"recv": returns(), "pub": forever()}) == "recv"


async def test_mqtt_errors_pass_through_as_they_are() -> None:
    async def lost() -> None:
        raise aiomqtt.MqttError("connection lost")

    async def forever() -> None:
        await asyncio.sleep(100)

    with pytest.raises(aiomqtt.MqttError, match="connection lost") as info:
        await run_until_any_ends({"recv": lost(), "pub": forever()})
    assert not isinstance(info.value, SessionTaskEnded)


async def test_outer_cancellation_cancels_every_task() -> None:
    ended: list[str] = []

    async def forever(name: str) -> None:
        try:
            await asyncio.sleep(100)
        finally:
            ended.append(name)

    task = asyncio.create_task(run_until_any_ends({"a": forever("a"), "b": forever("b")}))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sorted(ended) == ["a", "b"]


def _message(payload: bytes) -> aiomqtt.Message:
    return aiomqtt.Message("t", payload, qos=1, retain=False, mid=1, properties=None)


async def test_inbox_is_bounded_in_messages_and_bytes_and_counts_drops() -> None:
    drops: list[int] = []
    inbox = inbox_type(3, 100, lambda: drops.append(1))()
    for _ in range(5):
        inbox.put_nowait(_message(b"x" * 10))
    assert (inbox.qsize(), inbox.dropped, len(drops)) == (3, 2, 2)
    assert (await inbox.get()).payload == b"x" * 10
    inbox.put_nowait(_message(b"y" * 80))  # 20 + 80 bytes: fits exactly
    inbox.put_nowait(_message(b"z"))  # one byte over
    assert (inbox.qsize(), inbox.bytes, inbox.dropped) == (3, 100, 3)
    while not inbox.empty():
        await inbox.get()
    assert inbox.bytes == 0
