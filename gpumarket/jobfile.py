"""The YAML job file: the friendly form of a JobSpec that `gpumarket submit` reads.

The spec's own fields are checked by scheduler.schemas.JobSpec itself, so the job file
never disagrees with the API; this module adds what only a file on disk has (local
inputs, durations, env passthrough) and points every problem at its line.
"""

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from gpumarket.yaml_marks import (
    FieldPath,
    MarkedDocument,
    Position,
    YamlSyntaxError,
    load_marked,
    node_position,
)
from scheduler.schemas import JobSpec, relative_path

# fmt: off
KNOWN_FIELDS = ("image", "command", "env", "resources", "inputs", "outputs", "max_duration",
                "max_price_per_gpu_hour", "retries", "retry_on_exit_codes", "priority", "egress")
# Passed to JobSpec as written; the others have forms of the job file's own.
_SPEC_FIELDS = ("image", "resources", "max_price_per_gpu_hour", "retries",
                "retry_on_exit_codes", "priority", "egress")
# fmt: on
_DURATION = re.compile(r"(?:([0-9]+)d)?(?:([0-9]+)h)?(?:([0-9]+)m)?(?:([0-9]+)s)?")
_DURATION_HELP = 'should be seconds or a duration like "90s", "30m", "2h", "1h30m", "1d"'
# A spec field whose job-file name differs.
_RENAMED = {"max_duration_s": "max_duration"}


@dataclass(frozen=True)
class Problem:
    field: str
    message: str
    line: int | None
    column: int | None


class JobFileError(Exception):
    def __init__(self, path: Path, problems: list[Problem]) -> None:
        super().__init__(path, problems)
        self.path = path
        self.problems = problems

    def __str__(self) -> str:
        lines = []
        for p in self.problems:
            where = ":".join(str(n) for n in (self.path, p.line, p.column) if n is not None)
            lines.append(f"{where}: {p.field}: {p.message}" if p.field else f"{where}: {p.message}")
        return "\n".join(lines)


@dataclass(frozen=True)
class LocalInput:
    source: Path
    dest: str
    size: int


@dataclass(frozen=True)
class JobFile:
    path: Path
    inputs: list[LocalInput]
    outputs: Path | None
    # The validated spec without inputs, and where each dotted path was written.
    _spec: dict[str, Any] = field(repr=False, compare=False)
    _marks: dict[str, tuple[int, int]] = field(repr=False, compare=False)
    # For each of `inputs`, the index of the job file's item that produced it.
    _origins: list[int] = field(repr=False, compare=False)

    def job_spec(self, file_ids: dict[str, str]) -> JobSpec:
        """The spec to submit, given the uploaded file id of each input's dest."""
        missing = [i.dest for i in self.inputs if i.dest not in file_ids]
        if missing:
            raise ValueError(f"no uploaded file for inputs: {', '.join(missing)}")
        inputs = [{"file_id": file_ids[i.dest], "path": i.dest} for i in self.inputs]
        return JobSpec.model_validate({**self._spec, "inputs": inputs})

    def location(self, field: str) -> tuple[int, int] | None:
        """(line, column) of a dotted spec field such as a 422's "resources.gpus"."""
        parts = field.split(".") if field else []
        if parts:
            parts[0] = _RENAMED.get(parts[0], parts[0])
        if len(parts) > 1 and parts[0] == "inputs" and parts[1].isdecimal():
            index = int(parts[1])
            # The spec's inputs.3 is a file; a directory item of the job file gives several.
            parts = ["inputs", str(self._origins[index])] if index < len(self._origins) else []
        while parts:
            if (mark := self._marks.get(".".join(parts))) is not None:
                return mark
            parts.pop()
        return None


def load_job_file(path: Path, environ: Mapping[str, str] | None = None) -> JobFile:
    """Reads and checks a job file; raises JobFileError listing every problem found."""
    path = Path(path)
    try:
        doc = load_marked(path.read_bytes())
    except OSError as exc:
        raise JobFileError(path, [Problem("", f"cannot read: {exc.strerror}", None, None)]) from exc
    except YamlSyntaxError as exc:
        line, column = exc.position or (None, None)
        raise JobFileError(path, [Problem("", exc.message, line, column)]) from exc
    loader = _Loader(path, doc, os.environ if environ is None else environ)
    job_file = loader.load()
    if loader.problems:
        problems = sorted(loader.problems, key=lambda p: (p.line or 0, p.column or 0))
        raise JobFileError(path, problems)
    return job_file


