"""The user commands against a real stack where they used to go wrong: re-running a recipe whose job failed,
was cancelled or lost its checkpoint, a server that cannot be reached, where the server and key come from,
downloads into a directory, ids in narrow tables and server text that looks like Rich markup."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tests.services import free_port
from tvforge.demo import TINY_CLIP_CONFIG, build_demo_assets
from tvforge.recipe import RecipeRun, idempotency_key, load_recipe

pytestmark = pytest.mark.integration


def tvforge(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    """The CLI with only the server, key and settings env names (none inherited from the caller's shell)."""
    clean = {k: v for k, v in os.environ.items() if k not in ("TVFORGE_URL", "TVFORGE_API_KEY")}
    result = subprocess.run([sys.executable, "-m", "tvforge.cli", *args], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env=clean | {"HF_HUB_OFFLINE": "1", "TVFORGE_CONFIG": "/nonexistent",
                                                      "COLUMNS": "80"} | env)
    if check and result.returncode != 0:
        raise AssertionError(f"tvforge {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def at(stack) -> dict[str, str]:
    return {"TVFORGE_URL": stack.url, "TVFORGE_API_KEY": stack.owner_key}


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli-server")
    build_demo_assets(folder / "assets")
    return folder


def recipe_at(folder: Path, name: str, scaling: float, output: str) -> Path:
    """A task arithmetic recipe of two demo vectors; the scaling makes its job body its own."""
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "base": {"path": "assets/base.safetensors", "name": "tiny-clip", "config": TINY_CLIP_CONFIG},
        "vectors": {"a": "assets/task_vector_0.safetensors", "b": "assets/task_vector_1.safetensors"},
        "method": "task_arithmetic", "params": {"scaling": scaling}, "output": output}))
    return path


def test_merge_runs_a_recipe_again_after_its_job_was_cancelled_or_its_checkpoint_deleted(stack, assets):
    recipe = recipe_at(assets, "rerun", 0.25, "rerun/merged.safetensors")  # rerun/ does not exist yet
    with stack.client() as client:
        body = RecipeRun(client, load_recipe(recipe), assets, report=lambda _: None).resolve()
        # With no worker the job stays queued, so cancelling it cancels it at once.
        stack.kill_worker(stack.workers[-1])
        try:
            first = client.create_job(body["method"], body["base_model_id"], body["task_vectors"], body["params"],
                                      body["seed"], idempotency_key=idempotency_key(body, 0))
            assert client.cancel_job(first["id"])["status"] == "cancelled"
        finally:
            stack.start_worker()

        rerun = tvforge("merge", str(recipe), env=at(stack))
        assert f"previous job {first['id']} was cancelled: submitting the recipe again" in rerun.stderr
        assert Path(rerun.stdout.strip().splitlines()[-1]) == assets / "rerun" / "merged.safetensors"
        recipe_jobs = [j for j in client.iterate("/v1/jobs") if j["params"] == {"scaling": 0.25}]
        assert sorted(j["status"] for j in recipe_jobs) == ["cancelled", "succeeded"]

        # Succeeded with its checkpoint: found again, not repeated.
        again = tvforge("merge", str(recipe), env=at(stack))
        assert f"job {next(j['id'] for j in recipe_jobs if j['status'] == 'succeeded')} (task_arithmetic): " \
            "succeeded" in again.stderr
        assert len([j for j in client.iterate("/v1/jobs") if j["params"] == {"scaling": 0.25}]) == 2

        succeeded = next(j for j in recipe_jobs if j["status"] == "succeeded")
        tvforge("checkpoints", "rm", succeeded["result"]["checkpoint_id"], env=at(stack))
        lost = tvforge("merge", str(recipe), env=at(stack))
        assert f"previous job {succeeded['id']} succeeded but its checkpoint was deleted" in lost.stderr
        assert len([j for j in client.iterate("/v1/jobs") if j["params"] == {"scaling": 0.25}]) == 3
    assert (assets / "rerun" / "merged.safetensors").is_file()


@pytest.fixture(scope="module")
def merged(stack, assets) -> dict:
    """A recipe merged once: its file and its succeeded job."""
    recipe = recipe_at(assets, "once", 0.5, "once.safetensors")
    tvforge("merge", str(recipe), env=at(stack))
    with stack.client() as client:
        job = next(j for j in client.iterate("/v1/jobs") if j["params"] == {"scaling": 0.5})
    return {"recipe": recipe, "job": job}


def test_downloads_into_a_directory_name_the_file_after_the_checkpoint(stack, merged, tmp_path):
    checkpoint_id = merged["job"]["result"]["checkpoint_id"]
    (tmp_path / "folder").mkdir()
    printed = tvforge("checkpoints", "download", checkpoint_id, str(tmp_path / "folder"), env=at(stack))
    assert printed.stdout.strip() == str(tmp_path / "folder" / f"{checkpoint_id}.safetensors")
    assert (tmp_path / "folder" / f"{checkpoint_id}.safetensors").is_file()

    (tmp_path / "out").mkdir()
    merge = tvforge("merge", str(merged["recipe"]), "-o", str(tmp_path / "out"), env=at(stack))
    assert merge.stdout.strip().splitlines()[-1] == str(tmp_path / "out" / f"{checkpoint_id}.safetensors")
    assert (tmp_path / "out" / f"{checkpoint_id}.card.md").is_file()

    nested = tmp_path / "new" / "deeper" / "c.safetensors"
    tvforge("checkpoints", "download", checkpoint_id, str(nested), env=at(stack))
    assert nested.is_file()
    assert not list(tmp_path.rglob("*.part"))


