"""One module per step's Celery task, kept thin (decode the message, call a ``pipeline.job`` step, record state,
send what comes next):

- ``ingest``: ``omniq.ingest`` (media queue) — probe, plan, decode, send the infer units
- ``infer``: ``omniq.infer`` (GPU queue) — a batch of chunks through the model; the last one sends the summary
- ``summarize``: ``omniq.summarize`` (GPU queue) — the file summary, then the finalize
- ``finalize``: ``omniq.finalize`` (media queue) — the result files, the manifest, the end of the job
- ``base``: :class:`~workers.steps.base.OmniqTask`, what they all share (leases, duplicates, retries, deadlines)
- ``failures``: what ends a unit for good (failed rows, or a failed job); ``flow``: sending the next units

``workers.tasks`` gathers them (Celery loads that module; other code imports from it).
"""
