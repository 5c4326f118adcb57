"""Serving routed bundles over an OpenAI-compatible HTTP API (optional extras: `serve`, `ray`).

Files (one owner each): protocol.py (OpenAI schemas, errors, response builders), prompts.py (requests -> token
ids), batcher.py (dynamic batching on one worker thread), engine.py (the local engine: route, queue, respond),
app.py (FastAPI routes + the local backend), gateway.py (route here, generate on an upstream engine),
routing_only.py (tokenizer + embedding table + router, no backbone), ray_app.py (Ray Serve deployments),
runner.py (uvicorn: forever, or in a thread), launch.py (what `ariadne serve` calls).
"""
