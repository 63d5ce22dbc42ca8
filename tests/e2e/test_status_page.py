"""The status page in a real headless Chromium (Debian's ``chromium``), served by the API
on a loopback port over a :class:`MemoryView` (the daemon's read interface).

Two looks: the DOM after the page's scripts ran (``--dump-dom``: bar widths and colours
per node, the alarm list), and the screenshot (``--screenshot``), decoded here with
zlib and NumPy, checked for the bar colours, the plot line and one bar's length measured
in pixels. Chromium runs as an asyncio subprocess so the server in this loop keeps
answering the page's requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import struct
import zlib
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from controller.core.alarms import Alarm, AlarmKind
from controller.core.view import Health, MemoryView, NodeLive, build_rows
from controller.integrations.api.app import ApiServer, History, create_app
from controller.model.config import ApiConfig
from controller.model.loader import parse_site
from controller.model.topology import CONSTRAINT_KINDS, PowerTree
from tests.sites import tiny_site

NOW_S = 1_750_000_000.0


def _alarm(kind: AlarmKind, node: str, message: str, since_s: float) -> Alarm:
    """A node alarm as the daemon raises it (subject and node are the node)."""
    return Alarm(kind, node, message, since_s, node=node)


# Colours from status.css.
GREEN = (46, 158, 91)  # --ok: below 90 % of the envelope
AMBER = (224, 165, 38)  # --warn: 90-100 %
RED = (214, 69, 65)  # --over: above the envelope
BLUE = (47, 111, 214)  # --load: the plotted load line
TRACK = (232, 235, 239)  # the empty part of a bar

LIVE = {
    "feed": NodeLive("feed", envelope_w=18000, power_w=12600),
    "sst": NodeLive("sst", envelope_w=17000, estimated_w=12600),
    "bus": NodeLive("bus", envelope_w=16000, estimated_w=12600),
    "row": NodeLive("row", envelope_w=15000, power_w=13000),
    "rack-1": NodeLive(
        "rack-1",
        envelope_w=7000,
        power_w=6510,
        capped_gpus=4,
        cap_limit_w=320,
        mode="cap",
        alarms=(
            _alarm(AlarmKind.TRIP_RISK, "rack-1", "93 % of the envelope for 40 s", NOW_S - 40),
        ),
    ),
    "rack-2": NodeLive(
        "rack-2",
        envelope_w=7000,
        power_w=7350,
        alarms=(_alarm(AlarmKind.ENVELOPE_EXCEEDED, "rack-2", "105 % of 7 kW", NOW_S - 3),),
    ),
    "rack-1-n1": NodeLive("rack-1-n1", envelope_w=2200, estimated_w=1100),
    "rack-1-n2": NodeLive("rack-1-n2", envelope_w=2200, estimated_w=2000),
    "rack-2-n1": NodeLive("rack-2-n1", envelope_w=2200, estimated_w=1320),
    "rack-2-n2": NodeLive("rack-2-n2", envelope_w=2200, stale=True),  # counts at its rating
}

# node -> (load / envelope, bar class)
EXPECTED_BARS = {
    "feed": (12600 / 18000, "ok"),
    "sst": (12600 / 17000, "ok"),
    "bus": (12600 / 16000, "ok"),
    "row": (13000 / 15000, "ok"),
    "rack-1": (6510 / 7000, "warn"),
    "rack-2": (7350 / 7000, "over"),
    "rack-1-n1": (1100 / 2200, "ok"),
    "rack-1-n2": (2000 / 2200, "warn"),
    "rack-2-n1": (1320 / 2200, "ok"),
    "rack-2-n2": (1.0, "warn"),
}


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (Debian package: chromium)")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    return path


def prefilled_history(tree: PowerTree) -> History:
    """Five minutes of a training job's swing on the feed, so the plot has a shape."""
    hist = History()
    for k in range(300):
        swing = 1.0 + 0.12 * math.sin(k / 9.0)
        live = {
            nid: NodeLive(
                nid, n.envelope_w, None if n.power_w is None else n.power_w * swing, n.estimated_w
            )
            for nid, n in LIVE.items()
        }
        hist.sample(NOW_S - 300 + k, build_rows(tree, live, {}, CONSTRAINT_KINDS))
    return hist


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[str]:
    tree = PowerTree(parse_site(tiny_site()))
    view = MemoryView(
        tree,
        live=dict(LIVE),
        health_info=Health(
            status="ok",
            mode="enforce",
            started_at_s=NOW_S - 900,
            last_cycle_at_s=NOW_S - 0.3,
            cycles=1800,
        ),
    )
    app = create_app(view, ApiConfig(), clock=lambda: NOW_S, history=prefilled_history(tree))
    server = ApiServer(app, port=0)
    task = asyncio.create_task(server.serve())
    try:
        await asyncio.wait_for(server.wait_started(), 10)
        yield server.url
    finally:
        await server.shutdown()
        await asyncio.wait_for(task, 10)


async def run_chromium(url: str, tmp: Path, *mode: str) -> bytes:
    args = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp / 'profile'}",
        "--window-size=1280,900",
        "--virtual-time-budget=5000",
        *mode,
        url,
    ]
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out


