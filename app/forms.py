"""Typed reading of multipart text fields, collecting every error into one 422 problem."""
import json
import math
from typing import Any

from app.problems import Problem
from app.uploads import Upload
from store.datasets import MAX_CLASS_NAME_LENGTH


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of the range of a finite number")
    return value


def _not_json(constant: str):
    raise ValueError(f"{constant} is not a JSON value")


class FormFields:
    def __init__(self, upload: Upload):
        self._fields = upload.fields
        self.errors: list[dict[str, Any]] = []

    def _error(self, name: str, msg: str) -> None:
        self.errors.append({"loc": ["body", name], "msg": msg, "type": "value_error"})

    def text(self, name: str, *, required: bool = False, max_length: int = 200,
             choices: tuple[str, ...] | None = None) -> str | None:
        value = self._fields.get(name)
        if value is None or value == "":
            if required:
                self._error(name, "Field required")
            return None
        if len(value) > max_length:
            self._error(name, f"At most {max_length} characters")
            return None
        if "\x00" in value:  # PostgreSQL text cannot hold NUL
            self._error(name, "Must not contain NUL characters")
            return None
        if choices and value not in choices:
            self._error(name, f"One of {', '.join(choices)}")
            return None
        return value

    def json_value(self, name: str, expected: type, max_length: int = 1024 * 1024) -> Any:
        raw = self.text(name, max_length=max_length)
        if raw is None:
            return None
        try:
            value = json.loads(raw, parse_float=_finite_float, parse_constant=_not_json)
        except json.JSONDecodeError as exc:
            self._error(name, f"Not valid JSON: {exc.msg}")
            return None
        except RecursionError:
            self._error(name, "Not valid JSON: nested too deeply")
            return None
        except ValueError as exc:  # NaN, Infinity, 1e999, or an integer of more digits than Python parses
            self._error(name, f"Not valid JSON: {exc}")
            return None
        if not isinstance(value, expected):
            self._error(name, f"Must be a JSON {expected.__name__}")
            return None
        return value

    def class_names(self, most: int, name: str = "class_names") -> list[str] | None:
        """At most `most` distinct, non-empty names of at most MAX_CLASS_NAME_LENGTH characters."""
        value = self.json_value(name, list)
        if value is not None and (not value or not all(isinstance(c, str) and c.strip() for c in value)
                                  or len(set(value)) != len(value)):
            self._error(name, "Must be a JSON array of distinct, non-empty strings")
            return None
        if value is not None and (len(value) > most or any(len(c) > MAX_CLASS_NAME_LENGTH for c in value)):
            self._error(name, f"At most {most} names of at most {MAX_CLASS_NAME_LENGTH} characters each")
            return None
        return value

    def string_list(self, name: str) -> list[str] | None:
        value = self.json_value(name, list)
        if value is not None and not all(isinstance(item, str) for item in value):
            self._error(name, "Must be a JSON array of strings")
            return None
        return value

    def require_file(self, upload: Upload) -> None:
        if upload.file is None:
            self._error("file", "Field required")

    def exactly_one(self, first: str, second: str, first_value: Any, second_value: Any) -> None:
        if (first_value is None) == (second_value is None):
            self._error(first, f"Give exactly one of {first!r} and {second!r}")

    def raise_if_errors(self) -> None:
        if self.errors:
            raise Problem(422, "The request is not valid; see errors.", slug="validation", errors=self.errors)
