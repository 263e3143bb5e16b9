"""`/v1/models`: base models from the models dir (ids with `/`), fine-tunes and checkpoints (ids with `:`) with their
lineage, retrieve, delete, and ownership."""

from __future__ import annotations

import openai
import pytest

from tests.app.conftest import TINY, TINY_SLASHED, Backend, FineTune, TrainedRun, make_fine_tune


def test_base_models_are_listed_and_retrievable(backend: Backend) -> None:
    client = backend.client()
    listed = {m.id: m for m in client.models.list()}
    assert {TINY, TINY_SLASHED} <= listed.keys()
    base = listed[TINY]
    assert (base.object, base.owned_by, base.model_extra["root"], base.model_extra["parent"]) == (  # type: ignore[index]
        "model", "system", TINY, None)
    assert base.model_extra["max_model_len"] == 512  # type: ignore[index]
    assert client.models.retrieve(TINY_SLASHED).id == TINY_SLASHED  # sent as test-org%2Ftiny-chat
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("test-org/nope")
    assert e.value.code == "model_not_found"


def test_fine_tunes_and_checkpoints_with_lineage(backend: Backend, fine_tune: FineTune) -> None:
    client = backend.client(fine_tune.key)
    listed = {m.id: m.model_extra or {} for m in client.models.list()}
    assert listed[fine_tune.model]["parent"] == TINY
    for ckpt in fine_tune.checkpoints:
        assert listed[ckpt]["parent"] == fine_tune.model and listed[ckpt]["root"] == TINY
    retrieved = client.models.retrieve(fine_tune.checkpoints[0])
    assert retrieved.id == fine_tune.checkpoints[0] == f"{fine_tune.model}:ckpt-step-2"
    assert fine_tune.model == f"ft:{TINY}:unit:{fine_tune.job_id}"
    assert retrieved.model_extra["kind"] == "checkpoint"  # type: ignore[index]


def test_other_keys_models_are_invisible(backend: Backend, fine_tune: FineTune) -> None:
    other = backend.client(backend.other_key)
    assert fine_tune.model not in [m.id for m in other.models.list()]
    for model_id in (fine_tune.model, *fine_tune.checkpoints):
        with pytest.raises(openai.NotFoundError):
            other.models.retrieve(model_id)
        with pytest.raises(openai.NotFoundError):
            other.models.delete(model_id)


def test_delete_a_fine_tune_and_its_checkpoints(backend: Backend, trained_run: TrainedRun) -> None:
    key = backend.new_key()
    made = make_fine_tune(backend, trained_run, key, suffix="doomed")
    client = backend.client(key)
    assert client.chat.completions.create(model=made.model, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=2).choices  # loaded in the cache, then evicted by the delete
    deleted = client.models.delete(made.model)
    assert (deleted.id, deleted.deleted) == (made.model, True)
    for model_id in (made.model, *made.checkpoints):
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve(model_id)
    assert made.model not in backend.ctx.inference.cache.loaded()
    assert not (backend.settings.jobs_dir / made.job_id / "adapter").exists()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=made.model, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.PermissionDeniedError) as e:
        client.models.delete(TINY)
    assert e.value.code == "model_not_deletable"


def test_two_requests_that_both_find_a_new_model_directory_both_succeed(backend: Backend) -> None:
    """Issue 15: two concurrent `GET /v1/models` each found a directory with no row and both inserted it; the second
    INSERT was a 500. Here request A read the rows before B committed its insert (A's read sees none)."""
    from app.services import models

    settings = backend.settings
    with backend.ctx.sessions() as a, backend.ctx.sessions() as b:
        models.sync_base_models(session=b, settings=settings)  # B: every base model has its row, committed
        a.scalars = lambda *_, **__: iter([])  # type: ignore[method-assign,assignment,return-value]
        models.sync_base_models(session=a, settings=settings)  # A inserts them all again: nothing breaks
    ids = [m.id for m in backend.client().models.list()]
    assert ids.count(TINY) == 1
