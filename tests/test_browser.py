"""The live-maps page of ``nanobeam serve`` in a real headless Chromium, driven by selenium.

One ``nanobeam serve`` process (its in-memory stream cache) serves the page at /custom/live/. A
RunEngine grid scan of a phantom, analysed live by NanobeamCallback and written to /derived with
TiledWriter, runs while the page is open: the page must show the map growing from Tiled's stream
and end with the stored values. Bad input: a wrong API key, an unknown run. A server restart: the
page keeps its maps, reconnects and follows the next run.

Needs the Debian packages ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them);
without them the tests skip and say so.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nanobeam_bluesky.tiled.catalog import derived_catalog, tiled_writer
from nanobeam_bluesky.tiled.server import ServerConfig, TiledServer, free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
#: The maps the page draws from the derived stream (float columns) and the flag bits.
FLOAT_MAPS = ("strain", "omega", "chi", "strain_err", "omega_err", "chi_err")
#: Scan: N x N points of the phantom, 0.1 µm apart.
N = 8


def _wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``condition`` until it is truthy; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"the page did not {what} within {timeout} s (last: {value!r})")
        time.sleep(0.1)


class Page:
    """The page in the browser, read through the hook it exposes (``window.nanobeamView``)."""

    def __init__(self, driver: Any, url: str) -> None:
        self.driver = driver
        self.url = url

    def open(self, fragment: str) -> None:
        self.driver.get("about:blank")  # a new document, not a hash change
        self.driver.get(f"{self.url}#{fragment}")
        _wait_for(lambda: self.driver.execute_script("return !!window.nanobeamView"), 30, "load")

    def view(self, expression: str) -> Any:
        return self.driver.execute_script(f"return window.nanobeamView.{expression};")

    def filled(self) -> int:
        return int(self.view("filledCells()"))


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="selenium is not installed (pip install -e .[test])"
    )
    from selenium.webdriver.chrome.service import Service

    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip(
            f"no Chromium at {CHROMIUM} or no chromedriver at {CHROMEDRIVER}: "
            "apt-get install chromium chromium-driver (.ci/run does)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1150"):
        options.add_argument(arg)
    # The explicit driver path keeps selenium from looking for (downloading) one.
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield browser
    finally:
        browser.quit()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TiledServer]:
    data = tmp_path_factory.mktemp("browser-tiled")
    with TiledServer(ServerConfig(data_dir=data, port=free_port(), lazy_library=False)) as running:
        yield running


@pytest.fixture
def page(driver: Any, server: TiledServer) -> Page:
    return Page(driver, server.config.live_url)


def _scan(server: TiledServer, model: Any, phantom: Any, midway: Callable[[], Any] | None = None) -> str:
    """A grid scan of the phantom analysed live, raw and derived runs written to the server;
    the plan ``midway()`` runs after half the points. Returns the derived run's uid."""
    import bluesky.plan_stubs as bps
    import bluesky.plans as bp
    from bluesky import RunEngine
    from ophyd_async.core import init_devices

    from nanobeam_bluesky.callbacks import NanobeamCallback
    from nanobeam_bluesky.devices import FrameSimulator, NanoprobeStage, NanoprobeStepDetector

    runs = server.client("runs")
    RE = RunEngine({})
    with init_devices():
        stage = NanoprobeStage()
    detector = NanoprobeStepDetector(FrameSimulator(phantom(N, 0.1), seed=3), stage, name="det")
    callback = NanobeamCallback(model.predictor)
    derived_starts: list[str] = []
    callback.subscribe(lambda name, doc: derived_starts.append(doc["uid"]) if name == "start" else None)
    callback.subscribe(tiled_writer(derived_catalog(runs), batch_size=4))
    RE.subscribe(tiled_writer(runs, batch_size=4))
    RE.subscribe(callback)
    steps = 0

    def per_step(detectors: Any, step: Any, pos_cache: Any) -> Any:
        nonlocal steps
        yield from bps.one_nd_step(detectors, step, pos_cache)
        steps += 1
        if midway is not None and steps == N * N // 2:
            yield from midway()

    span = 0.1 * (N - 1)
    RE(
        bp.grid_scan(
            [detector], stage.y, 0, span, N, stage.x, 0, span, N, snake_axes=True, per_step=per_step
        ),
        sample="browser test phantom",
    )
    assert callback.flush(timeout=120)
    callback.close()
    return derived_starts[0]


