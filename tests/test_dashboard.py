"""The dashboard (/ui) rendered by a real headless browser (Debian's chromium) against a running stack."""
import re
import shutil
import subprocess

import numpy as np
import pytest

from tests.conftest import register_long_job_inputs

pytestmark = pytest.mark.integration
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def render(url: str, screenshot: str | None = None) -> str:
    """The page's DOM once its scripts and their API calls have run."""
    assert CHROMIUM, "the dashboard test needs Debian's chromium (scripts/test installs it as root)"
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--virtual-time-budget=15000", "--window-size=1280,1600"]
    args += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    result = subprocess.run([*args, url], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.fixture(scope="module")
def atlas_job(stack, demo_assets, tmp_path_factory) -> dict:
    """A finished aTLAS job (entropy on the tiny assets, 3 epochs) and the names of its inputs."""
    with stack.client() as client:
        ids = register_long_job_inputs(client, demo_assets, tmp_path_factory.mktemp("ui"))
        job = client.create_job("atlas", ids["base"], ids["vectors"], {
            "objective": "entropy", "target_dataset_id": ids["dataset"], "epochs": 3, "batch_size": 16})
        job = client.wait_for_job(job["id"], timeout_s=300)
        assert job["status"] == "succeeded", job["error"]
        coefficients = client.coefficients(job["id"])
    return {"job": job, "ids": ids, "coefficients": coefficients}


def test_job_page_shows_recipe_accuracy_heatmap_and_curves(stack, atlas_job):
    job, coefficients = atlas_job["job"], atlas_job["coefficients"]
    dom = render(f"{stack.url}/ui/#/jobs/{job['id']}?key={stack.owner_key}")
    assert f"Job {job['id']}" in dom and 'class="status succeeded"' in dom
    recipe = re.search(r'<pre id="recipe">(.*?)</pre>', dom, re.S).group(1)
    assert '"method": "atlas"' in recipe and '"objective": "entropy"' in recipe
    # One cell per (task vector, block), each carrying its learned value.
    cells = [float(v) for v in re.findall(r'<rect class="cell"[^>]*data-value="([^"]+)"', dom)]
    expected = [v for row in coefficients["values"] for v in row]
    assert len(cells) == len(expected) == len(coefficients["task_vectors"]) * len(coefficients["blocks"])
    assert cells == pytest.approx(expected)
    labels = re.findall(r'<text class="block-label"[^>]*>([^<]+)</text>', dom)
    assert "rb0.attn.qkv.w" in labels and not any(label.startswith("visual.") for label in labels)
    assert re.findall(r'<text class="vector-label"[^>]*>([^<]+)</text>', dom) == ["v0", "v1", "v2"]
    # Accuracy per task: the target dataset, by name, with its split.
    table = re.search(r'<table id="evaluation-table">(.*?)</table>', dom, re.S).group(1)
    assert f'data-dataset-id="{atlas_job["ids"]["dataset"]}"' in table and "<td>target</td>" in table
    assert 'id="loss-curve"' in dom and 'class="series"' in dom
    assert 'id="download"' in dom


def test_jobs_and_resource_pages_list_what_the_owner_has(stack, atlas_job):
    dom = render(f"{stack.url}/ui/#/jobs?key={stack.owner_key}")
    assert f'data-job-id="{atlas_job["job"]["id"]}"' in dom
    models = render(f"{stack.url}/ui/#/models?key={stack.owner_key}")
    assert f'data-id="{atlas_job["ids"]["base"]}"' in models and "lifecycle-base" in models
    vectors = render(f"{stack.url}/ui/#/vectors?key={stack.owner_key}")
    assert all(f'data-id="{v}"' in vectors for v in atlas_job["ids"]["vectors"])
    assert "<th>lora_rank</th>" in vectors and "<td>dense</td>" in vectors
    datasets = render(f"{stack.url}/ui/#/datasets?key={stack.owner_key}")
    assert f'data-id="{atlas_job["ids"]["dataset"]}"' in datasets


def test_another_owner_sees_none_of_it_and_a_bad_key_gets_the_sign_in_form(stack, atlas_job):
    other = render(f"{stack.url}/ui/#/jobs/{atlas_job['job']['id']}?key={stack.other_key}")
    assert 'id="page-error"' in other and "404" in other and 'id="heatmap"' not in other
    refused = render(f"{stack.url}/ui/#/jobs?key=not-a-key")
    assert 'id="login-form"' in refused and "That key was refused" in refused


def test_ui_page_is_served_with_a_strict_content_security_policy(stack):
    import httpx

    response = httpx.get(f"{stack.url}/ui/")
    assert response.status_code == 200 and "dashboard.js" in response.text
    assert "script-src 'self'" in response.headers["content-security-policy"]
    assert httpx.get(f"{stack.url}/ui/static/dashboard.js").status_code == 200


def test_an_atlas_card_carries_its_coefficients_table(stack, atlas_job):
    with stack.client() as client:
        checkpoint_id = atlas_job["job"]["result"]["checkpoint_id"]
        card = client.checkpoint_card(checkpoint_id)
        markdown = client.checkpoint_card(checkpoint_id, markdown=True)
    assert card["coefficients"]["values"] == atlas_job["coefficients"]["values"]
    assert card["recipe"]["method"] == "atlas" and card["recipe"]["params"]["objective"] == "entropy"
    table = markdown.split("## Learned coefficients (block)")[1].split("## Software")[0]
    rows = [line for line in table.splitlines() if line.startswith("| tv_")]
    assert len(rows) == 3 and all(len(r.split("|")) == len(atlas_job["coefficients"]["blocks"]) + 3 for r in rows)


def test_datasets_page_shows_each_split_with_its_image_count(stack, tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "two-splits.npz"
    np.savez(path, train_images=rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8), train_labels=np.arange(6) % 2,
             test_images=rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8), test_labels=np.arange(4) % 2,
             class_names=np.array(["a", "b"]))
    with stack.client() as client:
        dataset = client.upload_dataset("two-splits", path)
    assert {name: split["count"] for name, split in dataset["splits"].items()} == {"train": 6, "test": 4}
    dom = render(f"{stack.url}/ui/#/datasets?key={stack.owner_key}")
    row = re.search(rf'<tr data-id="{dataset["id"]}">(.*?)</tr>', dom, re.S).group(1)
    assert "<td>train 6, test 4</td>" in row


