"""docs/methods.md and docs/recipe.schema.json, generated from the method catalogue: `python -m tvforge.docs`
rewrites them.

Tests compare the files with this output, so a method added to the catalogue without its
documentation (or a changed default) fails the suite until the files are regenerated.
"""
import json
from pathlib import Path

from engine.methods.catalogue import METHODS
from engine.methods.spec import MethodSpec

METHODS_DOC = Path(__file__).resolve().parents[1] / "docs" / "methods.md"
RECIPE_SCHEMA = METHODS_DOC.with_name("recipe.schema.json")

HEADER = """# Composition methods

Generated from the method catalogue (`engine/methods/catalogue.py`) by `python -m tvforge.docs`; do not
edit by hand. The same schemas are served at `GET /v1/methods` and `GET /v1/methods/{name}`, and each is
the `params` of its job body in `/openapi.json`.

A job's `params` echo what the request set; every value a method used, default or chosen, is in
`result.metrics.chosen` with its source. Accuracies name their split (docs/api.md, "Splits and accuracies").
"""


def _type(schema: dict, definitions: dict) -> str:
    if "$ref" in schema:
        return _type(definitions[schema["$ref"].rsplit("/", 1)[-1]], definitions)
    if "anyOf" in schema:
        return " or ".join(_type(option, definitions) for option in schema["anyOf"])
    if "enum" in schema:
        return " / ".join(f"`{value}`" for value in schema["enum"])
    if "const" in schema:
        return f"`{schema['const']}`"
    kind = schema.get("type", "any")
    if kind == "array":
        return f"list of {_type(schema.get('items', {}), definitions)}"
    if kind == "object" and "additionalProperties" in schema:
        return f"map to {_type(schema['additionalProperties'], definitions)}"
    bounds = [f"{op} {schema[key]}" for key, op in (("minimum", ">="), ("exclusiveMinimum", ">"),
                                                    ("maximum", "<="), ("exclusiveMaximum", "<"))
              if key in schema]
    return kind + (f" ({', '.join(bounds)})" if bounds else "")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def method_section(spec: MethodSpec) -> str:
    schema = spec.params.model_json_schema()
    definitions = schema.get("$defs", {})
    rows = ["| param | type | default | description |", "|---|---|---|---|"]
    for name, field in schema["properties"].items():
        default = json.dumps(field["default"]) if "default" in field else "required"
        rows.append(f"| `{name}` | {_cell(_type(field, definitions))} | `{default}` | "
                    f"{_cell(field.get('description', ''))} |")
    results = ["| key | holds |", "|---|---|"]
    results += [f"| `{key}` | {_cell(text)} |" for key, text in spec.all_result_keys.items()]
    parts = [f"## `{spec.name}`", spec.summary, f"Reference: {spec.reference}"]
    if spec.params.__doc__:
        parts.append("\n".join(line.strip() for line in spec.params.__doc__.strip().splitlines()))
    parts += ["### Params", "\n".join(rows), "### Result keys (`result.metrics`)", "\n".join(results)]
    return "\n\n".join(parts)


def methods_markdown() -> str:
    return "\n\n".join([HEADER.strip(), *(method_section(spec) for spec in METHODS.values())]) + "\n"


def recipe_schema_json() -> str:
    from tvforge.recipe import recipe_json_schema

    return json.dumps(recipe_json_schema(), indent=2) + "\n"


if __name__ == "__main__":
    METHODS_DOC.write_text(methods_markdown())
    RECIPE_SCHEMA.write_text(recipe_schema_json())
    print(f"wrote {METHODS_DOC} and {RECIPE_SCHEMA}")
