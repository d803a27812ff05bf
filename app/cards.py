"""Model cards: what made a checkpoint and how it scored. The provenance (recipe, input sha256s, software) is read
from the checkpoint file's own safetensors metadata, so the card and the file cannot disagree; the values the
method chose, its metrics and aTLAS's coefficients come from the job, which learns them after the file is
written (putting them in the file would cost a second pass over it)."""
import json
from typing import Any

from engine.safetensors_io import read_header
from store.models import Checkpoint, Job

PROVENANCE_KEYS = {"tvforge.recipe": "recipe", "tvforge.inputs": "inputs", "tvforge.software": "software"}


def model_card(checkpoint: Checkpoint, job: Job | None, checkpoint_path) -> dict[str, Any]:
    metadata = read_header(checkpoint_path).metadata
    card: dict[str, Any] = {
        "checkpoint": {"id": checkpoint.id, "sha256": checkpoint.sha256, "size_bytes": checkpoint.size_bytes,
                       "format": checkpoint.format, "created_at": checkpoint.created_at.isoformat()},
        "job_id": checkpoint.job_id,
        "start_checkpoint_id": job.start_checkpoint_id if job is not None else None,
        **{name: json.loads(metadata[key]) if key in metadata else None for key, name in PROVENANCE_KEYS.items()},
        "file_metadata_keys": sorted(metadata),
    }
    metrics = ((job.result or {}).get("metrics") or {}) if job is not None else {}
    card["chosen"] = metrics.get("chosen")
    card["evaluation"] = metrics.get("evaluation")
    card["metrics"] = {k: v for k, v in metrics.items() if k not in ("chosen", "evaluation")}
    coefficients = ((job.artifacts or {}).get("coefficients") if job is not None else None)
    card["coefficients"] = coefficients
    return card


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def card_markdown(card: dict[str, Any]) -> str:
    recipe, inputs, software = card["recipe"] or {}, card["inputs"] or {}, card["software"] or {}
    lines = [f"# Model card: checkpoint {card['checkpoint']['id']}", "",
             f"Merged by tvforge job `{card['job_id']}` with **{recipe.get('method')}** "
             f"(seed {recipe.get('seed')}). File sha256 `{card['checkpoint']['sha256']}`, "
             f"{card['checkpoint']['size_bytes']} bytes, safetensors.", "", "## Recipe", "", "```json",
             json.dumps(recipe, indent=2, sort_keys=True), "```", "", "## Inputs", "",
             "| role | name | sha256 |", "|---|---|---|"]
    base = inputs.get("base_model") or {}
    lines.append(f"| base model | {base.get('name')} | `{base.get('sha256')}` |")
    lines += [f"| task vector ({tv.get('kind')}) | {tv.get('name')} | `{tv.get('sha256')}` |"
              for tv in inputs.get("task_vectors", [])]
    lines += [f"| dataset | {d.get('name')} | `{d.get('sha256')}` |" for d in inputs.get("datasets", [])]
    if inputs.get("start_checkpoint"):
        lines.append(f"| start checkpoint (merged onto) | {card['start_checkpoint_id']} | "
                     f"`{inputs['start_checkpoint']['sha256']}` |")
    if card["chosen"]:
        lines += ["", "## Chosen values", "", "| name | value | source |", "|---|---|---|"]
        lines += [f"| {name} | `{json.dumps(c.get('value'))}` | {c.get('source')} |"
                  for name, c in card["chosen"].items()]
    evaluation = card["evaluation"]
    if evaluation:
        lines += ["", "## Accuracy", "", "| dataset | split | images | accuracy % | reference % | normalised % |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {dataset_id} | {row.get('split')} | {row.get('images')} | {_pct(row.get('accuracy'))} | "
                  f"{_pct(row.get('reference_accuracy'))} | {_pct(row.get('normalised_accuracy'))} |"
                  for dataset_id, row in evaluation.get("datasets", {}).items()]
        lines.append(f"| mean | | | {_pct(evaluation.get('mean_accuracy'))} | | "
                     f"{_pct(evaluation.get('mean_normalised_accuracy'))} |")
    coefficients = card["coefficients"]
    if coefficients:
        kind = coefficients.get("granularity")
        if coefficients.get("partitions", 1) > 1:
            kind += (f", {coefficients['partitions']} partitions per block from seed {coefficients['partition_seed']}:"
                     " each block's mean below, every partition's value in the coefficients document")
        lines += ["", f"## Learned coefficients ({kind})", "",
                  "| task vector | " + " | ".join(coefficients["blocks"]) + " |",
                  "|---|" + "---|" * len(coefficients["blocks"])]
        lines += [f"| {tv} | " + " | ".join(f"{v:.4f}" for v in row) + " |"
                  for tv, row in zip(coefficients["task_vectors"], coefficients["values"], strict=True)]
    lines += ["", "## Software", "", *[f"- {name} {version}" for name, version in sorted(software.items())], ""]
    return "\n".join(lines)
