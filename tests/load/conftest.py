"""The live server of tests/fuzz (a real uvicorn in a thread, the tiny model, real objects), for the load check."""

from tests.fuzz.conftest import live

__all__ = ["live"]
