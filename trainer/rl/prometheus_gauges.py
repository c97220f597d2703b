"""The trainer's step metrics for Prometheus, so that a dashboard shows the run beside the reward servers
(`rewardserve ppo --metrics-port 9400`; `docker compose --profile monitoring up` scrapes it).

Every number of a metrics.jsonl line becomes the gauge `rewardserve_trainer_<name>`, set at each step (characters
Prometheus does not allow in a name, like the `/` of `time/step`, become `_`): the same names as TensorBoard and
Weights & Biases, one source. A gauge holds the last step's value: Prometheus keeps the history.
"""
from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Gauge, start_http_server

PREFIX = "rewardserve_trainer_"


def gauge_name(metric: str) -> str:
    """`time/step` -> `rewardserve_trainer_time_step`."""
    return PREFIX + re.sub(r"[^A-Za-z0-9_]", "_", metric)


class StepGauges:
    """An HTTP endpoint of its own (its own registry: nothing else of the process is exported) with a gauge per
    numeric step metric."""

    def __init__(self, port: int, host: str = "127.0.0.1"):
        self.registry = CollectorRegistry()
        self._gauges: dict[str, Gauge] = {}
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        self.port = self._server.server_address[1]
        print(f"step metrics for Prometheus at http://{host}:{self.port}/metrics", flush=True)

    def observe(self, record: dict) -> None:
        for name, value in record.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            exported = gauge_name(name)
            gauge = self._gauges.get(exported)
            if gauge is None:
                gauge = self._gauges[exported] = Gauge(exported, f"metrics.jsonl's {name}, at the last step",
                                                       registry=self.registry)
            gauge.set(value)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
