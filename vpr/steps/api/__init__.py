"""The HTTP localisation service (``vpr api``): FastAPI over the live release, hot-swapped.

``app`` (routes), ``live`` (the served release and its hot swap), ``batcher`` (micro-batching),
``serve`` (uvicorn), ``client`` (``vpr locate --api``). Nothing is imported here, so the client
loads without torch.
"""
