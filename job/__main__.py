"""The edge: environment → settings → logging → `run()` / `check()` → exit code.

`python -m job [run|check|settings]`. Every failure ends in one `job.failed` event, one line in
`/dev/termination-log` (when Kubernetes provides it) and the contract's exit code.
"""

import os
import sys
from pathlib import Path

import structlog

from job.errors import ConfigError, JobError, find_job_error
from job.logs import add_secrets, configure_logging, quiet_libraries, redact
from job.preemption import handling_sigterm
from job.settings import batch_line_source, load_settings, settings_table

TERMINATION_LOG = Path("/dev/termination-log")
RANK_EXIT_DIR_ENV = "ENTRYPOINT_RANK_EXIT_DIR"  # set by entrypoint.sh (not SDFT_: not a setting)
USAGE = "usage: python -m job [run|check|settings]"


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "run"
    if command == "settings":
        print(settings_table())
        return 0
    if command not in ("run", "check") or len(argv) > 1:
        print(USAGE, file=sys.stderr)
        return ConfigError.exit_code
    configure_logging()
    log = structlog.get_logger()
    with handling_sigterm():
        exit_code = _run_command(command, log)
    _record_exit_code(exit_code)
    return exit_code


def _record_exit_code(exit_code: int) -> None:
    """Under entrypoint.sh's several-process launch, tells it how this rank ended: accelerate launch
    exits 1 whatever the ranks' codes, and a preemption (every rank 143) must stay 143."""
    folder = os.environ.get(RANK_EXIT_DIR_ENV)
    if folder:
        Path(folder, f"rank-{os.environ.get('RANK', '0')}").write_text(f"{exit_code}\n")


def _run_command(command: str, log) -> int:
    try:
        settings = load_settings(_batch_line())
        add_secrets(getattr(settings, name) for name, field in type(settings).model_fields.items()
                    if (field.json_schema_extra or {}).get("secret"))
        configure_logging(settings.log_format, settings.log_level, settings.run_id)
        quiet_libraries()  # imports diffusers and transformers: only now that the settings are valid
        log.info("job.start", command=command, method=settings.method, base_model=settings.base_model)
        from job.run import check, run

        (check if command == "check" else run)(settings)
    except JobError as error:
        return _fail(log, error.exit_code, str(error), error)
    except Exception as error:  # a bug: keep the traceback in the log, the reason on one line
        wrapped = find_job_error(error)
        if wrapped is not None:
            return _fail(log, wrapped.exit_code, str(wrapped), wrapped)
        return _fail(log, 1, f"{type(error).__name__}: {error}", error)
    log.info("job.done", exit_code=0)
    return 0


def _batch_line() -> dict | None:
    """A fan-out pod's line of the batch file (read from storage here, at the edge), else None."""
    source = batch_line_source()
    if source is None:
        return None
    from job.fanout import read_batch_line

    return read_batch_line(source)


def _fail(log, exit_code: int, reason: str, error: Exception) -> int:
    reason = redact(" ".join(reason.split()))
    if exit_code == 1:
        log.error("job.failed", exit_code=exit_code, reason=reason, exc_info=error)
    else:
        log.error("job.failed", exit_code=exit_code, reason=reason)
    if TERMINATION_LOG.parent.exists() and TERMINATION_LOG.exists():
        # Several processes of one pod may fail; each appends its own line (Kubernetes shows 4 KiB).
        rank = os.environ.get("RANK", "0")  # set by accelerate launch for each process
        try:
            with TERMINATION_LOG.open("a") as termination_log:
                termination_log.write((f"rank {rank}: " if rank != "0" else "") + reason[:2000] + "\n")
        except OSError:
            pass  # not writable outside Kubernetes; the log event above carries the reason
    return exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
