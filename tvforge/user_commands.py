"""The user's commands (`tvforge merge`, `tvforge models|vectors|datasets|jobs|checkpoints ...`): the SDK over
HTTP, with rich progress. The server and key come from --url/--key, TVFORGE_URL/TVFORGE_API_KEY, the config
file (TVFORGE_CONFIG, default ~/.config/tvforge/config.toml), else the embedded service's own (`tvforge up`)."""
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Column, Table

from tvforge.client import (
    FINISHED,
    RETRIED_STATUSES,
    ApiError,
    JobInfo,
    TvforgeClient,
    load_config,
)

STREAM_RECONNECT_S, STREAM_RECONNECT_MAX_S = 1.0, 30.0

console = Console(stderr=True, soft_wrap=True)  # progress and reports; stdout carries only what a script would parse
out = Console(soft_wrap=True)

UrlOption = typer.Option(None, "--url", envvar="TVFORGE_URL", help="The API, e.g. http://127.0.0.1:8000.")
KeyOption = typer.Option(None, "--key", envvar="TVFORGE_API_KEY", help="API key.")
# A string, not a Path: a trailing slash (a directory to create) must survive.
DestArgument = typer.Argument(None, help="File or directory (ending in / if it does not exist yet) to write to.")


def open_client(url: str | None, key: str | None) -> TvforgeClient:
    try:
        config = load_config(url, key)
    except ValueError:
        console.print("[red]no API key[/]: pass --key, set TVFORGE_API_KEY, or write api_key in "
                      "~/.config/tvforge/config.toml (only the embedded service's own, `tvforge up` here, needs none)")
        raise typer.Exit(2) from None
    return TvforgeClient(config.url, config.api_key)


@contextmanager
def api_errors() -> Iterator[None]:
    """A problem from the server, or a server that cannot be reached, printed as the user can act on it (one
    line, no traceback), and exit status 1."""
    try:
        yield
    except ApiError as exc:
        console.print(f"[red]{exc.status} {escape(str(exc.problem.get('title', '')))}[/]: "
                      f"{escape(str(exc.problem.get('detail', '')))}")
        for error in exc.problem.get("errors") or []:
            where = ".".join(str(p) for p in error.get("loc", []))
            console.print(f"  {escape(where)}: {escape(str(error.get('msg')))}")
        raise typer.Exit(1) from None
    except httpx.TransportError as exc:
        url = exc.request.url
        console.print(f"[red]cannot reach {escape(f'{url.scheme}://{url.netloc.decode()}')}[/]: "
                      f"{escape(_network_cause(exc))}")
        raise typer.Exit(1) from None


def _network_cause(exc: httpx.TransportError) -> str:
    """The operating system's reason (connection refused, name or service not known), else httpx's."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror.lower()
        cause = cause.__cause__ or cause.__context__
    return str(exc) or type(exc).__name__


def byte_progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=console, transient=False)


def progress_callback(progress: Progress, label: str) -> Callable[[int, int], None]:
    task = progress.add_task(escape(label), total=None)
    return lambda done, total: progress.update(task, completed=done, total=total)


def watch_job(client: TvforgeClient, job_id: str) -> dict:
    """Follow the job's event stream with a progress bar until it ends; the finished job."""
    job = client.get_job(job_id)
    if job["status"] in FINISHED:
        return job
    with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                  TextColumn("{task.fields[info]}"), console=console) as progress:
        task = progress.add_task(f"job {escape(job_id)}", total=1.0, info=escape(job["status"]))
        cuts, logged = 0, None
        while job["status"] not in FINISHED:
            try:
                for _event, job in client.events(job_id):
                    cuts = 0
                    step = job["progress"]
                    fraction = step.get("fraction") or 0.0
                    info = " ".join(filter(None, [job["status"], step.get("stage"),
                                                  f"{step['step']}/{step['total']}" if step.get("total") else None]))
                    progress.update(task, completed=fraction, info=escape(info))
                    # Where no bar is drawn (a pipe, a CI log), a line at each new stage and tenth of the way.
                    if not console.is_terminal and logged != (mark := (job["status"], step.get("stage"),
                                                                       int(10 * fraction))):
                        console.print(f"job {escape(job_id)}: {escape(info)} ({fraction:.0%})", highlight=False)
                        logged = mark
            except (httpx.TransportError, ApiError) as exc:
                # The stream was cut or refused for now (an API restart, a proxy's timeout or 502, a rate limit):
                # the job runs on. Asked again (get_job retries, then gives up with the error) and followed anew,
                # waiting longer after each cut in a row.
                if isinstance(exc, ApiError) and exc.status not in RETRIED_STATUSES:
                    raise
                progress.update(task, info="event stream cut; reconnecting")
                time.sleep(min(STREAM_RECONNECT_MAX_S, STREAM_RECONNECT_S * 2**cuts))
                cuts += 1
            job = client.get_job(job_id)
    return job


