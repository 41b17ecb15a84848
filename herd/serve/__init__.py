"""`herd serve`: the OpenAI-compatible HTTP server (app.py: routes and handlers; worker.py: the engine thread per
model; inputs.py, stream.py: a request's way in and out; schemas.py, metrics.py) and its load generator (bench.py)."""
