"""The queue's view of a study's job, read with one HGET: what enqueue_study and the ingest's
'is a run in progress' check decide on. Real Redis."""

from __future__ import annotations

import uuid

import pytest
from rq import Queue
from rq.job import Job, JobStatus

from orchestrator.queue import jobs as jobqueue

pytestmark = pytest.mark.integration


def test_a_study_is_queued_once_while_its_job_waits_or_runs(redis_url: str) -> None:
    redis = jobqueue.connect(redis_url)
    name = f"medtriage-job-status-{uuid.uuid4().hex[:6]}"
    study = uuid.uuid4()
    key = Job.key_for(jobqueue.job_id(study))
    try:
        assert jobqueue.job_status(redis, study) is None
        assert jobqueue.enqueue_study(redis, name, study, job_timeout_s=60)
        assert jobqueue.job_status(redis, study) == JobStatus.QUEUED
        assert not jobqueue.enqueue_study(redis, name, study, job_timeout_s=60)
        assert Queue(name, connection=redis).count == 1
        assert not jobqueue.job_running(redis, study)
        redis.hset(key, "status", JobStatus.STARTED.value)  # what a worker sets on taking it
        assert jobqueue.job_running(redis, study)
        assert not jobqueue.enqueue_study(redis, name, study, job_timeout_s=60)
        # Finished (RQ lets the record expire after RESULT_TTL_S): queued again, as a job of
        # its own that does not expire with the old record.
        queue = Queue(name, connection=redis)
        redis.lrem(queue.key, 0, jobqueue.job_id(study))  # taken by a worker, which ran it
        redis.hset(key, "status", JobStatus.FINISHED.value)
        redis.expire(key, jobqueue.RESULT_TTL_S)
        assert jobqueue.enqueue_study(redis, name, study, job_timeout_s=60)
        assert jobqueue.job_status(redis, study) == JobStatus.QUEUED
        assert redis.ttl(key) == -1  # no expiry
        redis.hset(key, "status", "no-such-status")
        assert jobqueue.job_status(redis, study) is None
    finally:
        Queue(name, connection=redis).empty()
        redis.delete(key)