def print_rows(rows: list[dict], columns: list[str], as_json: bool) -> None:
    """A table whose ids, kinds and statuses are never cut (they are copied into other commands, and a status cut
    to 'canc…' says nothing) while names, methods and times wrap; other columns that would not fit even so are
    left out from the right, with a note (--json has every field)."""
    if as_json:
        out.print_json(json.dumps(rows))
        return
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    longest = [max(len(text) for text in [column, *(row[index] for row in cells)])
               for index, column in enumerate(columns)]
    widths = [min(WRAPPED_MIN_WIDTH, width) if column in WRAPPING_COLUMNS else width
              for column, width in zip(columns, longest, strict=True)]
    shown = list(range(len(columns)))
    droppable = [index for index, column in enumerate(columns) if not _is_id(column)]
    while droppable and sum(widths[i] for i in shown) + COLUMN_PADDING * len(shown) + 1 > out.width:
        shown.remove(droppable.pop())  # from the right; ids stay
    table = Table(*(Column(columns[i], min_width=widths[i], overflow="fold") if columns[i] in WRAPPING_COLUMNS
                    else Column(columns[i], no_wrap=True, min_width=widths[i]) for i in shown))
    for row in cells:
        table.add_row(*(escape(row[i]) for i in shown))
    out.print(table)
    if left_out := [column for i, column in enumerate(columns) if i not in shown]:
        console.print(f"[dim]{', '.join(left_out)} left out at {out.width} columns; --json shows them[/]")


def _is_id(column: str) -> bool:
    return column == "id" or column.endswith("_id")


def _whole_column(header: str, cells: list[str]) -> Column:
    """Never cut, however narrow the terminal or the pipe."""
    return Column(header, no_wrap=True, min_width=max(len(text) for text in [header, *cells]))


WRAPPING_COLUMNS = {"name", "method", "architecture", "created_at", "finished_at"}
WRAPPED_MIN_WIDTH = 10  # a date, with its time on the next line
COLUMN_PADDING = 3  # a cell's padding and its border; the table adds one for its right edge
ISO_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str) and ISO_TIME.match(value):  # to the minute, in UTC as the API gives it
        return value[:16].replace("T", " ")
    return "-" if value is None else str(value)


# The query parameters each list route filters on (tests/test_cli.py checks them against the OpenAPI).
LIST_FILTERS = {"/v1/base-models": ("sha256",), "/v1/task-vectors": ("base_model_id", "sha256", "source_sha256"),
                "/v1/datasets": ("source_sha256",), "/v1/jobs": ("status", "kind"),
                "/v1/checkpoints": ("job_id", "sha256")}


