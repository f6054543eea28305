"""Triton's metric names (`nv_inference_*`, `nv_gpu_*`) rendered from the same statistics the
statistics extension serves, so existing Triton dashboards work unchanged.

Written out directly in the Prometheus text format: prometheus-client would name a counter
`..._total`, and Triton's counters carry no such suffix. Nothing is updated per request;
everything is read at scrape time.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ember.server.repository import ModelHandle

_COUNTERS = (
    ("nv_inference_request_success", "Number of successful inference requests, all batch sizes"),
    ("nv_inference_request_failure", "Number of failed inference requests, all batch sizes"),
    ("nv_inference_count", "Number of inferences performed (rows, not requests)"),
    ("nv_inference_exec_count", "Number of model executions performed"),
    ("nv_inference_request_duration_us", "Cumulative inference request duration in microseconds"),
    ("nv_inference_queue_duration_us", "Cumulative inference queuing duration in microseconds"),
    ("nv_inference_compute_input_duration_us", "Cumulative compute input duration in microseconds"),
    ("nv_inference_compute_infer_duration_us", "Cumulative compute inference duration in us"),
    ("nv_inference_compute_output_duration_us", "Cumulative compute output duration in us"),
)  # fmt: skip


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def render(handles: Iterable[ModelHandle]) -> str:
    samples: dict[str, list[str]] = {name: [] for name, _ in _COUNTERS}
    pending: list[str] = []
    for handle in handles:
        stats = handle.stats
        labels = {"model": handle.name, "version": handle.config.version}
        at = _labels(**labels)
        samples["nv_inference_request_success"].append(f"{at} {stats.success.count}")
        for reason, count in sorted(stats.failures.items()):
            samples["nv_inference_request_failure"].append(
                f"{_labels(**labels, reason=reason)} {count}"
            )
        samples["nv_inference_count"].append(f"{at} {stats.inference_count}")
        samples["nv_inference_exec_count"].append(f"{at} {stats.execution_count}")
        for phase, duration in (
            ("request", stats.success.ns + stats.fail.ns),
            ("queue", stats.queue.ns),
            ("compute_input", stats.compute_input.ns),
            ("compute_infer", stats.compute_infer.ns),
            ("compute_output", stats.compute_output.ns),
        ):
            samples[f"nv_inference_{phase}_duration_us"].append(f"{at} {duration // 1000}")
        depth = len(handle.batcher) if handle.batcher is not None else 0
        pending.append(f"{at} {depth}")
    lines = []
    for name, help_text in _COUNTERS:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
        lines += [name + sample for sample in samples[name]]
    lines += [
        "# HELP nv_inference_pending_request_count Instantaneous number of pending requests "
        "awaiting execution per-model.",
        "# TYPE nv_inference_pending_request_count gauge",
    ]
    lines += ["nv_inference_pending_request_count" + sample for sample in pending]
    lines += _gpu_lines()
    return "\n".join(lines) + "\n"


def _gpu_lines() -> list[str]:
    if not torch.cuda.is_available():
        return []
    used, total = [], []
    for index in range(torch.cuda.device_count()):
        free, size = torch.cuda.mem_get_info(index)
        uuid = str(getattr(torch.cuda.get_device_properties(index), "uuid", index))
        at = _labels(gpu_uuid=f"GPU-{uuid}" if not uuid.startswith("GPU-") else uuid)
        used.append(f"nv_gpu_memory_used_bytes{at} {size - free}")
        total.append(f"nv_gpu_memory_total_bytes{at} {size}")
    return [
        "# HELP nv_gpu_memory_used_bytes GPU used memory, in bytes",
        "# TYPE nv_gpu_memory_used_bytes gauge",
        *used,
        "# HELP nv_gpu_memory_total_bytes GPU total memory, in bytes",
        "# TYPE nv_gpu_memory_total_bytes gauge",
        *total,
    ]
