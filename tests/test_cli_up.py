"""`tvforge up` when the API cannot serve: it exits with the API's status, never says it is up, and leaves
nothing running."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.services import free_port

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]


def run_up(tmp_path: Path, api_port: int) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`tvforge up` on throw-away state, to its end; what it printed and the processes it left running."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TVFORGE_DATA_DIR": str(tmp_path / "var"),
                        "TVFORGE_API_PORT": str(api_port), "TVFORGE_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0",
                        "TVFORGE_TORCH_THREADS": "1"}
    up = subprocess.Popen([sys.executable, "-m", "tvforge.cli", "up"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True)
    stdout, stderr = up.communicate(timeout=180)
    leftovers = subprocess.run(["pgrep", "-s", str(up.pid)], capture_output=True, text=True).stdout.split()
    return subprocess.CompletedProcess(up.args, up.returncode, stdout, stderr), leftovers


def test_up_exits_with_the_api_status_when_the_api_cannot_bind_its_port(tmp_path):
    # Bound, not listening, without SO_REUSEADDR: nothing answers on the port, and uvicorn's bind fails.
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        result, leftovers = run_up(tmp_path, held.getsockname()[1])
    # uvicorn's own status for a failed startup (3), passed on
    assert result.returncode != 0, result.stderr[-3000:]
    assert f"the API exited with status {result.returncode} before serving" in result.stderr
    assert "tvforge is up" not in result.stdout
    assert leftovers == [], f"processes left running: {leftovers}"


def test_up_refuses_a_port_another_server_answers_on(tmp_path):
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        result, leftovers = run_up(tmp_path, other.getsockname()[1])
    assert result.returncode == 1
    assert "something already listens on 127.0.0.1:" in result.stderr
    assert "tvforge is up" not in result.stdout
    assert leftovers == []
