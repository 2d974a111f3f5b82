"""The Redis side of webhooks: the RQ queue ``webhooks`` and the cluster-wide debounce markers.

Jobs are enqueued by dotted path (``workers.webhooks.deliver``) with the delivery as a plain
dict: ``sockudo`` never imports ``workers``. Retries are RQ's own and scheduled, never
slept: after a retryable failure the job returns ``rq.Retry(interval=[wait])`` with the
policy's next wait (``rq worker --with-scheduler`` runs it when due). The ``Retry`` attached
at enqueue is a separate, small allowance for attempts lost to a crashed work-horse.
No gevent here.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from rq import Queue, Retry
from rq.job import Job

from .webhook_delivery import RedisDeadLetters
from .webhook_metrics import QueueStats
from .webhooks import RQ_JOB, RQ_QUEUE, Delivery, RetryPolicy

logger = logging.getLogger(__name__)

RESULT_TTL_S = 300  # a finished job is kept this long (the worker reads its outcome, then it expires)
FAILURE_TTL_S = 7 * 24 * 3600  # jobs RQ itself failed; the worker turns them into dead letters
# Retries RQ itself may spend when a work-horse dies mid-attempt or the job raises (a bug, a
# Redis hiccup). HTTP failures never use them: the job returns its own Retry for those.
CRASH_ALLOWANCE = 3


def rq_retry(policy: RetryPolicy) -> Retry:
    wait = policy.initial_backoff_ms / 1000.0
    return Retry(max=CRASH_ALLOWANCE, interval=[wait * (2 ** i) for i in range(CRASH_ALLOWANCE)])


def job_data(delivery: Delivery) -> Any:
    return Queue.prepare_data(
        RQ_JOB,
        args=(delivery.to_payload(),),
        timeout=delivery.job_timeout_s,
        result_ttl=RESULT_TTL_S,
        failure_ttl=FAILURE_TTL_S,
        # RQ logs the description; the default would print the body and the signature.
        description=f"webhook delivery {delivery.delivery_id} app {delivery.app_id}",
        retry=rq_retry(delivery.retry),
    )


class RqQueue:
    """Enqueues deliveries for RQ workers; one job per endpoint batch."""

    backend = "redis"

    def __init__(self, client: Any, prefix: str, name: str = RQ_QUEUE, dead_letter_limit: int = 10_000) -> None:
        self.client = client
        self.queue = Queue(name, connection=client)
        self.dead_letters = RedisDeadLetters(client, prefix, dead_letter_limit)

    def enqueue(self, deliveries: list[Delivery]) -> None:
        """Raises RedisError/OSError when Redis cannot take them; the caller keeps them."""
        if not deliveries:
            return
        with self.client.pipeline() as pipe:
            self.queue.enqueue_many([job_data(d) for d in deliveries], pipeline=pipe)
            pipe.execute()

    def stats(self) -> QueueStats:
        q = self.queue
        pipe = self.client.pipeline(transaction=False)
        pipe.llen(q.key)
        pipe.zcard(q.scheduled_job_registry.key)
        pipe.zcard(q.started_job_registry.key)
        pipe.zcard(self.dead_letters.index_key)
        pipe.lindex(q.key, 0)
        ready, delayed, active, dead, head = pipe.execute()
        age = 0.0
        if head is not None:
            job_id = head.decode() if isinstance(head, bytes) else head
            enqueued = self.client.hget(Job.key_for(job_id), "enqueued_at")
            if enqueued:
                from rq.utils import utcparse

                age = max(0.0, time.time() - utcparse(enqueued.decode()).timestamp())
        return QueueStats(self.backend, q.name, {"ready": ready, "delayed": delayed, "active": active,
                                                 "dead_letter": dead}, age)


# -- debounce markers ------------------------------------------------------------------------

_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisMarkers:
    """Pending-leave markers shared by every node: a leave on node A and a rejoin on node B
    inside the window cancel each other.

    ``mark`` writes this leave's token (``SET PX``; a newer leave replaces an older one, whose
    timer then finds someone else's token and sends nothing). ``cancel`` is the rejoin:
    ``DEL`` answering 1 means a leave was pending. ``release`` is the timer: compare-and-delete
    of its own token, 1 = still pending, send it."""

    def __init__(self, client: Any, prefix: str) -> None:
        self.client = client
        self.prefix = f"{prefix}pending:"
        self._release = client.register_script(_RELEASE_LUA)

    def mark(self, key: str, token: str, ttl_ms: int) -> None:
        self.client.set(self.prefix + key, token, px=ttl_ms)

    def cancel(self, key: str) -> bool:
        return bool(self.client.delete(self.prefix + key))

    def release(self, key: str, token: str) -> bool:
        return bool(self._release(keys=[self.prefix + key], args=[token]))
