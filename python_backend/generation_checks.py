"""Constraint checks on a finished completion: ``python_syntax``, ``json_schema``, ``regex``.

A request names one with the parameter ``check`` (and its argument: ``check_schema``, a JSON Schema
as JSON text, or ``check_pattern``, a Python regular expression). :func:`parse_check` builds it, or
raises ``ValueError`` saying what is wrong with the request (so it fails alone, before any decoding).

- ``python_syntax``: the prompt followed by the completion is a valid prefix of Python source: it
  compiles (``codeop``, which accepts input that is incomplete but could go on), or it fails only
  because its unfinished last line ends too soon (the error lies at the very end of the text, or is
  an unterminated string on that line). A completion that ended at a newline stop is judged with its
  newline, so its last line counts as finished. The prompt alone must pass the same check, else no
  completion could.
- ``json_schema``: the completion parses as JSON and validates against the schema (``jsonschema``,
  the validator class the schema's ``$schema`` names, Draft 2020-12 by default).
- ``regex``: the whole completion matches the pattern (``re.fullmatch``).
"""

from __future__ import annotations

import codeop
import json
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

CHECKS = ("python_syntax", "json_schema", "regex")


@dataclass(frozen=True)
class CheckResult:
    passed: bool
    reason: str = ""  # why it failed, for the audit line


class Check(Protocol):
    name: str

    def __call__(self, prompt: str, completion: str, ended_line: bool) -> CheckResult: ...


def python_prefix_error(source: str) -> str | None:
    """None when ``source`` is a valid prefix of Python source (module docstring); else the error."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences and the like are warnings, not errors
            codeop.compile_command(source, "<completion>", "exec")
        return None
    except (SyntaxError, ValueError, OverflowError) as error:
        if isinstance(error, SyntaxError) and not source.endswith("\n") and _ends_too_soon(source, error):
            return None
        if isinstance(error, SyntaxError):
            return f"{error.msg} (line {error.lineno}, column {error.offset})"
        return str(error)


def _ends_too_soon(source: str, error: SyntaxError) -> bool:
    """The error of an unfinished last line is one more text could fix: it lies at the end of the text,
    or is a string the line has not closed yet."""
    lines = source.split("\n")
    if error.lineno != len(lines):
        return False
    if "unterminated string literal" in str(error.msg):
        return True
    return error.offset is not None and error.offset > len(lines[-1])


@dataclass(frozen=True)
class PythonSyntax:
    name = "python_syntax"

    def __call__(self, prompt: str, completion: str, ended_line: bool) -> CheckResult:
        error = python_prefix_error(prompt + completion + ("\n" if ended_line else ""))
        return CheckResult(error is None, error or "")


@dataclass(frozen=True)
class JsonSchema:
    schema: Mapping[str, Any]
    name = "json_schema"

    def __call__(self, prompt: str, completion: str, ended_line: bool) -> CheckResult:
        import jsonschema

        try:
            value = json.loads(completion)
        except json.JSONDecodeError as error:
            return CheckResult(False, f"not JSON: {error}")
        validator = jsonschema.validators.validator_for(self.schema)(self.schema)
        failure = jsonschema.exceptions.best_match(validator.iter_errors(value))
        return CheckResult(failure is None, "" if failure is None else f"schema: {failure.message}")


@dataclass(frozen=True)
class Regex:
    pattern: re.Pattern
    name = "regex"

    def __call__(self, prompt: str, completion: str, ended_line: bool) -> CheckResult:
        if self.pattern.fullmatch(completion):
            return CheckResult(True)
        return CheckResult(False, f"does not match {self.pattern.pattern!r}")


def parse_check(name: str, schema: str | None, pattern: str | None, prompt: str) -> Check:
    """The check a request names, with its argument; ``ValueError`` for a request that is wrong."""
    if name not in CHECKS:
        raise ValueError(f"unknown check {name!r}; expected one of {CHECKS}")
    if (schema is not None) != (name == "json_schema"):
        raise ValueError("check_schema goes with check json_schema, and only with it")
    if (pattern is not None) != (name == "regex"):
        raise ValueError("check_pattern goes with check regex, and only with it")
    if name == "python_syntax":
        error = python_prefix_error(prompt)
        if error is not None:
            raise ValueError(
                f"check python_syntax: the prompt is not a valid prefix of Python source ({error})"
            )
        return PythonSyntax()
    if name == "json_schema":
        import jsonschema

        try:
            document = json.loads(schema)
        except json.JSONDecodeError as error:
            raise ValueError(f"check_schema is not JSON: {error}") from None
        if not isinstance(document, (dict, bool)):
            raise ValueError("check_schema must be a JSON Schema (an object or a boolean)")
        try:
            jsonschema.validators.validator_for(document).check_schema(document)
        except jsonschema.exceptions.SchemaError as error:
            raise ValueError(f"check_schema is not a valid JSON Schema: {error.message}") from None
        return JsonSchema(document)
    try:
        return Regex(re.compile(pattern))
    except re.error as error:
        raise ValueError(f"check_pattern is not a valid regular expression: {error}") from None
