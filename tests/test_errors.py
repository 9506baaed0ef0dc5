"""A JobError that a library wrapped is still the reason the job stops, with its exit code."""

import logging

import pytest
import structlog

from job.__main__ import main
from job.errors import InputError, JobError, Preempted, find_job_error


def _wrapped(inner: Exception) -> Exception:
    try:
        try:
            raise inner
        except Exception as error:
            raise RuntimeError("a library caught it") from error
    except RuntimeError as outer:
        try:
            raise ValueError("and another wrapped that") from None
        except ValueError as outermost:
            outermost.__context__ = outer
            return outermost


@pytest.fixture
def edge_logging():
    """The edge configures logging for the whole process: put it back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level
    logging.captureWarnings(False)
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def test_the_job_error_down_the_chain_of_causes_is_found():
    preempted = Preempted("stopped by SIGTERM")
    assert find_job_error(_wrapped(preempted)) is preempted
    assert find_job_error(preempted) is preempted
    assert find_job_error(_wrapped(KeyError("x"))) is None


def test_the_edge_exits_with_the_wrapped_errors_code(monkeypatch, tmp_path, capsys, edge_logging):
    import job.run

    monkeypatch.setenv("SDFT_INSTANCE_URI", str(tmp_path / "photos"))
    monkeypatch.setenv("SDFT_OUTPUT_URI", str(tmp_path / "out"))
    monkeypatch.setenv("SDFT_LOG_FORMAT", "json")

    def wrapped_failure(settings):
        raise _wrapped(InputError("no images under the instance URI"))

    monkeypatch.setattr(job.run, "check", wrapped_failure)
    assert main(["check"]) == InputError.exit_code
    assert "no images under the instance URI" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["train"], ["run", "extra"]])
def test_an_unknown_command_exits_2(argv, capsys):
    assert main(argv) == 2
    assert "usage" in capsys.readouterr().err


def test_job_errors_carry_the_contract_exit_codes():
    assert JobError.exit_code == 1 and InputError.exit_code == 3 and Preempted.exit_code == 143
