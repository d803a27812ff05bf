"""Where the SDK and the CLI find their server and key (tvforge.client.load_config): the same rules for both."""
import pytest

from tvforge.client import TvforgeClient, load_config
from tvforge.settings import get_settings


@pytest.fixture
def embedded(tmp_path, monkeypatch):
    """A data dir where `tvforge up` left its admin key, and no server or key set anywhere else."""
    (tmp_path / "admin.key").write_text("tvf_admin\n")
    for name in ("TVFORGE_URL", "TVFORGE_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TVFORGE_CONFIG", str(tmp_path / "absent.toml"))
    monkeypatch.setenv("TVFORGE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("TVFORGE_API_PORT", "8123")
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


def test_with_nothing_set_the_sdk_talks_to_the_embedded_service_with_its_admin_key(embedded):
    with TvforgeClient.from_config() as client:
        assert str(client.http.base_url) == "http://127.0.0.1:8123"
        assert client.http.headers["Authorization"] == "Bearer tvf_admin"


def test_the_embedded_service_named_by_its_url_gets_its_admin_key(embedded):
    for url in ("http://127.0.0.1:8123", "http://localhost:8123/"):
        assert load_config(url=url).api_key == "tvf_admin"


def test_another_server_never_gets_the_embedded_admin_key(embedded, monkeypatch):
    for url in ("https://merges.example.com", "http://127.0.0.1:9000", "http://10.0.0.7:8123"):
        with pytest.raises(ValueError, match="no API key"):
            load_config(url=url)
    monkeypatch.setenv("TVFORGE_URL", "https://merges.example.com")
    with pytest.raises(ValueError, match="no API key"):
        load_config()
    (embedded / "config.toml").write_text('url = "https://merges.example.com"\n')
    monkeypatch.delenv("TVFORGE_URL")
    with pytest.raises(ValueError, match="no API key"):
        load_config(path=embedded / "config.toml")


def test_a_key_given_wins_over_the_embedded_one(embedded, monkeypatch):
    monkeypatch.setenv("TVFORGE_API_KEY", "tvf_mine")
    assert load_config().api_key == "tvf_mine"


def test_a_url_that_does_not_parse_is_no_key_not_a_traceback(embedded):
    with pytest.raises(ValueError, match="no API key"):
        load_config(url="http://host:port")
