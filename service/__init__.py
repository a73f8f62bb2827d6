"""The serving service: one shared base with per-request LoRA adapters, dynamic batching, hot-swap.

Processes: `python -m service` supervises one engine process (service/supervisor.py) and runs
--frontends HTTP front-end processes on one port. Request path (read top to bottom):
front-end `routes/*` validate -> `client.EngineClient.infer` tokenises (the engine's fast tokenizer)
and sends token ids over a Unix socket (`transport`) -> `engine.Engine` (engine process) hands the job to
`batcher.Batcher.submit` -> the batcher thread forms token-budget batches and calls
`runtime.Runtime.forward` -> the job's callback writes the logits back -> the front-end's event loop
resolves the request's future and the route shapes the response (orjson).
"""
