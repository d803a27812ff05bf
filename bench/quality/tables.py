"""Markdown rendering of the merge-quality benchmark's result (see bench.quality.run)."""


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _seconds(row: dict) -> str:
    return f"{row.get('method_s', 0) + row.get('eval_s', 0):.1f}"


def _margin(margin: dict) -> str:
    low, high = margin["ci95"]
    return f"{100 * margin['difference']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"


def addition_markdown(table: dict) -> str:
    tasks = table["tasks"]
    header = ["method", *tasks, "mean", "mean normalised", "time (s)"]
    rows = [[row["row"], *(_pct(row["accuracy"][t]) for t in tasks), _pct(row["mean_accuracy"]),
             _pct(row.get("mean_normalised_accuracy")), _seconds(row)] for row in table["rows"]]
    return _table(header, rows)


def ordering_markdown(ordering: list[dict]) -> str:
    rows = [[f"{m['better']} > {m['worse']}", _margin(m), "holds" if m["holds"] else "**does not hold**"]
            for m in ordering]
    return _table(["papers' ordering (mean normalised accuracy)", "margin, points [95% CI]", "interval > 0"], rows)


def newer_merges_markdown(margins: list[dict]) -> str:
    rows = [[f"{m['better']} vs {m['worse']}", _margin(m), "yes" if m["ci95"][1] >= 0 else "**no**",
             "yes" if m["holds"] else "no"] for m in margins]
    return _table(["newer merge vs baseline (mean normalised accuracy)", "margin, points [95% CI]",
                   "at least as good (interval reaches 0 or above)", "better (interval > 0)"], rows)


def negation_markdown(table: dict) -> str:
    header = ["target", "method", "target acc", "control acc", "control / zero-shot", "time (s)"]
    rows = [[row["target"], row["row"], _pct(row["target_accuracy"]), _pct(row["control_accuracy"]),
             f"{row['control_kept']:.2f}", _seconds(row)] for row in table["rows"]]
    methods = list(dict.fromkeys(row["row"] for row in table["rows"]))
    if len(table["targets"]) > 1:
        for method in methods:
            chosen = [row for row in table["rows"] if row["row"] == method]
            rows.append(["**mean**", method, _pct(sum(r["target_accuracy"] for r in chosen) / len(chosen)),
                         _pct(sum(r["control_accuracy"] for r in chosen) / len(chosen)),
                         f"{sum(r['control_kept'] for r in chosen) / len(chosen):.2f}",
                         f"{sum(float(_seconds(r)) for r in chosen):.1f}"])
    return _table(header, rows)


def few_shot_markdown(table: dict) -> str:
    columns = [f"{k}-shot" for k in table["shots"]] + ["unlabelled"]
    rows = []
    for row in table["rows"]:
        accuracy = row["accuracy"]
        if "zero-shot" in accuracy:  # the same model in every column
            cells = [_pct(accuracy["zero-shot"])] * len(columns)
        else:
            cells = [_pct(accuracy.get(c)) for c in columns]
        rows.append([row["row"], *cells, _seconds(row)])
    margins = {**next((r.get("margins", {}) for r in table["rows"] if r.get("margins")), {})}
    rows.append(["margin over zero-shot, points [95% CI]", *(_margin(margins[c]) if c in margins else "-"
                                                             for c in columns), ""])
    for row in table["rows"]:  # each unlabelled method's own margin, in its column
        if "margin" in row:
            rows.append([f"margin over zero-shot: {row['row']}", *["-"] * (len(columns) - 1), _margin(row["margin"]),
                         ""])
    return _table(["method", *columns, "time (s)"], rows)


def sta_ablation_markdown(table: dict) -> str:
    tasks = table["tasks"]
    header = ["STA setting (lambda 1)", "mean mask density", *tasks, "mean", "mean normalised", "time (s)"]
    rows = []
    for row in table["rows"]:
        densities = row["metrics"]["mask_density"]
        rows.append([row["row"], f"{sum(densities.values()) / len(densities):.3f}",
                     *(_pct(row["accuracy"][t]) for t in tasks), _pct(row["mean_accuracy"]),
                     _pct(row["mean_normalised_accuracy"]), _seconds(row)])
    return _table(header, rows)