def resource_app(name: str, path: str, columns: list[str], help_text: str) -> typer.Typer:
    """ls, show and rm of one kind of resource."""
    filters = LIST_FILTERS[path]
    app = typer.Typer(help=help_text, no_args_is_help=True)

    @app.command("ls")
    def ls(url: str = UrlOption, key: str = KeyOption,
           as_json: bool = typer.Option(False, "--json", help="JSON instead of a table."),
           where: list[str] = typer.Option([], "--where", "-w", metavar="FIELD=VALUE",
                                           help=f"Only those with this value of {', '.join(filters)}; "
                                                "repeatable.")) -> None:
        """List them all, oldest first."""
        selected = {}
        for item in where:
            field, equals, value = item.partition("=")
            if field not in filters or not equals:
                console.print(f"[red]--where takes FIELD=VALUE[/] with FIELD one of {', '.join(filters)}; "
                              f"not {escape(item)!r}")
                raise typer.Exit(2)
            selected[field] = value
        with api_errors(), open_client(url, key) as client:
            print_rows(list(client.iterate(path, **selected)), columns, as_json)

    @app.command("show")
    def show(resource_id: str, url: str = UrlOption, key: str = KeyOption) -> None:
        """Everything the server says about one."""
        with api_errors(), open_client(url, key) as client:
            out.print_json(json.dumps(client.get(f"{path}/{resource_id}")))

    @app.command("rm")
    def rm(resource_id: str, url: str = UrlOption, key: str = KeyOption) -> None:
        """Delete one (refused while a queued or running job uses it)."""
        with api_errors(), open_client(url, key) as client:
            client.delete(f"{path}/{resource_id}")
        console.print(f"deleted {name} {escape(resource_id)}")

    return app


models = resource_app("base model", "/v1/base-models", ["id", "name", "architecture", "parameter_count", "created_at"],
                      "Base models.")
vectors = resource_app("task vector", "/v1/task-vectors", ["id", "name", "base_model_id", "l2_norm", "created_at"],
                       "Task vectors.")
datasets = resource_app("dataset", "/v1/datasets", ["id", "name", "labeled", "source_format", "created_at"],
                        "Datasets.")
jobs = resource_app("job", "/v1/jobs", ["id", "kind", "method", "status", "created_at", "finished_at"], "Jobs.")
checkpoints = resource_app("checkpoint", "/v1/checkpoints", ["id", "job_id", "size_bytes", "created_at"],
                           "Merged checkpoints.")


@models.command("add")
def models_add(file: Path = typer.Argument(..., exists=True, dir_okay=False), name: str = typer.Option(None),
               architecture: str = typer.Option(None, help="An open_clip model name."),
               config: Path = typer.Option(None, exists=True, dir_okay=False, help="An open_clip config, JSON."),
               url: str = UrlOption, key: str = KeyOption) -> None:
    """Register a base model from a safetensors state dict."""
    if (architecture is None) == (config is None):  # the server's rule, before the file is sent
        console.print("[red]give exactly one of --config CFG.json or --architecture NAME[/]: the model the weights "
                      "are for")
        raise typer.Exit(2)
    try:
        config_value = json.loads(config.read_text(encoding="utf-8")) if config else None
    except ValueError as exc:  # not JSON, or not UTF-8
        console.print(f"[red]{escape(str(config))} is not a JSON config[/]: {escape(str(exc))}")
        raise typer.Exit(2) from None
    with api_errors(), open_client(url, key) as client, byte_progress() as progress:
        row = client.register_base_model(name or file.stem, file, architecture=architecture, config=config_value,
                                         progress=progress_callback(progress, f"upload {file.name}"))
    typer.echo(row["id"])


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [name.strip() for name in text.split(",")]


@vectors.command("add")
def vectors_add(file: Path = typer.Argument(..., exists=True, dir_okay=False),
                base: str = typer.Option(..., help="The base model's id."), name: str = typer.Option(None),
                finetuned: bool = typer.Option(False, help="The file holds fine-tuned weights, not tau."),
                class_names: str = typer.Option(None, help="The task's class names, comma-separated."),
                url: str = UrlOption, key: str = KeyOption) -> None:
    """Upload a task vector (or fine-tuned weights, with --finetuned)."""
    with api_errors(), open_client(url, key) as client, byte_progress() as progress:
        client.get(f"/v1/base-models/{base}")  # an unknown base is a 404 before the file is sent, not after
        row = client.upload_task_vector(base, name or file.stem, file, kind="finetuned" if finetuned else "task_vector",
                                        class_names=_names(class_names),
                                        progress=progress_callback(progress, f"upload {file.name}"))
    typer.echo(row["id"])


