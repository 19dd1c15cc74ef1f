"""Shared fixtures live in tests/fixtures_*.py, one file per area."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

pytest_plugins = [p for p in ("fixtures_core", "fixtures_models", "fixtures_brokers", "fixtures_userdata")
                  if os.path.exists(os.path.join(os.path.dirname(__file__), p + ".py"))]
