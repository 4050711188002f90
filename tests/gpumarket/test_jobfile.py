"""The YAML job file: what it turns into, and where its problems are reported."""

import textwrap
from decimal import Decimal
from pathlib import Path

import pytest

from gpumarket.jobfile import JobFile, JobFileError, LocalInput, Problem, load_job_file
from gpumarket.platform import SAMPLE_IMAGE
from scheduler.schemas import JobSpec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def write(directory: Path, text: str, name: str = "job.yaml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def load(directory: Path, text: str, environ: dict[str, str] | None = None) -> JobFile:
    return load_job_file(write(directory, text), environ=environ or {})


def problems(directory: Path, text: str, environ: dict[str, str] | None = None) -> list[Problem]:
    with pytest.raises(JobFileError) as caught:
        load(directory, text, environ)
    return caught.value.problems


def where(directory: Path, text: str, environ: dict[str, str] | None = None) -> list[tuple]:
    """(field, line, column) of each problem."""
    return [(p.field, p.line, p.column) for p in problems(directory, text, environ)]


MINIMAL = """
image: busybox
command: [echo, hi]
max_duration: 60
"""


class TestValidFile:
    def test_full_file_round_trips_to_the_job_spec(self, tmp_path: Path) -> None:
        (tmp_path / "hello.txt").write_text("hello\n")
        data = tmp_path / "data"
        (data / "sub").mkdir(parents=True)
        (data / "a.csv").write_text("1,2\n")
        (data / "sub" / "b.csv").write_text("3,4,5\n")
        job = load(
            tmp_path,
            """
            image: localhost/gpumarket-sample:latest
            command: |
              cat /inputs/hello.txt > /outputs/copy.txt
            env:
              BATCH: 8192
              DEBUG: true
              RATIO: 1.50
              NAME: run
            resources:
              gpus: 2
              gpu_models: [H100]
              min_vram_gb: 40
              labels: {tier: gold}
            inputs:
              - hello.txt
              - {src: data, dest: dataset/train}
            outputs: ./out
            max_duration: 1h30m
            max_price_per_gpu_hour: 1.25
            retries: 0
            retry_on_exit_codes: [75, 3]
            priority: 5
            egress: true
            """,
        )
        assert job.outputs == tmp_path.resolve() / "out"
        assert job.inputs == [
            LocalInput(tmp_path / "hello.txt", "hello.txt", 6),
            LocalInput(data / "a.csv", "dataset/train/a.csv", 4),
            LocalInput(data / "sub" / "b.csv", "dataset/train/sub/b.csv", 6),
        ]
        ids = {"hello.txt": "f1", "dataset/train/a.csv": "f2", "dataset/train/sub/b.csv": "f3"}
        assert job.job_spec(ids) == JobSpec.model_validate(
            {
                "image": "localhost/gpumarket-sample:latest",
                "command": ["sh", "-c", "cat /inputs/hello.txt > /outputs/copy.txt\n"],
                "env": {"BATCH": "8192", "DEBUG": "true", "RATIO": "1.50", "NAME": "run"},
                "resources": {
                    "gpus": 2,
                    "gpu_models": ["H100"],
                    "min_vram_gb": 40,
                    "labels": {"tier": "gold"},
                },
                "inputs": [
                    {"file_id": "f1", "path": "hello.txt"},
                    {"file_id": "f2", "path": "dataset/train/a.csv"},
                    {"file_id": "f3", "path": "dataset/train/sub/b.csv"},
                ],
                "max_duration_s": 5400,
                "max_price_per_gpu_hour": Decimal("1.25"),
                "retries": 0,
                "retry_on_exit_codes": [3, 75],
                "priority": 5,
                "egress": True,
            }
        )

    def test_minimal_file_takes_the_spec_defaults(self, tmp_path: Path) -> None:
        job = load(tmp_path, MINIMAL)
        spec = job.job_spec({})
        assert (spec.command, spec.resources.gpus, spec.retries) == (["echo", "hi"], 1, 2)
        assert (job.inputs, job.outputs, spec.inputs) == ([], None, [])

    def test_exec_form_items_are_kept_as_written(self, tmp_path: Path) -> None:
        job = load(tmp_path, "image: x\ncommand: [sleep, 5, 0.50]\nmax_duration: 9\n")
        assert job.job_spec({}).command == ["sleep", "5", "0.50"]

    @pytest.mark.parametrize(
        ("written", "seconds"),
        [("90", 90), ('"90"', 90), ("90s", 90), ("30m", 1800), ("2h", 7200),
         ("1h30m", 5400), ("1d", 86400), ("1d2h3m4s", 93784)],
    )  # fmt: skip
    def test_durations(self, tmp_path: Path, written: str, seconds: int) -> None:
        job = load(tmp_path, f"image: x\ncommand: [true]\nmax_duration: {written}\n")
        assert job.job_spec({}).max_duration_s == seconds

    def test_env_list_takes_bare_names_from_the_environment(self, tmp_path: Path) -> None:
        text = MINIMAL + "env:\n  - A=1=2\n  - TOKEN\n  - EMPTY=\n"
        job = load(tmp_path, text, environ={"TOKEN": "s3cret"})
        assert job.job_spec({}).env == {"A": "1=2", "TOKEN": "s3cret", "EMPTY": ""}

    def test_env_scalars_are_kept_as_written(self, tmp_path: Path) -> None:
        job = load(tmp_path, MINIMAL + "env: {DAY: 2024-01-01, ON: yes, HEX: 0x10, E: ''}\n")
        assert job.job_spec({}).env == {"DAY": "2024-01-01", "ON": "yes", "HEX": "0x10", "E": ""}

    def test_inputs_default_dest_and_absolute_src(self, tmp_path: Path) -> None:
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        (elsewhere / "model.bin").write_bytes(b"\0" * 10)
        jobs = tmp_path / "jobs"
        jobs.mkdir()
        (jobs / "run.py").write_text("print(1)\n")
        job = load(
            jobs,
            MINIMAL + f"inputs:\n  - {{src: {elsewhere / 'model.bin'}}}\n  - src: ./run.py\n"
            "    dest: code/./main.py\n",
        )
        assert job.inputs == [
            LocalInput(elsewhere / "model.bin", "model.bin", 10),
            LocalInput(jobs / "run.py", "code/main.py", 9),
        ]

    def test_job_spec_needs_an_id_for_every_input(self, tmp_path: Path) -> None:
        (tmp_path / "a.txt").write_text("a")
        job = load(tmp_path, MINIMAL + "inputs: [a.txt]\n")
        with pytest.raises(ValueError, match=r"a\.txt"):
            job.job_spec({})


class TestProblems:
    def test_unknown_top_level_field_points_at_its_key(self, tmp_path: Path) -> None:
        [problem] = problems(tmp_path, MINIMAL + "gpus: 2\n")
        assert (problem.field, problem.line, problem.column) == ("gpus", 4, 1)
        assert problem.message.startswith("unknown field (known: image, command,")

    def test_unknown_field_inside_resources(self, tmp_path: Path) -> None:
        [problem] = problems(tmp_path, MINIMAL + "resources:\n  gpus: 1\n  vram: 80\n")
        assert (problem.field, problem.line, problem.column) == ("resources.vram", 6, 3)
        assert problem.message.startswith("unknown field (known: gpus, gpu_models,")

    def test_wrong_type(self, tmp_path: Path) -> None:
        [problem] = problems(tmp_path, MINIMAL + "resources:\n  gpus: two\n")
        assert (problem.field, problem.line, problem.column) == ("resources.gpus", 5, 9)
        assert problem.message.startswith("should be a valid integer")

    def test_out_of_range_comes_from_the_job_spec(self, tmp_path: Path) -> None:
        [problem] = problems(tmp_path, MINIMAL + "resources:\n  gpus: 17\n")
        assert problem == Problem("resources.gpus", "should be at most 16", 5, 9)

    def test_job_spec_validator_message(self, tmp_path: Path) -> None:
        [problem] = problems(tmp_path, MINIMAL + "retry_on_exit_codes: [0]\n")
        assert problem == Problem(
            "retry_on_exit_codes", "0 is not a failing exit code (1-255)", 4, 22
        )

    @pytest.mark.parametrize("written", ["1h30", "soon", "-5s", "true", "[1]"])
    def test_bad_duration(self, tmp_path: Path, written: str) -> None:
        [problem] = problems(tmp_path, f"image: x\ncommand: [true]\nmax_duration: {written}\n")
        assert (problem.field, problem.line, problem.column) == ("max_duration", 3, 15)
        assert "30m" in problem.message

    def test_duration_out_of_range_is_reported_on_max_duration(self, tmp_path: Path) -> None:
        [problem] = problems(tmp_path, "image: x\ncommand: [true]\nmax_duration: 8d\n")
        assert problem == Problem("max_duration", "should be at most 604800", 3, 15)

    def test_missing_image_points_at_the_mapping(self, tmp_path: Path) -> None:
        assert where(tmp_path, "command: [true]\nmax_duration: 5\n") == [("image", 1, 1)]
        [problem] = problems(tmp_path, "command: [true]\nmax_duration: 5\n")
        assert problem.message == "required"

    def test_missing_max_duration(self, tmp_path: Path) -> None:
        assert where(tmp_path, "image: x\ncommand: [true]\n") == [("max_duration", 1, 1)]

    def test_missing_input_file(self, tmp_path: Path) -> None:
        [problem] = problems(tmp_path, MINIMAL + "inputs:\n  - nothere.txt\n")
        assert problem == Problem("inputs.0", "nothere.txt does not exist", 5, 5)

    def test_duplicate_dest(self, tmp_path: Path) -> None:
        (tmp_path / "a.txt").write_text("a")
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "a.txt").write_text("b")
        text = MINIMAL + "inputs:\n  - a.txt\n  - {src: d/a.txt}\n"
        [problem] = problems(tmp_path, text)
        assert (problem.field, problem.line, problem.column) == ("inputs.1", 6, 5)
        assert problem.message == "inputs.0 (line 5) also puts a file at /inputs/a.txt"

    def test_bad_dest(self, tmp_path: Path) -> None:
        (tmp_path / "a.txt").write_text("a")
        text = MINIMAL + "inputs:\n  - src: a.txt\n    dest: ../etc/passwd\n"
        assert where(tmp_path, text) == [("inputs.0.dest", 6, 11)]

    def test_empty_input_directory(self, tmp_path: Path) -> None:
        (tmp_path / "empty").mkdir()
        [problem] = problems(tmp_path, MINIMAL + "inputs: [empty]\n")
        assert (problem.field, problem.line, problem.column) == ("inputs.0", 4, 10)
        assert "empty directory" in problem.message

    def test_symlinked_directory_inside_an_input_is_not_skipped(self, tmp_path: Path) -> None:
        (tmp_path / "real").mkdir()
        (tmp_path / "real" / "x").write_text("x")
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "link").symlink_to(tmp_path / "real")
        assert where(tmp_path, MINIMAL + "inputs: [d]\n") == [("inputs.0", 4, 10)]

    def test_duplicate_key(self, tmp_path: Path) -> None:
        [problem] = problems(tmp_path, MINIMAL + "resources:\n  gpus: 1\n  gpus: 2\n")
        assert problem == Problem("resources.gpus", "duplicate key (first on line 5)", 6, 3)

    def test_yaml_syntax_error(self, tmp_path: Path) -> None:
        [problem] = problems(tmp_path, "image: x\ncommand: [true\nmax_duration: 5\n")
        assert (problem.field, problem.line) == ("", 3)
        assert problem.column is not None

    @pytest.mark.parametrize("text", ["- image: x\n", "just text\n", ""])
    def test_top_level_must_be_a_mapping(self, tmp_path: Path, text: str) -> None:
        [problem] = problems(tmp_path, text)
        assert problem.field == ""

    def test_unset_env_passthrough_names_it(self, tmp_path: Path) -> None:
        text = MINIMAL + "env:\n  - A=1\n  - HF_TOKEN\n"
        [problem] = problems(tmp_path, text, environ={})
        assert problem == Problem("env.1", "HF_TOKEN is not set in the local environment", 6, 5)

    def test_bad_env_name_from_the_job_spec(self, tmp_path: Path) -> None:
        [problem] = problems(tmp_path, MINIMAL + "env:\n  1X: y\n")
        assert problem == Problem("env", "'1X' is not a valid environment variable name", 5, 3)

    def test_null_env_value(self, tmp_path: Path) -> None:
        assert where(tmp_path, MINIMAL + "env:\n  TOKEN:\n") == [("env.TOKEN", 5, 9)]

    def test_input_mapping_without_src(self, tmp_path: Path) -> None:
        assert where(tmp_path, MINIMAL + "inputs:\n  - dest: x\n") == [("inputs.0.src", 5, 5)]

    def test_alias_that_contains_itself(self, tmp_path: Path) -> None:
        assert where(tmp_path, MINIMAL + "env: &e [*e]\n") == [("env.0", 4, 6)]

    def test_missing_job_file(self, tmp_path: Path) -> None:
        with pytest.raises(JobFileError) as caught:
            load_job_file(tmp_path / "nope.yaml")
        assert caught.value.problems[0].message.startswith("cannot read")

    def test_all_problems_together_in_line_order(self, tmp_path: Path) -> None:
        text = """
        image: x
        command: echo hi
        max_duration: forever
        resources:
          gpus: 0
          gpus: 3
        inputs: [missing.txt]
        colour: blue
        env: [UNSET]
        """
        assert where(tmp_path, text) == [
            ("max_duration", 3, 15),
            ("resources.gpus", 5, 9),
            ("resources.gpus", 6, 3),
            ("inputs.0", 7, 10),
            ("colour", 8, 1),
            ("env.0", 9, 7),
        ]

    def test_error_text_has_one_line_per_problem(self, tmp_path: Path) -> None:
        path = write(tmp_path, MINIMAL + "resources: {gpus: 17}\npriority: 101\n")
        with pytest.raises(JobFileError) as caught:
            load_job_file(path, environ={})
        assert str(caught.value).splitlines() == [
            f"{path}:4:19: resources.gpus: should be at most 16",
            f"{path}:5:11: priority: should be at most 100",
        ]