@vectors.command("download")
def vectors_download(vector_id: str, dest: str = DestArgument, url: str = UrlOption,
                     key: str = KeyOption) -> None:
    """Download a stored task vector (resumes an interrupted download)."""
    with api_errors(), open_client(url, key) as client, byte_progress() as progress:
        path = client.download_task_vector(vector_id, dest or f"{vector_id}.safetensors",
                                           progress=progress_callback(progress, vector_id))
    typer.echo(str(path))


@datasets.command("add")
def datasets_add(file: Path = typer.Argument(..., exists=True, dir_okay=False), name: str = typer.Option(None),
                 class_names: str = typer.Option(None, help="Comma-separated; their order gives the label ids."),
                 template: list[str] = typer.Option([], help="A zero-shot prompt template with {c}; repeatable."),
                 url: str = UrlOption, key: str = KeyOption) -> None:
    """Upload a dataset (npz, or a zip of class folders)."""
    with api_errors(), open_client(url, key) as client, byte_progress() as progress:
        row = client.upload_dataset(name or file.stem, file, class_names=_names(class_names),
                                    templates=template or None,
                                    progress=progress_callback(progress, f"upload {file.name}"))
    typer.echo(row["id"])


@jobs.command("watch")
def jobs_watch(job_id: str, url: str = UrlOption, key: str = KeyOption) -> None:
    """Follow a job's progress until it ends; exit status 1 unless it succeeded."""
    with api_errors(), open_client(url, key) as client:
        job = watch_job(client, job_id)
    report_job(job)
    if job["status"] != "succeeded":
        raise typer.Exit(1)


@jobs.command("cancel")
def jobs_cancel(job_id: str, url: str = UrlOption, key: str = KeyOption) -> None:
    """Ask a queued or running job to stop."""
    with api_errors(), open_client(url, key) as client:
        job = client.cancel_job(job_id)
    console.print(f"job {escape(job_id)}: {escape(job['status'])}, cancel requested")


@checkpoints.command("card")
def checkpoints_card(checkpoint_id: str, as_json: bool = typer.Option(False, "--json", help="JSON, not markdown."),
                     url: str = UrlOption, key: str = KeyOption) -> None:
    """The checkpoint's model card: recipe, input sha256s, software, chosen values, metrics, coefficients."""
    with api_errors(), open_client(url, key) as client:
        card = client.checkpoint_card(checkpoint_id, markdown=not as_json)
    if as_json:
        out.print_json(json.dumps(card))
    else:
        typer.echo(card)


@checkpoints.command("download")
def checkpoints_download(checkpoint_id: str, dest: str = DestArgument, url: str = UrlOption,
                         key: str = KeyOption) -> None:
    """Download a checkpoint (resumes an interrupted download, checks the sha256)."""
    with api_errors(), open_client(url, key) as client, byte_progress() as progress:
        path = client.download_checkpoint(checkpoint_id, dest or f"{checkpoint_id}.safetensors",
                                          progress=progress_callback(progress, checkpoint_id))
    typer.echo(str(path))


def report_job(job: dict, dataset_names: dict[str, str] | None = None) -> None:
    """What a finished job chose and measured, in a few lines (the server's text escaped, never read as markup);
    an evaluation's datasets by name too where dataset_names knows them."""
    console.print(f"job {escape(job['id'])}: [bold]{escape(job['status'])}[/]")
    if job.get("error"):
        console.print(f"[red]{escape(str(job['error'].get('title', 'error')))}[/]: "
                      f"{escape(str(job['error'].get('detail', '')))}")
    metrics = (job.get("result") or {}).get("metrics") or {}
    for name, chosen in (metrics.get("chosen") or {}).items():
        console.print(escape(f"  {name} = {chosen.get('value')} ({chosen.get('source')})"))
    if ((metrics.get("chosen") or {}).get("best_epoch") or {}).get("value") == 0:
        console.print("  [yellow]best_epoch 0 is the coefficients before training[/]: no epoch scored better on "
                      "the selection data, so the checkpoint keeps none of what was learned (the learning curve "
                      "shows each epoch)")
    evaluation = metrics.get("evaluation")
    if evaluation:
        datasets = evaluation.get("datasets", {})
        names = dataset_names or {}
        table = Table(_whole_column("dataset", list(datasets)), "name", "split", "accuracy", "normalised",
                      title="evaluation")
        for dataset_id, row in datasets.items():
            table.add_row(*(escape(_cell(v)) for v in (dataset_id, names.get(dataset_id), row.get("split"),
                                                       row.get("accuracy"), row.get("normalised_accuracy"))))
        console.print(table)
        if "mean_accuracy" in evaluation:
            console.print(escape(f"  mean accuracy {_cell(evaluation['mean_accuracy'])}"
                                 + (f", mean normalised {_cell(evaluation['mean_normalised_accuracy'])}"
                                    if "mean_normalised_accuracy" in evaluation else "")))


