"""How omniq keeps its promise when machines die or work hangs: nothing accepted is lost, nothing runs for ever.

- ``leases``: a running unit of work holds a Redis lease, renewed by a thread while its process lives; a holder
  that died is known by its expired lease (or, on the same host, by its dead pid), and its death is counted on
  the unit (poison work ends at ``OMNIQ_MAX_WORKER_DEATHS``).
- ``watchdog``: a thread in every worker, one sweeping at a time, that finds units whose lease is gone
  (``recovery.decide``, a pure function of the job's state) or whose message was lost (``deliveries``: fetched
  by a worker that died before starting it) and sends them again; it also rebuilds job state from the store
  when Redis lost its data (``restore``, also ``omniq recover``).
- ``deadlines``: a step past its deadline (``pipeline.deadlines``: derived from its work) is stopped for real:
  its ffmpeg killed and its unit counted like a death, or, for a model call that hangs, the GPU worker counts the
  death, hands back its other work and starts again in place.
- ``lifecycle``: the Celery signals that start the watchdog, take a GPU message's lease on receipt, install the
  deadline enforcement, hand work back at shutdown, and restart a worker in place.

A unit that ends for good fails only its rows when it can (``workers.steps.failures.give_up``: the job ends
``partial``), else its job. ``pipeline.failpoints`` (``OMNIQ_FAILPOINTS``) makes rows fail and calls hang on
real workers, to test all of this.
"""