class PageDom(HTMLParser):
    """Just what the test reads: per-row bar fill, the alarm items, a few texts by id."""

    def __init__(self) -> None:
        super().__init__()
        self.bars: dict[str, dict[str, str]] = {}
        self.alarms: list[str] = []
        self.texts: dict[str, str] = {}
        self._row: str | None = None
        self._capture: str | None = None
        self._alarm: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "tr" and "data-node" in a:
            self._row = a["data-node"]
        if "fill" in a.get("class", "").split() and self._row is not None:
            self.bars[self._row] = a
        if tag == "li" and "alarm" in a.get("class", "").split():
            self._alarm = []
        if a.get("id") in ("site", "health", "plot-node", "mode"):
            self._capture = a["id"]
            self.texts[self._capture] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr":
            self._row = None
        if tag == "li" and self._alarm is not None:
            self.alarms.append("".join(self._alarm))
            self._alarm = None
        if self._capture is not None and tag in ("span", "div"):
            self._capture = None

    def handle_data(self, data: str) -> None:
        if self._alarm is not None:
            self._alarm.append(data)
        if self._capture is not None:
            self.texts[self._capture] += data


def decode_png(data: bytes) -> npt.NDArray[np.uint8]:
    """An 8-bit RGB/RGBA, non-interlaced PNG (what Chromium writes) as an H x W x 3 array."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, b""
    width = height = colour = 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert (depth, interlace) == (8, 0) and colour in (2, 6)
        elif kind == b"IDAT":
            idat += body
    bpp = 3 if colour == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    out = np.zeros((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.uint8)
    for y in range(height):
        kind_f = raw[y * (stride + 1)]
        line = np.frombuffer(raw, np.uint8, count=stride, offset=y * (stride + 1) + 1)
        if kind_f == 0:
            cur = line.copy()
        elif kind_f == 1:  # Sub: running sum per channel, modulo 256
            cur = np.cumsum(line.reshape(width, bpp), axis=0, dtype=np.uint8).reshape(stride)
        elif kind_f == 2:  # Up
            cur = line + prev
        else:  # Average or Paeth: depends on the byte just decoded, so byte by byte
            done = bytearray(stride)
            ln, up = line.tolist(), prev.tolist()
            for x in range(stride):
                a = done[x - bpp] if x >= bpp else 0
                b = up[x]
                c = up[x - bpp] if x >= bpp else 0
                if kind_f == 3:
                    pred = (a + b) // 2
                else:
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                done[x] = (ln[x] + pred) & 0xFF
            cur = np.frombuffer(bytes(done), np.uint8)
        out[y] = cur
        prev = cur
    return out.reshape(height, width, bpp)[:, :, :3]


def mask(img: npt.NDArray[np.uint8], rgb: tuple[int, int, int]) -> npt.NDArray[np.bool_]:
    hit: npt.NDArray[np.bool_] = np.all(img == np.array(rgb, dtype=np.uint8), axis=2)
    return hit


def longest_run(row: npt.NDArray[np.bool_]) -> tuple[int, int]:
    """(start, length) of the longest run of True in a pixel row."""
    best = (0, 0)
    start = None
    for x, on in enumerate([*row.tolist(), False]):
        if on and start is None:
            start = x
        elif not on and start is not None:
            if x - start > best[1]:
                best = (start, x - start)
            start = None
    return best


async def test_status_page_shows_bars_alarms_and_plot(tmp_path: Path) -> None:
    chromium()
    async with serving() as url:
        dom_html = (await run_chromium(url + "/", tmp_path, "--dump-dom")).decode()
        shot = tmp_path / "status.png"
        await run_chromium(url + "/", tmp_path, f"--screenshot={shot}")

    # -- the DOM the scripts built ---------------------------------------------------
    dom = PageDom()
    dom.feed(dom_html)
    assert dom.texts["site"] == "tiny"
    assert dom.texts["health"] == "ok"
    assert dom.texts["plot-node"] == "feed"
    assert set(dom.bars) == set(EXPECTED_BARS)
    for nid, (ratio, band) in EXPECTED_BARS.items():
        fill = dom.bars[nid]
        assert fill["class"].split() == ["fill", band], nid
        assert float(fill["data-ratio"]) == pytest.approx(ratio, abs=1e-4), nid
        width = float(fill["style"].removeprefix("width:").removesuffix("%"))
        assert width == pytest.approx(min(ratio, 1.0) * 100, abs=0.05), nid
    assert dom.alarms == [
        "rack-1: trip_risk - 93 % of the envelope for 40 s",
        "rack-2: envelope_exceeded - 105 % of 7 kW",
    ]

    # -- the pixels ------------------------------------------------------------------------
    img = decode_png(shot.read_bytes())
    assert img.shape == (900, 1280, 3)
    colours = len(np.unique(img.reshape(-1, 3), axis=0))
    assert colours > 50, "the screenshot is (nearly) blank"
    counts = {
        name: int(mask(img, rgb).sum())
        for name, rgb in (("green", GREEN), ("amber", AMBER), ("red", RED), ("blue", BLUE))
    }
    # Bars are ~14 px high and over 150 px long at this window size: six green (one under
    # half full), four amber, one red (plus the red envelope line and alarm text).
    assert counts["green"] > 5000, counts
    assert counts["amber"] > 4000, counts
    assert counts["red"] > 2000, counts
    assert counts["blue"] > 1000, counts

    # The longest green bar is the row's (86.7 %): its share of the bar track in pixels.
    green = mask(img, GREEN)
    track = mask(img, TRACK)
    y = int(np.argmax([longest_run(green[y])[1] for y in range(img.shape[0])]))
    start, filled = longest_run(green[y])
    empty = longest_run(track[y, start + filled :])[1]
    assert filled / (filled + empty) == pytest.approx(13000 / 15000, abs=0.02)

    # The plot drew the swinging load: blue pixels spread over many heights.
    blue_rows = np.nonzero(mask(img, BLUE).any(axis=1))[0]
    assert blue_rows.max() - blue_rows.min() > 20, "the load line is flat or missing"
