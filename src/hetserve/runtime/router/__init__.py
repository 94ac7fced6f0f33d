"""``hetserve route``: a plan's routing as a standalone OpenAI-compatible proxy in front of the servers
that run its instances (vLLM, SGLang or ``hetserve serve``). ``backends``: the servers, their load and
health; ``proxy``: choosing, retrying, streaming and P/D's two steps; ``stats``: its metrics; ``app``: the HTTP
server and its health checks; ``cli``: the command."""