def test_an_unreachable_server_is_one_line_naming_it_and_why(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    build_demo_assets(tmp_path / "assets")
    for args in (["models", "ls"], ["merge", str(recipe_at(tmp_path, "r", 0.1, "x.safetensors"))]):
        result = tvforge(*args, "--url", url, "--key", "any", env={}, check=False)
        assert result.returncode == 1
        assert result.stderr.strip() == f"cannot reach {url}: connection refused"


def test_a_key_without_a_url_goes_to_the_configured_port_as_the_demo_does(stack, tmp_path):
    settings = {"TVFORGE_API_PORT": str(stack.port), "TVFORGE_DATA_DIR": str(tmp_path / "var")}
    listed = tvforge("models", "ls", "--json", "--key", stack.owner_key, env=settings)
    assert listed.returncode == 0
    demo = tvforge("demo", "--workdir", str(tmp_path / "demo"), env=settings | {"TVFORGE_API_KEY": stack.owner_key})
    assert "demo passed" in demo.stdout


def test_the_demo_without_a_key_exits_2_as_the_other_commands_do(tmp_path):
    result = tvforge("demo", "--workdir", str(tmp_path / "demo"), env={"TVFORGE_DATA_DIR": str(tmp_path / "var")},
                     check=False)
    assert result.returncode == 2
    assert "no API key" in result.stderr and "Traceback" not in result.stderr


def test_tables_print_ids_whole_in_80_columns(stack, merged):
    with stack.client() as client:
        vectors = list(client.iterate("/v1/task-vectors"))
    listed = tvforge("vectors", "ls", env=at(stack))  # piped: 80 columns
    assert vectors and all(v["id"] in listed.stdout and v["base_model_id"] in listed.stdout for v in vectors)
    assert max(len(line) for line in listed.stdout.splitlines()) <= 80


def test_server_text_is_printed_as_it_is_never_read_as_markup(stack, assets, merged):
    with stack.client() as client:
        vector = client.upload_task_vector(merged["job"]["base_model_id"], "odd[/x]",
                                           assets / "assets" / "task_vector_2.safetensors")
    wide = tvforge("vectors", "ls", env=at(stack) | {"COLUMNS": "200"})
    assert f"{vector['id']} │ odd[/x]" in wide.stdout
    missing = tvforge("models", "show", "bm_[red]x", env=at(stack), check=False)
    assert missing.returncode == 1 and "No base model with id 'bm_[red]x'" in missing.stderr


def test_a_recipe_with_a_finetuned_vector_uploads_it_once(stack, assets, tmp_path):
    """The server stores the fine-tuned file's tau under another sha256; it finds the file by source_sha256."""
    from safetensors.torch import load_file

    from engine.safetensors_io import save_tensors

    base, tau = load_file(str(assets / "assets" / "base.safetensors")), \
        load_file(str(assets / "assets" / "task_vector_2.safetensors"))
    save_tensors(assets / "assets" / "finetuned_2.safetensors",
                 {name: t + tau[name] if name in tau else t for name, t in base.items()})
    recipe = assets / "finetuned.yaml"
    recipe.write_text(yaml.safe_dump({
        "base": {"path": "assets/base.safetensors", "name": "tiny-clip", "config": TINY_CLIP_CONFIG},
        "vectors": {"a": "assets/task_vector_0.safetensors",
                    "tuned": {"path": "assets/finetuned_2.safetensors", "kind": "finetuned"}},
        "method": "task_arithmetic", "params": {"scaling": 0.35}, "output": "finetuned/merged.safetensors"}))
    tvforge("merge", str(recipe), env=at(stack))
    again = tvforge("merge", str(recipe), env=at(stack))
    with stack.client() as client:
        tuned = [v for v in client.iterate("/v1/task-vectors") if v["name"] == "tuned"]
        jobs = [j for j in client.iterate("/v1/jobs") if j["params"] == {"scaling": 0.35}]
    assert len(tuned) == 1 and tuned[0]["source_kind"] == "finetuned"
    assert len(jobs) == 1 and jobs[0]["status"] == "succeeded"
    assert "tuned" in again.stderr and again.stderr.count("(already on the server)") == 3  # base, a, tuned


def test_an_event_stream_that_goes_silent_is_given_up_not_waited_on_forever(monkeypatch):
    """A server that answers the stream's headers and then writes nothing (a half-open connection): the SDK
    raises once it has heard nothing for EVENTS_SILENCE_S (the real server writes a keep-alive every 15 s)."""
    import socket
    import threading

    import httpx

    from tvforge import client as sdk

    monkeypatch.setattr(sdk, "EVENTS_SILENCE_S", 1.0)
    server = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def answer_headers_then_nothing():
        connection, _ = server.accept()
        accepted.append(connection)
        connection.recv(65536)
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")

    threading.Thread(target=answer_headers_then_nothing, daemon=True).start()
    try:
        with sdk.TvforgeClient(f"http://127.0.0.1:{server.getsockname()[1]}", "key", retries=1) as client, \
                pytest.raises(httpx.ReadTimeout):
            list(client.events("job_0"))
    finally:
        for connection in accepted:
            connection.close()
        server.close()
