"""The serving service: one shared base with per-request LoRA adapters, dynamic batching, hot-swap.

Request path (read top to bottom): `routes/*` validate and tokenise -> `batcher.Batcher.submit`
puts rows on a bounded queue -> the batcher thread forms token-budget batches and calls
`runtime.Runtime.forward` -> the future resolves and the route shapes the response.
"""