class _Loader:
    def __init__(self, path: Path, doc: MarkedDocument, environ: Mapping[str, str]) -> None:
        self.path = path
        self.base = path.parent.resolve()
        self.doc = doc
        self.environ = environ
        self.problems: list[Problem] = []
        # Paths already reported: JobSpec's errors under them would only repeat ours.
        self.reported: set[FieldPath] = set()

    def problem(
        self,
        path: FieldPath,
        message: str,
        key: bool = False,
        at: Position | None = None,
        covers: bool = True,
    ) -> None:
        if any(path[: len(done)] == done for done in self.reported):
            return
        # A missing field points at the mapping that should hold it, an error inside a
        # string command at the string: the nearest enclosing value that was written.
        where = at or (self.doc.position(path, key=True) if key else None)
        parent = path
        while where is None and parent:
            where = self.doc.position(parent)
            parent = parent[:-1]
        line, column = where or self.doc.position(()) or (None, None)
        self.problems.append(Problem(".".join(map(str, path)), message, line, column))
        if path and covers:
            self.reported.add(path)

    def load(self) -> JobFile:
        for path, message, node in self.doc.issues:
            # A duplicate key says nothing against the first value: JobSpec still checks it.
            covers = self.doc.nodes.get(path) is node
            self.problem(path, message, at=node_position(node), covers=covers)
        top = self.doc.value
        if not isinstance(top, dict):
            empty = top is None and not self.doc.nodes
            self.problem((), "the file is empty" if empty else "should be a mapping of fields")
            return JobFile(self.path, [], None, {}, {}, [])
        for name in top:
            if name not in KNOWN_FIELDS:
                self.problem((name,), f"unknown field (known: {', '.join(KNOWN_FIELDS)})", True)
        spec = {name: top[name] for name in _SPEC_FIELDS if name in top}
        if "command" in top:
            spec["command"] = self.command(top["command"])
        if "env" in top:
            spec["env"] = self.env(top["env"])
        if "max_duration" in top:
            spec["max_duration_s"] = self.duration(top["max_duration"])
        inputs, origins = self.inputs(top.get("inputs", []))
        outputs = self.outputs(top["outputs"]) if "outputs" in top else None
        # Placeholder ids: the paths (count, length) are checked now, before any upload.
        spec["inputs"] = [{"file_id": "-", "path": i.dest} for i in inputs]
        fields: dict[str, Any] = {}
        try:
            fields = JobSpec.model_validate(spec).model_dump(exclude={"inputs"})
        except ValidationError as exc:
            for error in exc.errors():
                self.spec_error(error, origins)
        marks = {".".join(map(str, p)): node_position(n) for p, n in self.doc.nodes.items()}
        return JobFile(self.path, inputs, outputs, fields, marks, origins)

    def spec_error(self, error: ErrorDetails, origins: list[int]) -> None:
        loc: FieldPath = tuple(error["loc"])
        if loc and loc[0] in _RENAMED:
            loc = (_RENAMED[str(loc[0])], *loc[1:])
        if len(loc) > 1 and loc[0] == "inputs" and isinstance(loc[1], int):
            loc = ("inputs", origins[loc[1]])
        self.problem(loc, _message(error), key=error["type"] == "extra_forbidden")

    def command(self, value: Any) -> Any:
        if isinstance(value, str):
            return ["sh", "-c", value]
        if isinstance(value, list):
            # `[sleep, 5]`: the user meant the word written, not YAML's int.
            return [self._text(("command", i), item) for i, item in enumerate(value)]
        return value  # JobSpec says what is wrong with it

    def env(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {name: self._text(("env", name), item) for name, item in value.items()}
        if not isinstance(value, list):
            self.problem(("env",), "should be a mapping or a list of NAME=value / NAME")
            return {}
        env: dict[str, str] = {}
        for i, item in enumerate(value):
            if not isinstance(item, str):
                self.problem(("env", i), "should be NAME=value or NAME")
                continue
            name, sep, text = item.partition("=")
            if not sep:
                if name not in self.environ:
                    self.problem(("env", i), f"{name} is not set in the local environment")
                    continue
                text = self.environ[name]
            if name in env:
                self.problem(("env", i), f"{name} is set twice")
            env[name] = text
            # A 422 on env.NAME then points at this item.
            self.doc.nodes.setdefault(("env", name), self.doc.nodes[("env", i)])
        return env

    def _text(self, path: FieldPath, value: Any) -> Any:
        # Numbers, booleans and dates as written: `8192`, `true`, `1.50`, `2024-01-01`.
        if value is not None and not isinstance(value, str):
            raw = self.doc.raw_scalar(path)
            return value if raw is None else raw
        if value is None:
            self.problem(path, 'should be a value (write "" for an empty string)')
        return value

    def duration(self, value: Any) -> int | None:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            text = value.strip()
            if text.isascii() and text.isdigit():
                return int(text)
            match = _DURATION.fullmatch(text)
            if text and match:
                days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
                return ((days * 24 + hours) * 60 + minutes) * 60 + seconds
        self.problem(("max_duration",), _DURATION_HELP)
        return None

    def outputs(self, value: Any) -> Path | None:
        if not isinstance(value, str) or not value:
            self.problem(("outputs",), "should be the path of a local directory")
            return None
        outputs = (self.base / Path(value).expanduser()).resolve()
        if outputs.exists() and not outputs.is_dir():
            self.problem(("outputs",), f"{outputs} exists and is not a directory")
        return outputs

    def inputs(self, value: Any) -> tuple[list[LocalInput], list[int]]:
        """The files to upload, and for each the index of the item it came from."""
        if not isinstance(value, list):
            self.problem(("inputs",), "should be a list of paths or {src, dest} mappings")
            return [], []
        found: list[LocalInput] = []
        origins: list[int] = []
        owners: dict[str, int] = {}
        for i, item in enumerate(value):
            for local in self.input_item(i, item):
                if local.dest in owners:
                    other = owners[local.dest]
                    line = self.doc.position(("inputs", other))
                    where = f"inputs.{other}" + (f" (line {line[0]})" if line else "")
                    self.problem(("inputs", i), f"{where} also puts a file at /inputs/{local.dest}")
                    break
                owners[local.dest] = i
                found.append(local)
                origins.append(i)
        return found, origins

    def input_item(self, i: int, item: Any) -> list[LocalInput]:
        path: FieldPath = ("inputs", i)
        if isinstance(item, dict):
            for key in item:
                if key not in ("src", "dest"):
                    self.problem((*path, key), "unknown field (known: src, dest)", key=True)
            src, dest = item.get("src"), item.get("dest")
            if not isinstance(src, str) or not src:
                self.problem((*path, "src"), "should be a local path" if src else "required")
                return []
            if dest is not None and not isinstance(dest, str):
                self.problem((*path, "dest"), "should be a path inside /inputs")
                return []
        elif isinstance(item, str) and item:
            src, dest = item, None
        else:
            self.problem(path, "should be a local path or a {src, dest} mapping")
            return []
        # Not resolved: the dest's default is the name written, not a symlink's target.
        source = Path(os.path.normpath(self.base / Path(src).expanduser()))
        try:
            dest = relative_path(source.name if dest is None else dest)
        except ValueError as exc:
            self.problem((*path, "dest"), str(exc))
            return []
        if source.is_file():
            return [LocalInput(source, dest, source.stat().st_size)]
        if not source.is_dir():
            what = "does not exist" if not source.exists() else "is not a file or directory"
            self.problem(path, f"{src} {what}")
            return []
        files: list[LocalInput] = []
        try:
            for file in sorted(source.rglob("*")):
                if file.is_file():
                    rel = file.relative_to(source).as_posix()
                    files.append(LocalInput(file, f"{dest}/{rel}", file.stat().st_size))
                # rglob does not descend into linked directories: say so, skip nothing.
                elif file.is_symlink() or not file.is_dir():
                    self.problem(path, f"{file} is not a regular file or directory")
                    return []
        except OSError as exc:
            self.problem(path, f"cannot read {exc.filename}: {exc.strerror}")
            return []
        if not files:
            self.problem(path, f"{src} is an empty directory (nothing to upload)")
        return files


def _message(error: ErrorDetails) -> str:
    """Pydantic's message, read as a sentence about the field."""
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        known = _known_fields(error["loc"][:-1])
        return f"unknown field (known: {', '.join(known)})" if known else "unknown field"
    bounds = {
        "less_than_equal": ("at most", "le"),
        "greater_than_equal": ("at least", "ge"),
        "less_than": ("less than", "lt"),
        "greater_than": ("more than", "gt"),
    }
    if kind in bounds:
        words, key = bounds[kind]
        return f"should be {words} {ctx[key]}"
    message = str(error["msg"]).removeprefix("Value error, ")
    return message.removeprefix("Input ")


def _known_fields(loc: tuple[Any, ...]) -> list[str]:
    """The field names of the model at loc inside JobSpec (Resources for ("resources",))."""
    model: Any = JobSpec
    for part in loc:
        annotation = model.model_fields[part].annotation if part in model.model_fields else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)
