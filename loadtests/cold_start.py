"""A cold start through the activator: wait until the model has no replica at all, then let every
user send at once, and keep them sending while the model warms up.

Point `--host` at `ember activator`. Once all users are spawned, one greenlet polls the
activator's `GET /status` until `--model` has 0 ready, 0 starting and no replicas listed
(the scale-to-zero rules decide when: a fresh activator starts there; a warm one gets there
after its stable window and grace). Then the burst is released. The stats keep apart:

- `... [cold]`: each user's first request, the ones that queued while the model was at zero;
- `time to first answer` (type `cold-start`): from the release to the first answer;
- `X-Ember-Cold-Start-Ms` (type `cold-start`): the wait the activator itself reports on
  each answer that waited for a cold replica;
- `wait for zero replicas` (type `cold-start`): how long the model took to reach zero (a
  failure if it did not within `--zero-timeout`; the run then stops).

Everything else is the warm traffic that follows. For a front door without Ember's `/status`
(Knative, KServe), `--zero-check none` releases the burst at once: make sure the model is idle
first.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.request
from typing import Any

import _common
import gevent
import gevent.event
from locust import events
from locust.argument_parser import LocustArgumentParser
from locust.env import Environment

log = logging.getLogger("ember.loadtests.cold_start")

_spawned = gevent.event.Event()
_release = gevent.event.Event()
_state: dict[str, float] = {}


def _add_arguments(parser: LocustArgumentParser) -> None:
    parser.add_argument(
        "--zero-timeout",
        type=float,
        default=600.0,
        help="cold_start.py: seconds to wait for the model to reach zero replicas (default 600)",
    )
    parser.add_argument(
        "--zero-check",
        choices=("status", "none"),
        default="status",
        help="cold_start.py: status = poll the activator's /status; none = burst at once",
    )


_common.listen(events.init_command_line_parser, _add_arguments)


def _fire(environment: Environment, name: str, ms: float, error: Exception | None = None) -> None:
    _common.fire_request(environment, "cold-start", name, ms, error=error)


def _at_zero(doc: dict[str, Any], model: str) -> bool:
    state = doc["models"][model]
    return bool(state["ready"] == 0 and not state.get("starting") and not state["replicas"])


def _wait_for_zero(environment: Environment, url: str, model: str) -> None:
    timeout = float(_common.option(environment, "zero_timeout"))
    started = time.perf_counter()
    last = "no answer yet"
    while time.perf_counter() - started < timeout:
        try:
            with urllib.request.urlopen(f"{url}/status", timeout=5) as answer:
                doc = json.loads(answer.read())
            if model not in doc.get("models", {}):
                raise KeyError(f"the activator at {url} serves no model '{model}'")
            if _at_zero(doc, model):
                _fire(environment, "wait for zero replicas", (time.perf_counter() - started) * 1e3)
                return
            last = json.dumps(doc["models"][model])[:300]
        except (OSError, ValueError) as exc:  # includes urllib's HTTP and URL errors
            last = repr(exc)
        gevent.sleep(0.25)
    error = TimeoutError(f"'{model}' not at zero replicas after {timeout:.0f} s (last: {last})")
    _fire(environment, "wait for zero replicas", (time.perf_counter() - started) * 1e3, error)
    raise error


def _arm(environment: Environment) -> None:
    _spawned.wait()
    model = str(_common.option(environment, "model"))
    url = _common.base_url(environment, ColdStartUser.host)
    if _common.option(environment, "zero_check") == "status":
        try:
            _wait_for_zero(environment, url, model)
        except (TimeoutError, KeyError) as exc:
            log.error("cold start: %s; stopping", exc)
            if environment.runner is not None:
                environment.runner.quit()
            return
    log.info("cold start: '%s' is at zero replicas; releasing %s users", model, _spawned_users())
    _state["released"] = time.perf_counter()
    _release.set()


def _spawned_users() -> int:
    return int(_state.get("users", 0))


def _on_spawned(user_count: int, **_: Any) -> None:
    _state["users"] = user_count
    _spawned.set()


def _on_test_start(environment: Environment, **_: Any) -> None:
    _spawned.clear()
    _release.clear()
    _state.clear()
    gevent.spawn(_arm, environment)


_common.listen(events.spawning_complete, _on_spawned)
_common.listen(events.test_start, _on_test_start)


class ColdStartUser(_common.InferUser):
    def on_start(self) -> None:
        protocol = str(_common.option(self.environment, "protocol"))
        model = str(_common.option(self.environment, "model"))
        url = _common.base_url(self.environment, self.host)
        # Built before the burst (from the table or --payload, never by asking the activator).
        self.request = _common.http_infer(self.environment, url, model, protocol)
        self.cold = True
        _release.wait()

    def one_request(self) -> None:
        name = f"{self.request.name} [cold]" if self.cold else None
        response = _common.send(self.client, self.next_request(), name=name)
        self.cold = False
        if response.status_code != 200:
            return
        if "first_answer" not in _state and "released" in _state:
            _state["first_answer"] = time.perf_counter()
            _fire(self.environment, "time to first answer",
                  (_state["first_answer"] - _state["released"]) * 1e3)  # fmt: skip
        waited = _common.header(response, "X-Ember-Cold-Start-Ms")
        if waited is not None:
            _fire(self.environment, "X-Ember-Cold-Start-Ms", float(waited))
