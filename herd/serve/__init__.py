"""`herd serve`: the OpenAI-compatible HTTP server (app.py: routes and handlers; worker.py: the engine thread per
model; gate.py: the API key and body size before a body is read; inputs.py, stream.py: a request's way in and out;
schemas.py, limits.py, metrics.py) and its load generator (bench.py)."""