def test_a_job_whose_checkpoint_was_deleted_says_so_and_an_evaluation_shows_its_request(stack, atlas_job):
    """The job keeps naming its deleted checkpoint: no download button that would 404 in silence. An evaluation's
    recipe is the request that made it, not a merge's fields with method null."""
    with stack.client() as client:
        merged = client.wait_for_job(client.create_job("task_arithmetic", atlas_job["ids"]["base"],
                                                       atlas_job["ids"]["vectors"][:1])["id"])
        checkpoint_id = merged["result"]["checkpoint_id"]
        evaluation = client.wait_for_job(client.create_evaluation(
            [{"dataset_id": atlas_job["ids"]["dataset"]}], checkpoint_id=checkpoint_id)["id"])
        client.delete(f"/v1/checkpoints/{checkpoint_id}")
    dom = render(f"{stack.url}/ui/#/jobs/{merged['id']}?key={stack.owner_key}")
    assert 'id="checkpoint-deleted"' in dom and 'id="download"' not in dom and 'id="page-error"' not in dom
    dom = render(f"{stack.url}/ui/#/jobs/{evaluation['id']}?key={stack.owner_key}")
    recipe = re.search(r'<pre id="recipe">(.*?)</pre>', dom, re.S).group(1)
    assert f'"checkpoint_id": "{checkpoint_id}"' in recipe and '"method"' not in recipe
