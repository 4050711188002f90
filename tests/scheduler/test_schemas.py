import pytest
from pydantic import ValidationError

from common.settings import ServiceSettings
from scheduler.schemas import JobSpec, relative_path


@pytest.mark.parametrize("path", ["a", "a/b.txt", "./a/b"])
def test_relative_paths_are_accepted(path: str) -> None:
    assert not relative_path(path).startswith("/")


@pytest.mark.parametrize("path", ["", "/etc/passwd", "../x", "a/../../x", "a\x00b"])
def test_escaping_paths_are_refused(path: str) -> None:
    with pytest.raises(ValueError):
        relative_path(path)


def test_duplicate_input_paths_are_refused() -> None:
    with pytest.raises(ValidationError, match="same path"):
        JobSpec(
            image="i",
            command=["true"],
            max_duration_s=1,
            inputs=[{"file_id": "a", "path": "x"}, {"file_id": "b", "path": "./x"}],
        )


def test_defaults() -> None:
    spec = JobSpec(image="i", command=["true"], max_duration_s=1)
    assert spec.resources.gpus == 1 and spec.retries == 2 and spec.inputs == []


def test_default_secret_refused_outside_dev_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPUMARKET_INTERNAL_TOKEN", raising=False)
    with pytest.raises(ValidationError, match="INTERNAL_TOKEN"):
        ServiceSettings(dev_mode=False)
    assert ServiceSettings(dev_mode=True).dev_mode
