"""Fault injection for the reliability tests: `train.fault_injection` in the config.

Every key names a 1-based optimizer step (the step number that appears in metrics.jsonl) or a list
of them; `*_rank` keys limit a fault to one rank (default: every rank, or rank 0 for a pause).

    nan_at_step, nan_rank            the loss of that step is NaN
    inf_grad_at_step, inf_grad_rank  the loss stays finite but its gradients are inf
    pause_at_step, pause_rank, pause_seconds
                                     the rank sleeps at the start of the step (heartbeat phase
                                     "paused"), so a test can signal or kill it at a known step;
                                     a stop request (signal, stop file, launcher gone) ends it
    stop_at_step                     a stop request arrives during the step
    token_delay_s                    seconds every generated token takes (a generation slower than
                                     the watchdog's silence limit, as a large model's under ZeRO-3)
    setup_delay_s, setup_delay_rank  seconds the model load takes (a large model on a slow filesystem)
    save_write_delay_s, save_write_delay_rank
                                     seconds before each checkpoint file is written (a slow disk)
An empty dict (the default) injects nothing.
"""
from __future__ import annotations

import time
from typing import Any, Dict


def _steps(value) -> set:
    return set(value) if isinstance(value, (list, tuple)) or hasattr(value, "__iter__") and not isinstance(value, str) \
        else {value}


class Faults:
    def __init__(self, spec: Dict[str, Any], rank: int):
        self.spec, self.rank = dict(spec), rank

    def _hits(self, key: str, step: int, default_rank=None) -> bool:
        if self.spec.get(key) is None or step not in _steps(self.spec[key]):
            return False
        wanted = self.spec.get(key.replace("at_step", "rank"), default_rank)
        return wanted is None or wanted == self.rank

    def loss_factor(self, step: int) -> float:
        return float("nan") if self._hits("nan_at_step", step) else 1.0

    def grad_factor(self, step: int) -> float:
        return float("inf") if self._hits("inf_grad_at_step", step) else 1.0

    def stop_requested(self, step: int) -> bool:
        return self._hits("stop_at_step", step)

    def maybe_pause(self, step: int, heartbeat, stop=None) -> None:
        """Sleep pause_seconds, or until `stop` (a StopRequest) is requested: a test that signals a
        paused rank then never races the pause's end, however slow the machine."""
        if self._hits("pause_at_step", step, default_rank=0):
            heartbeat.beat(step - 1, "paused")
            end = time.monotonic() + float(self.spec.get("pause_seconds", 60))
            while time.monotonic() < end and not (stop is not None and stop.requested()):
                time.sleep(min(0.1, max(end - time.monotonic(), 0)))

    def delay_setup(self) -> None:
        wanted = self.spec.get("setup_delay_rank")
        if self.spec.get("setup_delay_s") and (wanted is None or wanted == self.rank):
            time.sleep(float(self.spec["setup_delay_s"]))

    def save_write_delay_s(self) -> float:
        """Seconds a checkpoint write waits before each file (every rank, or save_write_delay_rank): a
        slow disk, so that a test can kill a job while an asynchronous save is being written, or make
        one rank's synchronous save outlast the collective timeout."""
        wanted = self.spec.get("save_write_delay_rank")
        if wanted is not None and wanted != self.rank:
            return 0.0
        return float(self.spec.get("save_write_delay_s") or 0.0)

    def token_delay_s(self) -> float:
        return float(self.spec.get("token_delay_s") or 0.0)
