"""One place that creates onnxruntime sessions, so every graph gets the same providers and threads."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ragrt.errors import BundleError, RagrtError
from ragrt.runtime.hugepages import advise_new_regions, anonymous_regions

log = logging.getLogger("ragrt")


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise RagrtError("onnxruntime is not installed: pip install 'ragrt[cpu]' (or 'ragrt[gpu]' for CUDA)") from None
    return onnxruntime


@dataclass(frozen=True)
class SessionConfig:
    device: str = "auto"           # "auto" | "cpu" | "cuda"
    threads: int = 0               # intra-op threads; 0 lets onnxruntime use every core
    huge_pages: bool = True        # back the session's weights with huge pages (see hugepages.py)


def providers_for(device: str) -> list[str]:
    available = _ort().get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise RagrtError("device 'cuda' asked for, but this onnxruntime has no CUDAExecutionProvider: "
                         "pip install 'ragrt[gpu]'")
    return ["CPUExecutionProvider"]


def create_session(path: Path, config: SessionConfig):
    ort = _ort()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = config.threads
    opts.inter_op_num_threads = 1
    # Sequential execution: decoder graphs are one long chain; parallel mode only adds overhead.
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    # A session's threads spin after its run ends, holding the cores while the next graph (the
    # generator after the encoder, the assembly graph after the prefill one) runs: measured, 25 ms
    # lost on a 30-token run after a prefill. Stopping them at the end of each run cost decode
    # steps nothing measurable (benchmarks/README, "Thread pools that stop spinning").
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    providers = providers_for(config.device)
    before = anonymous_regions() if config.huge_pages else None
    try:
        session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as e:  # onnxruntime raises its own untyped errors for a bad file
        raise BundleError(f"{path}: onnxruntime cannot load this graph ({str(e).splitlines()[0][:200]})") from None
    if before is not None:
        advise_new_regions(before)
    if providers[0] != "CPUExecutionProvider" and session.get_providers()[0] == "CPUExecutionProvider":
        log.warning("CUDA was requested for %s but onnxruntime fell back to the CPU", path.name)
    return session