def _stored_maps(server: TiledServer, uid: str) -> dict[str, np.ndarray]:
    """The stored derived rows placed on the map as nanobeam's MapGrid places them."""
    from nanobeam_bluesky.callbacks import MapGrid

    run = server.client("derived")[uid]
    table = run["primary"].read()
    grid = MapGrid.from_start(run.metadata["start"])
    assert grid is not None and grid.extents is not None  # the grid comes from shape and extents
    data = {k: np.asarray(table[k]) for k in (*FLOAT_MAPS, "flag", "raw_seq_num", *grid.keys)}
    row, col = grid.cells(data, data["raw_seq_num"])
    assert (row >= 0).all()
    maps = {}
    for key in (*FLOAT_MAPS, "flag"):
        values = np.full(grid.shape, np.nan)
        values[row, col] = data[key]
        maps[key] = values
    return maps


def test_the_page_shows_the_map_grow_during_the_scan_and_ends_with_the_stored_values(
    page: Page, server: TiledServer, model, phantom, tmp_path: Path
):
    page.open(f"key={server.api_key}")
    _wait_for(lambda: page.view("status()") == "live", 60, "connect")
    assert page.view("message()") == ""
    seen_midway: list[tuple[str | None, int]] = []

    def midway() -> Iterator[Any]:
        # The scan waits here, half its points measured, until the page shows cells of this run.
        import bluesky.plan_stubs as bps

        deadline = time.monotonic() + 60
        while page.filled() == 0 and time.monotonic() < deadline:
            yield from bps.sleep(0.1)
        seen_midway.append((page.view("selectedRun()"), page.filled()))

    uid = _scan(server, model, phantom, midway)
    (selected, filled_midway) = seen_midway[0]
    assert selected == uid  # the page followed the new run by itself
    assert 0 < filled_midway <= N * N // 2  # a growing map, not the finished one
    _wait_for(lambda: page.view("complete()"), 60, "receive every row")
    assert page.filled() == N * N and page.view("shape()") == [N, N]

    stored = _stored_maps(server, uid)
    for key in FLOAT_MAPS:
        shown = np.array(page.view(f"values({json.dumps(key)})"), dtype=float).reshape(N, N)
        # The page keeps float32 maps: equal to the stored float64 values within its rounding.
        np.testing.assert_allclose(shown, stored[key], rtol=2.0**-24, atol=0, equal_nan=True, err_msg=key)
    flags = np.array(page.view('values("flag")'), dtype=float).reshape(N, N)
    np.testing.assert_array_equal(flags, stored["flag"])

    # Latency (a benchmark number, not a criterion): server write -> page, frame -> page.
    arrivals = np.array(page.view("arrivals()"), dtype=float)
    written_ms = arrivals[:, 3] - arrivals[:, 2]
    frame_ms = arrivals[:, 3] - 1e3 * arrivals[:, 1]
    print(
        f"\nrows streamed to the page: {len(arrivals)}; written -> page median "
        f"{np.median(written_ms):.0f} ms, p99 {np.percentile(written_ms, 99):.0f} ms; frame -> page median "
        f"{np.median(frame_ms):.0f} ms, p99 {np.percentile(frame_ms, 99):.0f} ms"
    )
    screenshot = tmp_path / "live-view.png"
    assert page.driver.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
    print(f"screenshot: {screenshot}")