def atlas_variants_markdown(table: dict) -> str:
    header = ["aTLAS addition", "stacked vectors (MiB)", "learned coefficients", "mean", "mean normalised",
              "time (s)"]
    rows = []
    for row in table["rows"]:
        metrics = row["metrics"]
        learned = metrics.get("budget", {}).get("learned_coefficients", metrics["coefficients"])
        rows.append([row["row"], f"{metrics['stacked_vector_bytes'] / 2**20:.2f}", str(learned),
                     _pct(row["mean_accuracy"]), _pct(row["mean_normalised_accuracy"]), _seconds(row)])
    return _table(header, rows)


def _value(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list) and value and isinstance(value[0], float):
        return "[" + ", ".join(f"{v:.3g}" for v in value) + "]"
    if isinstance(value, dict) and len(set(map(str, value.values()))) == 1:
        return str(next(iter(value.values())))  # the same value for every task, said once
    return str(value)


def _setting(row: dict) -> str | None:
    """One line on what a row ran with: every value its method used or chose (metrics.chosen), and why.

    Values the method took from its defaults without choosing are left out, to keep the line short.
    """
    chosen = (row.get("metrics") or {}).get("chosen") or {}
    parts = [f"{name} {_value(entry['value'])} ({entry['source']})" if entry["source"] != "given"
             else f"{name} {_value(entry['value'])}"
             for name, entry in chosen.items() if entry["source"] != "default" and entry["value"] is not None]
    return ", ".join(parts) or None


def _settings(rows: list[dict], label) -> str:
    lines = [f"- {label(row)}: {setting}" for row in rows if (setting := _setting(row))]
    return "\n".join(lines)


def _disentanglement_line(found: dict | None) -> list[str]:
    """The assets' weight disentanglement (build_assets._disentanglement), which bounds what task arithmetic can do."""
    if not found:
        return []
    return [f"Task vectors (val, before any merge): mean pairwise cosine {found['mean_off_diagonal_cosine']:+.3f}; "
            f"each fine-tuned model gains {_pct(found['mean_own_gain_val'])} points on its own task and changes "
            f"each other task by {_pct(found['mean_harm_val'])} points on average."]


def render_markdown(result: dict) -> str:
    tables, machine, timings = result["tables"], result["machine"], result["timings"]
    few = tables["few_shot"]
    parts = [
        f"## Merge quality ({'quick' if result['quick'] else 'full'} assets {result['assets']['config_hash']}, "
        f"seed {result['seed']})",
        f"Machine: {machine['usable_cpus']} usable CPUs, torch {machine['torch']} on {machine['torch_threads']} "
        f"thread(s), {machine['platform']}. Accuracies in % on each task's test split.",
        *_disentanglement_line(result["assets"].get("disentanglement")),
        "### 1. Task addition (normalised = merged / that task's fine-tuned accuracy)",
        addition_markdown(tables["addition"]),
        _settings(tables["addition"]["rows"], lambda row: row["row"]),
        ordering_markdown(tables["addition"]["ordering"]),
        newer_merges_markdown(tables["addition"]["newer_merges"]),
        f"### 2. Negation (control: {tables['negation']['control']}; lambda / epoch chosen on val with control "
        f">= 0.95 x zero-shot)",
        negation_markdown(tables["negation"]),
        _settings(tables["negation"]["rows"], lambda row: f"{row['target']}, {row['row']}"),
        f"### 3. Few-shot and test-time adaptation on the held-out task {few['target']} "
        f"({len(few['task_vectors'])} task vectors; chance {_pct(few['chance'])})",
        few_shot_markdown(few),
        _settings([run for row in few["rows"] for run in (row.get("runs") or {}).values()]
                  + [row for row in few["rows"] if row.get("method") and "runs" not in row],
                  lambda row: f"{row['params']['shots']}-shot" if row["params"].get("shots") else row["row"]),
    ]
    if "sta_ablation" in tables:
        parts += ["### 4. STA ablation (task addition at lambda 1, calibration on train)",
                  sta_ablation_markdown(tables["sta_ablation"])]
    if "atlas_variants" in tables:
        parts += ["### 5. aTLAS accuracy against memory (task addition)",
                  atlas_variants_markdown(tables["atlas_variants"])]
    parts.append("Notes:\n" + "\n".join(f"- {note}" for note in result.get("notes", [])))
    parts.append("Timings (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()))
    return "\n\n".join(parts)
