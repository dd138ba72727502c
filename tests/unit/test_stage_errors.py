"""How a stage reports a configuration error so that its driver sees it through torchrun.

torchrun's agent exits 1 whatever its worker's exit code, so the exit code 2
of a training stage never reaches Kubernetes or TorchX; the reason written to
the container's termination message and to torchrun's error file does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import BaseModel

from noisy_student_workloads import stage
from noisy_student_workloads.config import ConfigError
from noisy_student_workloads.pipeline import DataError


class Nothing(BaseModel):
    """A stage config with no fields."""


def fail(error: Exception):
    def body(cfg, args) -> None:
        raise error
    return body


@pytest.fixture
def termination_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "termination-log"
    path.touch()  # the kubelet creates it before the container starts
    monkeypatch.setattr(stage, "TERMINATION_LOG", str(path))
    return path


def run(body, monkeypatch: pytest.MonkeyPatch, error_file: Path | None) -> int:
    if error_file is None:
        monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    else:
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    return stage.run_entry_point("test", Nothing, body, ["--config", "{}"], quiet=True)


def test_a_config_error_is_written_to_the_termination_message_and_torchruns_error_file(
    tmp_path: Path, termination_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    error_file = tmp_path / "error.json"
    # A subclass (DataError, NonFiniteLoss) reads as a ConfigError too: the driver knows only that word.
    code = run(fail(DataError("labeled: s3://b/x-{0..1}.tar names no shards\n(check the brace range)")),
               monkeypatch, error_file)
    assert code == stage.CONFIG_ERROR_EXIT_CODE == 2
    reason = "ConfigError: labeled: s3://b/x-{0..1}.tar names no shards (check the brace range)"
    assert termination_log.read_text() == reason + "\n"  # one line
    # torchrun's agent reads its worker's error file with torch's own reader, and copies it to its own.
    failure = ProcessFailure(local_rank=0, pid=1, exitcode=2, error_file=str(error_file))
    assert failure.message["message"] == reason and failure.timestamp > 0
    assert json.loads(error_file.read_text())["message"]["errorCode"] == 2


def test_on_a_workstation_nothing_is_created_and_other_errors_are_not_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    absent = tmp_path / "dev" / "termination-log"
    monkeypatch.setattr(stage, "TERMINATION_LOG", str(absent))
    assert run(fail(ConfigError("model: unknown timm model 'x'")), monkeypatch, None) == 2
    assert not absent.exists() and not absent.parent.exists()
    with pytest.raises(RuntimeError):
        run(fail(RuntimeError("a bug")), monkeypatch, tmp_path / "error.json")
    assert not (tmp_path / "error.json").exists()  # an exception is torch's @record's to report
