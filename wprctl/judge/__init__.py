"""Pairwise LLM judging: templates, verdict parsing, the request layer, cache, cost, statistics,
the run itself, and a local OpenAI-compatible server for tests and the offline demo.

Modules import lazily (the `openai` client only when a run starts) so `wprctl --help` stays fast.
"""
