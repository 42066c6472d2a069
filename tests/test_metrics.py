"""GET /metrics reflects what the daemon did, in Prometheus text format."""

from __future__ import annotations

import time

import pytest
from aiohttp.test_utils import TestClient

from builder.server.metrics import Metrics
from tests.conftest import dockerfile, metric_sample, submit, wait_for, wait_for_line


async def test_metrics_count_builds_uploads_streams_and_teardown(client: TestClient) -> None:
    ok = await submit(client, {"Dockerfile": dockerfile("RUN true")})
    await wait_for(client, ok["build_id"], {"succeeded"})
    sleeper = await submit(client, {"Dockerfile": dockerfile("RUN echo started && sleep 300"), "m": str(time.time())})
    await wait_for_line(client, sleeper["build_id"], "started")
    stream = await client.get(f"/builds/{sleeper['build_id']}/logs", headers={"Accept": "text/event-stream"})
    await stream.content.readline()
    text = await (await client.get("/metrics")).text()
    assert metric_sample(text, "builder_builds_running") == 1
    assert metric_sample(text, "builder_queue_depth") == 0
    assert metric_sample(text, "builder_log_streams") >= 1
    assert metric_sample(text, "builder_upload_bytes_total") > 0
    stream.close()
    assert (await client.delete(f"/builds/{sleeper['build_id']}")).status == 200
    text = await (await client.get("/metrics")).text()
    assert metric_sample(text, "builder_builds_total", '{status="succeeded"}') == 1
    assert metric_sample(text, "builder_builds_total", '{status="cancelled"}') == 1
    assert metric_sample(text, "builder_cancel_teardown_seconds_count") == 1
    assert metric_sample(text, "builder_build_duration_seconds_count") == 2


@pytest.mark.unit
def test_metrics_render_in_text_format_with_counter_totals_and_live_gauges() -> None:
    metrics = Metrics()
    metrics.builds.labels(status="succeeded").inc()
    metrics.upload_bytes.inc(512)
    metrics.build_seconds.observe(3)
    metrics.observe(queued=lambda: 4, running=lambda: 2, streams=lambda: 7)
    text = metrics.render().decode()
    assert metric_sample(text, "builder_builds_total", '{status="succeeded"}') == 1
    assert metric_sample(text, "builder_upload_bytes_total") == 512
    assert metric_sample(text, "builder_build_duration_seconds_bucket", '{le="5.0"}') == 1
    assert metric_sample(text, "builder_build_duration_seconds_count") == 1
    assert (metric_sample(text, "builder_queue_depth"), metric_sample(text, "builder_builds_running")) == (4, 2)
    assert metric_sample(text, "builder_log_streams") == 7
