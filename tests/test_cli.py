"""The user's command line and SDK against a real stack: `tvforge merge RECIPE.yaml`, resource commands,
retries through a proxy that loses answers, resumed downloads, and recipe validation."""
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import yaml
from safetensors.torch import load_file

from engine.methods.catalogue import METHODS
from engine.safetensors_io import save_tensors
from tests.conftest import REPO
from tests.flaky_proxy import FlakyProxy
from tvforge.client import TvforgeClient
from tvforge.demo import TINY_CLIP_CONFIG, build_demo_assets
from tvforge.docs import RECIPE_SCHEMA, recipe_schema_json
from tvforge.recipe import RECIPE

pytestmark = pytest.mark.integration
EXAMPLE = REPO / "examples" / "ties.yaml"


def tvforge(*args: str, stack=None, key: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    if stack is not None:
        env |= {"TVFORGE_URL": stack.url, "TVFORGE_API_KEY": key or stack.owner_key,
                "TVFORGE_CONFIG": "/nonexistent"}
    result = subprocess.run([sys.executable, "-m", "tvforge.cli", *args], env=env, cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"tvforge {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> Path:
    """examples/ties.yaml in a folder of its own, beside the assets `tvforge demo-assets` writes."""
    folder = tmp_path_factory.mktemp("example")
    shutil.copy(EXAMPLE, folder / "ties.yaml")
    tvforge("demo-assets", str(folder / "assets"))
    return folder / "ties.yaml"


def test_the_example_recipe_names_the_demo_assets_config():
    recipe = yaml.safe_load(EXAMPLE.read_text())
    assert recipe["base"]["config"] == TINY_CLIP_CONFIG


@pytest.fixture(scope="module")
def merged(stack, example) -> tuple[subprocess.CompletedProcess, Path]:
    """`tvforge merge` of the example, once: its output and the checkpoint's path."""
    result = tvforge("merge", str(example), stack=stack)
    return result, Path(result.stdout.strip().splitlines()[-1])


def test_merge_runs_the_example_and_the_checkpoint_loads_with_plain_open_clip(merged, example):
    result, output = merged
    assert output == example.parent / "merged-ties.safetensors"
    assert "job " in result.stderr and "succeeded" in result.stderr

    merged = load_file(str(output))
    model = open_clip.CLIP(**TINY_CLIP_CONFIG)
    model.load_state_dict(merged, strict=True)
    base = load_file(str(example.parent / "assets" / "base.safetensors"))
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert changed and all(k.startswith("visual.") for k in changed)
    image = torch.rand(2, 3, 32, 32)
    assert model.encode_image(image).shape == (2, TINY_CLIP_CONFIG["embed_dim"])


def test_merge_again_reuses_every_upload_and_the_same_job(stack, example, merged, tmp_path):
    with stack.client() as client:
        before = {path: len(list(client.iterate(path))) for path in ("/v1/base-models", "/v1/task-vectors",
                                                                      "/v1/jobs")}
        result = tvforge("merge", str(example), "-o", f"{tmp_path / 'into'}/", stack=stack)
        after = {path: len(list(client.iterate(path))) for path in before}
    assert after == before
    assert result.stderr.count("(already on the server)") == 4
    written = Path(result.stdout.strip())  # -o DIR/: the checkpoint in the directory, named by its id
    assert written.parent == tmp_path / "into" and written.read_bytes() == merged[1].read_bytes()


def test_a_recipe_that_renames_its_files_reuses_them_too(stack, example, merged):
    """The same base weights and vectors under other names: found by their bytes (and config, kind and class
    names), not uploaded again; the job is the same job, as its body names the same ids."""
    renamed = example.with_name("renamed.yaml")
    renamed.write_text(example.read_text().replace("name: tiny-clip", "name: my-clip")
                       .replace("task-a:", "first-task:"))
    with stack.client() as client:
        before = {path: len(list(client.iterate(path))) for path in ("/v1/base-models", "/v1/task-vectors")}
        result = tvforge("merge", str(renamed), "--output", str(example.with_name("renamed.safetensors")),
                         stack=stack)
        after = {path: len(list(client.iterate(path))) for path in before}
    assert after == before
    assert result.stderr.count("(already on the server)") == 4


def test_a_recipe_chains_onto_an_earlier_merge(stack, example, merged):
    """start_checkpoint_id in a recipe: task arithmetic written onto the example's TIES checkpoint."""
    _, first = merged
    with stack.client() as client:
        jobs = [job for job in client.iterate("/v1/jobs") if job["method"] == "ties" and job["status"] == "succeeded"]
    start_id = jobs[0]["result"]["checkpoint_id"]
    chained = example.parent / "chained.yaml"
    recipe = yaml.safe_load(example.read_text())
    recipe.update(method="task_arithmetic", params={"scaling": 0.5}, start_checkpoint_id=start_id,
                  output="merged-chained.safetensors")
    chained.write_text(yaml.safe_dump(recipe))
    output = Path(tvforge("merge", str(chained), stack=stack).stdout.strip().splitlines()[-1])
    start, result = load_file(str(first)), load_file(str(output))
    vectors = [load_file(str(example.parent / path)) for path in recipe["vectors"].values()]
    for name, tensor in start.items():
        delta = sum(vector[name].double() for vector in vectors if name in vector)
        torch.testing.assert_close(result[name].double(), tensor.double() + 0.5 * delta, rtol=1e-5, atol=1e-6)
    with stack.client() as client:
        job = next(job for job in client.iterate("/v1/jobs") if job["start_checkpoint_id"] == start_id)
    assert job["method"] == "task_arithmetic"


def test_merge_with_an_unknown_param_exits_2_naming_the_field_and_uploads_nothing(stack, example):
    bad = example.parent / "bad.yaml"
    recipe = yaml.safe_load(example.read_text())
    recipe["params"]["topk"] = 10
    recipe["params"]["merge"] = "median"
    bad.write_text(yaml.safe_dump(recipe))
    with stack.client() as client:
        before = len(list(client.iterate("/v1/task-vectors")))
        result = tvforge("merge", str(bad), stack=stack, check=False)
        assert len(list(client.iterate("/v1/task-vectors"))) == before
    assert result.returncode == 2
    assert "params.topk: unknown field" in result.stderr and "params.merge" in result.stderr


@pytest.mark.parametrize("change, message", [
    (lambda r: r.update(method="nope"), "method"),
    (lambda r: r["params"].update(validation_datasets={"task-z": "mnist"}), "'task-z' is not one of the recipe's"),
    (lambda r: r.update(datasets={"task-a": "a.npz"}), "share the name"),
    (lambda r: r["vectors"].update({"task-d": "missing.safetensors"}), "vectors.task-d: no file"),
    (lambda r: r["base"].pop("config"), "exactly one of architecture and config"),
])
def test_recipe_check_lists_what_is_wrong(example, change, message):
    recipe = yaml.safe_load(example.read_text())
    change(recipe)
    bad = example.parent / "bad-check.yaml"
    bad.write_text(yaml.safe_dump(recipe))
    result = tvforge("recipe", "check", str(bad), check=False)
    assert result.returncode == 2
    assert message in result.stderr


def test_published_recipe_schema_is_the_current_one_and_accepts_the_example():
    assert RECIPE_SCHEMA.read_text() == recipe_schema_json(), "run `python -m tvforge.docs`"
    published = json.loads(RECIPE_SCHEMA.read_text())
    RECIPE.validate_python(yaml.safe_load(EXAMPLE.read_text()))
    assert {m["properties"]["method"]["const"] for m in published["$defs"].values() if "method" in
            m.get("properties", {})} == set(METHODS)


def test_resource_commands_list_show_and_remove(stack, example, merged, tmp_path):
    vector = tmp_path / "extra.safetensors"
    shutil.copy(example.parent / "assets" / "task_vector_0.safetensors", vector)
    with stack.client() as client:
        base_id = next(iter(client.iterate("/v1/base-models")))["id"]
    vector_id = tvforge("vectors", "add", str(vector), "--base", base_id, "--name", "extra",
                        stack=stack).stdout.strip()
    listed = json.loads(tvforge("vectors", "ls", "--json", stack=stack).stdout)
    assert vector_id in {row["id"] for row in listed}
    shown = json.loads(tvforge("vectors", "show", vector_id, stack=stack).stdout)
    assert shown["sha256"] == hashlib.sha256(vector.read_bytes()).hexdigest()
    downloaded = tmp_path / "back.safetensors"
    tvforge("vectors", "download", vector_id, str(downloaded), stack=stack)
    assert downloaded.read_bytes() == vector.read_bytes()
    into = tvforge("vectors", "download", vector_id, f"{tmp_path / 'new'}/", stack=stack).stdout.strip()
    assert into == str(tmp_path / "new" / f"{vector_id}.safetensors")  # a directory to create: not a file "new"
    assert Path(into).read_bytes() == vector.read_bytes()
    tvforge("vectors", "rm", vector_id, stack=stack)
    missing = tvforge("vectors", "show", vector_id, stack=stack, check=False)
    assert missing.returncode == 1 and "404" in missing.stderr
    other = tvforge("vectors", "ls", "--json", stack=stack, key=stack.other_key)
    assert json.loads(other.stdout) == []
    succeeded = json.loads(tvforge("jobs", "ls", "--json", "--where", "status=succeeded", stack=stack).stdout)
    assert succeeded and {job["status"] for job in succeeded} == {"succeeded"}
    assert tvforge("jobs", "ls", "--where", "status=bogus", stack=stack, check=False).returncode == 1  # the API's 422
    assert tvforge("jobs", "ls", "--where", "limit=5", stack=stack, check=False).returncode == 2  # not a filter
    table = tvforge("jobs", "ls", stack=stack).stdout  # 80 columns (a pipe): ids and statuses whole
    assert all(job["id"] in table and job["status"] in table for job in succeeded)
    merged_sha256 = hashlib.sha256(merged[1].read_bytes()).hexdigest()
    listed = json.loads(tvforge("checkpoints", "ls", "--json", "--where", f"sha256={merged_sha256}",
                                stack=stack).stdout)
    assert listed and {checkpoint["sha256"] for checkpoint in listed} == {merged_sha256}
    with stack.client() as client:
        assert [c["id"] for c in client.list_checkpoints(job_id=listed[0]["job_id"])] == [listed[0]["id"]]
    assert json.loads(tvforge("checkpoints", "ls", "--json", stack=stack, key=stack.other_key).stdout) == []


def test_the_sdk_estimates_lists_and_describes_without_queueing(stack, long_job):
    """A dry run through the SDK, jobs filtered by status, an aTLAS job's learning curve, the method catalogue."""
    with stack.client() as client:
        job = client.wait_for_job(long_job(client, epochs=2)["id"])
        queued_before = len(list(client.list_jobs(status="queued")))
        estimate = client.estimate_job(job["method"], job["base_model_id"], job["task_vectors"], job["params"])
        assert estimate["valid"] and estimate["estimate"]["images"] > 0
        assert len(list(client.list_jobs(status="queued"))) == queued_before
        assert job["id"] in {j["id"] for j in client.list_jobs(status="succeeded", kind="merge")}
        assert [epoch["epoch"] for epoch in client.learning_curve(job["id"])["epochs"]] == [0, 1, 2]
        assert "atlas" in {method["name"] for method in client.methods()}


def _flaky_client(stack, decide) -> tuple[TvforgeClient, FlakyProxy]:
    proxy = FlakyProxy(stack.port, decide)
    client = TvforgeClient(proxy.url, stack.owner_key, backoff_s=0.05)
    client.http.headers["Connection"] = "close"  # one request per proxied connection: each is judged alone
    return client, proxy


def _lose_first(prefix: bytes, keep_bytes: int = 0):
    lost = []

    def decide(head: bytes) -> int | None:
        if head.startswith(prefix) and not lost:
            lost.append(head)
            return keep_bytes
        return None
    return decide


def test_a_job_whose_answer_is_lost_is_retried_with_its_key_and_runs_once(stack, demo_assets):
    client, proxy = _flaky_client(stack, _lose_first(b"POST /v1/jobs"))
    with client, stack.client() as direct:
        base = direct.register_base_model("flaky-base", demo_assets.base_path, config=demo_assets.config)
        vector = direct.upload_task_vector(base["id"], "flaky-v", demo_assets.vector_paths[0])
        jobs_before = len(list(direct.iterate("/v1/jobs")))
        job = client.create_job("task_arithmetic", base["id"], [vector["id"]], {"scaling": 0.5})
        assert proxy.cuts == 1
        assert len(list(direct.iterate("/v1/jobs"))) == jobs_before + 1
        assert direct.get_job(job["id"])["id"] == job["id"]
    proxy.close()


def test_an_upload_whose_answer_is_lost_is_found_not_repeated(stack, demo_assets):
    client, proxy = _flaky_client(stack, _lose_first(b"POST /v1/task-vectors"))
    with client, stack.client() as direct:
        base = direct.register_base_model("flaky-upload-base", demo_assets.base_path, config=demo_assets.config)
        row = client.upload_task_vector(base["id"], "lost-answer", demo_assets.vector_paths[1])
        named = [v for v in direct.iterate("/v1/task-vectors", base_model_id=base["id"]) if v["name"] == "lost-answer"]
    assert proxy.cuts == 1
    assert [v["id"] for v in named] == [row["id"]]
    proxy.close()


def test_a_finetuned_upload_whose_answer_is_lost_is_found_by_its_file_not_repeated(stack, demo_assets, tmp_path):
    """The server stores tau, not the fine-tuned file, but records the file's sha256 (source_sha256)."""
    base_state, tau = load_file(str(demo_assets.base_path)), load_file(str(demo_assets.vector_paths[2]))
    finetuned = tmp_path / "finetuned.safetensors"
    save_tensors(finetuned, {name: t + tau[name] if name in tau else t for name, t in base_state.items()})
    client, proxy = _flaky_client(stack, _lose_first(b"POST /v1/task-vectors"))
    with client, stack.client() as direct:
        base = direct.register_base_model("flaky-finetuned-base", demo_assets.base_path, config=demo_assets.config)
        row = client.upload_task_vector(base["id"], "lost-finetuned", finetuned, kind="finetuned")
        named = [v for v in direct.iterate("/v1/task-vectors", base_model_id=base["id"])
                 if v["name"] == "lost-finetuned"]
    assert proxy.cuts == 1
    assert [v["id"] for v in named] == [row["id"]] and row["source_kind"] == "finetuned"
    proxy.close()


def test_a_cut_download_resumes_with_range_and_checks_the_sha256(stack, merged, tmp_path):
    with stack.client() as direct:
        job = next(j for j in direct.iterate("/v1/jobs") if j["status"] == "succeeded" and j["kind"] == "merge")
        checkpoint = direct.get_checkpoint(job["result"]["checkpoint_id"])
    cut_at = checkpoint["size_bytes"] // 3
    client, proxy = _flaky_client(stack, _lose_first(b"GET /v1/checkpoints/" + checkpoint["id"].encode()
                                                     + b"/download", keep_bytes=cut_at))
    seen = []
    with client:
        dest = client.download_checkpoint(checkpoint["id"], tmp_path / "resumed.safetensors",
                                          progress=lambda done, total: seen.append(done))
    proxy.close()
    assert proxy.cuts == 1
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == checkpoint["sha256"]
    assert not (tmp_path / "resumed.safetensors.part").exists()
    assert seen[-1] == checkpoint["size_bytes"]


def test_sdk_typed_responses_match_the_live_openapi(stack):
    """Every TypedDict of the SDK declares exactly the fields of its schema in /openapi.json."""
    from typing import get_type_hints

    from tvforge import client as sdk

    with stack.client() as direct:
        openapi = direct.get("/openapi.json")
    schemas = openapi["components"]["schemas"]
    pairs = {"BaseModelInfo": "BaseModelOut", "TaskVectorInfo": "TaskVectorOut", "DatasetInfo": "DatasetOut",
             "JobInfo": "JobOut", "JobProgress": "ProgressOut", "CheckpointInfo": "CheckpointOut",
             "CoefficientsInfo": "CoefficientsOut", "LearningCurveInfo": "LearningCurveOut",
             "DryRunInfo": "DryRunOut", "MethodInfo": "MethodOut"}
    for typed, schema in pairs.items():
        assert set(get_type_hints(getattr(sdk, typed))) == set(schemas[schema]["properties"]), typed
    # `ls --where` takes exactly the filters of each list route
    from tvforge.user_commands import LIST_FILTERS

    for path, filters in LIST_FILTERS.items():
        queries = {p["name"] for p in openapi["paths"][path]["get"]["parameters"] if p["in"] == "query"}
        assert set(filters) == queries - {"limit", "cursor"}, path


def test_the_sdk_example_makes_the_checkpoint_the_recipe_makes(stack, example, merged, tmp_path):
    """examples/sdk_merge.py, run as the README says: the example recipe's merge through the SDK, to a directory
    it creates."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TVFORGE_URL": stack.url, "TVFORGE_API_KEY": stack.owner_key,
                        "TVFORGE_CONFIG": "/nonexistent"}
    result = subprocess.run([sys.executable, "examples/sdk_merge.py", str(example.parent / "assets"),
                             f"{tmp_path / 'merged'}/"], env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path.parent == tmp_path / "merged" and path.suffix == ".safetensors"
    from_sdk, from_recipe = load_file(path), load_file(merged[1])
    assert from_sdk.keys() == from_recipe.keys()
    assert all(torch.equal(from_sdk[name], from_recipe[name]) for name in from_sdk)


def test_demo_assets_are_what_build_demo_assets_writes(tmp_path):
    tvforge("demo-assets", str(tmp_path / "cli"))
    direct = build_demo_assets(tmp_path / "direct")
    for path in [direct.base_path, *direct.vector_paths]:
        assert (tmp_path / "cli" / path.name).read_bytes() == path.read_bytes()


def test_merge_writes_a_model_card_whose_provenance_is_in_the_checkpoint_itself(stack, merged, example):
    from engine.safetensors_io import read_header

    result, output = merged
    card_md = output.with_name("merged-ties.card.md").read_text()
    metadata = read_header(output).metadata
    recipe, inputs, software = (json.loads(metadata[k]) for k in ("tvforge.recipe", "tvforge.inputs",
                                                                  "tvforge.software"))
    assert recipe == {"method": "ties", "params": {"top_k": 20.0, "merge": "sum"}, "seed": 0}
    files = [example.parent / "assets" / f"task_vector_{i}.safetensors" for i in range(3)]
    assert [tv["sha256"] for tv in inputs["task_vectors"]] == [hashlib.sha256(f.read_bytes()).hexdigest()
                                                               for f in files]
    assert inputs["base_model"]["sha256"] == hashlib.sha256(
        (example.parent / "assets" / "base.safetensors").read_bytes()).hexdigest()
    assert software["torch"] == importlib.metadata.version("torch")
    for tv in inputs["task_vectors"]:
        assert tv["sha256"] in card_md
    assert "## Chosen values" in card_md and "| scaling |" in card_md

    with stack.client() as client:
        job = next(j for j in client.iterate("/v1/jobs") if j["method"] == "ties" and j["status"] == "succeeded")
        card = client.checkpoint_card(job["result"]["checkpoint_id"])
        assert card["recipe"] == recipe and card["inputs"] == inputs and card["software"] == software
        assert card["checkpoint"]["sha256"] == hashlib.sha256(output.read_bytes()).hexdigest()
        assert card["chosen"] == job["result"]["metrics"]["chosen"]


def test_watching_a_job_outlives_a_cut_event_stream(stack, long_job):
    """The first event stream is cut after its first bytes, as an API restart or a proxy's timeout does: the
    watch asks for the job and follows a new stream to the end (it used to end with 'cannot reach', exit 1)."""
    from tvforge.user_commands import watch_job

    cut = []

    def cut_the_first_stream(head: bytes) -> int | None:
        if b"/events " in head.split(b"\r\n", 1)[0] and not cut:
            cut.append(head)
            return 300  # the answer's head and the start of its first event
        return None

    client, proxy = _flaky_client(stack, cut_the_first_stream)
    with client:
        finished = watch_job(client, long_job(client, epochs=3)["id"])
    proxy.close()
    assert finished["status"] == "succeeded" and proxy.cuts == 1


def test_watching_a_job_waits_out_a_gateway_that_refuses_its_stream(stack, long_job):
    """The first two event streams get a gateway's 502 and a rate limit's 429 (as during an API restart behind a
    proxy): the watch waits and follows a new stream to the end; it used to exit with the 502."""
    from tvforge.user_commands import watch_job

    answers = [b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Type: application/problem+json\r\n"
               b"Content-Length: 2\r\nConnection: close\r\n\r\n{}",
               b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: application/problem+json\r\nContent-Length: 2\r\n"
               b"Connection: close\r\n\r\n{}"]

    def refuse_the_first_streams(head: bytes) -> bytes | None:
        return answers.pop() if b"/events " in head.split(b"\r\n", 1)[0] and answers else None

    client, proxy = _flaky_client(stack, refuse_the_first_streams)
    with client:  # long enough to be running when the watch opens its stream, whatever else the worker did
        finished = watch_job(client, long_job(client, epochs=30)["id"])
    proxy.close()
    assert finished["status"] == "succeeded" and proxy.cuts == 2 and not answers


def test_a_watch_not_on_a_terminal_writes_its_progress_as_lines_as_it_goes(stack, long_job, capsys):
    """No bar is drawn into a pipe or a CI log: a line at each stage and tenth of the way instead (it used to say
    nothing until the job ended). Watched from its submission, the job is seen running."""
    from tvforge.user_commands import watch_job

    with stack.client() as client:
        finished = watch_job(client, long_job(client, epochs=30)["id"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith(f"job {finished['id']}: ")]
    assert finished["status"] == "succeeded"
    assert len(lines) >= 2 and any(line.startswith(f"job {finished['id']}: running ") for line in lines), lines


def test_local_mistakes_are_one_line_and_exit_2(tmp_path):
    """A config that is not JSON, a base model with no config or architecture (refused before its upload), a
    recipe that is not UTF-8, a key made before the database exists: a message, no traceback, and no empty
    database file left behind."""
    env = {"TVFORGE_DATA_DIR": str(tmp_path / "data"), "TVFORGE_DATABASE_URL": ""}
    (tmp_path / "base.safetensors").write_bytes(b"x")
    (tmp_path / "config.json").write_text("{embed_dim: 64")
    (tmp_path / "recipe.yaml").write_bytes(b"base: \xff\xfe")
    for args, message in ((["models", "add", str(tmp_path / "base.safetensors"), "--config",
                            str(tmp_path / "config.json"), "--key", "k"], "is not a JSON config"),
                          (["models", "add", str(tmp_path / "base.safetensors"), "--key", "k"],
                           "exactly one of --config"),
                          (["recipe", "check", str(tmp_path / "recipe.yaml")], "not UTF-8"),
                          (["keys", "create", "--owner", "x"], "tvforge migrate")):
        result = subprocess.run([sys.executable, "-m", "tvforge.cli", *args], env=os.environ | env, cwd=REPO,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "data" / "tvforge.db").exists()


def example_zip(folder: Path) -> Path:
    """A zip of class folders of images (what zip datasets are), one image each."""
    import io
    import zipfile

    from PIL import Image

    path = folder / "images.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for name in ("red", "green"):
            image = io.BytesIO()
            Image.new("RGB", (8, 8), name).save(image, "PNG")
            archive.writestr(f"{name}/0.png", image.getvalue())
    return path


def test_uploads_from_the_command_line_take_class_names_and_templates(stack, tmp_path):
    import numpy as np

    dataset = tmp_path / "colours.npz"
    np.savez(dataset, images=np.zeros((2, 8, 8, 3), np.uint8), labels=np.array([0, 1]))
    dataset_id = tvforge("datasets", "add", str(dataset), "--class-names", "red, green", "--template",
                         "a photo of {c}.", "--template", "{c}", stack=stack).stdout.strip()
    shown = json.loads(tvforge("datasets", "show", dataset_id, stack=stack).stdout)
    assert shown["class_names"] == ["red", "green"] and shown["templates"] == ["a photo of {c}.", "{c}"]
    # What a recipe reuses (tvforge.recipe): the same file under any name, only with the same prompts and labels.
    sha, templates = hashlib.sha256(dataset.read_bytes()).hexdigest(), ["a photo of {c}.", "{c}"]
    with stack.client() as client:
        assert client.find_equivalent_dataset(sha, None, templates, "renamed")["id"] == dataset_id
        assert client.find_equivalent_dataset(sha, ["red", "green"], templates, "colours")["id"] == dataset_id
        assert client.find_equivalent_dataset(sha, None, ["a blurry photo of {c}."], "colours") is None
        assert client.find_equivalent_dataset(sha, None, None, "colours") is None  # the service's templates
        assert client.find_equivalent_dataset(sha, ["green", "red"], templates, "colours") is None
    # An npz carrying its own templates, uploaded without any: a recipe that names none finds it again.
    from tvforge.recipe import npz_templates

    carrying = tmp_path / "carrying.npz"
    np.savez(carrying, images=np.zeros((2, 8, 8, 3), np.uint8), labels=np.array([0, 1]),
             class_names=np.array(["red", "green"]), templates=np.array(["a {c} thing."]))
    carrying_id = tvforge("datasets", "add", str(carrying), stack=stack).stdout.strip()
    assert npz_templates(carrying) == ["a {c} thing."] and npz_templates(example_zip(tmp_path)) is None
    with stack.client() as client:
        found = client.find_equivalent_dataset(hashlib.sha256(carrying.read_bytes()).hexdigest(), None,
                                               npz_templates(carrying), "carrying")
    assert found is not None and found["id"] == carrying_id


def test_evaluate_measures_a_checkpoint_from_the_command_line(stack, merged, tmp_path):
    import numpy as np

    dataset = tmp_path / "shades.npz"
    np.savez(dataset, images=np.random.default_rng(0).integers(0, 255, (4, 8, 8, 3), dtype=np.uint8),
             labels=np.array([0, 1, 0, 1]))
    dataset_id = tvforge("datasets", "add", str(dataset), "--class-names", "dark,light", stack=stack).stdout.strip()
    with stack.client() as client:
        sha256 = hashlib.sha256(merged[1].read_bytes()).hexdigest()
        checkpoint = next(c for c in client.list_checkpoints() if c["sha256"] == sha256)
        reference = client.get_job(checkpoint["job_id"])["task_vectors"][0]
    result = tvforge("evaluate", "--checkpoint", checkpoint["id"], "--dataset", dataset_id,
                     "--reference", f"{dataset_id}={reference}", "--json", stack=stack)
    finished = json.loads(result.stdout)
    row = finished["result"]["metrics"]["evaluation"]["datasets"][dataset_id]
    assert finished["kind"] == "evaluation" and row["images"] == 4 and 0.0 <= row["accuracy"] <= 1.0
    assert "reference_accuracy" in row and "shades" in result.stderr  # the table names the dataset
    for args, message in ((["--dataset", dataset_id], "exactly one of"),
                          (["--base", "bm_x", "--dataset", dataset_id, "--reference", f"{dataset_id}=x_1"],
                           "--reference takes")):
        refused = tvforge("evaluate", *args, stack=stack, check=False)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
