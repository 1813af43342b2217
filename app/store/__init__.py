"""Durable stores (SQLite): what the server keeps across requests and restarts. Synchronous and
pure of the event loop: the HTTP layer calls them from a worker thread."""
