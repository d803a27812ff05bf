"""A checkpoint read just before a concurrent delete removed its job (and it): a 404, not a 500."""
import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from app.deps import base_model_of
from app.problems import Problem
from store.models import Base, Checkpoint


def test_a_checkpoint_whose_job_is_gone_is_not_found():
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        read_before_the_delete = Checkpoint(id="ckpt_0123456789abcdef", job_id="job_0123456789abcdef")
        with pytest.raises(Problem) as raised:
            base_model_of(session, read_before_the_delete)
    assert raised.value.status == 404 and "ckpt_0123456789abcdef" in raised.value.detail
