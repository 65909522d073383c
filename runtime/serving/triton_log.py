"""Triton's own log, from the tritonserver process pytriton starts: onto stderr, never stdout.

pytriton 0.7.0 starts tritonserver with TritonServer(verbose=True), its default, which prints every line
of Triton's log on stdout, where clipfuse keeps results, whatever the log level. Here each line goes
through clipfuse's logger (stderr, tag "triton", silent with -q) and pytriton still keeps its copy
(its failure reports read it).

One line is dropped: every model pytriton loads logs
    E... model_repository_manager.cc] "Failed to set config modification time: model_config_content_name_ is empty"
pytriton loads a model through Triton's load API with the config given as an override (no config.pbtxt
in the loaded model's folder), and Triton 2.51 then has no config file whose modification time it could
record. That time only decides whether a later repository poll reloads a model whose config file
changed; pytriton runs Triton in explicit model-control mode with no polling and no config file, so there
is nothing to reload and nothing lost (triton-inference-server/core PR #304 introduced the record).
"""
from __future__ import annotations

from clipfuse.core.log import log

HARMLESS = ("Failed to set config modification time: model_config_content_name_ is empty",)


def route_triton_log(triton) -> None:
    """Before `triton.run()`: send the tritonserver process's log lines to stderr (through `log`) instead of
    stdout, without the HARMLESS ones. Reaches into pytriton's server object (pytriton 0.7.0 has no hook)."""
    initialize = triton._initialize_server

    def initialize_routed():
        initialize()
        server = triton._triton_server
        record = server._record_logs
        server._verbose = False           # pytriton's own print to stdout

        pending = []                      # pytriton reads the process unbuffered: a call may carry one character

        def route(chunk):
            record(chunk)                 # pytriton's copy
            pending.append(chunk.decode("utf-8", errors="replace") if isinstance(chunk, bytes) else chunk)
            if "\n" not in pending[-1]:
                return
            *lines, rest = "".join(pending).split("\n")
            pending[:] = [rest]
            for ln in lines:
                if ln.strip() and not any(h in ln for h in HARMLESS):
                    log(ln.rstrip(), tag="triton")

        server._record_logs = route       # read when the process starts, after this

    triton._initialize_server = initialize_routed
