"""A job that prints as fast as it can, next to a normal job on the same daemon (real NATS,
real podman): the flood is capped, live and in its stored log, and the other job loses
nothing."""

import re

import httpx

from gpumarket.localstack.process import free_port
from provider_daemon.logstream import KIB, LogLimits
from tests.provider_daemon.conftest import FakeGateway, StartDaemon, until

# Small, so the flood reaches every limit within seconds.
LIMITS = LogLimits(
    live_lines_per_s=100,
    live_burst_lines=300,
    live_bytes_per_s=64 * KIB,
    live_burst_bytes=128 * KIB,
    live_max_lines=500,
    live_max_bytes=1024 * KIB,
    file_max_bytes=128 * KIB,
)
FLOOD_LINE = "flood " + "x" * 73  # 80 bytes with its newline
# 24 MB as fast as `yes` goes (far more than the daemon reads in the 5 s), then the
# container stays up: podman's log stream ends soon after a container exits, even with a
# backlog, and an endless `yes` would write GBs to podman's own log file.
FLOOD = ["sh", "-c", f"yes '{FLOOD_LINE}' | head -n 300000; sleep 5"]
MARKER = "[gpumarket:"
# Whether the stored log was full yet when a marker was sent depends on the machine's speed.
RATE_MARKER = re.compile(
    r"\[gpumarket: [\d,]+ lines not streamed live \(rate limit\); "
    r"the stored log (has them|is full too)\]"
)
LIVE_CAP_MARKER = re.compile(
    r"\[gpumarket: live log stopped at its cap of 500 lines per job; "
    r"the stored log (has the rest|is full too)\]"
)
FILE_CAP_MARKER = b"[gpumarket: the stored log stops here, at its cap of 128 KiB per job]\n"


def flood_text(text: str) -> bool:
    """Output of the flood. Podman's log stream cuts lines into pieces and, behind a fast
    writer, loses some: a line read may be parts of several."""
    return bool(text) and set(text) <= set(FLOOD_LINE)


def metric(body: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    match = re.search(rf"^{name}\{{{wanted}\}} (\S+)$", body, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def scrape(port: int) -> str:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        return (await client.get("/metrics/")).text


class TestLogLimits:
    async def test_a_flood_is_capped_without_harming_the_job_beside_it(
        self, start_daemon: StartDaemon, gateway: FakeGateway
    ) -> None:
        port = free_port()
        running = await start_daemon(metrics_port=port, log_limits=LIMITS)
        before = await scrape(port)
        gpu_a, gpu_b = running.gpu_uuids
        flood = running.task_for(FLOOD, gpu_uuids=[gpu_a])
        await running.send(flood)
        # The normal job starts while the flood is running.
        await until(lambda: len(running.log_lines(flood.job_id)) >= 100, 30, "the flood live")
        script = "for i in $(seq 1 40); do echo normal-$i; sleep 0.05; done"
        normal = running.task_for(["sh", "-c", script], gpu_uuids=[gpu_b])
        await running.send(normal)

        done = await running.finished(normal.job_id)
        expected = [f"normal-{i}" for i in range(1, 41)]
        assert (done.outcome, done.exit_code) == ("exited", 0)
        await until(lambda: running.log_lines(normal.job_id) == expected, 10, "normal lines")
        assert done.log_tail == "\n".join(expected)
        normal_log = "".join(f"{x}\n" for x in expected).encode()
        assert gateway.logs[(normal.job_id, 1)] == normal_log
        assert "started" in running.types_of(flood.job_id)
        assert "finished" not in running.types_of(flood.job_id), "the flood ended too soon"

        ended = await running.finished(flood.job_id, within=60)
        assert (ended.outcome, ended.exit_code) == ("exited", 0)
        lines = running.log_lines(flood.job_id)
        # Live: the rate's burst, then a marker per skipped run and a second's worth of
        # lines, until the cap; its marker is the last line ever published for the job.
        assert all(flood_text(x) for x in lines[:300])
        assert LIVE_CAP_MARKER.fullmatch(lines[-1])
        output = [x for x in lines if not x.startswith(MARKER)]
        assert len(output) == LIMITS.live_max_lines and all(map(flood_text, output))
        rate_markers = [x for x in lines[:-1] if x.startswith(MARKER)]
        assert rate_markers and all(RATE_MARKER.fullmatch(x) for x in rate_markers)
        # One marker per skipped run, about one a second: not one a line.
        assert len(rate_markers) <= 5
        # Stored: the output up to the cap, then its marker. A line the engine sent in
        # pieces may stay cut at the cap; then the marker starts a line of its own.
        stored = gateway.logs[(flood.job_id, 1)]
        assert stored.endswith(b"\n" + FILE_CAP_MARKER)
        body = stored.removesuffix(FILE_CAP_MARKER)
        assert LIMITS.file_max_bytes - len(FLOOD_LINE) < len(body) <= LIMITS.file_max_bytes + 1
        assert all(map(flood_text, body.decode().removesuffix("\n").split("\n")))
        # The tail is the output's end, whatever was capped: no marker in it.
        tail = (ended.log_tail or "").split("\n")
        assert len(tail) == 50 and all(map(flood_text, tail))

        after = await scrape(port)

        def grew(name: str, **labels: str) -> float:
            return metric(after, name, **labels) - metric(before, name, **labels)

        assert grew("provider_daemon_log_caps_reached_total", destination="live") == 1
        assert grew("provider_daemon_log_caps_reached_total", destination="file") == 1
        assert grew("provider_daemon_log_lines_total", destination="live") == 500 + 40
        # The newline before the marker is the pump's when it had to end a cut line.
        flood_bytes = grew("provider_daemon_log_bytes_total", destination="file") - len(normal_log)
        assert len(body) - 1 <= flood_bytes <= len(body)
        for reason in ("rate_limit", "cap"):
            labels = {"destination": "live", "reason": reason}
            assert grew("provider_daemon_log_lines_dropped_total", **labels) > 0
        assert grew("provider_daemon_log_lines_dropped_total", destination="file", reason="cap") > 0
