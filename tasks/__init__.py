"""Prefect tasks: thin wrappers that call one :mod:`dpops.pipeline.stages` function each.

Every task returns references (paths, hashes, ids, metrics), never records, and none persists its
result or caches (Prefect would otherwise pickle results to local storage). Tasks that read
private data have no retries: a retry would read the data again without a new charge.
"""

from prefect.cache_policies import NO_CACHE

#: Options shared by every dpops task.
TASK_OPTIONS = dict(persist_result=False, cache_policy=NO_CACHE, retries=0, log_prints=False)
