import hashlib
import os
import stat
from pathlib import Path

import pytest

from provider_daemon.errors import InfrastructureError
from provider_daemon.workspace import create_job_dir, safe_input_path, scan_outputs


class TestJobDir:
    def test_layout(self, tmp_path: Path) -> None:
        job = create_job_dir(tmp_path, "job-1", 2)
        assert job.root == tmp_path / "jobs" / "job-1-2"
        assert job.inputs.is_dir() and job.log_file.is_file()
        assert stat.S_IMODE(job.outputs.stat().st_mode) == 0o777

    def test_leftovers_of_the_same_attempt_are_cleared(self, tmp_path: Path) -> None:
        job = create_job_dir(tmp_path, "job-1", 1)
        (job.outputs / "old.txt").write_text("stale")
        job = create_job_dir(tmp_path, "job-1", 1)
        assert list(job.outputs.iterdir()) == []

    @pytest.mark.parametrize("job_id", ["../x", "a/b", "", ".hidden"])
    def test_unsafe_job_ids(self, tmp_path: Path, job_id: str) -> None:
        with pytest.raises(InfrastructureError):
            create_job_dir(tmp_path, job_id, 1)


class TestInputPaths:
    def test_nested_relative_path(self, tmp_path: Path) -> None:
        assert safe_input_path(tmp_path, "data/a.txt") == tmp_path / "data" / "a.txt"

    @pytest.mark.parametrize("path", ["/etc/passwd", "../x", "a/../../x", "", ".", "a\\b"])
    def test_paths_leaving_inputs_are_refused(self, tmp_path: Path, path: str) -> None:
        with pytest.raises(InfrastructureError, match="input path"):
            safe_input_path(tmp_path, path)


class TestScanOutputs:
    def test_regular_files_with_hashes_and_no_symlinks(self, tmp_path: Path) -> None:
        (tmp_path / "sub").mkdir()
        (tmp_path / "a.txt").write_bytes(b"hello")
        (tmp_path / "sub" / "b.bin").write_bytes(b"\x00" * 10)
        secret = tmp_path.parent / "host-secret"
        secret.write_text("do not upload")
        (tmp_path / "link").symlink_to(secret)
        (tmp_path / "dirlink").symlink_to(tmp_path.parent)
        os.mkfifo(tmp_path / "fifo")
        files, skipped = scan_outputs(tmp_path)
        assert [(f.path, f.size) for f in files] == [("a.txt", 5), ("sub/b.bin", 10)]
        assert files[0].sha256 == hashlib.sha256(b"hello").hexdigest()
        assert sorted(skipped) == ["dirlink", "fifo", "link"]
