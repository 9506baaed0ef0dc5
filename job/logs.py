"""Structured logging: one JSON object per line off a terminal, console rendering on one.

Every event carries `run_id`; only the main process logs; known secret values are masked in every
event, including those of the libraries (transformers, diffusers, accelerate, botocore), whose logs go
through the same renderer.
"""

import logging
import os
import sys

import structlog

from job import strict_json

# Credentials come from the standard variables; their values must never be printed.
SECRET_ENV_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
MASK = "***"


_extra_secrets: set[str] = set()


def add_secrets(values) -> None:
    """Masks these values too from now on (the values of settings marked secret)."""
    _extra_secrets.update(str(v) for v in values if v)


def secret_values() -> list[str]:
    """The secret values in this process's environment, longest first (so overlaps mask fully)."""
    values = {os.environ.get(name, "") for name in SECRET_ENV_VARS} | _extra_secrets
    return sorted((v for v in values if len(v) >= 4), key=len, reverse=True)


def redact(text: str) -> str:
    for value in secret_values():
        text = text.replace(value, MASK)
    return text


def _redact_value(value):
    # Events carry lists and dicts too (skipped files, settings); a secret may hide anywhere in them.
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: _redact_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact_value(item) for item in value]
    return value


def _redact_event(_, __, event: dict) -> dict:
    return _redact_value(event)


def _main_process_only(_, __, event: dict) -> dict:
    # Accelerate sets RANK/LOCAL_RANK for every process it launches; only rank 0 speaks, except that
    # any rank's own failure is told in its own output (on another machine it is the only trace).
    rank = os.environ.get("RANK", "0")
    if rank == "0":
        return event
    if event.get("event") == "job.failed":
        return {**event, "rank": int(rank)}
    raise structlog.DropEvent


def _structlog_or_main_process(record: logging.LogRecord) -> bool:
    # The libraries' own records (bitsandbytes warns while peft imports it) on the other ranks are
    # dropped here: a formatter cannot drop one (DropEvent would escape from the library's logging
    # call and crash that process). structlog's records carry their event dict as `msg`.
    return isinstance(record.msg, dict) or os.environ.get("RANK", "0") == "0"


_KNOWN_NOISE = (
    "requires torchvision",  # transformers, on import: torchvision is absent; sdft never needs it
    "from kernels-community",  # bitsandbytes, on import on AVX512-BF16 CPUs: no 4-bit CPU kernel; sdft
    # uses bitsandbytes only for 8-bit AdamW on CUDA
)


def _drop_known_noise(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not any(noise in message for noise in _KNOWN_NOISE)


def configure_logging(log_format: str = "auto", level: str = "info", run_id: str | None = None) -> None:
    """Sets up structlog and routes the standard library's logging through it."""
    json_lines = log_format == "json" or (log_format == "auto" and not sys.stdout.isatty())
    renderer = (
        structlog.processors.JSONRenderer(serializer=strict_json.dumps)
        if json_lines
        else structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    )
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, _main_process_only, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            _redact_event,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    handler.addFilter(_drop_known_noise)
    handler.addFilter(_structlog_or_main_process)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    logging.captureWarnings(True)  # Python warnings become events too, redacted, not raw stderr
    root.setLevel(level.upper())
    # Libraries are chatty at info; their warnings still come through, as structured events.
    for name in ("transformers", "diffusers", "accelerate", "botocore", "boto3", "s3transfer", "urllib3", "httpx", "huggingface_hub", "PIL"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    structlog.contextvars.clear_contextvars()
    if run_id:
        structlog.contextvars.bind_contextvars(run_id=run_id)


def quiet_libraries() -> None:
    """Turns off the progress bars of diffusers, transformers and the Hub, and routes their loggers
    through ours. Apart from `configure_logging` because it imports diffusers and transformers
    (seconds): the edge calls it once the settings are valid, so a bad setting is reported at once."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    # Both libraries install their own handlers; let the root one (ours) do the rendering.
    for module in (diffusers.utils.logging, transformers.utils.logging):
        library_logger = module.get_logger()
        library_logger.handlers.clear()
        library_logger.propagate = True