class TestLocation:
    def test_server_fields_map_back_to_lines(self, tmp_path: Path) -> None:
        (tmp_path / "a.txt").write_text("a")
        (tmp_path / "d").mkdir()
        for name in ("x", "y"):
            (tmp_path / "d" / name).write_text(name)
        job = load(
            tmp_path,
            """
            image: x
            command: [echo, hi]
            max_duration: 2m
            resources:
              gpus: 1
            env: [A=1]
            inputs:
              - d
              - a.txt
            """,
        )
        assert job.location("resources.gpus") == (5, 9)
        assert job.location("resources.labels.tier") == (5, 3)  # nearest written parent
        assert job.location("max_duration_s") == (3, 15)
        assert job.location("command.1") == (2, 17)
        assert job.location("env.A") == (6, 7)
        # The spec's inputs are files: d gave inputs 0 and 1, a.txt input 2.
        assert job.location("inputs.1.file_id") == (8, 5)
        assert job.location("inputs.2.path") == (9, 5)
        assert job.location("inputs.7") is None
        assert job.location("nonsense") is None


class TestExamples:
    @pytest.mark.parametrize("name", ["cpu-hello", "cuda-matmul"])
    def test_example_validates(self, name: str) -> None:
        job = load_job_file(EXAMPLES / name / "job.yaml", environ={})
        spec = job.job_spec({i.dest: f"file-{n}" for n, i in enumerate(job.inputs)})
        assert job.inputs and all(i.source.is_file() for i in job.inputs)
        assert job.outputs == (EXAMPLES / name / "outputs").resolve()
        assert spec.resources.gpus == 1

    def test_cpu_hello_uses_the_local_sample_image(self) -> None:
        job = load_job_file(EXAMPLES / "cpu-hello" / "job.yaml", environ={})
        assert job.job_spec({"poem.txt": "f"}).image == SAMPLE_IMAGE
