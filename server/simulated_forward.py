"""A stand-in for the model's forward, to measure the serving path's own overhead on a machine without a GPU.

It behaves like a GPU queue: `launch` returns at once and books the device for `us_per_padded_token` microseconds
per padded token (rows x longest row) after whatever is already booked; `collect` sleeps (releasing the GIL, as a
wait on a CUDA event does) until that batch's booking ends. Its scores are all zero. The default, 5 us per padded
token, is what an H200 took for the 1B shape (161k real tokens/s at about 1.24 padded tokens per real one).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class _Booking:
    ends_at: float
    count: int


class SimulatedForward:
    def __init__(self, us_per_padded_token: float):
        self.seconds_per_token = us_per_padded_token / 1e6
        self._busy_until = 0.0
        self._lock = threading.Lock()

    def describe(self) -> str:
        return f"stand-in forward, {self.seconds_per_token * 1e6:g} us per padded token, scores all 0"

    def launch(self, sequences: list[list[int]]) -> _Booking:
        padded = len(sequences) * max(len(s) for s in sequences)
        with self._lock:
            self._busy_until = max(time.perf_counter(), self._busy_until) + padded * self.seconds_per_token
            return _Booking(self._busy_until, len(sequences))

    @staticmethod
    def collect(booking: _Booking) -> list[float]:
        time.sleep(max(0.0, booking.ends_at - time.perf_counter()))
        return [0.0] * booking.count

    def score_batch(self, sequences: list[list[int]]) -> list[float]:
        return self.collect(self.launch(sequences))
