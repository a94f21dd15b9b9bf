"""The HTTP API of ``textseg serve``, one FastAPI router per resource: ``service`` (health, models, workers),
``volumes`` (uploads), ``jobs`` (submit, state, cancel) and ``results`` (a finished job's files and
re-thresholds). Each route finds the server's state on ``request.app.state`` (see ``common``)."""