def submit_recipe_job(client: TvforgeClient, body: dict) -> JobInfo:
    """The recipe's job under an Idempotency-Key derived from its body and an attempt number: the job an
    attempt's key finds while it is queued, running, or succeeded with its checkpoint still stored; after one
    that failed, was cancelled or lost its checkpoint, the next attempt's key submits it again."""
    from tvforge.recipe import idempotency_key

    attempt = 0
    while True:
        job = client.create_job(body["method"], body["base_model_id"], body["task_vectors"], body["params"],
                                body["seed"], idempotency_key=idempotency_key(body, attempt),
                                start_checkpoint_id=body.get("start_checkpoint_id"))
        unusable = _unusable(client, job)
        if unusable is None:
            return job
        # Every later run passes this job too, and its next key finds the job submitted now.
        console.print(f"previous job {escape(job['id'])} {unusable}: submitting the recipe again under a new "
                      "Idempotency-Key")
        attempt += 1


def _unusable(client: TvforgeClient, job: JobInfo) -> str | None:
    """Why a job found by its Idempotency-Key cannot give the recipe's checkpoint; None if it can."""
    if job["status"] in ("failed", "cancelled"):
        return f"was {job['status']}"
    if job["status"] == "succeeded":
        try:
            client.get_checkpoint(job["result"]["checkpoint_id"])
        except ApiError as exc:
            if exc.status != 404:
                raise
            return "succeeded but its checkpoint was deleted"
    return None


def merge(recipe_file: Path = typer.Argument(..., exists=True, dir_okay=False, help="A recipe (YAML)."),
          output: str = typer.Option(None, "--output", "-o", help="Where the checkpoint goes (a directory: ending "
                                                                 "in /); default: the recipe's `output`, else "
                                                                 "<job id>.safetensors."),
          url: str = UrlOption, key: str = KeyOption) -> None:
    """Run a merge recipe: upload what it names (skipping files the server holds), submit the job, follow
    its progress, download the checkpoint."""
    from tvforge.recipe import RecipeError, RecipeRun, load_recipe

    try:
        recipe = load_recipe(recipe_file)
    except RecipeError as exc:
        console.print(f"[red]invalid recipe[/] {escape(str(exc))}")
        raise typer.Exit(2) from None
    root = recipe_file.resolve().parent
    with api_errors(), open_client(url, key) as client:
        with byte_progress() as progress:
            run = RecipeRun(client, recipe, root,
                            report=lambda u: console.print(escape(f"{u.what} {u.name}: {u.id}") +
                                                           (" (already on the server)" if u.reused else "")),
                            upload_progress=lambda label: progress_callback(progress, f"upload {label}"))
            body = run.resolve()
        job = submit_recipe_job(client, body)
        console.print(escape(f"job {job['id']} ({job['method']}): {job['status']}"))
        job = watch_job(client, job["id"])
        report_job(job, run.dataset_names)
        if job["status"] != "succeeded":
            raise typer.Exit(1)
        checkpoint_id = job["result"]["checkpoint_id"]
        with byte_progress() as progress:
            # A string, so that a directory's trailing slash survives (tvforge.client._file_in).
            dest = client.download_checkpoint(
                checkpoint_id, output or (os.path.join(root, recipe.output) if recipe.output
                                          else f"{job['id']}.safetensors"),
                progress=progress_callback(progress, f"download {checkpoint_id}"))
        card = dest.with_name(dest.name.removesuffix(".safetensors") + ".card.md")
        card.write_text(client.checkpoint_card(checkpoint_id, markdown=True))
        console.print(f"model card: {escape(str(card))}")
    typer.echo(str(dest))


