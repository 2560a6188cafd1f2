"""omniq's pure pipeline: media probing, chunk planning, extraction, model inference and assembly.

Nothing in this package imports Celery; every stage can be called and tested in-process.
"""

__version__ = "0.1.0"