def test_a_wrong_api_key_shows_a_message_and_asks_for_the_key(page: Page, server: TiledServer):
    page.open("key=" + "0" * 32)
    _wait_for(lambda: page.view("message()"), 30, "say what is wrong")
    message = page.view("message()")
    assert "refused the API key" in message and "api_key" in message, message
    assert page.view("status()") == "error"
    assert page.driver.find_element("id", "login").is_displayed()
    assert not page.driver.find_element("id", "main").is_displayed()


def test_an_unknown_run_shows_a_message(page: Page, server: TiledServer):
    page.open(f"key={server.api_key}&run=no-such-run")
    _wait_for(lambda: "no-such-run" in page.view("message()"), 30, "name the unknown run")
    assert "No derived run no-such-run in /derived" in page.view("message()")
    assert page.view("selectedRun()") is None


def test_after_a_server_restart_the_page_keeps_its_maps_and_follows_the_next_run(
    page: Page, server: TiledServer, model, phantom
):
    page.open(f"key={server.api_key}")
    _wait_for(lambda: page.view("status()") == "live", 60, "connect")
    if not page.view("runs()"):
        _scan(server, model, phantom)
    _wait_for(lambda: page.view("complete()"), 60, "show the newest run")
    before, shown = page.filled(), page.view("selectedRun()")

    server.stop()
    _wait_for(lambda: page.view("status()") == "reconnecting", 30, "notice that the server is gone")
    assert "Reconnecting" in page.view("message()")
    assert page.filled() == before and page.view("selectedRun()") == shown  # the maps stay

    server.start()
    _wait_for(lambda: page.view("status()") == "live" and not page.view("message()"), 60, "reconnect")
    uid = _scan(server, model, phantom)
    _wait_for(
        lambda: page.view("selectedRun()") == uid and page.view("complete()"), 60, "follow the next run"
    )
    assert page.filled() == N * N


def test_redis_going_away_mid_scan_is_said_on_the_page_and_storage_is_unaffected(
    driver: Any, tmp_path: Path, model, phantom
):
    """A server whose stream goes through a real redis-server: Redis is killed halfway through the
    scan. The page says it lost the live feed and keeps its maps; every row is still stored. (The
    waits are generous caps: a CI machine shared with other jobs took over a minute to notice.)"""
    from nanobeam_bluesky.errors import InputError
    from nanobeam_bluesky.tiled import RedisServer
    from nanobeam_bluesky.tiled._redis import find_redis_server

    try:
        find_redis_server()
    except InputError as exc:  # CI installs it (.ci/run)
        pytest.skip(f"redis-server not installed: {exc}")
    with RedisServer(tmp_path / "redis", port=free_port()) as redis:
        config = ServerConfig(
            data_dir=tmp_path / "tiled", port=free_port(), lazy_library=False, stream_cache=redis.uri
        )
        with TiledServer(config) as server:
            page = Page(driver, config.live_url)
            page.open(f"key={server.api_key}")
            _wait_for(lambda: page.view("status()") == "live", 180, "connect")

            def kill_redis() -> Any:
                # Midway, once the page shows rows of this run: the feed goes away.
                _wait_for(lambda: page.filled() > 0, 180, "show the first rows")
                redis.kill()
                yield from ()

            uid = _scan(server, model, phantom, midway=kill_redis)
            _wait_for(lambda: page.view("status()") != "live", 180, "notice the lost feed")
            message = page.view("message()")
            # The server itself still answers: the page says the stream is what is down.
            _wait_for(lambda: "live stream does not" in page.view("message()"), 180, "say the stream is down")
            message = page.view("message()")
            assert "Redis" in message and "maps keep what they have" in message, message
            assert 0 < page.filled() <= N * N and page.view("selectedRun()") == uid
            driver.save_screenshot(str(tmp_path / "redis-lost.png"))
            # Storage unaffected: every raw frame has its stored derived row.
            stored = server.client("derived")[uid]["primary"].read()
            assert sorted(np.asarray(stored["raw_seq_num"]).tolist()) == list(range(1, N * N + 1))
