"""Celery workers that run composition jobs. The SQL row is the truth; the broker carries only job ids."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