def evaluate(checkpoint: str = typer.Option(None, "--checkpoint", help="The checkpoint to evaluate."),
             base: str = typer.Option(None, "--base", help="Or a base model, as it is (zero-shot)."),
             dataset: list[str] = typer.Option(..., "--dataset", "-d", help="A labelled dataset's id; repeatable."),
             split: str = typer.Option(None, help="train, val or test for every dataset; default: test, else val, "
                                                  "else train."),
             reference: list[str] = typer.Option([], "--reference", metavar="DATASET_ID=REFERENCE_ID",
                                                 help="Normalise a dataset's accuracy by a task vector's fine-tuned "
                                                      "model (tv_...) or a checkpoint (ckpt_...); repeatable."),
             as_json: bool = typer.Option(False, "--json", help="Print the finished job as JSON."),
             url: str = UrlOption, key: str = KeyOption) -> None:
    """Measure a checkpoint, or a base model zero-shot, on datasets: submit, follow, print the accuracies."""
    if (checkpoint is None) == (base is None):
        console.print("[red]give exactly one of --checkpoint ID or --base ID[/]")
        raise typer.Exit(2)
    references: dict[str, dict[str, str]] = {}
    for item in reference:
        dataset_id, equals, reference_id = item.partition("=")
        field = {"tv": "reference_task_vector_id", "ckpt": "reference_checkpoint_id"}.get(reference_id.split("_")[0])
        if not equals or field is None or dataset_id not in dataset or dataset_id in references:
            console.print(f"[red]--reference takes DATASET_ID=tv_... or DATASET_ID=ckpt_...[/], once for a dataset "
                          f"given with --dataset; not {escape(item)!r}")
            raise typer.Exit(2)
        references[dataset_id] = {field: reference_id}
    datasets = [{"dataset_id": dataset_id, **references.get(dataset_id, {}), **({"split": split} if split else {})}
                for dataset_id in dataset]
    with api_errors(), open_client(url, key) as client:
        # Named before the job: an unknown id is a 404 now, and a dataset deleted while it runs cannot fail a
        # finished evaluation's report.
        names = {dataset_id: client.get(f"/v1/datasets/{dataset_id}")["name"] for dataset_id in dataset}
        job = client.create_evaluation(datasets, checkpoint_id=checkpoint, base_model_id=base)
        console.print(escape(f"job {job['id']} (evaluation): {job['status']}"))
        job = watch_job(client, job["id"])
        report_job(job, names)
    if as_json:
        out.print_json(json.dumps(job))
    if job["status"] != "succeeded":
        raise typer.Exit(1)


recipe = typer.Typer(help="Merge recipes.", no_args_is_help=True)


@recipe.command("schema")
def recipe_schema() -> None:
    """The recipes' JSON Schema (for editors; also docs/recipe.schema.json)."""
    from tvforge.recipe import recipe_json_schema

    out.print_json(json.dumps(recipe_json_schema()))


@recipe.command("check")
def recipe_check(recipe_file: Path = typer.Argument(..., exists=True, dir_okay=False)) -> None:
    """Validate a recipe without contacting the server."""
    from tvforge.recipe import RecipeError, load_recipe

    try:
        parsed = load_recipe(recipe_file)
    except RecipeError as exc:
        console.print(f"[red]invalid recipe[/] {escape(str(exc))}")
        raise typer.Exit(2) from None
    console.print(escape(f"{recipe_file}: a valid {parsed.method} recipe with {len(parsed.vectors)} vector(s)"))


def register(cli: typer.Typer) -> None:
    cli.command()(merge)
    cli.command()(evaluate)
    cli.add_typer(recipe, name="recipe")
    for name, app in [("models", models), ("vectors", vectors), ("datasets", datasets), ("jobs", jobs),
                      ("checkpoints", checkpoints)]:
        cli.add_typer(app, name=name)
