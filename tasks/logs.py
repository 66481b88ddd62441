"""vpr's log records in Prefect's run logs: the package logger ``vpr`` reaches the UI like a task's own logger."""

from __future__ import annotations

import logging

from prefect.context import FlowRunContext, TaskRunContext


class RunLogHandler(logging.Handler):
    """Hands ``vpr`` records to Prefect's API log handlers, only inside a flow or task run.

    Outside a run there is no run to log to (Prefect would warn on every record); the console still
    shows them through the root logger either way.
    """

    def emit(self, record: logging.LogRecord) -> None:
        if TaskRunContext.get() is None and FlowRunContext.get() is None:
            return
        for handler in logging.getLogger("prefect.extra").handlers:
            if record.levelno >= handler.level:
                handler.handle(record)


def show_vpr_logs(level: int = logging.INFO) -> None:
    """Attach ``vpr`` to Prefect's run logs (idempotent); its INFO messages are progress worth keeping."""
    logger = logging.getLogger("vpr")
    if not any(isinstance(h, RunLogHandler) for h in logger.handlers):
        logger.addHandler(RunLogHandler())
    if logger.level == logging.NOTSET:
        logger.setLevel(level)
